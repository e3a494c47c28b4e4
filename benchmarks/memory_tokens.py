"""Memory tokens on factworld far questions: exact match with and without memory at equal training tokens, and the
memory's cost per segment against the segment's forward.

    python benchmarks/memory_tokens.py                      # configs/memory_tokens.py, 300 steps per run
    python benchmarks/memory_tokens.py --quick              # 20 steps per run: a smoke test of the script
    python benchmarks/memory_tokens.py --cost-only          # only the cost per segment
    python benchmarks/memory_tokens.py --cost-only --ablation runs/bench_memory_tokens/memory   # + a run's ablation
    python benchmarks/memory_tokens.py --preset configs/memory_tokens_demo.py --init-from runs/demo \
        --stage2 runs/demo_stage2 --steps 120 --batch-size 8 --curriculum-docs 500   # from the demo LM + the engine

Both runs use `python -m mantis_jax.memory.train_tokens`'s `train()` with the same preset, steps and tokens per
step (memory: batch_size documents x segments x segment_len; none: batch_size x segments windows of segment_len),
so they see the same number of training tokens. Cost: one segment of batch_size rows, (a) the memory's own FLOPs
(read + router + gated write, from XLA's cost analysis) over the LM forward's, (b) the wall time of the jitted
memory segment (read, forward, write) over the plain forward of the same tokens (--reps calls of each,
alternated: the ratio of the fastest calls and the median of the paired ratios), (c) the share of a segment's
positions the 2N memory tokens take. Ablation: the trained memory model's teacher-forced answer CE with each
document's own memory against another document's, at the configured distance and at distance 0 (the evidence
in the segment just before the question). With --stage2 the engine (mantis_jax/engine: the Stage-1 LM of
--init-from with its retrieval memory and the trained encoder) answers the same test questions, beside the same
engine with its memory gates off (the LM alone on its window: no training beyond Stage 1). --reuse keeps trained
run folders (a finished run is only evaluated again).
"""

from __future__ import annotations

import argparse
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


def far_records(config, tokenizer, n: int) -> list[dict]:
    """The first n test-split far records the memory-token layout fits: the questions its far EM is scored on."""
    data = train_tokens.FarQuestions(config, tokenizer, "test")
    out, i = [], 0
    while len(out) < n:
        if data.record(i, with_answer=False) is not None:
            out.append(data.world.qa_record("test", "far", i, distance=config.memory.tokens.distance,
                                            count_tokens=data.count))
        i += 1
    return out


def engine_far_em(config, init_from: str, stage2: str, n: int) -> dict:
    """Far EM of the engine (Stage-1 LM + retrieval memory with the Stage-2 encoder) and of the same engine with its
    memory gates off (the LM on its window), on the same questions as the memory-token runs."""
    from mantis_jax.data import factworld  # noqa: PLC0415
    from mantis_jax.engine.core import Engine  # noqa: PLC0415
    from mantis_jax.engine.policy import FixedPolicy  # noqa: PLC0415
    from mantis_jax.memory.train import complete_config, load_encoder_params  # noqa: PLC0415
    from mantis_jax.train.checkpoint import load_for_inference  # noqa: PLC0415

    saved, tokenizer, params = load_for_inference(init_from)
    mem_tokenizer, _ = train_tokens.load_stage1(config, with_params=False)
    records = far_records(config, mem_tokenizer, n)
    engine = Engine(complete_config(saved), params, tokenizer, encoder_params=load_encoder_params(stage2))
    policy, window_only = engine.policy, FixedPolicy(retrieve="never")
    hits = {"engine": 0, "window": 0}
    t0 = time.perf_counter()
    for r in records:
        engine.forget()
        engine.read(r["context"])
        engine.policy = policy
        hits["engine"] += factworld.exact_match(engine.answer(r["question"]).text, r["answer"])
        engine.policy = window_only
        hits["window"] += factworld.exact_match(engine.answer(r["question"]).text, r["answer"])
    engine.close()
    return {"questions": len(records), "distance": config.memory.tokens.distance, "window_tokens": engine.window,
            "engine_far_em": hits["engine"] / len(records), "window_only_far_em": hits["window"] / len(records),
            "minutes": (time.perf_counter() - t0) / 60}


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
        new_state, logits, _ = mt.segment_forward(args, p, s, x, valid, 0, c.proposal)
        return new_state, logits

    def memory_only(p, s, h, logits_bnv):  # read + router + gated write (+ the vocab proposal), without the LM
        r = mt.read(s["memory"], s["route"])
        probs = mt.route(p["memory"], jnp.mean(h, 1))
        base = jax.nn.softmax(logits_bnv, -1) @ p["lm"]["embedding"] if c.proposal == "vocab" else None
        return r, mt.gated_update(p["memory"], s["memory"], h, probs, valid, base)

    h = jax.random.normal(jax.random.key(2), (B, N, args.d_model))
    logits_bnv = jax.random.normal(jax.random.key(3), (B, N, args.vocab_size))
    f_plain, f_mem = _flops(plain, params, tokens), _flops(memory_only, params, state, h, logits_bnv)
    t_plain, t_mem = _paired_times(jax.jit(plain), (params, tokens), jax.jit(with_memory), (params, state, tokens),
                                   reps)
    return {"segment": f"{B} x {S} tokens, N={N}, E={c.n_experts}, d_model={args.d_model}, proposal {c.proposal}",
            "forward_flops": f_plain, "memory_flops": f_mem, "memory_flops_ratio": f_mem / f_plain,
            "forward_ms_min": 1e3 * min(t_plain), "memory_segment_ms_min": 1e3 * min(t_mem),
            "time_ratio_min": min(t_mem) / min(t_plain),
            "time_ratio_median_paired": statistics.median(m / p for m, p in zip(t_mem, t_plain)),
            "memory_token_share": 2 * N / S}


def memory_ablation(workdir: str, n: int, distance: int | None = None) -> dict:
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
    if distance is not None:
        config.memory.tokens.distance = distance
    batch, _, _ = train_tokens.FarQuestions(config, tokenizer, "test").batch(0, n)
    pad, proposal = tokenizer.pad_id, config.memory.tokens.get("proposal", "tanh")

    @jax.jit
    def answer_scores(params, batch, shift):
        context = {k: v[:-1] for k, v in batch.items() if k in ("tokens", "targets", "weights", "valid")}
        mem, _ = mt.unroll(args, params, context, pad_id=pad, bptt=1, proposal=proposal)
        mem = jax.tree.map(lambda x: jnp.roll(x, shift, axis=0), mem)
        _, logits, _ = mt.segment_forward(args, params, mem, batch["tokens"][-1], batch["valid"][-1], pad, proposal)
        ce, hits = cross_entropy_and_hits(logits, batch["targets"][-1])
        w = batch["weights"][-1]
        return jnp.sum(ce * w) / jnp.sum(w), jnp.sum(hits * w) / jnp.sum(w)

    own = [float(x) for x in answer_scores(state.params, batch, 0)]
    other = [float(x) for x in answer_scores(state.params, batch, 1)]
    return {"step": step, "questions": n, "distance": config.memory.tokens.distance,
            "answer_ce_own_memory": own[0], "answer_ce_other_memory": other[0],
            "answer_acc_own_memory": own[1], "answer_acc_other_memory": other[1]}


def run(config, workdir: str, steps: int, enabled: bool, eval_questions: int, reuse: bool = False) -> dict:
    config.memory.tokens.enabled = enabled
    config.memory.tokens.eval_questions = eval_questions
    config.train.total_steps = steps
    config.train.max_minutes = 0.0
    config.train.save_every = steps
    if not reuse:
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
    p.add_argument("--preset", default=PRESET, help="config file (configs/memory_tokens_demo.py: the demo LM)")
    p.add_argument("--init-from", default="", help="Stage-1 workdir: sets memory.tokens.init_from")
    p.add_argument("--stage2", default="", help="Stage-2 encoder workdir for --init-from: also score the engine")
    p.add_argument("--batch-size", type=int, default=0, help="documents per step (0: the preset's)")
    p.add_argument("--curriculum-docs", type=int, default=-1, help="memory.tokens.curriculum_docs (-1: preset's)")
    p.add_argument("--skip-none", action="store_true", help="no no-memory run (the engine's window-only stands)")
    p.add_argument("--reuse", action="store_true", help="keep trained runs in --workdir (resume / re-evaluate)")
    a = p.parse_args()
    if a.quick:
        a.steps, a.eval_questions, a.reps = 20, 32, 5

    def preset():
        c = load_preset(a.preset)
        if a.init_from:
            c.memory.tokens.init_from = a.init_from
        if a.batch_size:
            c.data.batch_size = a.batch_size
        if a.curriculum_docs >= 0:
            c.memory.tokens.curriculum_docs = a.curriculum_docs
        return c

    cost_config = preset()
    if cost_config.memory.tokens.init_from:
        train_tokens.load_stage1(cost_config, with_params=False)  # the Stage-1 model's shape
    result = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv),
              "cost": segment_cost(cost_config, a.reps)}
    print(json.dumps(result["cost"], indent=1), flush=True)
    if not a.cost_only:
        modes = (("memory", True),) if a.skip_none else (("memory", True), ("none", False))
        result["runs"] = [run(preset(), os.path.join(a.workdir, name), a.steps, enabled, a.eval_questions, a.reuse)
                          for name, enabled in modes]
        for r in result["runs"]:
            print(json.dumps(r), flush=True)
    if not a.cost_only or a.ablation:
        where = a.ablation or os.path.join(a.workdir, "memory")
        result["ablation"] = [memory_ablation(where, a.eval_questions, distance=d) for d in (None, 0)]
        for r in result["ablation"]:
            print(json.dumps(r), flush=True)
    if a.stage2 and not a.cost_only:
        result["engine"] = engine_far_em(preset(), a.init_from, a.stage2, a.eval_questions)
    else:
        result["engine"] = "not run: pass --init-from and --stage2 (the engine needs the Stage-1 LM and its encoder)"
    print(json.dumps(result["engine"]), flush=True)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
