"""Selective-SSM scan implementations: forward + backward time and peak memory of one Mamba block.

For each length L, compiles `grad(sum(block(x)^2))` (w.r.t. parameters and input) with the `sequential`,
`associative` and `chunked` scans, reads the compiled program's temp bytes (`memory_analysis()`, the peak working
set XLA plans besides inputs and outputs), then times the three interleaved, `--reps` rounds, best of: wall time
and process CPU time (the CPU time is what to compare on a machine shared with other jobs). A variant
whose planned temp memory exceeds `--max-temp-gb` is compiled (memory reported) but not run.

Prints, per L: wall ms, CPU ms, speed-up over `sequential` in CPU time (its time / this time), temp MiB, temp
relative to `associative`.

    python benchmarks/ssm.py            # L in 2K, 8K, 32K; d_model 256, d_state 16, expand 2 (config defaults)
    python benchmarks/ssm.py --quick    # L in 512, 2K; 2 rounds
    python benchmarks/ssm.py --scan-only --lengths 2048,8192   # the scan alone, without the projections
"""

from __future__ import annotations

import argparse
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from mantis_jax.config import default_config
from mantis_jax.model.ssm import SCAN_IMPLS, MambaBlock, SSMArgs, selective_scan


def build_scan(args: SSMArgs, impl: str, length: int, batch: int):
    """The scan alone: grad of sum(y^2) + sum(h_T) w.r.t. x, Δ, A, B, C (Mamba-like Δ ~ softplus(N(-3, 1)))."""
    k = jax.random.split(jax.random.key(1), 5)
    di, n = args.d_inner, args.d_state
    x = jax.random.normal(k[0], (batch, length, di))
    delta = jax.nn.softplus(jax.random.normal(k[1], (batch, length, di)) - 3.0)
    a = -jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (di, n))
    inputs = (x, delta, a, jax.random.normal(k[2], (batch, length, n)), jax.random.normal(k[3], (batch, length, n)))

    def loss(*xs):
        y, h = selective_scan(*xs, impl=impl, chunk_size=args.chunk_size)
        return jnp.sum(jnp.square(y)) + jnp.sum(h)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(5)))).lower(*inputs).compile()
    return compiled, inputs, compiled.memory_analysis().temp_size_in_bytes


def build(args: SSMArgs, impl: str, length: int, batch: int):
    block = MambaBlock(args.replace(scan_impl=impl))
    x = jax.random.normal(jax.random.key(1), (batch, length, args.d_model), jnp.float32)
    params = nn.meta.unbox(jax.jit(block.init)(jax.random.key(0, impl="rbg"), x[:, :8]))

    def loss(p, x_btd):
        y, _ = block.apply(p, x_btd)
        return jnp.sum(jnp.square(y))

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    return compiled, (params, x), temp


def main() -> None:
    ep = default_config().memory.episodic
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="L in 512, 2K; 2 rounds")
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=ep.d_model)
    parser.add_argument("--d-state", type=int, default=ep.d_state)
    parser.add_argument("--expand", type=int, default=ep.expand)
    parser.add_argument("--chunk", type=int, default=ep.chunk_size)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scan-only", action="store_true", help="time selective_scan alone, not the whole block")
    parser.add_argument("--max-temp-gb", type=float, default=4.0, help="skip running variants planned above this")
    opts = parser.parse_args()
    lengths = [512, 2048] if opts.quick else [int(v) for v in opts.lengths.split(",")]
    reps = 2 if opts.quick else opts.reps
    args = SSMArgs(d_model=opts.d_model, d_state=opts.d_state, expand=opts.expand, chunk_size=opts.chunk)
    print(f"# {platform.node()} {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}; "
          f"B={opts.batch} d_model={args.d_model} d_inner={args.d_inner} d_state={args.d_state} "
          f"chunk={args.chunk_size}; forward+backward of {'the scan' if opts.scan_only else 'one Mamba block'}, "
          f"best of {reps}")
    print(f"{'L':>6} {'scan':>12} {'wall ms':>10} {'cpu ms':>10} {'speedup':>7} {'temp MiB':>10} {'/ assoc':>8}")
    for length in lengths:
        builder = build_scan if opts.scan_only else build
        built = {impl: builder(args, impl, length, opts.batch) for impl in SCAN_IMPLS}
        runnable = {impl: b for impl, b in built.items() if b[2] <= opts.max_temp_gb * 2**30}
        for compiled, inputs, _ in runnable.values():  # warm-up
            jax.block_until_ready(compiled(*inputs))
        best = {impl: float("inf") for impl in runnable}
        best_cpu = dict(best)
        for _ in range(reps):  # interleaved, so machine noise hits every variant alike
            for impl, (compiled, inputs, _) in runnable.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                jax.block_until_ready(compiled(*inputs))
                best[impl] = min(best[impl], time.perf_counter() - start)
                best_cpu[impl] = min(best_cpu[impl], time.process_time() - start_cpu)
        seq_cpu = best_cpu.get("sequential", float("nan"))
        assoc_temp = built["associative"][2]
        for impl in SCAN_IMPLS:
            temp = built[impl][2]
            if impl in best:
                speedup = seq_cpu / best_cpu[impl] if impl != "sequential" else 1.0
                timing = f"{best[impl] * 1e3:10.1f} {best_cpu[impl] * 1e3:10.1f} {speedup:6.2f}x"
            else:
                timing = f"{'skipped':>10} {'':>10} {'':>7}"
            print(f"{length:6d} {impl:>12} {timing} {temp / 2**20:10.1f} {temp / assoc_temp:8.3f}", flush=True)
        del built, runnable


if __name__ == "__main__":
    main()
