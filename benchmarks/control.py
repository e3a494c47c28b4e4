"""Control benchmark: accuracy, hallucination rate and compute of fixed policies, the critic and the PPO controller.

    python benchmarks/control.py --checkpoint=runs/demo --critic=runs/demo_critic --controller=runs/demo_rl \
        --n=24 --out=docs/perf/control

Every policy answers the same held-out test episodes (control/episodes.py: `n` factworld questions of each kind,
near, far, cross_session and unanswerable, test entities) on one engine. Per policy: accuracy (exact match;
"unknown" is right on unanswerable questions), hallucination rate (answered, not "unknown", and wrong, over all
questions), mean compute (FLOPs / the full path's), mean latency (model passes + layer steps / the full path's),
the Stage-3 reward, gate rates, and accuracy per kind. Baseline: "no critic" (always retrieve, never verify), the
engine's default. Also printed: the critic's test-split ECE / AUROC (from its workdir) and the PPO run's episodes/s
and wall time (from the controller's metrics.jsonl). Writes `<out>.json` and the accuracy-vs-compute plot
`<out>.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from mantis_jax.control import compare  # noqa: E402
from mantis_jax.control import controller as ctl  # noqa: E402
from mantis_jax.control import reward, store  # noqa: E402
from mantis_jax.control.critic import Critic  # noqa: E402
from mantis_jax.control.episodes import EngineEpisodes  # noqa: E402
from mantis_jax.engine.core import Engine  # noqa: E402
from mantis_jax.engine.policy import FixedPolicy  # noqa: E402
from mantis_jax.memory.train import load_encoder_params  # noqa: E402
from mantis_jax.train.checkpoint import load_for_inference  # noqa: E402
from mantis_jax.train.metrics import read_jsonl  # noqa: E402

DATE = "2026-12-01"


def plot(results: dict, path: str, command: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        learned = name.startswith("PPO")
        ax.scatter(r["compute"], r["accuracy"], marker="*" if learned else "o", s=160 if learned else 60,
                   color="crimson" if learned else "steelblue")
        # the controller's label below its star: it often sits on a fixed policy's point
        ax.annotate(name, (r["compute"], r["accuracy"]), textcoords="offset points",
                    xytext=(-60, -16) if learned else (6, 4), fontsize=8, color="crimson" if learned else "black")
    fixed = sorted((r["compute"], r["accuracy"]) for n, r in results.items() if not n.startswith("PPO"))
    front, best = [], -1.0
    for c, a in fixed:
        if a > best:
            front.append((c, a))
            best = a
    ax.plot(*zip(*front), color="steelblue", alpha=0.4, linestyle="--", label="front of the fixed policies")
    ax.margins(x=0.15, y=0.08)
    ax.set_xlabel("compute (FLOPs / full path)")
    ax.set_ylabel("accuracy (exact match)")
    ax.set_title(f"accuracy vs compute, factworld test, {DATE}", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.text(0.01, 0.01, command, fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="Stage-1 workdir (the LM)")
    p.add_argument("--critic", required=True, help="critic workdir (python -m mantis_jax.control.train_critic)")
    p.add_argument("--controller", default="", help="Stage-3 workdir (python -m mantis_jax.control.train_rl)")
    p.add_argument("--stage2", default="", help="Stage-2 workdir: its trained retrieval encoder (default: none)")
    p.add_argument("--n", type=int, default=24, help="test questions per kind")
    p.add_argument("--entropy", type=float, default=0.3, help="threshold of the entropy heuristic")
    p.add_argument("--out", default="control_benchmark", help="writes <out>.json and <out>.png")
    a = p.parse_args()
    command = "python benchmarks/control.py " + " ".join(sys.argv[1:])
    saved, tokenizer, params = load_for_inference(a.checkpoint)
    config = store.control_config(saved, [])
    critic = Critic.from_workdir(a.critic, lm=(config, tokenizer, params))
    encoder = load_encoder_params(a.stage2) if a.stage2 else None
    engine = Engine(config, params, tokenizer, critic=critic, encoder_params=encoder)
    env = EngineEpisodes(engine, "test", distance=config.controller.distance)
    weights = reward.Weights.from_config(config)
    indices = list(range(4 * a.n))
    policies = {
        "no critic (always retrieve)": FixedPolicy("always", 1.0, False),
        "never retrieve": FixedPolicy("never", 1.0, False),
        "critic (always retrieve + verify)": FixedPolicy("always", 1.0, True),
        "never retrieve + verify": FixedPolicy("never", 1.0, True),
        f"entropy > {a.entropy} (retrieve + verify)": compare.EntropyPolicy(a.entropy),
    }
    if a.controller:
        policies["PPO controller"] = ctl.Controller.from_workdir(a.controller)
    env.run(indices[0], policies["no critic (always retrieve)"])  # warm-up: compile the engine's shapes
    results = {}
    for name, policy in policies.items():
        results[name] = compare.evaluate(env, policy, indices, weights)
        r = results[name]
        print(compare.format_row(name, r), flush=True)
    summary = {"date": DATE, "command": command, "n_per_kind": a.n, "policies": results}
    crit = [r for r in read_jsonl(a.critic) if r.get("split") == "critic_test"]
    if crit:
        summary["critic_test"] = crit[-1]
        print(f"critic (test split): ECE {crit[-1]['ece']:.3f}  AUROC {crit[-1]['auroc']:.3f}  "
              f"threshold {crit[-1]['threshold']:.3f}")
    if a.controller:
        rl = [r for r in read_jsonl(a.controller) if r.get("split") == "ppo"]
        if rl:
            eps = [r["episodes_per_s"] for r in rl]
            summary["ppo"] = {"updates": len(rl), "episodes_per_s_median": float(np.median(eps)),
                              "first_reward": rl[0]["reward"], "last_reward": rl[-1]["reward"]}
            print(f"PPO: {len(rl)} updates, {np.median(eps):.2f} episodes/s (median), reward "
                  f"{rl[0]['reward']:.3f} -> {rl[-1]['reward']:.3f}")
    with open(a.out + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    plot(results, a.out + ".png", command)
    print(f"wrote {a.out}.json and {a.out}.png")


if __name__ == "__main__":
    main()
