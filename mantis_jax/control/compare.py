"""Policies compared on the same episodes: accuracy, hallucination rate, compute, latency and reward.

`evaluate(env, policy, indices, weights)` runs episodes `indices` of an environment (control/episodes.py) under one
policy and returns the means: accuracy (exact match; "unknown" is right on an unanswerable question),
hallucinated (answered, not "unknown", and wrong, over all questions), compute and latency (fractions of the full
path, counted from what ran), the Stage-3 reward, the retrieve and verify gate rates, and accuracy per kind.
`benchmarks/control.py` and the demo print these for the fixed policies, the critic and the PPO controller.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from mantis_jax.control import reward
from mantis_jax.data import factworld
from mantis_jax.engine.policy import Decisions


@dataclasses.dataclass
class EntropyPolicy:
    """Retrieve and verify only when the next-token distribution is uncertain (normalised entropy > threshold)."""

    threshold: float = 0.3

    def decide(self, summary) -> Decisions:
        unsure = float(summary.entropy) > self.threshold
        return Decisions(exit_threshold=1.0, episodic=unsure, semantic=unsure, verify=unsure)


def evaluate(env, policy, indices: list[int], weights: reward.Weights) -> dict:
    rows, t0 = [], time.perf_counter()
    for i in indices:
        ep = env.run(i, policy)
        answered = factworld.normalize_answer(ep.info["answer"]) != factworld.UNKNOWN
        rows.append({"kind": ep.info["kind"], "correct": ep.outcome.correct,
                     "hallucinated": answered and not ep.outcome.correct, "compute": ep.outcome.compute,
                     "latency": ep.outcome.latency, "reward": reward.reward(ep.outcome, weights)[0],
                     "retrieve": ep.decisions.episodic or ep.decisions.semantic, "verify": ep.decisions.verify})
    mean = lambda key, sel=rows: float(np.mean([r[key] for r in sel]))  # noqa: E731
    out = {k: mean(k) for k in ("correct", "hallucinated", "compute", "latency", "reward", "retrieve", "verify")}
    out["accuracy"] = out.pop("correct")
    out["by_kind"] = {k: mean("correct", [r for r in rows if r["kind"] == k]) for k in factworld.KINDS
                      if any(r["kind"] == k for r in rows)}
    out["episodes_per_s"] = len(rows) / (time.perf_counter() - t0)
    return out


def format_row(name: str, r: dict, width: int = 42) -> str:
    return (f"{name:{width}s} acc {r['accuracy']:.3f}  halluc {r['hallucinated']:.3f}  compute {r['compute']:.3f}  "
            f"latency {r['latency']:.3f}  reward {r['reward']:.3f}  retrieve {r['retrieve']:.2f}  "
            f"verify {r['verify']:.2f}  " + " ".join(f"{k} {v:.2f}" for k, v in r["by_kind"].items()))
