"""What the processes of one training run must agree on, so that none waits in a collective the others never join.

Every jitted step over a multi-process mesh is a collective: all processes must run the same steps, evaluations and
saves in the same order. Decisions a process would otherwise take alone are made jointly here:
  stop requests  SIGTERM / SIGINT (a scheduler's preemption, `timeout`, Ctrl-C, launch/local.sh forwarding either)
                 stop the run at one step that every process agrees on, where it saves and exits cleanly;
  time budget    `train.max_minutes` is judged by process 0's clock;
  eval steps     every process runs as many eval batches as the process with the most, short shards padded with
                 zero-weight batches (which change no metric);
  strings        the data-iterator state of every process, gathered for the checkpoint.
In a single process each is the local decision and costs nothing.

Stops in a multi-process run use JAX's preemption service (on by default with `jax.distributed.initialize`): its
notifier catches SIGTERM, tells every process, and `reached_preemption_sync_point(step)` turns true on every process
at the same step (one past the furthest any had reached). SIGINT is turned into that SIGTERM.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _multihost():
    from jax.experimental import multihost_utils  # noqa: PLC0415 (imports the distributed runtime's helpers)

    return multihost_utils


def process_0_decides(flag: bool) -> bool:
    """Process 0's `flag` on every process (a tiny collective; the flag itself in a single process)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(_multihost().broadcast_one_to_all(np.int32(bool(flag))))


def gather_strings(text: str) -> list[str]:
    """Every process's string, in process order (the data iterator states a checkpoint holds)."""
    if jax.process_count() == 1:
        return [text]
    multihost_utils = _multihost()
    raw = np.frombuffer(text.encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [bytes(row[:n]).decode() for row, n in zip(rows, sizes)]


def same_count(batches: list[dict[str, np.ndarray]],
               template: Callable[[], dict[str, np.ndarray]] | None = None) -> list[dict]:
    """`batches` padded with zero-weight batches to the largest count any process has (every eval step is a
    collective). A zero batch has loss_mask 0 everywhere, so it adds no tokens and changes no weighted metric.
    `template()` gives the batch layout to a process that has no batch of its own (called only then)."""
    if jax.process_count() == 1:
        return batches
    counts = np.asarray(_multihost().process_allgather(np.array([len(batches)], np.int32))).reshape(-1)
    missing = int(counts.max()) - len(batches)
    if missing == 0:
        return batches
    if not batches and template is None:
        raise ValueError("same_count: a process without batches needs a template batch for the layout")
    like = batches[0] if batches else template()
    blank = {k: np.zeros_like(v) for k, v in like.items()}
    return batches + [blank] * missing


class StopRequests:
    """Context for the step loop: catches SIGINT / SIGTERM and says at which step the run should stop.

    `should_stop(step)` is called after every step with the number of steps done; it turns true at the same step on
    every process. In one process a second signal interrupts at once (KeyboardInterrupt). Handlers can only be
    installed from the main thread; elsewhere (a notebook's worker thread) signals keep their default action."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}
        self._preemption = False

    def __enter__(self) -> "StopRequests":
        multi = jax.process_count() > 1
        # The preemption service exists only when jax.distributed.initialize created it (on by default).
        self._preemption = multi and bool(jax.config.jax_enable_preemption_service)
        if threading.current_thread() is threading.main_thread():
            # With the preemption service, SIGTERM is its notifier's: replacing that handler would lose the notice.
            for sig in (signal.SIGINT,) if self._preemption else STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self._preemption:  # SIGINT: hand it to the preemption notifier, once
            if not self.requested:
                self.requested = True
                signal.raise_signal(signal.SIGTERM)
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if self._preemption:
            return _multihost().reached_preemption_sync_point(step)
        if jax.process_count() > 1:  # no preemption service: agree every step (one small collective)
            flags = _multihost().process_allgather(np.array([self.requested], np.int32))
            return bool(np.asarray(flags).any())
        return self.requested

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


class Deadline:
    """`train.max_minutes` as a wall-clock deadline; multi-process, process 0's clock decides at `every` steps."""

    def __init__(self, minutes: float, every: int):
        self.at = time.monotonic() + 60 * minutes if minutes > 0 else None
        self.every = max(1, every)

    def passed(self, step: int) -> bool:
        if self.at is None:
            return False
        if jax.process_count() == 1:
            return time.monotonic() > self.at
        return step % self.every == 0 and process_0_decides(time.monotonic() > self.at)
