"""Stage 2 (the retrieval encoder): its batches, its loss against a loop, exact resume, and its CLI's errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.data import factworld
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
