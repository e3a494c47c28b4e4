"""Figures with matplotlib: a run's training curves (from its metrics.jsonl) and the evaluation's plots.

Training (the checkpoint notebook and `--plots`): loss curves (train and val), expert load per layer (the share
of tokens each expert got, last logged step), and the learning rate. Evaluation: factworld accuracy against
compute (one point per system and kind) and a reliability diagram (accuracy against confidence, per system).
Each function draws on a given Axes, or makes a figure; `save_all` writes PNGs, each captioned with the date and
the command that made it.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Sequence

import matplotlib

if "ipykernel" not in sys.modules and not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")  # files from the command line; a notebook keeps its inline backend
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _split(records: Sequence[dict], split: str) -> list[dict]:
    return [r for r in records if r.get("split") == split]


def loss_curves(records: Sequence[dict], ax=None):
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    train, val = _split(records, "train"), _split(records, "val")
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    ax.legend()
    return ax


def learning_rate(records: Sequence[dict], ax=None):
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    train = [r for r in _split(records, "train") if "lr" in r]
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    return ax


def expert_load(records: Sequence[dict], ax=None):
    """Heat map [layer, expert] of the last logged expert load (1/E everywhere is perfect balance)."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    loads = [r["expert_load"] for r in _split(records, "train") if "expert_load" in r]
    load = np.atleast_2d(np.asarray(loads[-1] if loads else [[1.0]], np.float64))
    im = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0.0)
    ax.figure.colorbar(im, ax=ax, label="share of tokens")
    ax.set(xlabel="expert", ylabel="layer", title="Expert load per layer (last log)",
           xticks=range(load.shape[1]), yticks=range(load.shape[0]))
    return ax


def accuracy_vs_compute(report: dict, ax=None):
    """factworld: exact match against FLOPs per question, one marker per system, labelled by kind."""
    ax = ax or plt.subplots(figsize=(5.5, 4))[1]
    for name, per_kind in report["systems"].items():
        xs = [m["flops_per_question"] for m in per_kind.values()]
        ys = [m["em"] for m in per_kind.values()]
        ax.scatter(xs, ys, label=name)
        for kind, x, y in zip(per_kind, xs, ys):
            ax.annotate(kind, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="FLOPs per question", ylabel="exact match", ylim=(-0.02, 1.02),
           title="factworld: accuracy against compute")
    ax.legend(fontsize=8)
    return ax


def reliability_diagram(report: dict, ax=None):
    ax = ax or plt.subplots(figsize=(4.5, 4))[1]
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="calibrated")
    for name, bins in report["reliability"].items():
        used = [b for b in bins if b["n"]]
        ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], "o-", label=name)
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability")
    ax.legend(fontsize=8)
    return ax


def _save(ax, path: str, caption: str) -> str:
    fig = ax.figure
    fig.text(0.01, 0.005, caption, fontsize=5, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_all(out_dir: str, *, records: Sequence[dict] = (), factworld_report: dict | None = None,
             command: str = "") -> list[str]:
    """PNG files for what is available; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    caption = f"{datetime.date.today().isoformat()}  {command}"[:180]
    written = []
    if records:
        written.append(_save(loss_curves(records), os.path.join(out_dir, "loss.png"), caption))
        written.append(_save(learning_rate(records), os.path.join(out_dir, "learning_rate.png"), caption))
        if any("expert_load" in r for r in records):
            written.append(_save(expert_load(records), os.path.join(out_dir, "expert_load.png"), caption))
    if factworld_report:
        written.append(_save(accuracy_vs_compute(factworld_report),
                             os.path.join(out_dir, "factworld_accuracy_vs_compute.png"), caption))
        written.append(_save(reliability_diagram(factworld_report), os.path.join(out_dir, "reliability.png"),
                             caption))
    return written
