"""Decode benchmark: greedy decoding at batch 1, tokens/s and time to first token, against a baseline in one run.

    python benchmarks/decode.py                  # micro and tiny-like shapes, prompt 32, 128 new tokens, vocab 8192
    python benchmarks/decode.py --quick          # 3 interleaved repeats instead of 7
    python benchmarks/decode.py --recompute      # also the no-cache loop (slow)
    python benchmarks/decode.py --checkpoint=runs/demo   # a trained model: also the int8 factworld-val perplexity

Shapes (issue #15's comparison with the PyTorch implementation of the same design, random weights):
  micro       d_model 256, 4 layers, 4 heads / 2 kv heads, d_ff 1024, dense
  tiny-like   d_model 512, 6 layers, 8 heads / 4 kv heads, d_ff 2048, 4 experts top-2
both unrolled layers (as configs/micro.py and configs/tiny.py), float32.

Variants, timed round-robin (one call of each per repeat, so machine load hits all alike; the median is reported):
  baseline    `generate` of the decode loop at `--baseline_rev` (its infer/decode.py and infer/sampling.py read
              with `git show` and run against today's model code): the loop before the speed work
  cached      today's `decode.generate` (one jitted prefill + `lax.while_loop`), float32 weights
  int8        the same with int8 weight-only params
  recompute   (--recompute) every step re-runs the full forward over the [B, prompt + new] buffer
Time to first token: the same compiled call with the step limit at 1 (prefill + first sample). Greedy, no stop
token, so every call makes exactly `new` tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mantis_jax.infer import decode, quantize  # noqa: E402
from mantis_jax.model import transformer as tfm  # noqa: E402
from mantis_jax.model.args import ModelArgs  # noqa: E402

BASELINE_REV = "57d7f45"  # main on 2026-11-30: sorts the vocabulary twice per greedy step, dequantizes per step
SHAPES = {
    "micro": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=1024),
    "tiny-like": dict(d_model=512, n_layers=6, n_heads=8, n_kv_heads=4, d_ff=2048, n_experts=4, top_k=2),
}


def load_baseline(rev: str):
    """The `decode` module as of git revision `rev` (with that revision's sampling), or None if git lacks it."""
    try:
        src = {name: subprocess.check_output(["git", "-C", ROOT, "show", f"{rev}:mantis_jax/infer/{name}.py"],
                                             stderr=subprocess.DEVNULL, text=True)
               for name in ("sampling", "decode")}
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    sampling = types.ModuleType(f"sampling_{rev}")
    exec(compile(src["sampling"], f"{rev}:sampling.py", "exec"), sampling.__dict__)
    module = types.ModuleType(f"decode_{rev}")
    module.__dict__["_sample"] = sampling.sample
    code = src["decode"].replace("from mantis_jax.infer.sampling import sample", "sample = _sample")
    exec(compile(code, f"{rev}:decode.py", "exec"), module.__dict__)
    return module


def bench_shape(name: str, args: ModelArgs, params, a, baseline) -> list[tuple]:
    B, T, new = a.batch, a.prompt_len, a.new
    rng = np.random.default_rng(0)
    tokens, mask = decode.left_pad([rng.integers(3, args.vocab_size, T).tolist() for _ in range(B)], 0, T)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    stop = jnp.zeros((args.vocab_size,), bool)
    knobs = (jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0), 0)
    key = jax.random.key(0)
    caches: dict = {}

    def cached(module, p, tag):
        def call(limit):
            cache = caches.pop(tag, None) or decode.new_cache(args, B, T, new)
            out = module.generate(args, p, cache, tokens, mask, key, stop, *knobs, limit, max_new_tokens=new)
            caches[tag] = out.cache  # donated in, handed back: the next call reuses the buffer
            return out.tokens_bn
        return call

    variants = {}
    if baseline is not None:
        variants[f"baseline: loop at {a.baseline_rev}"] = cached(baseline, params, "base")
    variants["cached loop, float32"] = cached(decode, params, "float")
    variants["cached loop, int8 weights"] = cached(decode, quantize.quantize_params(params), "int8")
    if a.recompute:
        variants["full recompute each step"] = lambda limit: decode.generate_recompute(
            args, params, tokens, mask, key, stop, *knobs, limit, max_new_tokens=new).tokens_bn

    first, toks, times, ttft = {}, {}, {v: [] for v in variants}, {v: [] for v in variants}
    for v, call in variants.items():
        t0 = time.perf_counter()
        toks[v] = np.asarray(jax.block_until_ready(call(new)))
        first[v] = time.perf_counter() - t0
    for _ in range(a.repeats):
        for v, call in variants.items():
            for limit, bucket in ((new, times), (1, ttft)):
                t0 = time.perf_counter()
                jax.block_until_ready(call(limit))
                bucket[v].append(time.perf_counter() - t0)
    ref = next(iter(variants))
    rows = []
    for v in variants:
        s, f = statistics.median(times[v]), statistics.median(ttft[v])
        same = float(np.mean(toks[v] == toks["cached loop, float32"]))
        rows.append((name, v, B * new / s, B * new / min(times[v]), f * 1e3, statistics.median(times[ref]) / s,
                     same, first[v]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shapes", default="micro,tiny-like", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new", type=int, default=128, help="new tokens")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved timed repeats (default 7, --quick 3)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--baseline_rev", default=BASELINE_REV, help="git revision of the baseline loop ('' = none)")
    ap.add_argument("--recompute", action="store_true", help="also time the no-cache loop")
    ap.add_argument("--checkpoint", default="", help="a training workdir: its model instead of the shapes")
    a = ap.parse_args()
    a.repeats = a.repeats or (3 if a.quick else 7)
    baseline = load_baseline(a.baseline_rev) if a.baseline_rev else None
    if a.baseline_rev and baseline is None:
        print(f"baseline revision {a.baseline_rev} is not in this git checkout: timing today's loop only")
    print(f"batch {a.batch}, prompt {a.prompt_len}, {a.new} new tokens, greedy, {a.repeats} interleaved repeats; "
          f"devices: {jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")

    rows, ppl = [], None
    if a.checkpoint:
        from mantis_jax.train.checkpoint import load_for_inference  # noqa: PLC0415

        config, tokenizer, params = load_for_inference(a.checkpoint)
        args = ModelArgs.from_config(config)
        args = args.replace(max_seq_len=max(args.max_seq_len, a.prompt_len + a.new))
        rows += bench_shape(os.path.basename(a.checkpoint.rstrip("/")), args, params, a, baseline)
        windows = quantize.val_windows(config, tokenizer, seq_len=min(config.data.seq_len, 256), max_windows=32)
        ppl = quantize.report(args, params, quantize.quantize_params(params), windows)
    else:
        for name in a.shapes.split(","):
            args = ModelArgs(vocab_size=a.vocab, max_seq_len=max(512, a.prompt_len + a.new), scan_layers=False,
                             **SHAPES[name])
            params = tfm.init_params(args, jax.random.key(0))
            n = sum(x.size for x in jax.tree.leaves(params))
            print(f"{name}: {n / 1e6:.2f}M params")
            rows += bench_shape(name, args, params, a, baseline)

    print("\n| shape | decode loop | tokens/s (median) | tokens/s (best) | time to first token ms | vs first row "
          "| greedy tokens = float loop | compile + first call s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, v, tps, best, ttft, ratio, same, first in rows:
        print(f"| {name} | {v} | {tps:,.1f} | {best:,.1f} | {ttft:.1f} | {ratio:.2f}x | {100 * same:.1f}% | "
              f"{first:.1f} |")
    if ppl:
        print(f"\nfactworld val perplexity: float32 {ppl['ppl_float']:.3f}, int8 {ppl['ppl_quantized']:.3f} "
              f"({100 * ppl['ppl_change']:+.2f}%); weights {ppl['memory_ratio']:.2f}x the bytes")


if __name__ == "__main__":
    main()
