"""Stage 2 (the retrieval encoder): its batches, its loss against a loop, exact resume, and its CLI's errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.data import factworld
from mantis_jax.memory import pool
from mantis_jax.memory import train as stage2
from mantis_jax.memory.encoder import split_sentences
from mantis_jax.train.checkpoint import params_equal


def test_infonce_matches_a_loop():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(3, 4)).astype(np.float32)
    k = rng.normal(size=(7, 4)).astype(np.float32)
    loss, acc = stage2.infonce(jnp.asarray(q), jnp.asarray(k), 0.5)
    ref, hits = 0.0, 0
    for i in range(3):
        logits = [float(q[i] @ k[j]) / 0.5 for j in range(7)]
        m = max(logits)
        ref += -(logits[i] - m - np.log(sum(np.exp(x - m) for x in logits))) / 3
        hits += int(np.argmax(logits) == i)
    assert float(loss) == pytest.approx(ref, rel=1e-5) and float(acc) == pytest.approx(hits / 3)


def test_batches_pair_questions_with_their_evidence_and_hard_negatives(stage1):
    _, config = stage1
    batches = stage2.Batches(config)
    B, n = config.retrieval.batch_size, batches.negatives
    questions, keys = batches.batch(5)
    assert len(questions) == B and len(keys) == B * (1 + n)
    assert batches.batch(5) == (questions, keys)  # a pure function of the step: resume is exact
    world = factworld.world_from_config(config)
    for i in range(B):
        rec = world.qa_record("train", "near", 5 * B + i, distance=0)
        assert questions[i] == rec["question"] and keys[i] == stage2_evidence(rec)
        own = keys[B + i * n: B + (i + 1) * n]
        assert stage2_evidence(rec) not in own
        context = set(split_sentences(rec["context"]))
        from_context = [s for s in own if s in context]
        # other sentences of the context (one slot may go to a filler sentence), then the same attribute of others
        assert len(from_context) >= min(config.retrieval.context_negatives, len(context) - 1) - 1
        assert all(s in context or rec["entity"] not in s for s in own)


def stage2_evidence(rec):
    return rec["context"][rec["evidence_span"][0]:rec["evidence_span"][1]]


def test_stage2_resumes_exactly_and_reports_recall(stage1, tmp_path):
    workdir, _ = stage1
    straight = stage2.train(workdir, str(tmp_path / "a"), {"retrieval.steps": "4"}, out=lambda s: None)
    first = stage2.train(workdir, str(tmp_path / "b"), {"retrieval.steps": "4"}, out=lambda s: None, stop_at=2)
    assert first["step"] == 2 and first["stopped"] == "stop_at"
    lines = []
    resumed = stage2.train(workdir, str(tmp_path / "b"), {"retrieval.steps": "4"}, out=lines.append)
    assert any("resumed Stage 2 from step 2" in line for line in lines)
    assert resumed["step"] == straight["step"] == 4
    assert params_equal(resumed["params"], straight["params"])
    assert params_equal(stage2.load_encoder_params(str(tmp_path / "b")), straight["params"])
    r = straight["recall"]
    for key in ("baseline_recall@1", "baseline_recall@5", "trained_recall@1", "trained_recall@5"):
        assert 0.0 <= r[key] <= 1.0
    assert r["baseline_recall@1"] <= r["baseline_recall@5"] and r["trained_recall@1"] <= r["trained_recall@5"]
    records = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [m["step"] for m in records if m["split"] == "train"] == [1, 2, 3, 4]
    assert any(m["split"] == "test" and "trained_recall@5" in m for m in records)


def test_recall_counts_ranks_against_a_brute_force_reference(stage1):
    """The untrained baseline's recall@k equals a direct ranking of every gallery sentence per question."""
    workdir, _ = stage1
    from mantis_jax.train.checkpoint import load_for_inference
    from mantis_jax.memory import encoder as enc
    from mantis_jax.model.args import ModelArgs
    from mantis_jax.model.ssm import SSMArgs

    config, tok, params = load_for_inference(workdir)
    config.retrieval.max_len = 24
    got = stage2.recall(config, tok, params, None, 8)
    records = list(factworld.world_from_config(config).qa_records("test", "near", 8, distance=0))
    gallery = sorted({s for r in records for s in split_sentences(r["context"])})
    fn = enc.encode_fn(ModelArgs.from_config(config), SSMArgs.from_config(config), False)
    vec = lambda texts: np.concatenate([np.asarray(fn(None, params, *stage2.tokenize(tok, [t], 24)))
                                        for t in texts])
    g, q = vec(gallery), vec([r["question"] for r in records])
    for k in (1, 5):
        hits = [gallery.index(stage2_evidence(r)) in np.argsort(-(q[i] @ g.T), kind="stable")[:k]
                for i, r in enumerate(records)]
        assert got[f"baseline_recall@{k}"] == pytest.approx(np.mean(hits))


def test_stage2_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        stage2.main(["--checkpoint", str(tmp_path / "none"), "--workdir", str(tmp_path / "w")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no Stage-1 checkpoint" in err[0]
    with pytest.raises(stage2.Stage2Error, match="python -m mantis_jax.memory.train"):
        stage2.load_encoder_params(str(tmp_path))


# ---- the pool and the cached features (memory/pool.py) ------------------------------------------------------
def pool_overrides(**extra):
    base = {"retrieval.pool": "12", "retrieval.cache_features": "true", "retrieval.steps": "4"}
    return {**base, **{k: str(v) for k, v in extra.items()}}


def test_fact_key_reads_every_wording():
    for attribute, (templates, _) in factworld.ATTRIBUTES.items():
        for t in templates:
            assert pool.fact_key(t.format(n="Zorvak", v="bus driver")) == ("Zorvak", attribute)
    assert pool.fact_key("A quiet wind crossed the market.") is None


def test_pool_batches_cover_the_pool_and_never_hold_a_batch_answer(stage1):
    _, config = stage1
    config = config.copy_and_resolve_references()
    for k, v in pool_overrides().items():
        stage2.set_key(config, k, v)
    batches = pool.PoolBatches(config)
    B, n = config.retrieval.batch_size, batches.negatives
    assert len({r["key"] for r in batches.records}) == 12  # distinct (entity, attribute)
    by_question = {r["question"]: r for r in batches.records}
    seen = []
    for step in range(batches.steps_per_epoch):  # one epoch: each record at most once
        questions, keys = batches.batch(step)
        assert batches.batch(step) == (questions, keys) and len(keys) == B * (1 + n)
        answers = {by_question[q]["key"] for q in questions}
        for i, q in enumerate(questions):
            rec = by_question[q]
            assert keys[i] == rec["evidence"]
            own = keys[B + i * n: B + (i + 1) * n]
            assert not any(pool.fact_key(s) in answers for s in own)
            # after its context: the same attribute of other entities, as many as the pool has outside the batch
            extra = [s for s in own if s not in rec["others"]]
            available = [r for r in batches.records if r["key"][1] == rec["key"][1] and r["key"] not in answers]
            same = [s for s in extra if pool.fact_key(s)[1] == rec["key"][1]]
            assert len(extra) >= config.retrieval.attribute_negatives
            assert len(same) == min(len(extra), len(available))
        seen += questions
    assert len(seen) == len(set(seen)) == B * batches.steps_per_epoch
    assert set(batches.texts()) >= {t for r in batches.records for t in (r["question"], r["evidence"])}


def test_cached_features_give_the_on_the_fly_loss(stage1):
    """Step 0 on the LM's hidden states from the cache equals step 0 running the LM: same loss, same update."""
    import jax

    from mantis_jax.memory import encoder as enc
    from mantis_jax.model.args import ModelArgs
    from mantis_jax.model.ssm import SSMArgs
    from mantis_jax.train.checkpoint import load_for_inference
    from mantis_jax.train.state import TrainState

    workdir, _ = stage1
    config, tok, lm_params = load_for_inference(workdir)
    config = stage2.complete_config(config)
    for k, v in pool_overrides().items():
        stage2.set_key(config, k, v)
    rt = config.retrieval
    margs, sargs = ModelArgs.from_config(config), SSMArgs.from_config(config)
    batch = pool.PoolBatches(config).batch(0)
    cache = pool.HiddenCache(margs, lm_params, tok, rt.max_len)
    tokens, mask = stage2.tokenize(tok, batch[1], rt.max_len)
    hidden, cmask = cache.batch(batch[1])
    ref = np.asarray(enc.hidden_fn(margs)(lm_params, tokens, mask))  # one call on the whole batch
    assert np.array_equal(cmask, mask)
    np.testing.assert_allclose(hidden[mask], ref[mask], rtol=1e-5, atol=1e-5)
    tx = stage2.make_optimizer(rt)
    params = enc.init_encoder(config, jax.random.key(0))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    results = []
    for cached in (False, True):
        fn = stage2.make_train_step(margs, sargs, stage2._optimizer_key(rt), rt.temperature, cached)
        results.append(fn(state, lm_params, *stage2.batch_inputs(batch, tok, rt, cache if cached else None)))
    (s_fly, m_fly), (s_cached, m_cached) = results
    assert float(m_cached["loss"]) == pytest.approx(float(m_fly["loss"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(s_fly.params), jax.tree.leaves(s_cached.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_cached_stage2_resumes_exactly_through_the_cli(stage1, tmp_path, capsys):
    workdir, _ = stage1
    overrides = pool_overrides()
    straight = stage2.train(workdir, str(tmp_path / "a"), overrides, out=lambda s: None)
    first = stage2.train(workdir, str(tmp_path / "b"), overrides, out=lambda s: None, stop_at=2)
    assert first["step"] == 2
    stage2.main(["--checkpoint", workdir, "--workdir", str(tmp_path / "b")]
                + [f"--config.{k}={v}" for k, v in overrides.items()])
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["step"] == 4
    assert params_equal(stage2.load_encoder_params(str(tmp_path / "b")), straight["params"])
    r = straight["recall"]
    assert 0.0 <= r["baseline_recall@1"] <= r["baseline_recall@5"] <= 1.0
    with pytest.raises(Exception, match="retrieval.pool"):
        stage2.train(workdir, str(tmp_path / "c"), {"retrieval.cache_features": "true"}, out=lambda s: None)
