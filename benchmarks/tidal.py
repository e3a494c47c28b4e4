"""TIDAL benchmark: the trained decoding policy against fixed sampling settings at equal perplexity.

    python benchmarks/tidal.py --checkpoint=runs/demo_final --policy=runs/demo_tidal --n=256 --out=docs/perf/tidal

Every setting continues the same `n` held-out prompts (factworld test-split text, `decoding.prompt_len` tokens)
by chunk·chunks tokens. Per setting: repetition rate (share of new tokens already among the row's earlier new
tokens), distinct-2/3 and the perplexity of the new tokens under the base model (its unmodulated logits).
Settings: the policy acting with its Beta mean ("policy") and sampling m ("policy-sampled"); fixed temperatures
(top-k, top-p and penalty off); fixed modulations m (the policy's own knob map with a constant m). The baselines'
figures are interpolated (linearly in log-perplexity) at the policy's perplexity, so the policy is compared with
the fixed temperature and the fixed m that reach the same perplexity: the fixed m there is the best constant
modulation, so the policy beats it only through what its state dependence adds. The policy rows also report
the spread of m (std over all chunks, and the mean within-episode std): a head that acts alike everywhere is a
constant m. Writes `<out>.json` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mantis_jax.control import decoding as dec  # noqa: E402
from mantis_jax.control import train_decoding  # noqa: E402
from mantis_jax.model.args import ModelArgs  # noqa: E402
from mantis_jax.train.checkpoint import load_for_inference  # noqa: E402

DATE = "2026-12-01"
FIGURES = ("repetition", "distinct_2", "distinct_3", "perplexity")


def measure(args, spec, lm_params, head, prompts, bigrams, batch, *, mode, fixed=None, seed=0) -> dict:
    """text_metrics over all prompts (batches of `batch`), plus the mean knobs used."""
    toks, nlls, temps, ms = [], [], [], []
    for i in range(0, len(prompts), batch):
        p = jnp.asarray(prompts[i:i + batch])
        kn = None if fixed is None else dec.fixed_knobs(len(p), *fixed)
        roll = dec.rollout(args, spec, lm_params, head, p, jax.random.key(seed + i), bigrams, kn, mode=mode)
        toks.append(roll.tokens)
        nlls.append(roll.nll)
        temps.append(roll.knobs.temperature)
        ms.append(roll.m)
    out = dec.text_metrics(jnp.concatenate(toks), jnp.concatenate(nlls))
    out["mean_temperature"] = float(jnp.mean(jnp.concatenate(temps)))
    if mode != "fixed":
        m_bk = jnp.concatenate(ms)
        out.update(m_mean=float(jnp.mean(m_bk)), m_std=float(jnp.std(m_bk)),
                   m_std_within=float(jnp.mean(jnp.std(m_bk, axis=1))))
    return out


def at_perplexity(rows: list[dict], ppl: float) -> dict:
    """The baseline figures linearly interpolated in log-perplexity at `ppl` (clamped to the swept range)."""
    rows = sorted(rows, key=lambda r: r["perplexity"])
    x = np.log([r["perplexity"] for r in rows])
    out = {k: float(np.interp(np.log(ppl), x, [r[k] for r in rows])) for k in FIGURES}
    out["in_range"] = bool(x[0] <= np.log(ppl) <= x[-1])
    return out


def rule_head(spec, head: dict, feature: str, tau: float, m_lo: float, m_hi: float, sharp: float = 200.0) -> dict:
    """Head parameters (the policy's layout) that act m_lo below `tau` on one observation scalar and m_hi above
    it (a steep ramp; Beta means at concentration 20): a hand-made state-dependent rule, to ask whether ANY
    dependence on that feature beats the best constant m at equal perplexity."""
    j = spec.n_features - len(dec.SCALARS) + dec.SCALARS.index(feature)
    zero = jax.tree.map(jnp.zeros_like, head)
    k0 = zero["hidden_0"]["kernel"].at[j, 0].set(sharp).at[j, 1].set(sharp)  # ramp = gelu(u) − gelu(u − 1)
    b0 = zero["hidden_0"]["bias"].at[0].set(-sharp * tau).at[1].set(-sharp * tau - 1.0)
    k1 = zero["hidden_1"]["kernel"].at[0, 0].set(1.0).at[1, 0].set(-1.0)
    H = float(jax.nn.gelu(1.0))  # hidden_1 unit 0 is 0 below tau, gelu(1) above
    inv = lambda y: float(np.log(np.expm1(y)))  # noqa: E731  softplus⁻¹
    ends = [(inv(m * 20 - 1), inv((1 - m) * 20 - 1)) for m in (m_lo, m_hi)]  # alpha, beta = 20·(m, 1 − m)
    kb = zero["beta_params"]["kernel"].at[0].set(jnp.array([(hi - lo) / H for lo, hi in zip(*ends)]))
    out = dict(zero, hidden_0={"kernel": k0, "bias": b0}, hidden_1={"kernel": k1, "bias": zero["hidden_1"]["bias"]},
               beta_params={"kernel": kb, "bias": jnp.array(ends[0])})
    return jax.tree.map(lambda a, b: a.astype(b.dtype), out, head)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="Stage-1 workdir: the base model")
    p.add_argument("--policy", required=True, help="trained decoding policy (python -m mantis_jax.control."
                                                    "train_decoding)")
    p.add_argument("--n", type=int, default=64, help="held-out prompts")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--temperatures", default="0.5,0.6,0.7,0.8,0.9,1.0,1.1,1.2,1.3,1.4")
    p.add_argument("--ms", default="0,0.2,0.3,0.35,0.4,0.45,0.5,0.55,0.6,0.65,0.7,0.8,1")
    p.add_argument("--rules", default="", help="hand-made rules feature:tau:m_lo:m_hi,... (rule_head), each "
                                                "scored against the best constant m at its own perplexity")
    p.add_argument("--skip_sweeps", action="store_true", help="only the policy, the m sweep and the rules")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    _, tokenizer, lm_params = load_for_inference(a.checkpoint)
    spec, head, config = train_decoding.load_policy(a.policy)
    args = ModelArgs.from_config(config)
    prompts = train_decoding.Corpus(config, tokenizer, "test").prompts(config.seed, 0, a.n,
                                                                       config.decoding.prompt_len)
    bigrams = jnp.asarray(train_decoding.Corpus(config, tokenizer, "train").bigrams)
    t0 = time.perf_counter()
    run = lambda mode, fixed=None: measure(args, spec, lm_params, head, prompts, bigrams, a.batch,  # noqa: E731
                                           mode=mode, fixed=fixed)
    result = {"policy": run("mean"), "policy-sampled": run("sample")}
    temps = [{"temperature": t, **run("fixed", (t, 0, 1.0, 1.0))}
             for t in ([] if a.skip_sweeps else map(float, a.temperatures.split(",")))] or None
    ms = [{"m": m, **run("fixed", tuple(v[0].item() for v in dec.knobs(spec, jnp.array([m]))))}
          for m in map(float, a.ms.split(","))]
    ppl = result["policy"]["perplexity"]
    rules = []
    for r in filter(None, a.rules.split(",")):
        feature, tau, m_lo, m_hi = r.split(":")
        params = rule_head(spec, head, feature, float(tau), float(m_lo), float(m_hi))
        got = measure(args, spec, lm_params, params, prompts, bigrams, a.batch, mode="mean")
        const = at_perplexity(ms, got["perplexity"])
        rules.append({"rule": r, **got, "constant_m_repetition": const["repetition"], "in_range": const["in_range"],
                      "delta_repetition": got["repetition"] - const["repetition"]})
    result.update(temperature_sweep=temps, m_sweep=ms, rules=rules,
                  fixed_temperature_at_policy_ppl=at_perplexity(temps, ppl) if temps else None,
                  fixed_m_at_policy_ppl=at_perplexity(ms, ppl), n=a.n, tokens=spec.new_tokens, date=DATE,
                  wall_s=time.perf_counter() - t0,
                  command="python benchmarks/tidal.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"{'setting':34s} " + " ".join(f"{k:>11s}" for k in FIGURES))
    for name in ("policy", "policy-sampled", "fixed_temperature_at_policy_ppl", "fixed_m_at_policy_ppl"):
        if result[name] is None:
            continue
        print(f"{name:34s} " + " ".join(f"{result[name][k]:11.3f}" for k in FIGURES))
    for r in temps or []:
        print(f"{'T=' + str(r['temperature']):34s} " + " ".join(f"{r[k]:11.3f}" for k in FIGURES))
    for r in ms:
        print(f"{'m=' + str(r['m']):34s} " + " ".join(f"{r[k]:11.3f}" for k in FIGURES))
    for r in rules:
        print(f"rule {r['rule']:28s} repetition {r['repetition']:.3f} at perplexity {r['perplexity']:.3f} (m mean "
              f"{r['m_mean']:.2f}, within-episode std {r['m_std_within']:.2f}); constant m there "
              f"{r['constant_m_repetition']:.3f}: delta {r['delta_repetition']:+.3f}")
    for name in ("policy", "policy-sampled"):
        r = result[name]
        print(f"{name}: m mean {r['m_mean']:.3f}, std over chunks {r['m_std']:.3f}, "
              f"mean within-episode std {r['m_std_within']:.3f}")
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
