"""Semantic memory: long-term facts (a vector + the real text span) in a FAISS index, searched by the model's pooled
state. `SemanticMemory` is the one API (in-process, one service, or shards: `in_process`, `connect`,
`from_config(config.memory.semantic)`); the service runs with `python -m mantis_jax.memory.server`.

Modules, in the order data flows through them:
  client        SemanticMemory and its backends (in-process store, gRPC service, shards)
  validation    the input contract every entry point shares (one InvalidArgument for one bad argument)
  errors        the error classes, one per gRPC status; payload: Payload and SearchResult
  wire          numpy arrays and Payloads <-> protobuf messages (proto/: the gRPC schema and generated code)
  service       the gRPC servicer, token check, TLS, command line
  store         SemanticStore: validation, locking, durability (log replay, snapshots) around one index
  wal           the fsynced write-ahead log; payload_tables: payloads in SQLite or a dict
  index         IndexSpec and VectorIndex: raw rows, the FAISS index over them, tombstones, ivfpq training
  ondisk_lists  IVF inverted lists in a memory-mapped file (ivfpq with ondisk)
"""

from mantis_jax.memory.semantic.client import SemanticMemory
from mantis_jax.memory.semantic.errors import (InvalidArgument, NotFound, ResourceExhausted, SemanticMemoryError,
                                               Unauthenticated, Unavailable)
from mantis_jax.memory.semantic.index import IndexSpec
from mantis_jax.memory.semantic.payload import Payload, SearchResult
from mantis_jax.memory.semantic.store import SemanticStore

__all__ = ["SemanticMemory", "SemanticStore", "IndexSpec", "Payload", "SearchResult", "SemanticMemoryError",
           "InvalidArgument", "NotFound", "ResourceExhausted", "Unauthenticated", "Unavailable"]
