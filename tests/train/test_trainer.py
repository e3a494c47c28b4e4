"""The training loop: exact resume after Ctrl-C, early stopping, unreadable checkpoints, NaN loss, bad input.

One tiny model (~20K parameters, seq 32) and one optimizer setting throughout, so the jitted steps compile once
per module (`trainer.compiled_steps` is cached); the tests vary only fields the compiled step does not depend on.
"""

import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from mantis_jax.config import ConfigError, default_config, set_shape
from mantis_jax.data.sources import DataError
from mantis_jax.data.tokenizer import Tokenizer, TokenizerMismatchError
from mantis_jax.train import checkpoint as ck
from mantis_jax.train import metrics as metrics_lib
from mantis_jax.train.trainer import TrainingError, train

WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "blue", "green", "the", "a", "of", "runs", "sees"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_corpus(path, n_docs=120, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(" ".join(rng.choice(WORDS, 10)) + ".\nA: " + str(rng.choice(WORDS)) + "\n\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    _write_corpus(root / "train.txt")
    _write_corpus(root / "other.txt", seed=1)
    tok = Tokenizer.train(open(root / "train.txt").read().split("\n\n"), 300)
    tok.save(str(root / "tokenizer.json"))
    other = Tokenizer.train([" ".join(WORDS[::-1])] * 20, 280)
    other.save(str(root / "other_tokenizer.json"))
    return root


def make_config(corpus, **train):
    c = default_config()
    set_shape(c, d_model=32, n_layers=2, n_experts=2, top_k=1)
    c.model.n_heads, c.model.n_kv_heads, c.model.d_ff, c.model.max_seq_len = 4, 2, 64, 64
    c.moe.impl = "dense"
    d = c.data
    d.source, d.path, d.tokenizer, d.cache_dir = "text", str(corpus / "train.txt"), str(corpus / "tokenizer.json"), \
        str(corpus / "cache")
    d.val_split, d.seq_len, d.batch_size = 0.1, 32, 4
    t = c.train
    t.total_steps, t.warmup_steps, t.lr = 8, 2, 3e-3
    t.log_every, t.eval_every, t.save_every, t.eval_steps = 1, 4, 4, 2
    t.peak_flops = 1e10  # no probe: the figure is not under test here
    c.mesh.data = 1
    c.logging.progress = False
    for k, v in train.items():
        c.train[k] = v
    return c


def _losses(workdir):
    return {r["step"]: r["loss"] for r in metrics_lib.read_jsonl(workdir, "train")}


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """A: 8 uninterrupted steps. B: Ctrl-C at step 4 (snapshot B4), then the same command again."""
    root = tmp_path_factory.mktemp("runs")
    devices = jax.devices()[:1]
    config = make_config(corpus)
    a = train(config, str(root / "a"), devices=devices)

    def ctrl_c_at_4(step, split, metrics):
        if split == "train" and step == 4:
            signal.raise_signal(signal.SIGINT)

    b_first = train(config, str(root / "b"), devices=devices, on_log=ctrl_c_at_4)
    shutil.copytree(root / "b", root / "b4")
    b = train(config, str(root / "b"), devices=devices)
    return {"root": root, "config": config, "a": a, "b_first": b_first, "b": b, "devices": devices}


def test_ctrl_c_saves_and_resume_is_exact(runs):
    root = runs["root"]
    assert runs["b_first"]["stopped"] == "interrupted" and runs["b_first"]["step"] == 4
    assert 4 in ck.list_steps(str(root / "b4"))
    assert runs["b"]["resumed_from"] == 4 and runs["b"]["step"] == 8 and runs["a"]["stopped"] == "done"
    la, lb = _losses(str(root / "a")), _losses(str(root / "b"))
    assert sorted(la) == sorted(lb) == list(range(1, 9))
    assert all(la[s] == lb[s] for s in la), (la, lb)  # bit for bit
    assert ck.params_equal(runs["a"]["state"].params, runs["b"]["state"].params)
    assert la[8] < la[1]


def test_metrics_logged(runs):
    a = runs["a"]
    train_m = a["train"]
    for key in ("loss", "ce", "perplexity", "lb_loss", "z_loss", "grad_norm", "lr", "tokens_per_s", "mfu"):
        assert math.isfinite(train_m[key]), key
    np.testing.assert_allclose(train_m["perplexity"], math.exp(train_m["ce"]), rtol=1e-9)
    load = np.asarray(train_m["expert_load"])
    assert load.shape == (2, 2)
    np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-5)
    val = metrics_lib.read_jsonl(str(runs["root"] / "a"), "val")
    assert [r["step"] for r in val] == [4, 8] and a["best_val_loss"] == min(r["val_loss"] for r in val)
    scalars = metrics_lib.read_event_scalars(str(runs["root"] / "a" / metrics_lib.TENSORBOARD_DIR))
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 9))
    assert any(tag.startswith("train/expert_load/layer_1") for tag in scalars)
    assert a["bytes_per_param"] == pytest.approx(8.0, abs=0.01)


def test_early_stopping(runs, tmp_path):
    config = make_config(_corpus_of(runs), eval_every=2, patience=1, min_delta=10.0)
    config.checkpoint.max_to_keep = 1
    s = train(config, str(tmp_path), devices=runs["devices"])
    # The first eval (step 2) improves on +inf; the second (step 4) cannot beat it by min_delta: stop.
    assert s["stopped"] == "early_stop" and s["step"] == 4 and s["best_step"] == 2
    val = {r["step"]: r["val_loss"] for r in metrics_lib.read_jsonl(str(tmp_path), "val")}
    lowest = min(val, key=val.get)
    assert ck.list_steps(str(tmp_path)) == sorted({4, lowest})  # the last one plus the lowest val loss
    assert ck.inspect(str(tmp_path))["best"] == lowest


def test_time_budget_stops_after_a_step(runs, tmp_path):
    config = make_config(_corpus_of(runs), max_minutes=1e-9)
    s = train(config, str(tmp_path), devices=runs["devices"])
    assert s["stopped"] == "time_budget" and s["step"] == 1 and ck.list_steps(str(tmp_path)) == [1]
    assert _losses(str(tmp_path))[1] == _losses(str(runs["root"] / "a"))[1]


def _corpus_of(runs):
    return pathlib.Path(os.path.dirname(runs["config"].data.path))


def _corrupt_state(step_dir):
    for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            with open(os.path.join(dirpath, name), "wb") as f:
                f.write(b"garbage")


def test_corrupt_checkpoint_falls_back_to_previous(runs, tmp_path, capsys):
    work = tmp_path / "b"
    shutil.copytree(runs["root"] / "b", work)
    assert ck.list_steps(str(work)) == [4, 8]
    _corrupt_state(os.path.join(ck.checkpoint_dir(str(work)), "8"))
    s = train(runs["config"], str(work), devices=runs["devices"])
    out = capsys.readouterr().out
    assert "checkpoint step 8" in out and "unreadable" in out and "falling back to step 4" in out
    assert s["resumed_from"] == 4 and s["step"] == 8
    assert ck.params_equal(s["state"].params, runs["a"]["state"].params)
    assert os.listdir(work / ck.CORRUPT_DIR)


def test_resume_from_another_workdir(runs, tmp_path):
    s = train(runs["config"], str(tmp_path), resume=str(runs["root"] / "b4"), devices=runs["devices"])
    assert s["resumed_from"] == 4 and s["step"] == 8
    assert ck.params_equal(s["state"].params, runs["a"]["state"].params)
    assert ck.list_steps(str(tmp_path)) == [8]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(runs, tmp_path):
    work = tmp_path / "b4"
    shutil.copytree(runs["root"] / "b4", work)
    config = make_config(_corpus_of(runs))
    config.data.answer_loss_weight = float("inf")  # every batch has answer tokens: the weighted loss is inf/inf
    with pytest.raises(TrainingError, match=r"at step 5.*last good checkpoint is step 4"):
        train(config, str(work), devices=runs["devices"])
    assert ck.list_steps(str(work)) == [4]


def test_checkpoint_of_another_config(runs, tmp_path):
    work = tmp_path / "b4"
    shutil.copytree(runs["root"] / "b4", work)
    config = make_config(_corpus_of(runs))
    config.model.d_ff = 128
    with pytest.raises(ck.CheckpointError, match=r"another config: config.model.d_ff: checkpoint 64, this run 128"):
        train(config, str(work), devices=runs["devices"])


def test_tokenizer_mismatch(runs, tmp_path):
    work = tmp_path / "b4"
    shutil.copytree(runs["root"] / "b4", work)
    config = make_config(_corpus_of(runs))
    config.data.tokenizer = str(_corpus_of(runs) / "other_tokenizer.json")
    with pytest.raises(TokenizerMismatchError, match="made with tokenizer"):
        train(config, str(work), devices=runs["devices"])


def test_missing_and_empty_data(corpus, tmp_path):
    config = make_config(corpus)
    config.data.path = str(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="does not exist"):
        train(config, str(tmp_path / "w1"))
    (tmp_path / "empty.txt").write_text("")
    config.data.path = str(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="empty"):
        train(config, str(tmp_path / "w2"))
    config.data.val_file = str(corpus / "other.txt")
    with pytest.raises(ConfigError, match="val_split and config.data.val_file are both set"):
        train(config, str(tmp_path / "w3"))
    with pytest.raises(ck.CheckpointError, match="no checkpoints"):
        train(make_config(corpus), str(tmp_path / "w4"), resume=str(tmp_path / "nothing"))


def test_cli_reports_bad_input_in_one_line(corpus, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "mantis_jax.train", f"--workdir={tmp_path / 'w'}", "--config.data.source=text",
           f"--config.data.path={tmp_path / 'missing.txt'}", "--config.logging.progress=False"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "does not exist" in last, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_data_parallel_over_two_devices_matches_one(runs, tmp_path):
    config = make_config(_corpus_of(runs))
    config.mesh.data = 2
    s = train(config, str(tmp_path), devices=jax.devices()[:2])
    one, two = _losses(str(runs["root"] / "a")), _losses(str(tmp_path))
    np.testing.assert_allclose([two[k] for k in sorted(one)], [one[k] for k in sorted(one)], rtol=2e-4)
    assert s["step"] == 8
    m = s["train"]  # per-device throughput: half the tokens/s on each of 2 devices, MFU from each one's share
    np.testing.assert_allclose(m["tokens_per_s_per_device"], m["tokens_per_s"] / 2, rtol=1e-6)
    np.testing.assert_allclose(m["mfu"], m["tflops_per_device"] * 1e12 / (config.train.peak_flops / 2), rtol=1e-6)
    config.data.batch_size = 3
    with pytest.raises(ConfigError, match=r"batch_size \(3\) must be divisible by the 2 batch shards"):
        train(config, str(tmp_path / "odd"), devices=jax.devices()[:2])


def test_length_curriculum_resumes_exactly_across_a_boundary(runs, tmp_path):
    """Rows of 16 tokens for steps 1-5, 32 after; stopped by Ctrl-C at step 4, the resumed run crosses the boundary
    at the step the schedule says. The same windows are read as without a curriculum (the same tokens each step)."""
    config = make_config(_corpus_of(runs), seq_len_schedule="0:16,5:32")

    def ctrl_c_at_4(step, split, metrics):
        if split == "train" and step == 4:
            signal.raise_signal(signal.SIGINT)

    whole = train(config, str(tmp_path / "whole"), devices=runs["devices"])
    first = train(config, str(tmp_path / "cut"), devices=runs["devices"], on_log=ctrl_c_at_4)
    second = train(config, str(tmp_path / "cut"), devices=runs["devices"])
    assert first["stopped"] == "interrupted" and first["step"] == 4 and second["resumed_from"] == 4
    lw, lc = _losses(str(tmp_path / "whole")), _losses(str(tmp_path / "cut"))
    assert sorted(lw) == sorted(lc) == list(range(1, 9)) and all(lw[s] == lc[s] for s in lw)
    assert ck.params_equal(whole["state"].params, second["state"].params)
    plain = {r["step"]: r for r in metrics_lib.read_jsonl(str(runs["root"] / "a"), "train")}
    curr = {r["step"]: r for r in metrics_lib.read_jsonl(str(tmp_path / "whole"), "train")}
    assert [curr[s]["tokens"] for s in curr] == [plain[s]["tokens"] for s in curr]  # the same tokens each step
    assert curr[1]["loss"] != plain[1]["loss"] and curr[5]["loss"] != plain[5]["loss"]  # in shorter rows


def _inject_oom(monkeypatch, fail_at_call):
    """Wraps `compiled_steps` so that the single-micro-batch train step raises XLA's out-of-memory error."""
    import json as json_lib

    from mantis_jax.train import trainer

    real = trainer.compiled_steps
    calls = {"n": 0}

    def compiled_steps(args, train_json, mesh, rules):
        fns = dict(real(args, train_json, mesh, rules))
        if json_lib.loads(train_json)["grad_accum"] == 1 or fail_at_call is None:
            step = fns["train_step"]

            def train_step(state, batch, rng):
                calls["n"] += 1
                if fail_at_call is None or calls["n"] == fail_at_call:
                    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                                     "1.00GiB (injected)")
                return step(state, batch, rng)

            fns["train_step"] = train_step
        return fns

    monkeypatch.setattr(trainer, "compiled_steps", compiled_steps)


def test_out_of_memory_halves_the_micro_batch_and_continues(runs, tmp_path, monkeypatch, capsys):
    _inject_oom(monkeypatch, fail_at_call=3)
    s = train(runs["config"], str(tmp_path), devices=runs["devices"])
    assert "out of memory in step 3 with 1 micro-batch(es) of 4 rows: retrying it as 2 micro-batches of 2 rows" \
        in capsys.readouterr().out
    assert s["step"] == 8 and s["micro_batches"] == 2
    la, lo = _losses(str(runs["root"] / "a")), _losses(str(tmp_path))
    assert all(lo[k] == la[k] for k in (1, 2))
    # The same update from two micro-batches: only the per-micro-batch load-balancing loss differs.
    np.testing.assert_allclose([lo[k] for k in range(3, 9)], [la[k] for k in range(3, 9)], rtol=1e-3)


def test_out_of_memory_that_cannot_be_halved_names_the_fix(runs, tmp_path, monkeypatch):
    _inject_oom(monkeypatch, fail_at_call=None)  # every micro-batch size runs out: 4 rows, 2, 1, then no further
    with pytest.raises(TrainingError, match=r"out of memory in step 1 with 4 micro-batch\(es\) of 1 rows, which "
                                            r"cannot be halved.*--config.data.batch_size"):
        train(runs["config"], str(tmp_path), devices=runs["devices"])
