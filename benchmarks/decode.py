"""Decode benchmark: the cached decode loop against full recompute, and int8 weights against float, in one run.

    python benchmarks/decode.py            # micro-sized model, batch 1, prompt 32, 512 new tokens
    python benchmarks/decode.py --quick    # 64 new tokens, one timed repeat
    python benchmarks/decode.py --checkpoint=runs/micro   # a trained model: also the factworld-val perplexity change

Baseline: `decode.generate` (prefill + `lax.while_loop` over the static KV cache, one jitted call) with float32
weights. Measured in the same run, same jitted style and shapes: `decode.generate_recompute` (every step re-runs
the full forward over the [B, prompt + new] buffer; goal: cached >= 5x faster), and the cached loop with int8
weight-only params (dequantized inside each step). Greedy decoding, no stop token, so every run makes exactly
`new` tokens per row. Each figure is the median of the timed repeats after a warm-up (compile) call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mantis_jax.eval import perplexity as ppl_lib  # noqa: E402
from mantis_jax.infer import decode, quantize  # noqa: E402
from mantis_jax.model import transformer as tfm  # noqa: E402
from mantis_jax.model.args import ModelArgs  # noqa: E402


def micro_args(vocab: int, max_len: int) -> ModelArgs:
    """configs/micro.py's shape (d 128, 8 layers, 4 heads / 2 kv, d_ff 768, dense) with the given vocab."""
    return ModelArgs(vocab_size=vocab, d_model=128, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=768,
                     max_seq_len=max(512, max_len))


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(compile + first call seconds, median seconds of `repeats` calls, last output)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new", type=int, default=None, help="new tokens (default 512, --quick 64)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3, --quick 1)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--skip_recompute", action="store_true", help="only the cached float vs int8 figures")
    ap.add_argument("--checkpoint", default="", help="a training workdir: use its model and report perplexity")
    a = ap.parse_args()
    new = a.new or (64 if a.quick else 512)
    repeats = a.repeats or (1 if a.quick else 3)
    B, T = a.batch, a.prompt_len

    if a.checkpoint:
        from mantis_jax.train.checkpoint import load_for_inference  # noqa: PLC0415

        config, tokenizer, params = load_for_inference(a.checkpoint)
        args = ModelArgs.from_config(config)
        args = args.replace(max_seq_len=max(args.max_seq_len, T + new))
    else:
        args = micro_args(a.vocab, T + new)
        params = jax.jit(lambda k: tfm.init_params(args, k))(jax.random.key(0))
    qparams = jax.block_until_ready(quantize.quantize_params(params))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"model: {n_params / 1e6:.2f}M params (d {args.d_model}, {args.n_layers} layers, vocab "
          f"{args.vocab_size}); batch {B}, prompt {T}, {new} new tokens, {repeats} timed repeat(s); "
          f"devices: {jax.devices()[0].platform} x{jax.device_count()}")

    rng = np.random.default_rng(0)
    tokens, mask = decode.left_pad([rng.integers(3, args.vocab_size, T).tolist() for _ in range(B)], 0, T)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    stop = jnp.zeros((args.vocab_size,), bool)
    knobs = (jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0), 0)
    key = jax.random.key(0)
    caches = {}

    def cached(p, limit=new):
        cache = caches.pop(id(p), None) or decode.new_cache(args, B, T, new)
        out = decode.generate(args, p, cache, tokens, mask, key, stop, *knobs, limit, max_new_tokens=new)
        caches[id(p)] = out.cache  # donated in, handed back: the next call reuses the buffer
        return out.tokens_bn

    def recompute():
        return decode.generate_recompute(args, params, tokens, mask, key, stop, *knobs, new,
                                         max_new_tokens=new).tokens_bn

    rows = []
    c_first, c_s, c_tok = timed(lambda: cached(params), repeats)
    rows.append(("cached loop, float32 (baseline)", c_s, c_first))
    _, ttft_s, _ = timed(lambda: cached(params, 1), repeats)
    if not a.skip_recompute:
        r_first, r_s, r_tok = timed(recompute, repeats)
        rows.append(("full recompute each step, float32", r_s, r_first))
    q_first, q_s, q_tok = timed(lambda: cached(qparams), repeats)
    rows.append(("cached loop, int8 weights", q_s, q_first))

    print(f"\n| decode ({B}x{new} tokens) | seconds | tokens/s | vs baseline | compile+first call s |")
    print("|---|---:|---:|---:|---:|")
    for name, s, first in rows:
        print(f"| {name} | {s:.3f} | {B * new / s:,.1f} | {c_s / s:.2f}x | {first:.1f} |")
    if not a.skip_recompute:
        print(f"\ncached / recompute speed-up: {r_s / c_s:.1f}x (goal >= 5x)")
    print(f"time to first token (prefill {T} + first sample, cached float): {ttft_s * 1e3:.1f} ms")
    for name, toks in (("recompute", None if a.skip_recompute else r_tok), ("int8", q_tok)):
        if toks is not None:
            same = float(np.mean(np.asarray(toks) == np.asarray(c_tok)))
            print(f"greedy tokens of {name} equal to the cached float loop's: {100 * same:.1f}% of positions")

    mem = {}
    for name, p in (("float32", params), ("int8", qparams)):
        compiled = decode.generate.lower(args, p, decode.new_cache(args, B, T, new), tokens, mask, key, stop,
                                         *knobs, new, max_new_tokens=new).compile()
        stats = compiled.memory_analysis()
        mem[name] = (quantize.param_bytes(p), getattr(stats, "argument_size_in_bytes", float("nan")),
                     getattr(stats, "temp_size_in_bytes", float("nan")))
    print("\n| weights | param bytes | vs float | jitted decode: argument bytes | temp bytes |")
    print("|---|---:|---:|---:|---:|")
    for name, (pb, arg_b, tmp_b) in mem.items():
        print(f"| {name} | {pb / 2**20:.2f} MiB | {pb / mem['float32'][0]:.2f}x | {arg_b / 2**20:.2f} MiB | "
              f"{tmp_b / 2**20:.2f} MiB |")

    if a.checkpoint:
        windows = ppl_lib.val_windows(config, tokenizer, seq_len=min(config.data.seq_len, 256), max_windows=32)
        r = ppl_lib.quantization_report(args, params, qparams, windows)
        print(f"\nfactworld val perplexity ({windows.shape[0]} windows of {windows.shape[1] - 1}): float32 "
              f"{r['ppl_float']:.3f}, int8 {r['ppl_quantized']:.3f} ({100 * r['ppl_change']:+.2f}%)")


if __name__ == "__main__":
    main()
