"""The semantic store: validated, durable, concurrent access to one VectorIndex plus its payloads.

`SemanticStore` is what the gRPC service serves and what `SemanticMemory` runs in-process; both raise the same
`SemanticMemoryError` subclasses, each naming the problem and the fix, and a rejected request changes nothing.

Durability (when `data_dir` is set):
  1. a write is validated (validation.py: everything that could make it fail to apply), appended to
     `wal.<gen>.log` and fsynced, and only then applied and acknowledged; nothing that cannot apply is logged;
  2. payloads live in `payloads.sqlite` (WAL mode), raw vectors in the memory-mapped `vectors.<n>.f32`, and
     with `spec.ondisk` the IVF inverted lists in an immutable memory-mapped `lists.<token>.ivfdata`;
  3. `snapshot()` writes `snap.<gen+1>/` (FAISS index + row tables; on-disk lists get a new file), starts an
     empty `wal.<gen+1>.log`, and commits both by atomically renaming `MANIFEST.json`; the old log is then deleted;
  4. on start the manifest's snapshot is loaded and its log replayed (a torn tail record was never
     acknowledged and is cut off). Replay is idempotent: adds are upserts and removes are deletes, so replaying
     onto a payload table that is already ahead of the snapshot gives the same state.
Ids: a client's explicit ids are stored as given; ids the store assigns come from a counter of their own that
skips ids in use (and wraps at 2^63 - 1), so no explicit id, however large, blocks assignment.
Concurrency: a readers-writer lock; searches run in parallel (FAISS releases the GIL), writes are exclusive.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading

import numpy as np

from mantis_jax.memory.semantic import ondisk_lists
from mantis_jax.memory.semantic.errors import InvalidArgument, NotFound, ResourceExhausted
from mantis_jax.memory.semantic.index import IndexSpec, VectorIndex
from mantis_jax.memory.semantic.payload import Payload, SearchResult
from mantis_jax.memory.semantic.payload_tables import MemoryPayloads, SqlitePayloads
from mantis_jax.memory.semantic.validation import ID_MAX, as_ids, as_payloads, as_vectors, check_search_args
from mantis_jax.memory.semantic.wal import OP_ADD_ASSIGNED, OP_REMOVE, Wal, decode, encode_add, encode_remove, fsync_dir


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
        self._wal: Wal | None = None
        self.generation = 0
        self.ns_codes: dict[str, int] = {"": 0}
        self.next_id = 0
        self._closed = threading.Event()
        if data_dir is None:
            self.payloads = MemoryPayloads()
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
            if (ours.match(name) or ondisk_lists.LISTS_FILE.match(name)) and name not in keep:
                path = self._path(name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        self.payloads = SqlitePayloads(self._path("payloads.sqlite"))
        snap = self._path(f"snap.{self.generation}")
        if os.path.isdir(snap):
            self.index = VectorIndex.load(self.spec, snap, self._path(self._vectors_name), data_dir)
            with open(os.path.join(snap, "store.json")) as f:
                state = json.load(f)
            self.ns_codes, self.next_id = state["ns_codes"], state["next_id"]
            self.next_id = self.next_id if self.next_id <= ID_MAX else 0  # counters blocked by an explicit 2^63 - 1
        else:
            self.index = VectorIndex(self.spec, self._path(self._vectors_name), 0, data_dir)
        wal_path = self._path(f"wal.{self.generation}.log")
        for body in Wal.records(wal_path):
            op, ids, vectors, payloads = decode(body)
            if op == OP_REMOVE:
                self._apply_remove(ids)
                continue
            if op == OP_ADD_ASSIGNED:  # explicit ids (OP_ADD) leave the counter alone
                self.next_id = max(self.next_id, int(ids.max()) + 1)
                self.next_id = self.next_id if self.next_id <= ID_MAX else 0
            self._apply_add(ids, vectors, payloads)
        self._wal = Wal(wal_path)

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
        fsync_dir(tmp)
        os.rename(tmp, self._path(f"snap.{gen}"))
        new_wal = Wal(self._path(f"wal.{gen}.log"))
        with open(self._path("MANIFEST.json.tmp"), "w") as f:
            json.dump({"generation": gen, "vectors": vectors_name, "lists": self.index.lists_file}, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(self._path("MANIFEST.json.tmp"), self._path("MANIFEST.json"))  # the commit point
        fsync_dir(self.data_dir)
        old_gen, old_vectors = self.generation, self._vectors_name
        self._wal.close()
        self._wal, self.generation, self._vectors_name = new_wal, gen, vectors_name
        os.remove(self._path(f"wal.{old_gen}.log"))
        if os.path.isdir(self._path(f"snap.{old_gen}")):
            shutil.rmtree(self._path(f"snap.{old_gen}"))
        if old_vectors != vectors_name:
            os.remove(self._path(old_vectors))
        for name in os.listdir(self.data_dir):  # on-disk lists no snapshot names any more
            if ondisk_lists.LISTS_FILE.match(name) and name != self.index.lists_file:
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
        return as_vectors(x, self.spec.dim, what, max_batch=self.max_batch, normalize=self.spec.normalize)

    def _ids(self, ids, what: str = "ids") -> np.ndarray:
        return as_ids(ids, what, max_batch=self.max_batch)

    def _known(self, ids: np.ndarray) -> np.ndarray:
        rows = self.index.rows_of(ids)
        if (rows < 0).any():
            missing = ids[rows < 0][:10].tolist()
            raise NotFound(f"{int((rows < 0).sum())} unknown ids, e.g. {missing}; nothing was changed")
        return rows

    # ---------------------------------------------------------------------------------------- writes
    def add(self, vectors, payloads: list[Payload], ids=None) -> np.ndarray:
        """Upserts vectors with payloads; returns their ids (assigned from the counter when not given)."""
        x_nd = self._matrix(vectors, "vectors")
        payloads = as_payloads(payloads, len(x_nd))
        if ids is not None:
            ids = self._ids(ids)
            if len(ids) != len(x_nd):
                raise InvalidArgument(f"got {len(x_nd)} vectors but {len(ids)} ids; pass one id per vector or none")
        self._lock.acquire_write()
        try:
            assigned = ids is None
            if assigned:
                ids = self._assign_ids(len(x_nd))
                self.next_id = int(ids[-1]) + 1 if ids[-1] < ID_MAX else 0  # before anything can fail: never reused
            if self._wal is not None:
                self._wal.append(encode_add(ids, x_nd, payloads, assigned=assigned))
            self._apply_add(ids, x_nd, payloads)
            self._maybe_compact()
            return ids
        finally:
            self._lock.release_write()

    def _assign_ids(self, n: int) -> np.ndarray:
        """The next n ids from the counter that no live entry holds (explicit ids are skipped, not blocking)."""
        found, start, scanned = [], self.next_id, 0
        while sum(map(len, found)) < n:
            if scanned > ID_MAX:
                raise ResourceExhausted("every 64-bit id is in use; remove entries first")
            need = n - sum(map(len, found))
            count = min(need, ID_MAX + 1 - start)
            candidates = start + np.arange(count, dtype=np.int64)
            found.append(candidates[self.index.rows_of(candidates) < 0])
            scanned += count
            start = start + count if start + count <= ID_MAX else 0
        return np.concatenate(found)[:n]

    def remove(self, ids) -> int:
        """Deletes ids, immediately; every id must exist (NotFound otherwise, and nothing is removed)."""
        ids = self._ids(ids)
        self._lock.acquire_write()
        try:
            self._known(ids)
            if self._wal is not None:
                self._wal.append(encode_remove(ids))
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

    def _apply_remove(self, ids) -> None:
        self.payloads.delete(ids.tolist())
        self.index.remove(ids)

    # ----------------------------------------------------------------------------------------- reads
    def search(self, queries, k: int, *, nprobe: int | None = None, ef_search: int | None = None,
               namespace: str | None = None, with_payloads: bool = True) -> SearchResult:
        check_search_args(k, nprobe, ef_search, max_k=self.max_k)
        q_bd = self._matrix(queries, "queries")
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
                    "train_error": self.index.train_error,
                    "stale_fraction": self.index.stale_fraction(), "generation": self.generation,
                    "wal_bytes": self._wal.size() if self._wal is not None else 0,
                    "durable": self.data_dir is not None,
                    "ondisk": isinstance(self.index.index, ondisk_lists.OnDiskIVF)}
        finally:
            self._lock.release_read()
