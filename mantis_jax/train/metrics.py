"""Training metrics: the peak-FLOP/s probe, MFU, and the writers (JSONL + TensorBoard event files).

A step's metrics leave the jitted step as a dict of device arrays; `to_host` turns them into floats (and lists for
the per-layer expert load [L, E]). `MetricsWriter.write(step, metrics)` appends one JSON line to
`<workdir>/metrics.jsonl` and writes each scalar (and each layer's expert load) to TensorBoard event files under
`<workdir>/tensorboard` with tensorboardX, which needs no TensorFlow. MFU is model FLOPs per second divided by the
dense float32 matmul FLOP/s that XLA reaches on the same machine, measured at start-up by `measure_peak_flops`.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def measure_peak_flops(n: int = 1024, reps: int = 5, dtype=jnp.float32, device=None) -> float:
    """FLOP/s of a jitted n×n @ n×n matmul (best of `reps` timed calls after a warm-up): the MFU denominator.

    Several chained matmuls per call amortise the dispatch, so the figure is the matmul unit's, not Python's. The
    operands are made on the host and put on one of this process's own devices (`device`, default its first), so
    the probe runs alone on each process of a multi-process job and inside any mesh context."""
    device = device or jax.local_devices()[0]
    chain = 4
    rng = np.random.default_rng(0)
    a, b = (jax.device_put((rng.standard_normal((n, n)) / math.sqrt(n)).astype(dtype), device) for _ in range(2))

    @jax.jit
    def matmuls(x, y):
        for _ in range(chain):  # each depends on the last, so XLA cannot drop or merge them
            x = jnp.dot(x, y, preferred_element_type=dtype)
        return x

    matmuls(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        matmuls(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return chain * 2.0 * n ** 3 / best


def agreed_peak_flops(peak_flops: float = 0.0) -> float:
    """`peak_flops` when set, else the probe's figure; in a multi-process job, process 0's figure on every process
    (each probes its own device, and MFU must mean the same thing in every process's metrics)."""
    if peak_flops:
        return float(peak_flops)
    measured = measure_peak_flops()
    if jax.process_count() == 1:
        return measured
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return float(multihost_utils.broadcast_one_to_all(np.float64(measured)))


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak FLOP/s."""
    return flops_per_token * tokens_per_s / peak_flops if peak_flops > 0 else 0.0


def to_host(metrics: dict[str, Any]) -> dict[str, Any]:
    """Device metrics -> Python floats (scalars) and nested lists (arrays such as expert_load [L, E])."""
    out = {}
    for key, value in jax.device_get(metrics).items():
        arr = np.asarray(value)
        out[key] = float(arr) if arr.ndim == 0 else arr.astype(np.float64).tolist()
    return out


def mean_metrics(history: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each key over host metric dicts (lists averaged element-wise); "tokens" is summed."""
    history = list(history)
    out = {}
    for key in history[0]:
        values = np.asarray([h[key] for h in history], np.float64)
        value = values.sum(0) if key == "tokens" else values.mean(0)
        out[key] = float(value) if value.ndim == 0 else value.tolist()
    return out


class MetricsWriter:
    """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard event files (either may be off)."""

    def __init__(self, workdir: str, *, jsonl: bool = True, tensorboard: bool = True, enabled: bool = True):
        self.workdir = workdir
        self._jsonl = None
        self._tb = None
        if not enabled:  # processes other than 0 in a multi-process run write nothing
            return
        os.makedirs(workdir, exist_ok=True)
        if jsonl:
            self._jsonl = open(os.path.join(workdir, JSONL_NAME), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 (optional at import time for notebooks)

            self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), flush_secs=10)

    def write(self, step: int, metrics: dict[str, Any], *, prefix: str = "train") -> None:
        """One record: {"step", "split", **metrics}; scalars also go to TensorBoard as `<prefix>/<key>`."""
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": int(step), "split": prefix, **metrics}) + "\n")
            self._jsonl.flush()
        if self._tb is None:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"{prefix}/{key}", value, step)
            elif key == "expert_load":  # [L, E]: the share of tokens each expert got, one chart per layer
                for layer, row in enumerate(value):
                    for e, v in enumerate(row):
                        self._tb.add_scalar(f"{prefix}/expert_load/layer_{layer}/expert_{e}", float(v), step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(workdir: str, split: str | None = None) -> list[dict[str, Any]]:
    """The records of `<workdir>/metrics.jsonl` (optionally one split: "train", "val", ...)."""
    path = os.path.join(workdir, JSONL_NAME)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if split is None or r.get("split") == split]


def read_event_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Scalars in the TensorBoard event files under `logdir`: {tag: [(step, value), ...]}.

    Reads the TFRecord framing (length, crc, payload, crc) and parses each payload as an `Event` proto, so
    notebooks and tests can check the files without TensorBoard or TensorFlow installed."""
    from tensorboardX.proto import event_pb2  # noqa: PLC0415

    out: dict[str, list[tuple[int, float]]] = {}
    for root, _, files in os.walk(logdir):
        for name in sorted(files):
            if "tfevents" not in name:
                continue
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            pos = 0
            while pos + 12 <= len(data):
                (length,) = np.frombuffer(data[pos:pos + 8], "<u8")
                payload = data[pos + 12:pos + 12 + int(length)]
                pos += 12 + int(length) + 4
                event = event_pb2.Event.FromString(payload)
                for v in event.summary.value:
                    out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out
