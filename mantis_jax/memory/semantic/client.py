"""Semantic memory client: long-term facts (vector + real text span) searched by the model's pooled state.

`SemanticMemory` has one API over three backends, so notebooks and unit tests run without a server:
  - in-process: a SemanticStore in this process (same index code as the service; durable if given a data_dir);
  - gRPC: one service started with `python -m mantis_jax.memory.server` (see docs/semantic_memory.md), in
    plain text on loopback or over TLS (`tls_ca`: the CA that signed the service's certificate);
  - sharded: several services, each holding the ids with `id % n_shards == i`; searches fan out in parallel
    and the per-shard top-k are merged (scores are "higher is better" everywhere, so merging is a top-k).
Vectors enter as numpy [N, D] float32 (D = the model's d_model) with one Payload (or text str) each; searches
return a SearchResult (ids [B, K], scores [B, K], payloads). Call it outside `jit`, between device steps, with
host numpy arrays (`np.asarray(device_array)`). Errors are the same SemanticMemoryError subclasses locally and
over gRPC (InvalidArgument, NotFound, ResourceExhausted, Unauthenticated, Unavailable): the client runs the
store's own checks (validation.py) before it encodes a request.
"""

from __future__ import annotations

import concurrent.futures
import json
import os

import grpc
import numpy as np

from mantis_jax.memory.semantic.errors import ERRORS, InvalidArgument, SemanticMemoryError
from mantis_jax.memory.semantic.index import IndexSpec
from mantis_jax.memory.semantic.payload import Payload, SearchResult
from mantis_jax.memory.semantic.proto import semantic_pb2 as pb
from mantis_jax.memory.semantic.proto import semantic_pb2_grpc as pb_grpc
from mantis_jax.memory.semantic.store import SemanticStore
from mantis_jax.memory.semantic.validation import as_ids, as_payloads, check_search_args
from mantis_jax.memory.semantic.wire import (bytes_to_ids, ids_to_bytes, matrix_to_proto, payload_to_proto,
                                             proto_to_matrix, proto_to_payload)

_HINTS = {
    "RESOURCE_EXHAUSTED": "split the batch into smaller requests or start the service with a larger "
                          "--max-request-mb / --max-batch",
    "UNAVAILABLE": "is the service running? start it with `python -m mantis_jax.memory.server --data-dir DIR "
                   "--dim D` and pass its host:port; a service started with --tls-cert needs a client with tls_ca "
                   "(or tls=True), and a plain service a client without",
    "DEADLINE_EXCEEDED": "the service did not answer in time; raise config.memory.semantic.timeout_s",
}


def _as_matrix(x, what: str) -> np.ndarray:
    try:
        x = np.asarray(x, np.float32)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{what} must be a numeric [N, D] array ({e})") from None
    return x[None] if x.ndim == 1 else x


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InvalidArgument(f"cannot read the {what} {path!r} ({e.strerror}); pass the PEM file's path") from None


class _GrpcBackend:
    """One service: numpy in, protobuf over the wire, numpy out; gRPC errors become SemanticMemoryErrors.
    TLS when `tls` or `tls_ca` (a PEM file of the CA that signed the service's certificate; without it the
    system's roots); `tls_server_name` overrides the name checked against the certificate."""

    def __init__(self, address: str, token: str = "", timeout_s: float = 30.0, *, tls: bool = False,
                 tls_ca: str = "", tls_server_name: str = ""):
        self.address, self.timeout_s = address, timeout_s
        self.addresses, self.data_dirs = [address], []
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        if tls or tls_ca:
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            root = _read_pem(tls_ca, "CA certificate (tls_ca)") if tls_ca else None
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root), options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.SemanticMemoryStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def _call(self, name: str, request):
        try:
            return getattr(self._stub, name)(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            code = e.code().name
            hint = _HINTS.get(code, "")
            message = f"{self.address} {name}: {e.details()}" + (f" ({hint})" if hint else "")
            raise ERRORS.get(code, SemanticMemoryError)(message) from None

    def add(self, vectors, payloads, ids=None):
        payloads = as_payloads(payloads, len(vectors))  # what the encoder cannot carry fails here, as in-process
        request = pb.AddRequest(vectors=matrix_to_proto(vectors), payloads=[payload_to_proto(p) for p in payloads],
                                ids=ids_to_bytes(ids) if ids is not None else b"")
        return bytes_to_ids(self._call("Add", request).ids)

    def search(self, queries, k, *, nprobe=None, ef_search=None, namespace=None, with_payloads=True):
        request = pb.SearchRequest(
            queries=matrix_to_proto(queries), k=k, nprobe=nprobe or 0, ef_search=ef_search or 0,
            filter=pb.Filter(namespace=namespace or "", has_namespace=namespace is not None),
            with_payloads=with_payloads)
        r = self._call("Search", request)
        ids = bytes_to_ids(r.ids).reshape(r.rows, r.k)
        scores = np.frombuffer(r.scores, "<f4").reshape(r.rows, r.k).astype(np.float32)
        payloads = None
        if with_payloads:
            flat = [proto_to_payload(p) for p in r.payloads]
            payloads = [flat[b * r.k:(b + 1) * r.k] for b in range(r.rows)]
        return SearchResult(ids, scores, payloads)

    def remove(self, ids):
        return int(self._call("Remove", pb.IdsRequest(ids=ids_to_bytes(ids))).removed)

    def get(self, ids):
        r = self._call("Get", pb.IdsRequest(ids=ids_to_bytes(ids)))
        return proto_to_matrix(r.vectors, "vectors").copy(), [proto_to_payload(p) for p in r.payloads]

    def snapshot(self):
        return int(self._call("Snapshot", pb.Empty()).generation)

    def stats(self):
        return json.loads(self._call("Stats", pb.Empty()).json)

    def health(self):
        return self._call("Health", pb.Empty()).status

    def close(self):
        self._channel.close()


class _LocalBackend:
    def __init__(self, store: SemanticStore):
        self.store = store
        self.addresses, self.data_dirs = [], [store.data_dir] if store.data_dir is not None else []

    def __getattr__(self, name):
        return getattr(self.store, name)

    def health(self):
        return "SERVING"


class _ShardedBackend:
    """Shard i holds ids with id % n == i. Writes go to their shard; searches go to all and are merged."""

    def __init__(self, shards: list):
        self.shards = shards
        self.addresses = [a for s in shards for a in s.addresses]
        self.data_dirs = [d for s in shards for d in s.data_dirs]
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(shards))
        self._rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))

    def _map(self, fn, items):
        return list(self._pool.map(fn, items))

    def _route(self, ids: np.ndarray) -> list[np.ndarray]:
        owner = np.asarray(ids, np.int64) % len(self.shards)
        return [np.flatnonzero(owner == s) for s in range(len(self.shards))]

    def add(self, vectors, payloads, ids=None):
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None]
        if ids is None:  # no shared counter across shards: random 62-bit ids (collision odds ~ n^2 / 2^63)
            ids = self._rng.integers(0, 2 ** 62, len(vectors), dtype=np.int64)
        ids = np.asarray(ids)
        if len(ids) != len(vectors) or len(payloads) != len(vectors):
            raise InvalidArgument(f"got {len(vectors)} vectors, {len(payloads)} payloads and {len(ids)} ids; "
                                  "pass one payload (and id) per vector")
        parts = [(s, idx) for s, idx in enumerate(self._route(ids)) if len(idx)]
        self._map(lambda p: self.shards[p[0]].add(vectors[p[1]], [payloads[i] for i in p[1]], ids[p[1]]), parts)
        return ids.astype(np.int64)

    def search(self, queries, k, **kwargs):
        results = self._map(lambda shard: shard.search(queries, k, **kwargs), self.shards)
        ids = np.concatenate([r.ids for r in results], axis=1)  # [B, S*K]
        scores = np.concatenate([r.scores for r in results], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        payloads = None
        if results[0].payloads is not None:
            flat = [sum((r.payloads[b] for r in results), []) for b in range(ids.shape[0])]
            payloads = [[flat[b][j] for j in order[b]] for b in range(ids.shape[0])]
        return SearchResult(np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1), payloads)

    def get(self, ids):
        ids = np.asarray(ids, np.int64)
        parts = [(s, idx) for s, idx in enumerate(self._route(ids)) if len(idx)]
        answers = self._map(lambda p: self.shards[p[0]].get(ids[p[1]]), parts)
        vectors, payloads = None, [None] * len(ids)
        for (s, idx), (vec, pay) in zip(parts, answers):
            vectors = np.zeros((len(ids), vec.shape[1]), np.float32) if vectors is None else vectors
            vectors[idx] = vec
            for i, p in zip(idx, pay):
                payloads[i] = p
        return vectors, payloads

    def remove(self, ids):
        ids = np.asarray(ids, np.int64)
        self.get(ids)  # NotFound before anything is removed on any shard
        parts = [(s, idx) for s, idx in enumerate(self._route(ids)) if len(idx)]
        return sum(self._map(lambda p: self.shards[p[0]].remove(ids[p[1]]), parts))

    def snapshot(self):
        return max(self._map(lambda s: s.snapshot(), self.shards))

    def stats(self):
        per = self._map(lambda s: s.stats(), self.shards)
        return {"count": sum(p["count"] for p in per), "dim": per[0]["dim"], "index": per[0]["index"],
                "metric": per[0]["metric"], "shards": per}

    def health(self):
        states = self._map(lambda s: s.health(), self.shards)
        return "SERVING" if all(s == "SERVING" for s in states) else ",".join(states)

    def close(self):
        for s in self.shards:
            s.close()
        self._pool.shutdown()


class SemanticMemory:
    """The long-term memory tier. Build it with `in_process`, `connect` or `from_config`."""

    def __init__(self, backend, default_k: int = 5):
        self._backend = backend
        self.default_k = default_k

    @classmethod
    def in_process(cls, dim: int, *, index: str = "flat", data_dir: str | None = None, max_k: int = 1024,
                   max_batch: int = 65536, default_k: int = 5, **spec) -> "SemanticMemory":
        """A store in this process; `spec` takes IndexSpec fields (metric, nlist, pq_m, nprobe, ...)."""
        store = SemanticStore(IndexSpec(dim=dim, kind=index, **spec), data_dir, max_k=max_k, max_batch=max_batch)
        return cls(_LocalBackend(store), default_k)

    @classmethod
    def connect(cls, address: str | list[str], *, token: str | None = None, timeout_s: float = 30.0,
                default_k: int = 5, tls: bool = False, tls_ca: str = "",
                tls_server_name: str = "") -> "SemanticMemory":
        """One service ("host:port") or shards ("h1:p1,h2:p2" or a list, in shard order). The token defaults
        to $MANTIS_SEMANTIC_TOKEN. TLS when `tls_ca` (the CA's PEM file; the service's self-signed certificate
        works) or `tls=True` (the system's roots); `tls_server_name` if the certificate names another host."""
        addresses = address.split(",") if isinstance(address, str) else list(address)
        addresses = [a.strip() for a in addresses if a.strip()]
        if not addresses:
            raise InvalidArgument("no service address given; pass 'host:port' or use SemanticMemory.in_process")
        token = os.environ.get("MANTIS_SEMANTIC_TOKEN", "") if token is None else token
        shards = [_GrpcBackend(a, token, timeout_s, tls=tls, tls_ca=tls_ca, tls_server_name=tls_server_name)
                  for a in addresses]
        return cls(shards[0] if len(shards) == 1 else _ShardedBackend(shards), default_k)

    @classmethod
    def sharded(cls, memories: list["SemanticMemory"], default_k: int = 5) -> "SemanticMemory":
        """Shards from existing memories (any backend); shard i holds ids with id % len(memories) == i."""
        return cls(_ShardedBackend([m._backend for m in memories]), default_k)

    @classmethod
    def from_config(cls, sem) -> "SemanticMemory":
        """`config.memory.semantic`: a service when `address` is set, else in-process (durable if data_dir)."""
        if sem.address:
            token = os.environ.get(sem.token_env, "")
            return cls.connect(sem.address, token=token, timeout_s=sem.timeout_s, default_k=sem.k,
                               tls=sem.get("tls", False), tls_ca=sem.get("tls_ca", ""),  # configs saved before TLS
                               tls_server_name=sem.get("tls_server_name", ""))
        store = SemanticStore(IndexSpec.from_config(sem), sem.data_dir or None, max_k=sem.max_k,
                              max_batch=sem.max_batch)
        return cls(_LocalBackend(store), sem.k)

    @property
    def addresses(self) -> list[str]:
        """The services behind this memory ("host:port", in shard order); [] in-process."""
        return list(self._backend.addresses)

    @property
    def data_dirs(self) -> list[str]:
        """Data dirs of the durable in-process stores behind this memory; [] for services and non-durable stores."""
        return list(self._backend.data_dirs)

    # ------------------------------------------------------------------------------------------- API
    def add(self, vectors, payloads: list, ids=None) -> np.ndarray:
        """Stores vectors [N, D] with one Payload (or text) each; ids are upserted. Returns the ids."""
        x_nd = _as_matrix(vectors, "vectors")
        payloads = [Payload(text=p) if isinstance(p, str) else p for p in payloads]
        return self._backend.add(x_nd, payloads, None if ids is None else as_ids(ids))

    def search(self, queries, k: int | None = None, *, nprobe: int | None = None, ef_search: int | None = None,
               namespace: str | None = None, with_payloads: bool = True) -> SearchResult:
        """Top-k facts per query row [B, D]; one FAISS call per batch."""
        k = self.default_k if k is None else k
        check_search_args(k, nprobe, ef_search)  # the backend checks its own max_k
        return self._backend.search(_as_matrix(queries, "queries"), k,
                                    nprobe=nprobe, ef_search=ef_search, namespace=namespace,
                                    with_payloads=with_payloads)

    def remove(self, ids) -> int:
        """Deletes ids now; NotFound (and nothing removed) if any is unknown."""
        return self._backend.remove(as_ids(ids))

    def get(self, ids) -> tuple[np.ndarray, list[Payload]]:
        """(stored vectors [N, D], payloads) of known ids; NotFound if any is unknown."""
        return self._backend.get(as_ids(ids))

    def snapshot(self) -> int:
        return self._backend.snapshot()

    def stats(self) -> dict:
        return self._backend.stats()

    def health(self) -> str:
        return self._backend.health()

    def close(self) -> None:
        self._backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
