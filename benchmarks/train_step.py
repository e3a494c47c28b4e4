"""Training speed: tokens/s and MFU of the full jitted train step, against the matmul peak measured in this run.

    python benchmarks/train_step.py            # micro and tiny, batch 8 x seq 256, vocab 8192, float32
    python benchmarks/train_step.py --quick    # fewer timed steps, micro only
    python benchmarks/train_step.py --variants # also the config variants below (attention, remat, MoE, scan)
    python benchmarks/train_step.py --presets demo --variants --batch 16 --seq 128 --vocab 1024  # kv_conv cost
    python benchmarks/train_step.py --presets micro --profile  # + where the step's CPU time goes (jax.profiler)

The step is the trainer's (`trainer.compiled_steps`: forward, loss, backward, AdamW update; donated state,
explicit shardings on one device). MFU = model FLOPs per token (`model.summary.flops_per_token`, training = 3x
forward, active experts) x tokens/s / peak, where the peak is the best dense float32 matmul FLOP/s XLA reaches on
this machine (`train.metrics.measure_peak_flops`, 1024^2 float32 matmuls, best of). The machine is shared, so the
peak is probed right before and right after each timed variant and its MFU is taken against the larger of the two
(the matmul rate the machine offered while that variant ran). Step time is the best (and the median) over the timed
steps after two warm-up steps: on a shared machine contention only ever slows a step down, so best-of step time
against best-of matmul rate is the least noisy ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mantis_jax import cli  # noqa: E402

if __name__ == "__main__":  # measure the step users get: the trainer's entry points restart the same way
    cli.reexec_with_malloc_tunables()  # before importing jax, so the restart does not import it twice

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mantis_jax.config import validate  # noqa: E402
from mantis_jax.model.args import ModelArgs  # noqa: E402
from mantis_jax.model.summary import flops_per_token, param_counts  # noqa: E402
from mantis_jax.parallel import mesh as mesh_lib  # noqa: E402
from mantis_jax.train import metrics as metrics_lib  # noqa: E402
from mantis_jax.train.trainer import STEP_KEYS, compiled_steps  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
VARIANTS = {
    "micro": [{}, {"model.attn_block_q": 0}, {"model.attn_block_q": 64}, {"model.remat": "full"},
              {"model.scan_layers": True}],
    "tiny": [{}, {"model.attn_block_q": 0}, {"moe.impl": "dense"}, {"moe.impl": "capacity"},
             {"model.scan_layers": True}],
    # the demo preset's convolution on keys and values (width 8) against none and width 4
    "demo": [{}, {"model.kv_conv": 0}, {"model.kv_conv": 4}],
}


def bench_config(preset: str, overrides: dict, batch: int, seq: int, vocab: int, devices: int = 1):
    config = cli.load_preset(os.path.join(ROOT, "configs", f"{preset}.py"))
    config.model.vocab_size, config.data.batch_size, config.data.seq_len = vocab, batch, seq
    config.model.dtype = config.model.param_dtype = "float32"
    config.mesh.data = devices
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return validate(config)


def profile_breakdown(run_step, n_steps: int = 3, top: int = 12) -> str:
    """Where a step's time goes: XLA:CPU op time per kind (summed over the runtime's threads) from a jax.profiler
    trace of `n_steps` steps, next to the wall time. Kinds are HLO names without their numeric suffix:
    `ynn_fusion` = matmuls (with fused elementwise work) run by YNNPACK; `copy*`/`transpose*` = layout changes;
    `*dynamic-update-slice*`/`dynamic-slice*` = writing/reading per-layer slices of scanned weights and grads."""
    import collections
    import glob
    import re
    import tempfile

    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        t0 = time.perf_counter()
        for _ in range(n_steps):
            run_step()
        wall = (time.perf_counter() - t0) / n_steps
        jax.profiler.stop_trace()
        data = ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
        kinds, threads = collections.Counter(), set()
        for plane in data.planes:
            for line in plane.lines:
                if not line.name.startswith("tf_XLAEigen"):  # XLA:CPU's compute threads
                    continue
                threads.add(line.name)
                for ev in line.events:
                    if ev.name.startswith(("ThunkExecutor", "end:")) or "Await" in ev.name:
                        continue  # containers and waits, not work
                    kinds[re.sub(r"\.\d+$", "", ev.name)] += ev.duration_ns / 1e6 / n_steps
    busy = sum(kinds.values())
    lines = [f"  wall {wall * 1e3:.0f} ms/step; op time {busy:.0f} ms/step summed over {len(threads)} threads "
             f"({busy / max(len(threads), 1) / (wall * 1e3):.0%} of the threads' wall time busy)"]
    lines += [f"  {ms:8.1f} ms  {ms / busy:5.1%}  {kind}" for kind, ms in kinds.most_common(top)]
    return "\n".join(lines)


def time_step(config, steps: int, profile: bool = False) -> tuple[float, dict]:
    """(best, median) seconds per train step, and model facts (with `profile`: + the op-time breakdown)."""
    import json

    args = ModelArgs.from_config(config)
    mesh = mesh_lib.make_mesh(config, jax.devices()[:config.mesh.data])
    rules = mesh_lib.logical_rules(config)
    fns = compiled_steps(args, json.dumps({k: config.train[k] for k in STEP_KEYS}, sort_keys=True), mesh, rules)
    B, T = config.data.batch_size, config.data.seq_len
    rng = np.random.default_rng(0)
    seq = rng.integers(0, args.vocab_size, (B, T + 1)).astype(np.int32)
    batch = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": np.ones((B, T), np.float32)}
    with mesh_lib.activate(mesh, rules):
        batch = {k: jax.device_put(v, fns["batch_sharding"]) for k, v in batch.items()}
        state = fns["init"](jax.random.key(0))
        key = jax.random.key(1)
        times = []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            state, m = fns["train_step"](state, batch, jax.random.fold_in(key, i))
            jax.block_until_ready(m)
            if i >= 2:  # the first call compiles, the second may still warm caches
                times.append(time.perf_counter() - t0)
        facts = {}
        if profile:
            def run_step():
                nonlocal state
                state, m = fns["train_step"](state, batch, key)
                jax.block_until_ready(m)

            facts["profile"] = profile_breakdown(run_step)
    facts.update(params=param_counts(args)["total"], flops_per_token=flops_per_token(args, T)["active"])
    return (min(times), statistics.median(times)), facts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="micro only, 3 timed steps")
    p.add_argument("--variants", action="store_true", help="also time the config variants")
    p.add_argument("--presets", default="micro,tiny")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--devices", type=int, default=1,
                   help="data-parallel over this many CPU devices (run with XLA_FLAGS="
                        "--xla_force_host_platform_device_count=N): one program per core")
    p.add_argument("--profile", action="store_true", help="print each row's op-time breakdown (jax.profiler)")
    a = p.parse_args()
    presets = ["micro"] if a.quick else a.presets.split(",")
    steps = 3 if a.quick else a.steps
    if not 1 <= a.devices <= jax.device_count():
        p.error(f"--devices={a.devices} but {jax.device_count()} device(s) exist; for N CPU devices run with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count=N")
    print(f"devices: {jax.devices()[:a.devices]} (of {jax.device_count()}), "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} "
          "(set GLIBC_TUNABLES= to time the step without huge-page malloc)")
    probe = lambda: metrics_lib.measure_peak_flops(n=1024, reps=5)  # noqa: E731
    print("| preset | variant | params | GFLOP/token | step ms best (median) | tokens/s | model GFLOP/s | peak GFLOP/s "
          "(before, after) | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in presets:
        for overrides in (VARIANTS[preset] if a.variants else [{}]):
            config = bench_config(preset, overrides, a.batch, a.seq, a.vocab, a.devices)
            before = probe()
            (seconds, median), facts = time_step(config, steps, a.profile)
            after = probe()
            peak = max(before, after)
            tps = a.batch * a.seq / seconds
            achieved = facts["flops_per_token"] * tps
            name = ",".join(f"{k}={v}" for k, v in overrides.items()) or "default"
            print(f"| {preset} | {name} | {facts['params'] / 1e6:.2f}M | {facts['flops_per_token'] / 1e9:.3f} | "
                  f"{seconds * 1e3:.0f} ({median * 1e3:.0f}) | {tps:,.0f} | {achieved / 1e9:.1f} | "
                  f"{before / 1e9:.1f}, {after / 1e9:.1f} | {achieved / peak:.0%} |", flush=True)
            if a.profile:
                print(facts["profile"], flush=True)


if __name__ == "__main__":
    main()
