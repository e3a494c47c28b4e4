"""Grain pipeline: packed windows vs a concatenation reference, boundaries, weights, resume, sharding, val."""

import itertools
import json

import grain
import numpy as np
import pytest

from mantis_jax import config as C
from mantis_jax.data import factworld as fw
from mantis_jax.data import pipeline, sources
from mantis_jax.data.sources import DataError
from mantis_jax.data.tokenizer import Tokenizer

T, B = 32, 4


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(fw.World(0, 300).tokenizer_sample(300), 400)


def _config(**data):
    cfg = C.default_config()
    cfg.data.seq_len, cfg.data.batch_size = T, B
    cfg.data.factworld_entities, cfg.data.factworld_docs, cfg.data.factworld_val_docs = 300, 60, 6
    cfg.data.answer_loss_weight = 3.0
    cfg.data.packing = "concat"
    for k, v in data.items():
        cfg.data[k] = v
    return C.validate(cfg)


def _reference_rows(tok, src, order, n_rows):
    """Documents in `order`, each <bos> ids <eos>, concatenated and cut into rows of T + 1."""
    stream, need = [], n_rows * (T + 1)
    for i in order:
        stream += [tok.bos_id] + src[i].tolist() + [tok.eos_id]
        if len(stream) >= need:
            break
    return np.asarray(stream[:need]).reshape(n_rows, T + 1)


@pytest.fixture(scope="module")
def setup(tok):
    cfg = _config()
    ds = pipeline.make_datasets(cfg, tok)
    it = iter(ds.train)
    return cfg, ds, [next(it) for _ in range(6)]


def test_batches_are_packed_windows_of_the_shuffled_documents(tok, setup):
    cfg, ds, batches = setup
    for b in batches:
        assert {k: (v.dtype, v.shape) for k, v in b.items()} == {
            "inputs": (np.int32, (B, T)), "targets": (np.int32, (B, T)),
            "loss_mask": (np.float32, (B, T)), "answer_mask": (np.float32, (B, T))}
    src = sources.open_source(cfg, tok)
    order = list(itertools.islice(grain.MapDataset.range(len(src))[0::1].shuffle(seed=0).repeat(None), 200))
    assert sorted(order[:len(src)]) == list(range(len(src)))  # an epoch is a permutation
    assert order[:len(src)] != list(range(len(src)))
    ref = _reference_rows(tok, src, order, 6 * B)
    got_in = np.concatenate([b["inputs"] for b in batches])
    got_tg = np.concatenate([b["targets"] for b in batches])
    np.testing.assert_array_equal(got_in, ref[:, :-1])
    np.testing.assert_array_equal(got_tg, ref[:, 1:])


def test_loss_mask_at_boundaries_and_on_answers(tok, setup):
    _, _, batches = setup
    for b in batches:
        for row in range(B):
            inputs, targets = b["inputs"][row], b["targets"][row]
            lm, am = b["loss_mask"][row], b["answer_mask"][row]
            # The <bos> opening the next document is not predicted; everything else is.
            np.testing.assert_array_equal(lm == 0, targets == tok.bos_id)
            # Answer weights where the answer mask of the window (targets side) says so.
            ref = tok.answer_mask(np.concatenate([inputs[:1], targets]))[1:]
            # The window may start mid-line (inside an answer): compare from the first line break on.
            first_break = np.flatnonzero(np.isin(inputs, tok._newline_ids) | (inputs == tok.eos_id))
            if first_break.size:
                k = first_break[0]
                np.testing.assert_array_equal(am[k:], ref[k:])
            np.testing.assert_array_equal(lm[am > 0], 3.0)
            np.testing.assert_array_equal(lm[(am == 0) & (lm > 0)], 1.0)
    answers = [tok.decode(b["targets"][r][b["answer_mask"][r] > 0], skip_special=False)
               for b in batches for r in range(B)]
    assert sum(a.count("\n") + a.count("<|eos|>") for a in answers) > 10


def test_iterator_resume(tok, setup):
    cfg, ds, batches = setup
    it = iter(ds.train)
    for _ in range(2):
        next(it)
    state = pipeline.iterator_state_to_json(it)
    json.loads(state)
    rest = [next(it) for _ in range(4)]
    for got, want in zip(rest, batches[2:]):
        np.testing.assert_array_equal(got["inputs"], want["inputs"])
    fresh = pipeline.make_datasets(cfg, tok)  # as after a restart: new objects, same config
    resumed = pipeline.restore_iterator_state(iter(fresh.train), state)
    for want in rest:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_first_fit_packing_keeps_documents_whole(tok):
    cfg = _config(packing="first_fit", seq_len=256, factworld_max_entities=1)
    src = sources.open_source(cfg, tok)
    whole = {tuple([tok.bos_id] + src[i].tolist() + [tok.eos_id]) for i in range(len(src))}
    assert max(len(d) for d in whole) <= 257  # every test document fits a window
    ds = pipeline.make_datasets(cfg, tok)
    assert pipeline.resolve_packing(_config(packing="auto")) == "first_fit"
    assert pipeline.resolve_packing(_config(packing="auto", source="text")) == "concat"
    it = iter(ds.train)
    batches = [next(it) for _ in range(4)]
    seen, padding = set(), 0
    for b in batches:
        for r in range(B):
            row = np.concatenate([b["inputs"][r], b["targets"][r, -1:]])
            real = row[row != tok.pad_id]
            assert (row[len(real):] == tok.pad_id).all()  # padding only at the end
            padding += len(row) - len(real)
            starts = np.flatnonzero(real == tok.bos_id).tolist() + [len(real)]
            assert starts[0] == 0
            for a, z in zip(starts, starts[1:]):
                assert tuple(real[a:z].tolist()) in whole  # each segment is one whole document
                seen.add(tuple(real[a:z].tolist()))
            assert (b["loss_mask"][r][b["targets"][r] == tok.pad_id] == 0).all()
    assert len(seen) > 4 * B and padding < 0.5 * 4 * B * 257
    state = it.get_state()  # resume mid-stream
    want = [next(it) for _ in range(2)]
    resumed = pipeline.restore_iterator_state(iter(pipeline.make_datasets(cfg, tok).train), json.dumps(state))
    for w in want:
        np.testing.assert_array_equal(next(resumed)["inputs"], w["inputs"])
    long_docs = pipeline.SplitLongDocument(10).flat_map({"tokens": np.arange(25), "answer": np.zeros(25)})
    assert [len(x["tokens"]) for x in long_docs] == [10, 10, 5]
    np.testing.assert_array_equal(np.concatenate([x["tokens"] for x in long_docs]), np.arange(25))


def test_iterator_state_in_an_orbax_checkpoint(tok, setup, tmp_path):
    import orbax.checkpoint as ocp

    cfg, _, batches = setup
    it = iter(pipeline.make_datasets(cfg, tok).train)
    next(it)
    handlers = {"data": grain.checkpoint.CheckpointHandler()}
    with ocp.CheckpointManager(str(tmp_path / "ckpt"), item_handlers=handlers) as mngr:
        mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    restored = iter(pipeline.make_datasets(cfg, tok).train)
    with ocp.CheckpointManager(str(tmp_path / "ckpt"), item_handlers=handlers) as mngr:
        mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    np.testing.assert_array_equal(next(restored)["inputs"], batches[1]["inputs"])


def test_each_process_reads_its_own_shard(tok):
    cfg = _config()
    src = sources.open_source(cfg, tok)
    rows = []
    for p in range(2):
        ds = pipeline.make_datasets(cfg, tok, process_index=p, process_count=2)
        assert ds.batch_size == B // 2
        b = next(iter(ds.train))
        order = list(itertools.islice(grain.MapDataset.range(len(src))[p::2].shuffle(seed=0).repeat(None), 50))
        ref = _reference_rows(tok, src, order, B // 2)
        np.testing.assert_array_equal(b["inputs"], ref[:, :-1])
        rows.append(order[:len(src) // 2])
    assert set(rows[0]).isdisjoint(rows[1]) and set(rows[0]) | set(rows[1]) == set(range(len(src)))
    with pytest.raises(DataError, match="divisible"):
        pipeline.make_datasets(_config(batch_size=3), tok, process_count=2)


def test_curriculum_ramps_contrast_and_tail_documents_in(tok):
    cfg = _config(factworld_contrast=1.0, factworld_tail_questions=1.0, factworld_curriculum_docs=40,
                  factworld_max_facts=40)
    src = sources.open_source(cfg, tok)
    ramp = sources.CurriculumDocument(src, 40)
    assert [ramp.hardness(p) for p in (0, 19, 39, 40, 500)] == [1 / 40, 0.5, 1.0, 1.0, 1.0]
    assert sources.CurriculumDocument(src, 40, process_count=2).hardness(10) == 21 / 40
    # The same shuffled order as without a curriculum; document p generated at its position's hardness.
    order = list(itertools.islice(grain.MapDataset.range(len(src)).shuffle(seed=0).repeat(None), 200))
    stream, need = [], 6 * B * (T + 1)
    for p, i in enumerate(order):
        stream += [tok.bos_id] + src.tokens(i, ramp.hardness(p)).tolist() + [tok.eos_id]
        if len(stream) >= need:
            break
    ref = np.asarray(stream[:need]).reshape(6 * B, T + 1)
    it = iter(pipeline.make_datasets(cfg, tok).train)
    got = np.concatenate([next(it)["inputs"] for _ in range(6)])
    np.testing.assert_array_equal(got, ref[:, :-1])
    assert not np.array_equal(src.tokens(order[0], ramp.hardness(0)), src.tokens(order[0]))  # the ramp acts
    state = it.get_state()  # resume inside the ramp gives the same next batch
    expected = next(it)["inputs"]
    again = iter(pipeline.make_datasets(cfg, tok).train)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["inputs"], expected)
    with pytest.raises(C.ConfigError, match="factworld_curriculum_docs"):
        _config(factworld_curriculum_docs=-1)


def test_validation_batches_are_padded_and_fixed(tok, setup):
    _, ds, _ = setup
    val = ds.val_batches()
    assert val and all(v["inputs"].shape == (B, T) for v in val)
    again = ds.val_batches()
    for a, b in zip(val, again):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    last = val[-1]
    pad = last["targets"] == tok.pad_id
    assert pad.any() and (last["loss_mask"][pad] == 0).all()  # the stream ends inside the last batch
    assert len(ds.val_batches(max_batches=1)) == 1


def test_val_split_and_val_file(tok, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(fw.World(0, 300).iter_documents("train", 0, 40)))
    common = dict(source="text", path=str(text), cache_dir=str(tmp_path / "c"), answer_loss_weight=1.0)
    ds = pipeline.make_datasets(_config(val_split=0.25, **common), tok)
    windows = [np.concatenate([v["inputs"][r], v["targets"][r, -1:]]) for v in ds.val_batches() for r in range(B)]
    val_text = tok.decode(np.concatenate(windows), skip_special=False)
    docs = list(fw.World(0, 300).iter_documents("train", 0, 40))
    assert docs[-1] in val_text and docs[0] not in val_text  # the last 10 documents are held out
    batch = next(iter(ds.train))
    assert (batch["loss_mask"] <= 1.0).all()
    (tmp_path / "val.txt").write_text(docs[0])
    ds = pipeline.make_datasets(_config(val_file=str(tmp_path / "val.txt"), **common), tok)
    first_row = tok.decode(ds.val_batches()[0]["inputs"][0])
    assert len(first_row) > 20 and docs[0].startswith(first_row)
    cfg = _config(**common)
    cfg.data.val_split, cfg.data.val_file = 0.1, str(tmp_path / "val.txt")
    with pytest.raises(DataError, match="both set"):
        pipeline.make_datasets(cfg, tok)
    with pytest.raises(C.ConfigError, match="both set"):
        C.validate(cfg)
    with pytest.raises(DataError, match="does not exist"):
        pipeline.make_datasets(_config(val_file=str(tmp_path / "nope.txt"), **common), tok)
    # factworld: its own val entities by default, or a val_file; val_split does not apply.
    ds = pipeline.make_datasets(_config(val_file=str(tmp_path / "val.txt")), tok)
    assert docs[0].startswith(tok.decode(ds.val_batches()[0]["inputs"][0]))
    with pytest.raises(DataError, match="does not apply to factworld"):
        pipeline.make_datasets(_config(val_split=0.1), tok)


def test_build_tokenizer_from_config(tmp_path, tok):
    cfg = _config(tokenizer_vocab=300)
    built = pipeline.build_tokenizer(cfg, sample_docs=300)
    assert built.vocab_size <= 300
    cfg.data.tokenizer = tok.save(str(tmp_path))
    assert pipeline.build_tokenizer(cfg).fingerprint() == tok.fingerprint()


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(tok, setup):
    cfg, _, batches = setup
    ds = pipeline.make_datasets(_config(worker_count=1), tok)
    it = iter(ds.train)
    for want in batches[:3]:
        np.testing.assert_array_equal(next(it)["inputs"], want["inputs"])
    state = it.get_state()
    want = next(it)
    it2 = iter(pipeline.make_datasets(_config(worker_count=1), tok).train)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["inputs"], want["inputs"])
