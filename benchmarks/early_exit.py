"""Early-exit decoding on a trained checkpoint: mean layers per token, tokens/s at batch 1 against full depth, and
the near-range exact-match change, for the two confidences and a sweep of thresholds, in one run.

    python -m mantis_jax.train --config=configs/demo.py --workdir=runs/ee --config.model.exit_loss_weight=1.0
    python benchmarks/early_exit.py --checkpoint=runs/ee               # 150 near-range questions
    python benchmarks/early_exit.py --checkpoint=runs/ee --quick       # 48 questions, 3 timed repeats

Baseline (measured in the same run): full-depth decoding (`exit=None`) of the same checkpoint.
- EM: factworld test near-range questions answered greedily (batch 16, up to 8 new tokens, stop at a newline);
  exit decisions are per row, so the batch does not change a row's answer.
- Speed: batch 1, the prompt is the start of a test document, 128 new tokens without a stop token; the variants
  are timed round-robin (one call of each per round). Tokens/s from the median call; the speed-ups are paired:
  the median over rounds of the baseline's time / the variant's time in the same round (calls made back to back,
  so load that drifts during the run cancels), and the ratio of the fastest calls (on a loaded machine the least
  preempted: the code's own cost). Mean layers per token is over the generated tokens of that run (token 0 comes
  from the full-depth prefill). A timed call is prefill + decode: the prompt's (<= 64 tokens) full-depth prefill
  is in every variant's time, so the ratios slightly understate the decode loop's own. A second baseline is the
  early-exit step at threshold 1 (the same tokens as full depth, every exit check paid): what exiting itself
  saves, apart from how the step is built; a third row is that step with no exit check at all (min_layer = L):
  full depth computed the way the early-exit step computes it (its cache handling is cheaper than `forward`'s).
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

from mantis_jax.data import factworld  # noqa: E402
from mantis_jax.infer import decode  # noqa: E402
from mantis_jax.infer.early_exit import EarlyExit  # noqa: E402
from mantis_jax.infer.runner import Generator, newline_ids  # noqa: E402
from mantis_jax.model.args import ModelArgs  # noqa: E402
from mantis_jax.train.checkpoint import load_for_inference  # noqa: E402


NO_EXIT = "early-exit step, threshold 1 (never exits)"
NO_CHECK = "early-exit step without checks (min_layer = L: full depth)"


def near_em(config, tokenizer, params, records, variants) -> dict:
    """EM and mean layers per generated token of each variant {name: (exit, threshold)}."""
    gen = Generator(ModelArgs.from_config(config), params, tokenizer, batch_size=16,
                    extra_stop_ids=newline_ids(tokenizer))
    prompts = [factworld.prompt(r) for r in records]
    out = {}
    for name, (ex, thr) in variants.items():
        completions, stats = gen.generate(prompts, max_new_tokens=8, temperature=0.0, truncate=True,
                                          measure_ttft=False, exit=ex, exit_threshold=thr)
        hits = [factworld.exact_match(c.split("\n", 1)[0].strip(), r["answer"]) for c, r in zip(completions, records)]
        out[name] = (float(np.mean(hits)), stats.mean_layers())
    return out


def speed(args, params, prompt_ids, variants, new: int, repeats: int) -> dict:
    """Per variant: the call times of every round (one call of each variant per round, in turn) and the mean layers
    per generated token."""
    T = len(prompt_ids)
    tokens, mask = (jnp.asarray(x) for x in decode.left_pad([prompt_ids], 0, T))
    stop = jnp.zeros((args.vocab_size,), bool)
    caches: dict = {}

    def call(name):
        ex, thr = variants[name]
        cache = caches.pop(name, None) or decode.new_cache(args, 1, T, new)
        out = decode.generate(args, params, cache, tokens, mask, jax.random.key(0), stop, 0.0, 0, 1.0, 0, new,
                              jnp.float32(thr), max_new_tokens=new, exit=ex)
        jax.block_until_ready(out.tokens_bn)
        caches[name] = out.cache
        return out

    layers = {name: float(np.asarray(call(name).layers_bn)[0, 1:].mean()) for name in variants}  # + compile
    times: dict = {name: [] for name in variants}
    for _ in range(repeats):
        for name in variants:
            t0 = time.perf_counter()
            call(name)
            times[name].append(time.perf_counter() - t0)
    return {name: (times[name], layers[name]) for name in variants}


def paired(times_a, times_b) -> float:
    """Median over rounds of time_a / time_b (b's speed-up over a): each ratio compares calls made back to back,
    so load that drifts over the run cancels (a ratio of two medians does not)."""
    return statistics.median(a / b for a, b in zip(times_a, times_b))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True, help="a training workdir (trained with model.exit_loss_weight)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="near-range questions (default 150, --quick 48)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, --quick 3)")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--min_layers", default="", help="comma list of first exit layers (default: "
                    "config.model.min_exit_layer)")
    ap.add_argument("--thresholds", default="0.9,0.8,0.6,0.4")
    ap.add_argument("--skip_em", action="store_true", help="only the batch-1 speed (no QA)")
    a = ap.parse_args()
    n, repeats = a.n or (48 if a.quick else 150), a.repeats or (3 if a.quick else 5)
    config, tokenizer, params = load_for_inference(a.checkpoint)
    args = ModelArgs.from_config(config)
    min_layers = [int(x) for x in a.min_layers.split(",")] if a.min_layers else [args.min_exit_layer]
    variants = {"full depth (baseline)": (None, 1.0),  # the early-exit step that never exits: what the checks cost
                NO_EXIT: (EarlyExit(min_layers[0], "softmax"), 1.0),
                NO_CHECK: (EarlyExit(args.n_layers, "softmax"), 1.0)}
    for min_layer in min_layers:
        for kind in ("softmax", "margin"):
            for thr in (float(t) for t in a.thresholds.split(",")):
                variants[f"{kind} >= {thr:g}, from layer {min_layer}"] = (EarlyExit(min_layer, kind), thr)
    print(f"{a.checkpoint}: {args.n_layers} layers, d_model {args.d_model}, vocab {args.vocab_size}, "
          f"exit_loss_weight {args.exit_loss_weight}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    records = list(factworld.world_from_config(config).qa_records("test", "near", n))
    em = ({v: (float("nan"), float("nan")) for v in variants} if a.skip_em
          else near_em(config, tokenizer, params, records, variants))
    doc = factworld.world_from_config(config).document("test", 0).text
    prompt_ids = tokenizer.encode(doc, add_bos=True)[:64]
    tps = speed(args, params, prompt_ids, variants, a.new, repeats)

    base_em, (base_times, _) = em["full depth (baseline)"][0], tps["full depth (baseline)"]
    print(f"\n| decoding | near EM ({n}) | EM change (points) | mean layers / token (QA) | mean layers / token "
          f"(batch-1 run) | tokens/s at batch 1 (median) | vs full depth (paired) | vs the step that never exits "
          f"(paired) | vs full depth, fastest of {repeats} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in variants:
        e, lq = em[name]
        t, ls = tps[name]
        print(f"| {name} | {100 * e:.1f}% | {100 * (e - base_em):+.1f} | {lq:.2f} | {ls:.2f} | "
              f"{a.new / statistics.median(t):,.1f} | {paired(base_times, t):.2f}x | "
              f"{paired(tps[NO_EXIT][0], t):.2f}x | {min(base_times) / min(t):.2f}x |")


if __name__ == "__main__":
    main()
