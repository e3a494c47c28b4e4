"""Multi-process training through the commands users run: `launch/local.sh 2 --config=<preset> ...` starts 2 ×
`python -m mantis_jax.train` (1 fake CPU device each, gloo collectives); the preset is configs/micro.py at a tiny
shape.

One module fixture makes three launches: A runs 10 steps uninterrupted (the reference, with the peak-FLOP/s probe;
the two processes' shares of the validation data have 3 and 2 batches, which used to hang the first evaluation);
B is the same run in another workdir, stopped by SIGTERM to the launcher once training has begun; C re-runs B's
command, which resumes B's checkpoint. Then one in-process run resumes B's 2-process checkpoint on 1 process with
another mesh.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOTAL, EVERY = 10, 5  # steps; save and eval cadence
WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "blue", "green", "the", "a", "of", "runs", "sees"]
# The micro preset at a tiny shape (set_shape keeps every field tied to the shape in step), on a small text corpus.
PRESET = """from mantis_jax import cli
from mantis_jax.config import set_shape


def get_config():
    c = cli.load_preset({micro!r})
    set_shape(c, d_model=32, n_layers=2, n_experts=1, top_k=1)
    c.model.n_heads, c.model.n_kv_heads, c.model.d_ff = 2, 1, 64
    return c
"""
OVERRIDES = ["--config.data.source=text", "--config.data.val_split=0.1", "--config.data.seq_len=32",
             "--config.data.batch_size=4", f"--config.train.total_steps={TOTAL}",
             f"--config.train.save_every={EVERY}", f"--config.train.eval_every={EVERY}", "--config.train.log_every=1",
             "--config.train.warmup_steps=2", "--config.logging.progress=False",
             "--config.logging.tensorboard=False"]
NO_PROBE = ["--config.train.peak_flops=1e10"]  # B and C skip the peak-FLOP/s probe that A runs


def _corpus(root):
    rng = np.random.default_rng(0)
    with open(root / "train.txt", "w") as f:
        for _ in range(110):  # 11 validation documents: 6 and 5 for the two processes
            f.write(" ".join(rng.choice(WORDS, 10)) + ".\nA: " + str(rng.choice(WORDS)) + "\n\n")
    from mantis_jax.data.tokenizer import Tokenizer

    Tokenizer.train(open(root / "train.txt").read().split("\n\n"), 300).save(str(root / "tokenizer.json"))
    (root / "tiny_micro.py").write_text(PRESET.format(micro=os.path.join(ROOT, "configs", "micro.py")))
    return [f"--config={root / 'tiny_micro.py'}", *OVERRIDES, f"--config.data.path={root / 'train.txt'}",
            f"--config.data.tokenizer={root / 'tokenizer.json'}", f"--config.data.cache_dir={root / 'cache'}"]


def _launch(args, log_path):
    # The launches share a persistent compilation cache: B and C load the programs A compiled.
    cache = os.path.join(os.path.dirname(log_path), "xla_cache")
    env = dict(os.environ, JAX_PLATFORMS="cpu", MANTIS_CPU_DEVICES="1", PYTHON=sys.executable,
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("XLA_FLAGS", None)
    log = open(log_path, "w")
    return subprocess.Popen(["bash", os.path.join(ROOT, "launch", "local.sh"), "2", *args], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def _processes_of(workdir) -> list[int]:
    """Pids of the processes whose command line names `workdir` (the trainers a launch started)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f"--workdir={workdir}".encode() in f.read():
                    out.append(int(pid))
        except OSError:
            pass
    return out


def _finish(proc, log_path, workdir, timeout=400):
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _processes_of(workdir):  # never leave a trainer behind, whatever happened
            os.kill(pid, signal.SIGKILL)
    with open(log_path) as f:
        return proc.returncode, f.read()


def _wait_for(path, text, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(path) and text in open(path).read():
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never appeared in {path}")


def _losses(workdir):
    from mantis_jax.train import metrics as metrics_lib

    return {r["step"]: r["loss"] for r in metrics_lib.read_jsonl(str(workdir), "train")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    data = _corpus(root)
    a, b = root / "a", root / "b"
    rc_a, out_a = _finish(_launch([*data, f"--workdir={a}"], root / "a.log"), root / "a.log", a)
    assert rc_a == 0, f"launch/local.sh 2 failed:\n{out_a[-4000:]}"
    proc = _launch([*data, *NO_PROBE, f"--workdir={b}"], root / "b.log")
    _wait_for(b / "metrics.jsonl", '"split": "setup"', proc)  # set up: the first step is compiling
    proc.send_signal(signal.SIGTERM)
    live_after_kill = None
    try:
        proc.wait(timeout=300)
        live_after_kill = _processes_of(b)
    finally:
        rc_b, out_b = _finish(proc, root / "b.log", b)
    shutil.copytree(b, root / "b_stopped")
    rc_c, out_c = _finish(_launch([*data, *NO_PROBE, f"--workdir={b}"], root / "c.log"), root / "c.log", b)
    assert rc_c == 0, f"the resume failed:\n{out_c[-4000:]}"
    return {"root": root, "data": data, "a": a, "b": b, "out_a": out_a, "rc_b": rc_b, "out_b": out_b,
            "live_after_kill": live_after_kill, "out_c": out_c}


def _config(args):
    from mantis_jax import cli

    return cli.load_config(["test", *args])


@functools.lru_cache(maxsize=None)
def _loss_sums_fn(config_json):
    from mantis_jax import config as config_lib
    from mantis_jax.model.args import ModelArgs
    from mantis_jax.train.step import loss_sums

    args = ModelArgs.from_config(config_lib.from_json(config_json))
    return jax.jit(lambda params, batch: loss_sums(params, batch, args))


def test_two_processes_train_and_evaluate_uneven_validation_shares(runs):
    from mantis_jax import config as config_lib
    from mantis_jax.data import pipeline
    from mantis_jax.train import checkpoint as ck
    from mantis_jax.train import metrics as metrics_lib

    assert "[p0] hardware: 2 x cpu (cpu) in 2 process(es)" in runs["out_a"] and "[p1] " in runs["out_a"]
    (setup,) = metrics_lib.read_jsonl(str(runs["a"]), "setup")
    assert setup["peak_flops"] > 1e8  # probed on each process's own device (it used to crash multi-process)
    assert sorted(_losses(runs["a"])) == list(range(1, TOTAL + 1))
    assert ck.list_steps(str(runs["a"])) == [EVERY, TOTAL]
    val = {r["step"]: r for r in metrics_lib.read_jsonl(str(runs["a"]), "val")}
    assert sorted(val) == [EVERY, TOTAL]
    # The val loss is that of every validation row of both processes (the padding batches weigh nothing).
    config, tokenizer, params = ck.load_for_inference(str(runs["a"]), step=TOTAL)
    shares = [pipeline.make_datasets(config, tokenizer, process_index=p, process_count=2)
              .val_batches(config.train.eval_steps) for p in range(2)]
    assert [len(s) for s in shares] == [3, 2]  # uneven: process 1 pads one batch
    rows = {k: np.concatenate([b[k] for s in shares for b in s]) for k in shares[0][0]}
    sums = _loss_sums_fn(config_lib.to_json(config))(params, rows)
    assert float(sums["valid"]) == val[TOTAL]["val_tokens"]
    np.testing.assert_allclose(val[TOTAL]["val_loss"], float(sums["ce_sum"] / sums["valid"]), rtol=2e-5)


def test_sigterm_to_the_launcher_saves_at_one_step_and_the_resume_is_exact(runs):
    from mantis_jax.train import checkpoint as ck

    out_b = runs["out_b"]
    assert runs["rc_b"] == 128 + signal.SIGTERM, out_b[-4000:]
    assert runs["live_after_kill"] == [], "trainer processes outlived the launcher"
    assert "unbound variable" not in out_b
    stopped = ck.list_steps(str(runs["root"] / "b_stopped"))
    assert len(stopped) == 1 and 0 < stopped[0] < TOTAL, (stopped, out_b[-3000:])
    u = stopped[0]
    for p in (0, 1):  # both processes stopped at the same step, saved, and said how to resume
        assert f"[p{p}] interrupted at step {u}: saved a checkpoint" in out_b
    la, lb = _losses(runs["a"]), _losses(runs["b"])
    assert sorted(lb) == list(range(1, TOTAL + 1))
    assert all(lb[s] == la[s] for s in la), (u, la, lb)  # bit for bit, before and after the resume
    assert "resumed_from\": " + str(u) in runs["out_c"].replace("[p0] ", "")
    _, _, params_a = ck.load_for_inference(str(runs["a"]), step=TOTAL)
    _, _, params_b = ck.load_for_inference(str(runs["b"]), step=TOTAL)
    assert ck.params_equal(params_a, params_b)


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process_on_another_mesh(runs, tmp_path, capsys):
    """B's checkpoint (2 processes, data=2) resumes in this process with fsdp=2 over 2 devices; the data position
    of 2 processes does not fit 1, so training restarts the data, and the first loss is the restored parameters'
    loss on the first batch, computed here on one device."""
    from mantis_jax import config as config_lib
    from mantis_jax.data import pipeline
    from mantis_jax.train import checkpoint as ck
    from mantis_jax.train.trainer import train

    stopped_dir = runs["root"] / "b_stopped"
    (u,) = ck.list_steps(str(stopped_dir))
    config = _config([*runs["data"], *NO_PROBE, "--config.mesh.data=1", "--config.mesh.fsdp=2",
                      "--config.mesh.rules_preset=fsdp", f"--config.train.total_steps={u + 1}"])
    summary = train(config, str(tmp_path), resume=str(stopped_dir), devices=jax.devices()[:2])
    assert summary["resumed_from"] == u and summary["step"] == u + 1
    assert "the data iterator restarts from the beginning" in capsys.readouterr().out
    saved_config, tokenizer, params = ck.load_for_inference(str(stopped_dir), step=u)
    config.model.vocab_size = tokenizer.padded_vocab_size
    first = next(iter(pipeline.make_datasets(config, tokenizer, process_index=0, process_count=1).train))
    sums = _loss_sums_fn(config_lib.to_json(saved_config))(params, first)
    np.testing.assert_allclose(_losses(tmp_path)[u + 1], float(sums["weighted_ce"] / sums["weight"]), rtol=2e-5)


def test_launcher_rejects_bad_process_count():
    out = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "zero"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: launch/local.sh N" in out.stderr
