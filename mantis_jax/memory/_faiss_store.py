"""The semantic store: validated, durable, concurrent access to one VectorIndex plus its payloads.

`SemanticStore` is what the gRPC service serves and what `SemanticMemory` runs in-process; both raise the same
`SemanticMemoryError` subclasses, each naming the problem and the fix, and a rejected request changes nothing.

Durability (when `data_dir` is set):
  1. a write is validated, appended to `wal.<gen>.log` and fsynced, and only then applied and acknowledged;
  2. payloads live in `payloads.sqlite` (WAL mode), raw vectors in the memory-mapped `vectors.<n>.f32`, and
     with `spec.ondisk` the IVF inverted lists in an immutable memory-mapped `lists.<token>.ivfdata`;
  3. `snapshot()` writes `snap.<gen+1>/` (FAISS index + row tables; on-disk lists get a new file), starts an empty `wal.<gen+1>.log`, and
     commits both by atomically renaming `MANIFEST.json`; the old log is then deleted;
  4. on start the manifest's snapshot is loaded and its log replayed (a torn tail record was never
     acknowledged and is cut off). Replay is idempotent: adds are upserts and removes are deletes, so replaying
     onto a payload table that is already ahead of the snapshot gives the same state.
Concurrency: a readers-writer lock; searches run in parallel (FAISS releases the GIL), writes are exclusive.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading

import numpy as np

from mantis_jax.memory import _faiss_ondisk
from mantis_jax.memory._faiss_index import IndexSpec, VectorIndex, normalize_rows
from mantis_jax.memory._faiss_log import (_OP_ADD, _MemoryPayloads, _SqlitePayloads, _Wal, _decode, _encode_add,
                                          _encode_remove, _fsync_dir)
from mantis_jax.memory._faiss_types import (ERRORS, InvalidArgument, NotFound, Payload, ResourceExhausted,  # noqa: F401
                                            SearchResult, SemanticMemoryError, Unauthenticated, Unavailable)


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers so writes are not starved."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    def acquire_read(self):
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self):
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self):
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True

    def release_write(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class SemanticStore:
    """Vectors + payloads behind validation, a readers-writer lock and (with `data_dir`) a fsynced log."""

    def __init__(self, spec: IndexSpec, data_dir: str | None = None, *, max_k: int = 1024,
                 max_batch: int = 65536, snapshot_interval_s: float = 0.0):
        self.spec, self.data_dir = spec, data_dir
        self.max_k, self.max_batch = max_k, max_batch
        self._lock = RWLock()
        self._wal: _Wal | None = None
        self.generation = 0
        self.ns_codes: dict[str, int] = {"": 0}
        self.next_id = 0
        self._closed = threading.Event()
        if data_dir is None:
            self.payloads = _MemoryPayloads()
            self.index = VectorIndex(spec)
        else:
            self._open(data_dir)
        self._timer = None
        if snapshot_interval_s > 0 and data_dir is not None:
            self._timer = threading.Thread(target=self._snapshot_loop, args=(snapshot_interval_s,), daemon=True)
            self._timer.start()

    # ------------------------------------------------------------------------------------ durability
    def _path(self, name: str) -> str:
        return os.path.join(self.data_dir, name)

    def _open(self, data_dir: str) -> None:
        os.makedirs(data_dir, exist_ok=True)
        manifest = {"generation": 0, "vectors": "vectors.0.f32"}
        if os.path.exists(self._path("MANIFEST.json")):
            with open(self._path("MANIFEST.json")) as f:
                manifest = json.load(f)
        self.generation = manifest["generation"]
        self._vectors_name = manifest["vectors"]
        keep = {"MANIFEST.json", "payloads.sqlite", "payloads.sqlite-wal", "payloads.sqlite-shm",
                f"snap.{self.generation}", f"wal.{self.generation}.log", self._vectors_name, manifest.get("lists")}
        ours = re.compile(r"^(snap\.\d+(\.tmp)?|wal\.\d+\.log|vectors\.\d+\.f32|MANIFEST\.json\.tmp)$")
        for name in os.listdir(data_dir):  # leftovers of a snapshot that crashed before its commit
            if (ours.match(name) or _faiss_ondisk.LISTS_FILE.match(name)) and name not in keep:
                path = self._path(name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        self.payloads = _SqlitePayloads(self._path("payloads.sqlite"))
        snap = self._path(f"snap.{self.generation}")
        if os.path.isdir(snap):
            self.index = VectorIndex.load(self.spec, snap, self._path(self._vectors_name), data_dir)
            with open(os.path.join(snap, "store.json")) as f:
                state = json.load(f)
            self.ns_codes, self.next_id = state["ns_codes"], state["next_id"]
        else:
            self.index = VectorIndex(self.spec, self._path(self._vectors_name), 0, data_dir)
        wal_path = self._path(f"wal.{self.generation}.log")
        for body in _Wal.records(wal_path):
            op, ids, vectors, payloads = _decode(body)
            if op == _OP_ADD:
                self._apply_add(ids, vectors, payloads)
            else:
                self._apply_remove(ids)
        self._wal = _Wal(wal_path)

    def snapshot(self) -> int:
        """Writes the index and truncates the log, atomically; returns the new generation (no-op in memory)."""
        self._lock.acquire_write()
        try:
            return self._snapshot_locked()
        finally:
            self._lock.release_write()

    def _snapshot_locked(self) -> int:
        if self.data_dir is None:
            if self.index.stale_fraction() > self.spec.compact_ratio:
                self.index.compact()
            return self.generation
        gen = self.generation + 1
        vectors_name = self._vectors_name
        if self.index.stale_fraction() > self.spec.compact_ratio:
            vectors_name = f"vectors.{gen}.f32"
            self.index.compact(self._path(vectors_name))
        self.payloads.checkpoint()
        tmp = self._path(f"snap.{gen}.tmp")
        os.makedirs(tmp, exist_ok=True)
        self.index.save(tmp)
        with open(os.path.join(tmp, "store.json"), "w") as f:
            json.dump({"ns_codes": self.ns_codes, "next_id": self.next_id}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, self._path(f"snap.{gen}"))
        new_wal = _Wal(self._path(f"wal.{gen}.log"))
        with open(self._path("MANIFEST.json.tmp"), "w") as f:
            json.dump({"generation": gen, "vectors": vectors_name, "lists": self.index.lists_file}, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(self._path("MANIFEST.json.tmp"), self._path("MANIFEST.json"))  # the commit point
        _fsync_dir(self.data_dir)
        old_gen, old_vectors = self.generation, self._vectors_name
        self._wal.close()
        self._wal, self.generation, self._vectors_name = new_wal, gen, vectors_name
        os.remove(self._path(f"wal.{old_gen}.log"))
        if os.path.isdir(self._path(f"snap.{old_gen}")):
            shutil.rmtree(self._path(f"snap.{old_gen}"))
        if old_vectors != vectors_name:
            os.remove(self._path(old_vectors))
        for name in os.listdir(self.data_dir):  # on-disk lists no snapshot names any more
            if _faiss_ondisk.LISTS_FILE.match(name) and name != self.index.lists_file:
                os.remove(self._path(name))
        return gen

    def _snapshot_loop(self, interval: float) -> None:
        while not self._closed.wait(interval):
            if self._wal is not None and self._wal.size() > 0:
                self.snapshot()

    def close(self) -> None:
        self._closed.set()
        self._lock.acquire_write()
        try:
            if self._wal is not None:
                self._wal.close()
                self._wal = None
            self.index.flush()
            self.payloads.close()
        finally:
            self._lock.release_write()

    # ------------------------------------------------------------------------------------ validation
    def _matrix(self, x, what: str) -> np.ndarray:
        try:
            x = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"{what} must be a numeric [N, {self.spec.dim}] array ({e})") from None
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[0] == 0:
            raise InvalidArgument(f"{what} must be a non-empty [N, {self.spec.dim}] array; got shape {x.shape}")
        if x.shape[0] > self.max_batch:
            raise ResourceExhausted(f"{what} has {x.shape[0]} rows, above the limit of {self.max_batch}; "
                                    "split the batch or raise --max-batch")
        if x.shape[1] != self.spec.dim:
            raise InvalidArgument(f"{what} have dimension {x.shape[1]} but the index has dimension {self.spec.dim}; "
                                  "pass vectors of the model's d_model (config.memory.semantic.dim)")
        if not np.isfinite(x).all():
            bad = np.flatnonzero(~np.isfinite(x).all(axis=1))[:5].tolist()
            raise InvalidArgument(f"{what} contain NaN or inf (rows {bad}); drop or fix those rows")
        if self.spec.normalize:
            if (np.linalg.norm(x, axis=1) == 0).any():
                raise InvalidArgument(f"{what} contain an all-zero row, which cannot be normalised; drop it")
            x = normalize_rows(x)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _ids(self, ids, what: str = "ids") -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or len(ids) == 0:
            raise InvalidArgument(f"{what} must be a non-empty 1-D list of 64-bit integers; got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InvalidArgument(f"{what} must be integers; got dtype {ids.dtype}")
        if len(ids) > self.max_batch:
            raise ResourceExhausted(f"{len(ids)} {what} exceed the limit of {self.max_batch}; split the request")
        ids = ids.astype(np.int64)
        if (ids == -1).any():
            raise InvalidArgument(f"{what} contain -1, which marks 'no result'; use any other 64-bit integer")
        if len(np.unique(ids)) != len(ids):
            raise InvalidArgument(f"{what} contain duplicates; pass each id once per request")
        return ids

    def _known(self, ids: np.ndarray) -> np.ndarray:
        rows = self.index.rows_of(ids)
        if (rows < 0).any():
            missing = ids[rows < 0][:10].tolist()
            raise NotFound(f"{int((rows < 0).sum())} unknown ids, e.g. {missing}; nothing was changed")
        return rows

    # ---------------------------------------------------------------------------------------- writes
    def add(self, vectors, payloads: list[Payload], ids=None) -> np.ndarray:
        """Upserts vectors with payloads; returns their ids (assigned from a counter when not given)."""
        x_nd = self._matrix(vectors, "vectors")
        if len(payloads) != len(x_nd):
            raise InvalidArgument(f"got {len(x_nd)} vectors but {len(payloads)} payloads; pass one payload per vector")
        if not all(isinstance(p, Payload) for p in payloads):
            raise InvalidArgument("payloads must be Payload objects (mantis_jax.memory.semantic.Payload)")
        if ids is not None:
            ids = self._ids(ids)
            if len(ids) != len(x_nd):
                raise InvalidArgument(f"got {len(x_nd)} vectors but {len(ids)} ids; pass one id per vector or none")
        self._lock.acquire_write()
        try:
            if ids is None:
                if self.next_id + len(x_nd) >= 2 ** 63:
                    raise InvalidArgument("the id counter would pass 2^63 - 1 (explicit ids near the top of the "
                                          "int64 range were stored); pass explicit ids")
                ids = np.arange(self.next_id, self.next_id + len(x_nd), dtype=np.int64)
            if self._wal is not None:
                self._wal.append(_encode_add(ids, x_nd, payloads))
            self._apply_add(ids, x_nd, payloads)
            self._maybe_compact()
            return ids
        finally:
            self._lock.release_write()

    def remove(self, ids) -> int:
        """Deletes ids, immediately; every id must exist (NotFound otherwise, and nothing is removed)."""
        ids = self._ids(ids)
        self._lock.acquire_write()
        try:
            self._known(ids)
            if self._wal is not None:
                self._wal.append(_encode_remove(ids))
            self._apply_remove(ids)
            self._maybe_compact()
            return len(ids)
        finally:
            self._lock.release_write()

    def _maybe_compact(self) -> None:
        if self.index.stale_fraction() > self.spec.compact_ratio:
            self._snapshot_locked()  # compacts: rebuilds the index (HNSW graph included) without dead rows

    def _apply_add(self, ids, x_nd, payloads) -> None:
        for p in payloads:
            if p.namespace not in self.ns_codes:
                self.ns_codes[p.namespace] = len(self.ns_codes)
        codes = np.array([self.ns_codes[p.namespace] for p in payloads], np.int32)
        self.payloads.put(ids.tolist(), payloads)
        self.index.add(ids, x_nd, codes)
        self.next_id = max(self.next_id, int(ids.max()) + 1)

    def _apply_remove(self, ids) -> None:
        self.payloads.delete(ids.tolist())
        self.index.remove(ids)

    # ----------------------------------------------------------------------------------------- reads
    def search(self, queries, k: int, *, nprobe: int | None = None, ef_search: int | None = None,
               namespace: str | None = None, with_payloads: bool = True) -> SearchResult:
        q_bd = self._matrix(queries, "queries")
        if not isinstance(k, (int, np.integer)) or not 0 < k <= self.max_k:
            raise InvalidArgument(f"k ({k}) must be an integer in [1, {self.max_k}]")
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and not 0 < value <= 1 << 20:
                raise InvalidArgument(f"{name} ({value}) must be in [1, 1048576]; leave it unset for the default")
        self._lock.acquire_read()
        try:
            allowed = None
            if namespace is not None:
                code = self.ns_codes.get(namespace, -1)
                n = self.index.n_rows
                alive = np.unpackbits(self.index.live, bitorder="little")[:n].astype(bool)
                allowed = np.packbits(alive & (self.index.row_ns[:n] == code), bitorder="little")
            ids_bk, scores_bk = self.index.search(q_bd, int(k), nprobe=nprobe, ef_search=ef_search,
                                                  allowed_bits=allowed)
            payloads = None
            if with_payloads:
                flat = ids_bk.ravel().tolist()
                found = self.payloads.get([i for i in flat if i != -1])
                it = iter(found)
                flat_p = [None if i == -1 else next(it) for i in flat]
                payloads = [flat_p[b * ids_bk.shape[1]:(b + 1) * ids_bk.shape[1]] for b in range(ids_bk.shape[0])]
            return SearchResult(ids_bk, scores_bk, payloads)
        finally:
            self._lock.release_read()

    def get(self, ids) -> tuple[np.ndarray, list[Payload]]:
        """(vectors [N, D] as stored, payloads); NotFound if any id is unknown."""
        ids = self._ids(ids)
        self._lock.acquire_read()
        try:
            rows = self._known(ids)
            return self.index.vectors(rows), self.payloads.get(ids.tolist())
        finally:
            self._lock.release_read()

    def stats(self) -> dict:
        self._lock.acquire_read()
        try:
            return {"count": self.index.n_live, "rows": self.index.n_rows, "dim": self.spec.dim,
                    "index": self.spec.kind, "metric": self.spec.metric, "trained": self.index.trained,
                    "stale_fraction": self.index.stale_fraction(), "generation": self.generation,
                    "wal_bytes": self._wal.size() if self._wal is not None else 0,
                    "durable": self.data_dir is not None, "ondisk": isinstance(self.index.index, _faiss_ondisk.OnDiskIVF)}
        finally:
            self._lock.release_read()
