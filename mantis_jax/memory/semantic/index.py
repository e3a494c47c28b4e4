"""The FAISS index engine behind semantic memory: rows of raw vectors, one FAISS index over them, tombstones.

Every vector ever added gets a *row* in an append-only raw-vector matrix (in RAM, or a memory-mapped file when
the store is durable). FAISS only ever sees rows as ids, so external 64-bit ids live in `row2id` and never
reach FAISS. A deletion clears the row's bit in the `live` bitmap, which every search passes to FAISS as an
`IDSelectorBitmap`: a deleted row can never come back, whatever the index kind. When more than
`compact_ratio` of the rows are dead, `compact()` rebuilds the matrix and the index from the live rows.

Index kinds (all searched in one FAISS call per batch; scores are "higher is better": inner product, or minus
the squared L2 distance):
  flat   exact `IndexFlat`.
  ivfpq  exact `IndexFlat` until `train_min` live vectors exist; then IVF-PQ is trained on a sample and every
         live row is added to it. `train_min` and `train_sample` must cover the clusters k-means fits
         (max(nlist, 2^pq_nbits)), so training cannot fail for lack of points; if it fails anyway (memory), the
         exact index keeps serving, `train_error` says why, and training is retried once the index grows 10%.
         Candidates (k * refine_factor) are re-ranked exactly against the raw rows,
         which is what lifts recall@10 above 0.95; only the PQ codes (pq_m bytes per vector) are held by FAISS,
         the raw rows can be a memory-mapped file larger than RAM. With `ondisk` the inverted lists (the PQ
         codes) live in a memory-mapped file too, except the rows added since the last merge (see
         ondisk_lists), so RAM does not grow with the data.
  hnsw   `IndexHNSWFlat`; no removal in FAISS, so deleted rows are tombstones filtered at search time, and the
         graph is rebuilt once more than `compact_ratio` are stale.
Upserting an existing id kills its old row and appends a new one. Callers hold the locks (see store.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import faiss
import numpy as np

from mantis_jax.memory.semantic import ondisk_lists as ondisk

_log = logging.getLogger(__name__)
_CHUNK = 65536  # rows per FAISS add call when (re)building, to bound temporary memory


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    """Static description of an index; `from_config(config.memory.semantic)` builds one."""

    dim: int
    kind: str = "flat"  # flat | ivfpq | hnsw
    metric: str = "ip"  # ip | l2
    normalize: bool = True  # L2-normalise vectors and queries, so "ip" scores are cosines
    nlist: int = 1024
    pq_m: int = 32
    pq_nbits: int = 8
    refine_factor: int = 8
    train_min: int = 0  # 0 = 39 * max(nlist, 2**pq_nbits), FAISS's minimum for stable k-means
    train_sample: int = 131072
    hnsw_m: int = 32
    ef_construction: int = 80
    nprobe: int = 32
    ef_search: int = 128
    compact_ratio: float = 0.2
    ondisk: bool = False  # ivfpq: inverted lists in a memory-mapped file (needs a data dir), not in RAM
    ondisk_merge_rows: int = 262144  # ondisk: rows held in RAM before they are merged into the lists file
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.dim > 0, f"dim ({self.dim}) must be > 0"),
            (self.kind in ("flat", "ivfpq", "hnsw"), f"kind ({self.kind!r}) must be one of flat, ivfpq, hnsw"),
            (self.metric in ("ip", "l2"), f"metric ({self.metric!r}) must be ip or l2"),
            (self.kind != "ivfpq" or self.dim % self.pq_m == 0,
             f"pq_m ({self.pq_m}) must divide dim ({self.dim}) for ivfpq"),
            (1 <= self.pq_nbits <= 16, f"pq_nbits ({self.pq_nbits}) must be in [1, 16]"),
            (min(self.nlist, self.pq_m, self.refine_factor, self.hnsw_m, self.nprobe, self.ef_search,
                 self.ondisk_merge_rows) > 0,
             "nlist, pq_m, refine_factor, hnsw_m, nprobe, ef_search and ondisk_merge_rows must be > 0"),
            (0.0 < self.compact_ratio < 1.0, f"compact_ratio ({self.compact_ratio}) must be in (0, 1)"),
            (self.kind != "ivfpq" or self.train_min == 0 or self.train_min >= self.clusters,
             f"train_min ({self.train_min}) must be 0 (= 39 x {self.clusters}) or at least max(nlist, 2**pq_nbits) "
             f"= {self.clusters}, the clusters ivfpq trains (--train-min, config.memory.semantic.train_min)"),
            (self.kind != "ivfpq" or self.train_sample >= self.clusters,
             f"train_sample ({self.train_sample}) must be at least max(nlist, 2**pq_nbits) = {self.clusters}, the "
             "clusters ivfpq trains (--train-sample, config.memory.semantic.train_sample)"),
            (not self.ondisk or self.kind == "ivfpq",
             f"ondisk keeps IVF inverted lists on disk and needs kind 'ivfpq' (got {self.kind!r}); use "
             "--index ivfpq or drop --ondisk"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"semantic index spec: {message}")

    @property
    def clusters(self) -> int:
        """The most centroids ivfpq's k-means fits (IVF lists or PQ codewords): it needs that many points."""
        return max(self.nlist, 2 ** self.pq_nbits)

    @property
    def min_train(self) -> int:
        return self.train_min or 39 * self.clusters

    @classmethod
    def from_config(cls, sem) -> "IndexSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: sem[k] for k in names if k in sem and k not in ("dim", "kind")}
        return cls(dim=sem.dim, kind=sem.index, **values)


class VectorIndex:
    """Raw rows + a FAISS index over them. Not thread-safe: the store serialises writers against readers.
    `lists_dir` holds the files of on-disk inverted lists (required when `spec.ondisk`)."""

    def __init__(self, spec: IndexSpec, vectors_path: str | None = None, n_rows: int = 0,
                 lists_dir: str | None = None):
        if spec.ondisk and lists_dir is None:
            raise ValueError("ondisk inverted lists need a file: give the store a data dir (--data-dir, "
                             "config.memory.semantic.data_dir) or set ondisk=False")
        self.spec = spec
        self.vectors_path = vectors_path
        self.lists_dir = lists_dir
        self.n_rows = n_rows
        self.n_live = 0
        self._raw_nd = np.zeros((0, spec.dim), np.float32)
        self.row2id = np.zeros(0, np.int64)  # [R] external id per row
        self.row_ns = np.zeros(0, np.int32)  # [R] namespace code per row (for filtered search)
        self.live = np.zeros(0, np.uint8)  # [ceil(R/8)] bit r%8 of byte r//8 = row r alive (FAISS bit order)
        self.id2row: dict[int, int] = {}
        self.trained = spec.kind != "ivfpq"
        self.train_error = ""  # why the last training attempt failed ("" = none failed)
        self._retrain_at = 0  # live rows at which a failed training is retried
        self._grow(max(n_rows, 1024))
        self.index = self._empty_index()

    # ----------------------------------------------------------------------------------------- storage
    def _grow(self, need: int) -> None:
        cap = self._raw_nd.shape[0]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 1024)
        if self.vectors_path is not None:
            if isinstance(self._raw_nd, np.memmap):
                self._raw_nd.flush()
            self._raw_nd = None  # unmap before resizing the file
            with open(self.vectors_path, "ab") as f:
                f.truncate(max(os.path.getsize(self.vectors_path), new_cap * self.spec.dim * 4))
            size = os.path.getsize(self.vectors_path) // (self.spec.dim * 4)
            self._raw_nd = np.memmap(self.vectors_path, np.float32, "r+", shape=(size, self.spec.dim))
            new_cap = size
        else:
            raw = np.zeros((new_cap, self.spec.dim), np.float32)
            raw[:cap] = self._raw_nd
            self._raw_nd = raw
        self.row2id = np.concatenate([self.row2id, np.full(new_cap - len(self.row2id), -1, np.int64)])
        self.row_ns = np.concatenate([self.row_ns, np.zeros(new_cap - len(self.row_ns), np.int32)])
        n_bytes = (new_cap + 7) // 8
        self.live = np.concatenate([self.live, np.zeros(n_bytes - len(self.live), np.uint8)])

    def flush(self) -> None:
        if isinstance(self._raw_nd, np.memmap):
            self._raw_nd.flush()

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self._raw_nd[rows])

    def _faiss_metric(self) -> int:
        return faiss.METRIC_INNER_PRODUCT if self.spec.metric == "ip" else faiss.METRIC_L2

    def _empty_index(self):
        s = self.spec
        if s.kind == "hnsw":
            index = faiss.IndexHNSWFlat(s.dim, s.hnsw_m, self._faiss_metric())
            index.hnsw.efConstruction = s.ef_construction
            return index
        return faiss.IndexFlat(s.dim, self._faiss_metric())  # flat, and ivfpq's exact buffer until it trains

    def _ivfpq_index(self):
        """An untrained IVF-PQ index."""
        s = self.spec
        index = faiss.index_factory(s.dim, f"IVF{s.nlist},PQ{s.pq_m}x{s.pq_nbits}np", self._faiss_metric())
        index.cp.seed = s.seed
        # PQ k-means on 8-dim sub-vectors is BLAS-unfriendly and dominated training time (20+ s for 10K
        # vectors at d=256); 64 points per centroid and 10 iterations cost no measurable recall after
        # the exact re-ranking.
        index.pq.cp.niter = 10
        index.pq.cp.max_points_per_centroid = 64
        return index

    # ------------------------------------------------------------------------------------------ writes
    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter((self.id2row.get(int(i), -1) for i in ids), np.int64, len(ids))

    def add(self, ids: np.ndarray, vectors_nd: np.ndarray, ns_codes: np.ndarray) -> None:
        """Upserts: ids already present lose their old row. Vectors are already validated (and normalised)."""
        old = self.rows_of(ids)
        self._kill(old[old >= 0])
        n, start = len(ids), self.n_rows
        self._grow(start + n)
        rows = np.arange(start, start + n)
        self._raw_nd[start:start + n] = vectors_nd
        self.row2id[rows] = ids
        self.row_ns[rows] = ns_codes
        np.bitwise_or.at(self.live, rows >> 3, (1 << (rows & 7)).astype(np.uint8))
        self.id2row.update(zip(ids.tolist(), rows.tolist()))
        self.n_rows += n
        self.n_live += n
        if self.spec.kind == "ivfpq" and self.trained:
            self.index.add_with_ids(vectors_nd, rows)
        else:
            self.index.add(vectors_nd)  # position == row for flat, hnsw and the pre-training buffer
        if not self.trained and self.n_live >= max(self.spec.min_train, self._retrain_at):
            self._train()

    def remove(self, ids: np.ndarray) -> None:
        rows = self.rows_of(ids)
        for i in ids.tolist():
            self.id2row.pop(i, None)
        self._kill(rows[rows >= 0])

    def _kill(self, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        np.bitwise_and.at(self.live, rows >> 3, (~(1 << (rows & 7))).astype(np.uint8))
        self.row2id[rows] = -1
        self.n_live -= len(rows)

    def live_rows(self) -> np.ndarray:
        bits = np.unpackbits(self.live, bitorder="little")[: self.n_rows]
        return np.flatnonzero(bits)

    def stale_fraction(self) -> float:
        return 0.0 if self.n_rows == 0 else (self.n_rows - self.n_live) / self.n_rows

    def _train(self) -> None:
        """Switches ivfpq from the exact buffer to a trained IVF-PQ holding every live row. The new index is built
        aside and swapped in only when complete: a failure leaves the exact buffer serving every row."""
        rows = self.live_rows()
        rng = np.random.default_rng(self.spec.seed)
        sample = np.sort(rng.choice(rows, min(len(rows), self.spec.train_sample), replace=False))
        try:
            index = self._fit(np.ascontiguousarray(self.vectors(sample)))
            if self.spec.ondisk:
                index = ondisk.OnDiskIVF(index, self.lists_dir, self.spec.ondisk_merge_rows)
            for lo in range(0, len(rows), _CHUNK):
                chunk = rows[lo:lo + _CHUNK]
                index.add_with_ids(np.ascontiguousarray(self.vectors(chunk)), chunk)
        except (RuntimeError, MemoryError, OSError) as e:  # FAISS errors arrive as RuntimeError
            self.train_error = f"{type(e).__name__}: {e}"
            self._retrain_at = self.n_live + max(1, self.n_live // 10)
            _log.warning("ivfpq training on %d rows failed (%s); the exact index keeps serving, retrying at %d "
                         "live rows", len(sample), self.train_error, self._retrain_at)
            return
        self.index, self.trained, self.train_error = index, True, ""

    def _fit(self, sample_nd: np.ndarray):
        """A trained, empty IVF-PQ index."""
        index = self._ivfpq_index()
        index.train(sample_nd)
        return index

    def compact(self, new_vectors_path: str | None = None) -> None:
        """Drops dead rows: a fresh raw matrix (a new file when durable) and an index rebuilt from live rows."""
        if self.vectors_path is not None and new_vectors_path in (None, self.vectors_path):
            raise ValueError("compacting a file-backed index needs a new vectors file: the old rows must stay "
                             "intact until the snapshot that stops using them is committed")
        rows = self.live_rows()
        old_raw, old_ids, old_ns = self._raw_nd, self.row2id, self.row_ns
        if new_vectors_path is not None:
            if os.path.exists(new_vectors_path):
                os.remove(new_vectors_path)
            self.vectors_path = new_vectors_path
        trained_index = self.index if (self.spec.kind == "ivfpq" and self.trained) else None
        self.__init__(self.spec, self.vectors_path, 0, self.lists_dir)
        if trained_index is not None:  # keep the trained quantizers; only the lists are rebuilt
            self.trained = True
            self.index = trained_index
            self.index.reset()
        for lo in range(0, len(rows), _CHUNK):
            chunk = rows[lo:lo + _CHUNK]
            self.add(old_ids[chunk], np.ascontiguousarray(old_raw[chunk]), old_ns[chunk])

    # ------------------------------------------------------------------------------------------ search
    def search(self, q_bd: np.ndarray, k: int, *, nprobe: int | None = None, ef_search: int | None = None,
               allowed_bits: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over live rows (and `allowed_bits`, a row bitmap, when given). Returns (ids [B,K], scores [B,K]);
        missing slots have id -1 and score -inf."""
        bits = allowed_bits if allowed_bits is not None else self.live
        filtered = allowed_bits is not None or self.n_live < self.n_rows
        sel = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)) if filtered else None
        s = self.spec
        refine = s.kind == "ivfpq" and self.trained
        k_search = max(k, min(k * s.refine_factor, self.n_rows)) if refine else k  # FAISS pads past ntotal
        if s.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(ef_search or s.ef_search, k))
        elif refine:
            params = faiss.SearchParametersIVF(nprobe=min(nprobe or s.nprobe, s.nlist))
        else:
            params = faiss.SearchParameters()
        if sel is not None:
            params.sel = sel
        dist_bk, rows_bk = self.index.search(q_bd, k_search, params=params)
        if refine:
            dist_bk = self._exact(q_bd, rows_bk)
            order = np.argsort(-dist_bk, axis=1, kind="stable")[:, :k]
            rows_bk = np.take_along_axis(rows_bk, order, 1)
            scores_bk = np.take_along_axis(dist_bk, order, 1)
        else:
            scores_bk = dist_bk if s.metric == "ip" else -dist_bk
        missing = rows_bk < 0
        ids_bk = np.where(missing, -1, self.row2id[np.maximum(rows_bk, 0)])
        scores_bk = np.where(missing, -np.inf, scores_bk).astype(np.float32)
        return ids_bk, scores_bk

    def _exact(self, q_bd: np.ndarray, rows_bk: np.ndarray) -> np.ndarray:
        """Exact scores of candidate rows (higher is better); -inf for missing candidates."""
        v_bkd = self._raw_nd[np.maximum(rows_bk, 0)]
        if self.spec.metric == "ip":
            s_bk = np.einsum("bkd,bd->bk", v_bkd, q_bd)
        else:
            s_bk = -np.sum((v_bkd - q_bd[:, None, :]) ** 2, axis=-1)
        return np.where(rows_bk < 0, -np.inf, s_bk)

    # ----------------------------------------------------------------------------------- persistence
    def save(self, directory: str) -> None:
        """Writes the index and row tables into `directory` (fsynced); the raw rows are flushed in place, on-disk
        inverted lists are merged into a base file in `lists_dir` that the snapshot names (`meta["lists"]`)."""
        self.flush()
        lists = None
        if isinstance(self.index, ondisk.OnDiskIVF):
            lists = self.index.save(directory)
        else:
            faiss.write_index(self.index, os.path.join(directory, "index.faiss"))
        n = self.n_rows
        np.savez(os.path.join(directory, "rows.npz"), row2id=self.row2id[:n], row_ns=self.row_ns[:n],
                 live=self.live[: (n + 7) // 8])
        meta = {"n_rows": n, "n_live": self.n_live, "trained": self.trained, "kind": self.spec.kind,
                "dim": self.spec.dim, "metric": self.spec.metric, "lists": lists}
        with open(os.path.join(directory, "index.json"), "w") as f:
            json.dump(meta, f)
        for name in ("index.faiss", "rows.npz", "index.json"):
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    @property
    def lists_file(self) -> str | None:
        """The on-disk lists file the last save named (None when the lists are in RAM)."""
        return self.index.saved_name if isinstance(self.index, ondisk.OnDiskIVF) else None

    @classmethod
    def load(cls, spec: IndexSpec, directory: str, vectors_path: str | None,
             lists_dir: str | None = None) -> "VectorIndex":
        """The index saved in `directory`. Inverted lists go where `spec.ondisk` says (RAM, or mapped from their
        file in `lists_dir`), whichever way the snapshot was written."""
        with open(os.path.join(directory, "index.json")) as f:
            meta = json.load(f)
        for key in ("kind", "dim", "metric"):
            if meta[key] != getattr(spec, key):
                raise ValueError(f"the snapshot in {directory} has {key}={meta[key]!r} but the service was started "
                                 f"with {key}={getattr(spec, key)!r}; start it with the snapshot's {key} or use a "
                                 "new --data-dir")
        n = meta["n_rows"]
        self = cls(spec, vectors_path, n, lists_dir)
        tables = np.load(os.path.join(directory, "rows.npz"))
        self.row2id[:n], self.row_ns[:n] = tables["row2id"], tables["row_ns"]
        self.live[: len(tables["live"])] = tables["live"]
        self.n_rows, self.n_live, self.trained = n, meta["n_live"], meta["trained"]
        if spec.kind == "ivfpq" and meta["trained"]:
            self.index = ondisk.read_ivf(directory, meta, lists_dir, spec.ondisk, spec.ondisk_merge_rows)
        else:
            self.index = faiss.read_index(os.path.join(directory, "index.faiss"))
        rows = self.live_rows()
        self.id2row = dict(zip(self.row2id[rows].tolist(), rows.tolist()))
        return self
