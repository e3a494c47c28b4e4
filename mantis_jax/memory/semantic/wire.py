"""Conversions between numpy arrays / Payloads and the service's protobuf messages (client and server share them).

Arrays cross the wire as little-endian bytes (`Matrix.data`, `ids`, `scores`), so a batch is one memcpy each way;
malformed bytes raise InvalidArgument naming the field.
"""

from __future__ import annotations

import json

import numpy as np

from mantis_jax.memory.semantic.errors import InvalidArgument
from mantis_jax.memory.semantic.payload import Payload
from mantis_jax.memory.semantic.proto import semantic_pb2 as pb
from mantis_jax.memory.semantic.validation import METADATA_DEPTH_MAX


def matrix_to_proto(x_nd: np.ndarray) -> pb.Matrix:
    x_nd = np.asarray(x_nd, dtype="<f4")
    if x_nd.ndim == 1:
        x_nd = x_nd[None]
    if x_nd.ndim != 2:
        raise InvalidArgument(f"expected a [N, D] array of vectors; got shape {x_nd.shape}")
    return pb.Matrix(rows=x_nd.shape[0], dim=x_nd.shape[1], data=np.ascontiguousarray(x_nd).tobytes())


def proto_to_matrix(m: pb.Matrix, what: str) -> np.ndarray:
    if len(m.data) != 4 * m.rows * m.dim:
        raise InvalidArgument(f"{what}: {len(m.data)} bytes do not hold rows={m.rows} x dim={m.dim} float32 values")
    return np.frombuffer(m.data, "<f4").reshape(m.rows, m.dim)


def ids_to_bytes(ids) -> bytes:
    return np.asarray(ids, dtype="<i8").ravel().tobytes()


def bytes_to_ids(data: bytes, what: str = "ids") -> np.ndarray:
    if len(data) % 8:
        raise InvalidArgument(f"{what}: {len(data)} bytes is not a whole number of int64 values")
    return np.frombuffer(data, "<i8").astype(np.int64)


def payload_to_proto(p: Payload | None) -> pb.Payload:
    if p is None:
        return pb.Payload(present=False)
    return pb.Payload(text=p.text, source=p.source, timestamp=p.timestamp, importance=p.importance,
                      namespace=p.namespace, metadata_json=json.dumps(p.metadata) if p.metadata else "",
                      present=True)


def proto_to_payload(m: pb.Payload) -> Payload | None:
    if not m.present:
        return None
    try:
        meta = json.loads(m.metadata_json) if m.metadata_json else {}
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"payload metadata_json is not valid JSON ({e}); send a JSON object") from None
    except RecursionError:  # the decoder recurses per level; the store refuses far shallower nesting anyway
        raise InvalidArgument(f"payload metadata_json is nested deeper than {METADATA_DEPTH_MAX} levels; "
                              "flatten it") from None
    if not isinstance(meta, dict):
        raise InvalidArgument("payload metadata_json must encode a JSON object")
    return Payload(m.text, m.source, m.timestamp, m.importance, m.namespace, meta)
