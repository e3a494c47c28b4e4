"""Scores shared by every task: accuracy, hallucination rate, calibration (ECE and reliability bins), pass@k.

Per-item results enter as plain lists (correct flags, confidences in [0, 1], abstention flags); figures leave as
floats. A hallucination is an answer that was given (not an abstention) and is wrong.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def hallucination_rate(correct: Sequence[bool], abstained: Sequence[bool]) -> float:
    """Share of items answered (not abstained) and wrong."""
    return mean([(not c) and (not a) for c, a in zip(correct, abstained)])


def reliability_bins(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> list[dict]:
    """Equal-width confidence bins over [0, 1] (the last one closed): count, mean confidence, accuracy."""
    conf = np.clip(np.asarray(confidence, np.float64), 0.0, 1.0)
    hit = np.asarray(correct, np.float64)
    index = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    bins = []
    for b in range(n_bins):
        sel = index == b
        n = int(sel.sum())
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": n,
                     "confidence": float(conf[sel].mean()) if n else float("nan"),
                     "accuracy": float(hit[sel].mean()) if n else float("nan")})
    return bins


def ece(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> float:
    """Expected calibration error: sum over bins of (bin share) x |accuracy - mean confidence|."""
    total = len(confidence)
    if not total:
        return float("nan")
    return float(sum(b["n"] / total * abs(b["accuracy"] - b["confidence"])
                     for b in reliability_bins(confidence, correct, n_bins) if b["n"]))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k), computed as a stable product."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c ({c}) <= n ({n}) and 1 <= k ({k}) <= n")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def softmax(logits: Sequence[float]) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def summary(correct: Sequence[bool], confidence: Sequence[float], abstained: Sequence[bool] | None = None) -> dict:
    """accuracy, hallucination rate, abstention rate and ECE of one task's items."""
    abstained = list(abstained) if abstained is not None else [False] * len(correct)
    return {"n": len(correct), "accuracy": mean(correct), "hallucination_rate": hallucination_rate(correct, abstained),
            "abstention_rate": mean(abstained), "ece": ece(confidence, correct)}


def is_finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
