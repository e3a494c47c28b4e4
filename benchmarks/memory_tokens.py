"""Memory tokens on factworld far questions: exact match with and without memory at equal training tokens, and the
memory's cost per segment against the segment's forward.

    python benchmarks/memory_tokens.py                      # configs/memory_tokens.py, 300 steps per run
    python benchmarks/memory_tokens.py --quick              # 20 steps per run: a smoke test of the script
    python benchmarks/memory_tokens.py --cost-only          # only the cost per segment
    python benchmarks/memory_tokens.py --cost-only --ablation runs/bench_memory_tokens/memory   # + a run's ablation

Both runs use `python -m mantis_jax.memory.train_tokens`'s `train()` with the same preset, steps and tokens per
step (memory: batch_size documents x segments x segment_len; none: batch_size x segments windows of segment_len),
so they see the same number of training tokens. Cost: one segment of batch_size rows, (a) the memory's own FLOPs
(read + router + gated write, from XLA's cost analysis) over the LM forward's, (b) the wall time of the jitted
memory segment (read, forward, write) over the plain forward of the same tokens (--reps calls of each,
alternated: the ratio of the fastest calls and the median of the paired ratios), (c) the share of a segment's
positions the 2N memory tokens take. Ablation: the trained memory model's teacher-forced answer CE with each
document's own memory against another document's. The engine's retrieval memory (mantis_jax/engine/) is left
out when this tree lacks it; the script says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mantis_jax.cli import load_preset  # noqa: E402
from mantis_jax.memory import tokens as mt  # noqa: E402
from mantis_jax.memory import train_tokens  # noqa: E402
from mantis_jax.model.args import ModelArgs  # noqa: E402
from mantis_jax.model.transformer import forward  # noqa: E402

PRESET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "memory_tokens.py")


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def _paired_times(f, f_args, g, g_args, reps: int) -> tuple[list[float], list[float]]:
    """Wall times of f and g called alternately (so load on a shared machine hits both alike), after warm-ups."""
    jax.block_until_ready(f(*f_args))
    jax.block_until_ready(g(*g_args))
    tf, tg = [], []
    for _ in range(reps):
        for fn, fn_args, out in ((f, f_args, tf), (g, g_args, tg)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            out.append(time.perf_counter() - t0)
    return tf, tg


def segment_cost(config, reps: int) -> dict:
    """The memory's cost per segment relative to the segment's forward (random weights: cost does not depend on
    them)."""
    c = config.memory.tokens
    config.model.vocab_size = 1152  # the preset's BPE (1024) + 2N memory tokens, padded to 128
    args = ModelArgs.from_config(config)
    B, S, N = config.data.batch_size, c.segment_len, c.n_tokens
    params = train_tokens.init_all(args, config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (B, S), 16, 1000, jnp.int32)
    state = mt.initial_state(params["memory"], B)
    valid = jnp.ones((B,))

    def plain(p, x):  # the same padding mask as the memory segment's, so only the memory differs
        return forward(args, p["lm"], x, kv_mask_bs=x != 0)[0]

    def with_memory(p, s, x):
        new_state, logits, _ = mt.segment_forward(args, p, s, x, valid, pad_id=0)
        return new_state, logits

    def memory_only(p, s, h):  # read + router + gated write, without the LM
        r = mt.read(s["memory"], s["route"])
        probs = mt.route(p["memory"], jnp.mean(h, 1))
        return r, mt.gated_update(p["memory"], s["memory"], h, probs, valid)

    h = jax.random.normal(jax.random.key(2), (B, N, args.d_model))
    f_plain, f_mem = _flops(plain, params, tokens), _flops(memory_only, params, state, h)
    t_plain, t_mem = _paired_times(jax.jit(plain), (params, tokens), jax.jit(with_memory), (params, state, tokens),
                                   reps)
    return {"segment": f"{B} x {S} tokens, N={N}, E={c.n_experts}, d_model={args.d_model}",
            "forward_flops": f_plain, "memory_flops": f_mem, "memory_flops_ratio": f_mem / f_plain,
            "forward_ms_min": 1e3 * min(t_plain), "memory_segment_ms_min": 1e3 * min(t_mem),
            "time_ratio_min": min(t_mem) / min(t_plain),
            "time_ratio_median_paired": statistics.median(m / p for m, p in zip(t_mem, t_plain)),
            "memory_token_share": 2 * N / S}


def memory_ablation(workdir: str, n: int) -> dict:
    """Answer CE and top-1 accuracy (teacher-forced) on n test-split far questions of a trained memory run, with each
    document's own memory and with the memory of another document (the batch rolled by one): the gap is what the
    memory carries about its own document."""
    from mantis_jax import config as config_lib  # noqa: PLC0415
    from mantis_jax.train.checkpoint import Checkpointer  # noqa: PLC0415
    from mantis_jax.train.step import cross_entropy_and_hits  # noqa: PLC0415

    ckpt = Checkpointer(workdir, create=False, async_save=False)
    try:
        step = ckpt.steps()[-1]
        config, tokenizer = ckpt.config_at(step), ckpt.tokenizer_at(step)
        args = ModelArgs.from_config(config)
        fns = train_tokens.compiled(args, config_lib.to_json(config), tokenizer.pad_id)
        _, state, _, _ = ckpt.restore(jax.eval_shape(fns["init"], jax.random.key(0)), step=step)
    finally:
        ckpt.close()
    batch, _, _ = train_tokens.FarQuestions(config, tokenizer, "test").batch(0, n)
    pad = tokenizer.pad_id

    @jax.jit
    def answer_scores(params, batch, shift):
        context = {k: v[:-1] for k, v in batch.items() if k in ("tokens", "targets", "weights", "valid")}
        mem, _ = mt.unroll(args, params, context, pad_id=pad, bptt=1)
        mem = jax.tree.map(lambda x: jnp.roll(x, shift, axis=0), mem)
        _, logits, _ = mt.segment_forward(args, params, mem, batch["tokens"][-1], batch["valid"][-1], pad)
        ce, hits = cross_entropy_and_hits(logits, batch["targets"][-1])
        w = batch["weights"][-1]
        return jnp.sum(ce * w) / jnp.sum(w), jnp.sum(hits * w) / jnp.sum(w)

    own = [float(x) for x in answer_scores(state.params, batch, 0)]
    other = [float(x) for x in answer_scores(state.params, batch, 1)]
    return {"step": step, "questions": n, "answer_ce_own_memory": own[0], "answer_ce_other_memory": other[0],
            "answer_acc_own_memory": own[1], "answer_acc_other_memory": other[1]}


def run(config, workdir: str, steps: int, enabled: bool, eval_questions: int) -> dict:
    config.memory.tokens.enabled = enabled
    config.memory.tokens.eval_questions = eval_questions
    config.train.total_steps = steps
    config.train.max_minutes = 0.0
    config.train.save_every = steps
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    summary = train_tokens.train(config, workdir)
    summary.pop("state")
    return {"memory": enabled, "steps": summary["step"], "tokens_seen": summary["tokens_seen"],
            "far_em": summary["eval"]["far_em"], "far_questions": summary["eval"]["far_questions"],
            "train_answer_ce": summary["train"].get("answer_ce"), "train_loss": summary["train"].get("loss"),
            "train_answer_accuracy": summary["train"].get("answer_accuracy"),
            "minutes": (time.perf_counter() - t0) / 60, "params": summary["params"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-questions", type=int, default=128)
    p.add_argument("--workdir", default="runs/bench_memory_tokens")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="20 steps, 32 questions, 5 timing reps")
    p.add_argument("--cost-only", action="store_true")
    p.add_argument("--out", default="", help="also write the JSON result here")
    p.add_argument("--ablation", default="", help="with --cost-only: the memory ablation of this trained workdir")
    a = p.parse_args()
    if a.quick:
        a.steps, a.eval_questions, a.reps = 20, 32, 5
    result = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv),
              "cost": segment_cost(load_preset(PRESET), a.reps)}
    print(json.dumps(result["cost"], indent=1), flush=True)
    if not a.cost_only:
        result["runs"] = [run(load_preset(PRESET), os.path.join(a.workdir, name), a.steps, enabled, a.eval_questions)
                          for name, enabled in (("memory", True), ("none", False))]
        for r in result["runs"]:
            print(json.dumps(r), flush=True)
    if not a.cost_only or a.ablation:
        result["ablation"] = memory_ablation(a.ablation or os.path.join(a.workdir, "memory"), a.eval_questions)
        print(json.dumps(result["ablation"]), flush=True)
    result["engine"] = ("mantis_jax.engine is present but this script does not compare it yet" if
                        importlib.util.find_spec("mantis_jax.engine") else
                        "left: mantis_jax.engine is not in this tree, so the retrieval-memory comparison is not run")
    print(json.dumps({k: v for k, v in result.items() if k not in ("cost", "runs", "ablation")}), flush=True)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
