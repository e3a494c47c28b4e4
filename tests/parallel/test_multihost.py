"""Multi-host: 2 processes × 2 fake CPU devices (launch/local.sh, gloo) train exactly like 1 process × 4 devices;
their orbax checkpoint (written by both processes to one folder) resumes exactly in 1 process.

Run as a script, this file is the worker each process runs: `python tests/parallel/test_multihost.py
--steps=0:3 --mesh=1,4,1,1 [--save=DIR] [--restore=DIR]`; it prints `LOSSES [...]` from process 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GLOBAL_BATCH, SEQ = 8, 16


def _config(mesh_sizes):
    from mantis_jax.config import default_config, set_shape

    c = default_config()
    set_shape(c, d_model=32, n_layers=2, n_experts=4, top_k=2)
    c.model.vocab_size, c.model.n_heads, c.model.n_kv_heads, c.model.d_ff = 128, 4, 2, 64
    c.train.lr, c.train.warmup_steps, c.train.total_steps = 1e-2, 0, 100
    c.mesh.rules_preset = "fsdp"
    for axis, size in zip(("data", "fsdp", "expert", "tensor"), mesh_sizes):
        c.mesh[axis] = size
    return c


def _global_rows(step):
    import numpy as np

    rng = np.random.default_rng(step)
    tokens = rng.integers(0, 128, (GLOBAL_BATCH, SEQ + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((GLOBAL_BATCH, SEQ), np.float32)}


_STEPS: dict = {}  # (mesh sizes, device ids) -> (state shardings, jitted step): the resume reuses the reference's


def _sharded_step(config, mesh, rules):
    import jax

    from mantis_jax.model.args import ModelArgs
    from mantis_jax.parallel import mesh as pm
    from mantis_jax.train import state as st
    from mantis_jax.train.step import make_train_step

    key = (tuple(mesh.shape.values()), tuple(d.id for d in mesh.devices.flat))
    if key not in _STEPS:
        args, tx = ModelArgs.from_config(config), st.make_optimizer(config)
        with pm.activate(mesh, rules):
            shardings = pm.shardings_of(jax.eval_shape(st.init_state_fn(args, tx), jax.random.key(0)), mesh, rules)
        step = jax.jit(make_train_step(args, tx, st.lr_schedule(config)),
                       in_shardings=(shardings, pm.batch_sharding(mesh, rules), pm.replicated(mesh)),
                       out_shardings=(shardings, pm.replicated(mesh)), donate_argnums=0)
        _STEPS[key] = (shardings, step)
    return _STEPS[key]


def train_steps(mesh_sizes, start, stop, *, devices=None, save=None, restore=None):
    """Steps [start, stop) of the tiny run on a mesh of `devices`; each process feeds only its rows. -> losses."""
    import jax
    import orbax.checkpoint as ocp

    from mantis_jax.model.args import ModelArgs
    from mantis_jax.parallel import distributed
    from mantis_jax.parallel import mesh as pm
    from mantis_jax.parallel import reshard
    from mantis_jax.train import state as st

    config = _config(mesh_sizes)
    mesh, rules = pm.make_mesh(config, devices), pm.logical_rules(config)
    shardings, step_fn = _sharded_step(config, mesh, rules)
    if restore:
        step, state = reshard.restore_state(restore, config, mesh)
        assert step == start, (step, start)
        assert jax.tree.map(lambda x: x.sharding, state) == shardings
    else:  # created sharded: no process ever holds the whole state
        args, tx = ModelArgs.from_config(config), st.make_optimizer(config)
        state, _ = pm.create_sharded(st.init_state_fn(args, tx), mesh, rules, jax.random.key(0))
    batch_sh = pm.batch_sharding(mesh, rules)
    rows = distributed.process_rows(batch_sh, GLOBAL_BATCH)
    losses = []
    with pm.activate(mesh, rules):
        for s in range(start, stop):
            local = {k: v[rows] for k, v in _global_rows(s).items()}
            state, metrics = step_fn(state, distributed.global_batch(local, batch_sh), jax.random.key(s))
            losses.append(float(metrics["loss"]))
    if save:  # every process writes its own shards into the one folder
        manager = ocp.CheckpointManager(os.path.join(save, "checkpoints"), item_names=("state",))
        manager.save(stop, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        manager.wait_until_finished()
        manager.close()
    return losses


def worker(argv):
    from mantis_jax.parallel import distributed

    distributed.initialize_from_env()  # before any device is touched
    import jax

    opts = dict(a[2:].split("=", 1) for a in argv)
    start, stop = (int(x) for x in opts["steps"].split(":"))
    losses = train_steps([int(x) for x in opts["mesh"].split(",")], start, stop, save=opts.get("save"))
    if jax.process_index() == 0:
        print(f"processes={jax.process_count()} devices={jax.device_count()}", flush=True)
        print("LOSSES " + json.dumps(losses), flush=True)


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_on_other_mesh(tmp_path):
    import jax

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, MANTIS_CPU_DEVICES="2")
    env.pop("XLA_FLAGS", None)
    multi = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "local.sh"), "2", sys.executable,
                              os.path.abspath(__file__), "--steps=0:3", "--mesh=1,4,1,1", f"--save={tmp_path}"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:  # while the 2 processes run: the reference, one process on 4 of this process's fake devices
        ref_losses = train_steps((1, 4, 1, 1), 0, 5, devices=jax.devices()[:4])
        out, _ = multi.communicate(timeout=400)
    finally:
        multi.kill()
    assert multi.returncode == 0, f"launch/local.sh 2 failed:\n{out[-4000:]}"
    assert "[p0] processes=2 devices=4" in out
    multi_losses = json.loads([x for x in out.splitlines() if "LOSSES " in x][-1].split("LOSSES ", 1)[1])
    assert len(multi_losses) == 3 and multi_losses[0] > multi_losses[-1]  # it trains
    assert multi_losses == pytest.approx(ref_losses[:3], rel=1e-5, abs=1e-6)
    # The 2-process checkpoint resumes in 1 process (another process count; test_reshard covers other meshes).
    resumed = train_steps((1, 4, 1, 1), 3, 5, devices=jax.devices()[:4], restore=str(tmp_path))
    assert resumed == pytest.approx(ref_losses[3:], rel=1e-5, abs=1e-6)


def test_launcher_rejects_bad_process_count():
    out = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "zero"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: launch/local.sh N" in out.stderr


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    worker(sys.argv[1:])
