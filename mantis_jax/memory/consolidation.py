"""Consolidation: entries evicted from the episodic store become long-term facts in semantic memory.

Data enters through `Consolidator.on_evict(entries)` (the EpisodicStore's eviction callback): any objects with
`text`, `token_range`, `embedding` [D], `timestamp` (store tick) and `importance`, optionally `uncertainty` and
`source`. A background thread drains a bounded queue in batches and, per batch:
  1. vectors = `embed_fn(entries)` [N, D] (the model's pooled hidden state; default: each entry's `embedding`);
  2. importance = recency_weight * 0.5 ** (age / decay_half_life)
                + novelty_weight * clip(1 - cos(nearest stored fact), 0, 1)
                + uncertainty_weight * clip(uncertainty, 0, 1);
  3. an entry whose cosine to a stored fact (or to an earlier entry of the batch) is above `dedup_threshold`
     merges into it: the fact keeps its text and vector, gains a provenance record (text span, token range,
     tick, source), and its importance becomes max(its importance decayed to now, the entry's);
  4. other entries below `min_importance` are dropped; the rest are stored with the real text span as payload,
     under an id derived from the entry's content, so storing an entry twice is an upsert, not a duplicate.
Facts leave through `SemanticMemory.search`.

Durability: `on_evict` returns only after the entries are fsynced to a spool (`spool.jsonl`, with the offset
of what is stored in `spool.done`) that a restarted Consolidator replays first, so a crash loses nothing
acknowledged; a failed batch (service down, embed_fn error) is retried with backoff, never dropped. Where the
spool lives (`spool_dir`): "auto" (the default) puts it under the in-process memory's data dir, or for a
service in `$XDG_STATE_HOME/mantis_jax/consolidation/<key of the addresses and namespace>` (default
`~/.local/state`); a non-durable in-process memory gets no spool (a crash loses that memory anyway). "" means an
in-memory queue only, which is NOT crash-safe; any other value is the spool directory. One Consolidator per
spool: a second one on the same directory is refused (an exclusive lock), since both would replay and truncate it.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import hashlib
import json
import os
import queue
import re
import threading
import time
from typing import Callable, Protocol, Sequence

import numpy as np

from mantis_jax.memory.semantic import Payload, SemanticMemory

_STOP = object()


class EvictedEntry(Protocol):
    text: str
    token_range: tuple[int, int]
    embedding: np.ndarray
    timestamp: int
    importance: float


@dataclasses.dataclass
class SpooledEntry:
    """An evicted entry as read back from the spool (same attributes as the episodic store's entries)."""

    text: str
    token_range: tuple[int, int]
    embedding: np.ndarray
    timestamp: int
    importance: float
    uncertainty: float = 0.0
    source: str = "episodic"


def entry_key(entry) -> int:
    """A 62-bit id from the entry's content: re-consolidating the same entry upserts instead of duplicating."""
    text = json.dumps([entry.text, [int(t) for t in entry.token_range], int(entry.timestamp), _source(entry)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


def decayed(importance: float, age: float, half_life: float) -> float:
    """Importance after `age` store ticks of exponential decay."""
    return float(importance) * 0.5 ** (max(age, 0.0) / half_life)


def _unit(x_nd: np.ndarray) -> np.ndarray:
    return x_nd / np.maximum(np.linalg.norm(x_nd, axis=-1, keepdims=True), 1e-30)


def _source(entry) -> str:
    return getattr(entry, "source", "") or "episodic"


def spool_dir_for(memory, spool_dir: str, namespace: str) -> str | None:
    """The spool directory a Consolidator of `memory` uses (None: in memory only); see the module docstring."""
    if spool_dir != "auto":
        return spool_dir or None
    data_dirs, addresses = getattr(memory, "data_dirs", None), getattr(memory, "addresses", None)
    if data_dirs is None or addresses is None:
        raise ValueError(f"consolidation.spool_dir='auto' cannot tell where {type(memory).__name__} keeps its data; "
                         "set config.memory.consolidation.spool_dir to a directory (or '' for an in-memory queue "
                         "that is not crash-safe)")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", namespace)
    if name != namespace or not name:  # keep distinct namespaces apart after the renaming
        name += "-" + hashlib.blake2b(namespace.encode(), digest_size=4).hexdigest()
    if data_dirs:
        return os.path.join(data_dirs[0], "consolidation", name)
    if addresses:
        key = hashlib.blake2b(",".join(addresses).encode(), digest_size=6).hexdigest()
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        return os.path.join(state, "mantis_jax", "consolidation", f"{key}-{name}")
    return None  # a non-durable in-process memory: nothing survives a crash, the spool included


def _default_embed(entries: Sequence[EvictedEntry]) -> np.ndarray:
    return np.stack([np.asarray(e.embedding, np.float32) for e in entries])


class Consolidator:
    """Moves evicted episodic entries into `memory` in a background thread (see the module docstring)."""

    def __init__(self, memory: SemanticMemory, config, *, embed_fn: Callable | None = None,
                 clock: Callable[[], float] | None = None, start: bool = True):
        self.memory, self.cfg = memory, config
        self.embed_fn = embed_fn or _default_embed
        self._clock = clock
        self._latest_tick = 0.0
        self.counts = {"accepted": 0, "stored": 0, "merged": 0, "dropped": 0, "retries": 0}
        self.last_error: str = ""
        self._queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._stop = threading.Event()
        self._spool_lock = threading.Lock()
        self._accept_lock = threading.Lock()
        self.spool_dir = spool_dir_for(memory, config.spool_dir, config.namespace)
        self._spool = os.path.join(self.spool_dir, "spool.jsonl") if self.spool_dir else None
        self._done = os.path.join(self.spool_dir, "spool.done") if self.spool_dir else None
        self._lock_file = self._lock_spool() if self.spool_dir else None
        self._thread = threading.Thread(target=self._run, name="consolidation", daemon=True)
        backlog = self._read_spool() if self._spool else []
        if start:
            self._thread.start()
        for item in backlog:  # entries acknowledged before a crash go first
            self._queue.put(item)

    # ----------------------------------------------------------------------------------- the queue
    def on_evict(self, entries: Sequence[EvictedEntry]) -> None:
        """Accepts evicted entries; blocks while the queue is full. With a spool (the default whenever the memory
        is durable), returns only after the entries are fsynced to it."""
        entries = list(entries)
        if not entries:
            return
        for e in entries:
            if np.asarray(e.embedding).ndim != 1:
                raise ValueError(f"evicted entry {e.text[:40]!r} has an embedding of shape "
                                 f"{np.asarray(e.embedding).shape}; it must be a [d_model] vector")
        with self._accept_lock:  # spool order == queue order, so "done up to offset" never skips an entry
            offsets = self._append_spool(entries) if self._spool else [0] * len(entries)
            for e, off in zip(entries, offsets):
                self._queue.put((e, off))
            self.counts["accepted"] += len(entries)

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every accepted entry is stored; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float | None = 30.0) -> None:
        """Flushes (up to `timeout`), then stops the thread. Unstored entries stay in the spool, if any."""
        self.flush(timeout)
        self._stop.set()
        if self._thread.is_alive():
            self._queue.put((_STOP, 0))
            self._thread.join(timeout)
        if self._lock_file is not None and not self._thread.is_alive():  # a live thread may still write the spool
            self._lock_file.close()  # releases the lock
            self._lock_file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while len(batch) < self.cfg.batch_size and batch[-1][0] is not _STOP:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            entries = [e for e, _ in batch if e is not _STOP]
            attempt = 0
            while entries:
                try:
                    self.consolidate(entries)
                    self._mark_done(max(off for _, off in batch))
                    break
                except Exception as err:  # keep the entries and retry: a consolidation error never loses them
                    self.last_error = f"{type(err).__name__}: {err}"
                    self.counts["retries"] += 1
                    attempt += 1
                    if self._stop.wait(min(0.05 * 2 ** attempt, 5.0)):
                        break  # closing: what is unstored stays in the spool
            for _ in batch:
                self._queue.task_done()
            if any(e is _STOP for e, _ in batch):
                return

    # ------------------------------------------------------------------------------------ the spool
    def _lock_spool(self):
        os.makedirs(self.spool_dir, exist_ok=True)
        f = open(os.path.join(self.spool_dir, "spool.lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "?"
            f.close()
            raise ValueError(f"the consolidation spool {self.spool_dir} is in use by another Consolidator (pid "
                             f"{owner}); give each one its own config.memory.consolidation.spool_dir or namespace, "
                             "or close the other first") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        open(os.path.join(self.spool_dir, "spool.jsonl"), "ab").close()
        for path in (self.spool_dir, os.path.dirname(os.path.abspath(self.spool_dir))):  # survive a power cut
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        return f

    def _append_spool(self, entries) -> list[int]:
        lines = []
        for e in entries:
            emb = np.asarray(e.embedding, "<f4")
            lines.append(json.dumps({
                "text": e.text, "token_range": [int(t) for t in e.token_range], "timestamp": int(e.timestamp),
                "importance": float(e.importance), "uncertainty": float(getattr(e, "uncertainty", 0.0)),
                "source": _source(e), "embedding": base64.b64encode(emb.tobytes()).decode(),
            }).encode() + b"\n")
        with self._spool_lock:
            os.makedirs(os.path.dirname(self._spool), exist_ok=True)
            with open(self._spool, "ab") as f:
                start = f.tell()
                offsets = np.cumsum([start] + [len(line) for line in lines])[1:].tolist()
                f.write(b"".join(lines))
                f.flush()
                os.fsync(f.fileno())
        return offsets

    def _read_spool(self) -> list:
        if not os.path.exists(self._spool):
            return []
        done = 0
        if os.path.exists(self._done):
            with open(self._done) as f:
                done = int(f.read() or 0)
        items, at = [], done
        with open(self._spool, "rb") as f:
            f.seek(done)
            for line in f:
                at += len(line)
                if not line.endswith(b"\n"):
                    break  # torn tail: never fsynced, so never acknowledged
                r = json.loads(line)
                emb = np.frombuffer(base64.b64decode(r["embedding"]), "<f4").copy()
                items.append((SpooledEntry(r["text"], tuple(r["token_range"]), emb, r["timestamp"],
                                           r["importance"], r["uncertainty"], r["source"]), at))
        self.counts["accepted"] += len(items)
        return items

    def _mark_done(self, offset: int) -> None:
        if not self._spool:
            return
        with self._spool_lock:
            if offset >= os.path.getsize(self._spool):  # lines are processed in order: all are stored
                open(self._spool, "wb").close()  # everything is stored: start an empty spool
                offset = 0
            tmp = self._done + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(offset))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._done)

    # ------------------------------------------------------------------------------ the algorithm
    def now(self) -> float:
        return float(self._clock()) if self._clock is not None else self._latest_tick

    def consolidate(self, entries: Sequence[EvictedEntry]) -> dict:
        """Synchronously stores/merges `entries`; returns counts {"stored", "merged", "dropped"}."""
        cfg = self.cfg
        vectors = np.asarray(self.embed_fn(entries), np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(entries):
            raise ValueError(f"embed_fn returned shape {vectors.shape}; expected [{len(entries)}, d_model]")
        self._latest_tick = max(self._latest_tick, max(float(e.timestamp) for e in entries))
        now = self.now()
        unit = _unit(vectors)
        # Nearest stored fact per entry, its exact cosine (whatever the index metric) and its payload.
        stored_cos = np.full(len(entries), -np.inf)
        hits = np.full(len(entries), -1, np.int64)
        stored = {}
        if self.memory.stats()["count"] > 0:
            hits = self.memory.search(vectors, 1, namespace=cfg.namespace, with_payloads=False).ids[:, 0]
            known = np.unique(hits[hits >= 0])
            if len(known):
                vecs, pays = self.memory.get(known)
                stored = {int(i): [v, p] for i, v, p in zip(known, vecs, pays)}
                for n, i in enumerate(hits):
                    if i >= 0:
                        stored_cos[n] = float(unit[n] @ _unit(stored[int(i)][0]))
        recency = np.array([0.5 ** (max(now - float(e.timestamp), 0.0) / cfg.decay_half_life) for e in entries])
        novelty = np.clip(1.0 - np.where(np.isfinite(stored_cos), stored_cos, -np.inf), 0.0, 1.0)
        uncertainty = np.clip([float(getattr(e, "uncertainty", 0.0)) for e in entries], 0.0, 1.0)
        score = cfg.recency_weight * recency + cfg.novelty_weight * novelty + cfg.uncertainty_weight * uncertainty

        new: list[list] = []  # [id, unit vector, raw vector, Payload]
        touched: set[int] = set()
        counts = {"stored": 0, "merged": 0, "dropped": 0}
        for n, e in enumerate(entries):
            batch_cos = [float(unit[n] @ f[1]) for f in new]
            best_batch = int(np.argmax(batch_cos)) if new else -1
            record = self._provenance(e, float(score[n]))
            if new and batch_cos[best_batch] > cfg.dedup_threshold and batch_cos[best_batch] >= stored_cos[n]:
                self._merge(new[best_batch][3], record, float(score[n]), now)
                counts["merged"] += 1
            elif stored_cos[n] > cfg.dedup_threshold:
                target = int(hits[n])
                self._merge(stored[target][1], record, float(score[n]), now)
                touched.add(target)
                counts["merged"] += 1
            elif score[n] < cfg.min_importance:
                counts["dropped"] += 1
            else:
                payload = Payload(text=e.text, source=_source(e), timestamp=float(e.timestamp),
                                  importance=float(score[n]), namespace=cfg.namespace,
                                  metadata={"token_range": [int(t) for t in e.token_range], "provenance": [record]})
                new.append([entry_key(e), unit[n], vectors[n], payload])
                counts["stored"] += 1
        ids = [i for i in touched] + [f[0] for f in new]
        if ids:
            rows = [stored[i][0] for i in touched] + [f[2] for f in new]
            pays = [stored[i][1] for i in touched] + [f[3] for f in new]
            self.memory.add(np.stack(rows), pays, ids=np.array(ids, np.int64))
        for key in counts:
            self.counts[key] += counts[key]
        return counts

    @staticmethod
    def _provenance(e, score: float) -> dict:
        return {"key": str(entry_key(e)), "text": e.text, "token_range": [int(t) for t in e.token_range],
                "timestamp": int(e.timestamp), "source": _source(e),
                "importance": float(e.importance), "uncertainty": float(getattr(e, "uncertainty", 0.0)),
                "score": score}

    def _merge(self, payload: Payload, record: dict, score: float, now: float) -> None:
        provenance = payload.metadata.setdefault("provenance", [])
        if any(p.get("key") == record["key"] for p in provenance):
            return  # already merged (a replayed spool entry): merging is idempotent
        provenance.append(record)
        payload.importance = max(decayed(payload.importance, now - payload.timestamp, self.cfg.decay_half_life),
                                 score)
        payload.timestamp = max(payload.timestamp, float(record["timestamp"]))
