"""Stage 2 step time: the frozen LM run every step (on the fly) against its hidden states cached once.

    python benchmarks/stage2_speed.py --checkpoint=runs/demo [--pool=256] [--steps=4]

One process, the same batches (memory/pool.py's PoolBatches, `retrieval.*` at the run's values): seconds per
training step on the fly (LM + encoder, chunked scan), cached with the chunked scan, cached with the sequential
scan; the cache's fill time per text. The first step of each variant (compilation) is not timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mantis_jax.memory import encoder as enc  # noqa: E402
from mantis_jax.memory import pool  # noqa: E402
from mantis_jax.memory import train as stage2  # noqa: E402
from mantis_jax.model.args import ModelArgs  # noqa: E402
from mantis_jax.model.ssm import SSMArgs  # noqa: E402
from mantis_jax.train.state import TrainState  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--pool", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    saved, tok, lm_params = stage2._load_stage1(a.checkpoint)
    config = stage2.complete_config(saved)
    stage2.set_key(config, "retrieval.pool", a.pool)
    rt, margs = config.retrieval, ModelArgs.from_config(config)
    batches = pool.PoolBatches(config)
    cache = pool.HiddenCache(margs, lm_params, tok, rt.max_len)
    texts = batches.texts()
    t = time.perf_counter()
    cache.fill(texts)
    print(f"cache fill: {len(texts)} texts, {(time.perf_counter() - t) / len(texts) * 1e3:.2f} ms per text")
    results = {}
    for name, cached, impl in (("on the fly, chunked", False, "chunked"), ("cached, chunked", True, "chunked"),
                               ("cached, sequential", True, "sequential")):
        stage2.set_key(config, "memory.episodic.scan_impl", impl)
        sargs = SSMArgs.from_config(config)
        tx = stage2.make_optimizer(rt)
        params = enc.init_encoder(config, jax.random.key(0))
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
        step_fn = stage2.make_train_step(margs, sargs, stage2._optimizer_key(rt), rt.temperature, cached)
        for i in range(a.steps + 1):
            if i == 1:
                t = time.perf_counter()
            inputs = stage2.batch_inputs(batches.batch(i), tok, rt, cache if cached else None)
            state, metrics = step_fn(state, lm_params, *inputs)
            float(metrics["loss"])
        results[name] = (time.perf_counter() - t) / a.steps
        print(f"{name:22s} {results[name]:7.2f} s/step  ({results['on the fly, chunked'] / results[name]:.1f}x)",
              flush=True)


if __name__ == "__main__":
    main()
