"""The Stage-3 reward: w_c·correct − w_l·latency − w_f·compute + w_cal·calibration, each term in [0, 1].

correct      the final answer matches (exact match; "unknown" on an unanswerable question is correct)
latency      sequential work counted from what ran, over the full path's: the layer steps of the generated tokens
             plus L layer steps per model pass (a prefill, the prefill with retrieved spans, a critic call: a pass
             is parallel over its tokens, sequential over its layers). Deterministic: no wall clock is read.
compute      FLOPs that ran over the FLOPs of the same query on the full path (the engine's trace counts both)
calibration  1 − (confidence − candidate correct)² when the critic ran (a Brier score of its P(supported) against
             whether the answer it judged was right); 0 when it did not run (no confidence was stated)
"""

from __future__ import annotations

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class Weights:
    correct: float = 1.0
    latency: float = 0.3
    compute: float = 0.2
    calibration: float = 0.5

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Weights":
        c = config.controller
        return cls(float(c.reward_correct), float(c.reward_latency), float(c.reward_compute),
                   float(c.reward_calibration))


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one episode did and how it ended."""

    correct: bool  # the final answer
    candidate_correct: bool  # the answer before the critic's verdict (what the critic judged)
    confidence: float | None  # the critic's P(supported); None when it did not run
    latency: float  # in [0, 1], see latency_fraction
    compute: float  # flops / flops_full


def latency_fraction(layers_per_token: list[int], n_layers: int, passes: int, full_passes: int) -> float:
    """Sequential layer steps of this query (`passes` whole-model passes besides decoding) over those of the same
    tokens on the full path (every token at full depth, `full_passes` passes)."""
    if not layers_per_token:
        raise ValueError("latency_fraction got no generated tokens; an episode generates at least one")
    ran = sum(layers_per_token) + n_layers * passes
    full = len(layers_per_token) * n_layers + n_layers * full_passes
    return ran / full


def calibration(confidence: float | None, candidate_correct: bool) -> float:
    if confidence is None:
        return 0.0
    return 1.0 - (float(confidence) - float(candidate_correct)) ** 2


def reward(outcome: Outcome, weights: Weights) -> tuple[float, dict[str, float]]:
    """(reward, its terms) of one episode."""
    terms = {"correct": float(outcome.correct), "latency": float(outcome.latency),
             "compute": float(outcome.compute),
             "calibration": calibration(outcome.confidence, outcome.candidate_correct)}
    total = (weights.correct * terms["correct"] - weights.latency * terms["latency"]
             - weights.compute * terms["compute"] + weights.calibration * terms["calibration"])
    return total, terms
