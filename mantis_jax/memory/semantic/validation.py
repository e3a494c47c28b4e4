"""The semantic memory's input contract, one set of checks for every entry point: the store runs them (in-process
and inside the service) and the client runs them before anything is sent, so a bad argument raises the same
InvalidArgument (or ResourceExhausted for size limits) whichever backend is behind `SemanticMemory`, and a
rejected request is never logged and changes nothing.

Values enter as whatever the caller passed (lists, numpy arrays, Python numbers, Payloads or text) and leave as
what the store keeps: float32 [N, D] rows (normalised when asked), int64 ids, Payloads with finite numbers and
JSON metadata of bounded depth.
"""

from __future__ import annotations

import json
import math
import numbers

import numpy as np

from mantis_jax.memory.semantic.errors import InvalidArgument, ResourceExhausted
from mantis_jax.memory.semantic.payload import Payload

ID_MAX = 2 ** 63 - 1  # ids are int64; -1 marks an empty result slot
WIRE_MAX = 2 ** 32 - 1  # k, nprobe and ef_search travel as uint32
SEARCH_PARAM_MAX = 1 << 20  # nprobe and ef_search
METADATA_DEPTH_MAX = 64  # nesting of a payload's metadata (dicts and lists)
FLOAT32_MAX = float(np.finfo(np.float32).max)
RAW_NORM_MAX = 1e18  # without normalisation, |q| |v| and |q - v|^2 stay below the float32 maximum (3.4e38)


def _is_int(value) -> bool:
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def normalize_rows(x_nd: np.ndarray) -> np.ndarray:
    """Unit rows, for any finite non-zero row: dividing by the largest |component| first keeps the squares of
    ~1e20 components from overflowing float32 and those of ~1e-30 from underflowing to zero."""
    x_nd = x_nd / np.abs(x_nd).max(axis=1, keepdims=True)  # every row now has a component of magnitude 1
    return x_nd / np.linalg.norm(x_nd, axis=1, keepdims=True)


def as_vectors(x, dim: int | None, what: str, *, max_batch: int | None = None,
               normalize: bool = False) -> np.ndarray:
    """A contiguous float32 [N, dim] array of finite rows (unit rows with `normalize`). `dim` and `max_batch`
    None (the client, which does not know the service's) skip those checks."""
    width = dim if dim is not None else "D"
    try:
        x_nd = np.asarray(x)
        if x_nd.dtype != np.float32:  # checked in float64 first: float32 would turn 1e39 into inf silently
            x_nd = x_nd.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{what} must be a numeric [N, {width}] array ({e})") from None
    if x_nd.ndim == 1:
        x_nd = x_nd[None]
    if x_nd.ndim != 2 or x_nd.shape[0] == 0:
        raise InvalidArgument(f"{what} must be a non-empty [N, {width}] array; got shape {x_nd.shape}")
    if max_batch is not None and x_nd.shape[0] > max_batch:
        raise ResourceExhausted(f"{what} has {x_nd.shape[0]} rows, above the limit of {max_batch}; "
                                "split the batch or raise --max-batch")
    if dim is not None and x_nd.shape[1] != dim:
        raise InvalidArgument(f"{what} have dimension {x_nd.shape[1]} but the index has dimension {dim}; "
                              "pass vectors of the model's d_model (config.memory.semantic.dim)")
    bad = ~(np.isfinite(x_nd) & (np.abs(x_nd) <= FLOAT32_MAX)).all(axis=1)
    if bad.any():
        raise InvalidArgument(f"{what} contain NaN or inf, or values beyond the float32 range (rows "
                              f"{np.flatnonzero(bad)[:5].tolist()}); drop or fix those rows")
    x_nd = x_nd.astype(np.float32, copy=False)
    if normalize:
        zero = ~x_nd.any(axis=1)
        if zero.any():
            raise InvalidArgument(f"{what} contain all-zero rows (rows {np.flatnonzero(zero)[:5].tolist()}, in "
                                  "float32), which cannot be normalised; drop them")
        x_nd = normalize_rows(x_nd)
    elif dim is not None:
        big = np.linalg.norm(x_nd.astype(np.float64), axis=1) > RAW_NORM_MAX
        if big.any():
            raise InvalidArgument(f"{what} have rows of norm above {RAW_NORM_MAX:g} (rows "
                                  f"{np.flatnonzero(big)[:5].tolist()}), whose scores overflow float32 without "
                                  "normalisation; scale them down or start the store with normalisation on")
    return np.ascontiguousarray(x_nd, dtype=np.float32)


def as_ids(ids, what: str = "ids", *, max_batch: int | None = None) -> np.ndarray:
    """A non-empty 1-D int64 array of distinct ids, none of them -1."""
    try:
        ids = np.asarray(ids)
    except (OverflowError, ValueError) as e:
        raise InvalidArgument(f"{what} must be 64-bit integers ({e})") from None
    if ids.ndim != 1 or len(ids) == 0:
        raise InvalidArgument(f"{what} must be a non-empty 1-D list of 64-bit integers; got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InvalidArgument(f"{what} must be integers; got dtype {ids.dtype}")
    if np.issubdtype(ids.dtype, np.unsignedinteger) and ids.max() > ID_MAX:
        raise InvalidArgument(f"{what} contain values above 2^63 - 1; ids are signed 64-bit integers")
    if max_batch is not None and len(ids) > max_batch:
        raise ResourceExhausted(f"{len(ids)} {what} exceed the limit of {max_batch}; split the request")
    ids = ids.astype(np.int64)
    if (ids == -1).any():
        raise InvalidArgument(f"{what} contain -1, which marks 'no result'; use any other 64-bit integer")
    if len(np.unique(ids)) != len(ids):
        raise InvalidArgument(f"{what} contain duplicates; pass each id once per request")
    return ids


def check_search_args(k, nprobe=None, ef_search=None, *, max_k: int | None = None) -> None:
    """k in [1, max_k] (the wire's uint32 bound when max_k is None: the service checks its own), and nprobe /
    ef_search None (the index's default) or integers in [1, 2^20]."""
    if not _is_int(k) or not 0 < k <= (max_k if max_k is not None else WIRE_MAX):
        bound = max_k if max_k is not None else "max_k (the service's --max-k)"
        raise InvalidArgument(f"k ({k!r}) must be an integer in [1, {bound}]")
    for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
        if value is not None and (not _is_int(value) or not 0 < value <= SEARCH_PARAM_MAX):
            raise InvalidArgument(f"{name} ({value!r}) must be an integer in [1, {SEARCH_PARAM_MAX}]; leave it "
                                  "unset (None) for the index's default")


def _metadata_depth(meta, limit: int) -> int:
    """Nesting depth of dicts and lists, walked without recursion; stops counting past `limit`."""
    deepest, stack = 0, [(meta, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list, tuple)))
    return deepest


def check_metadata(meta, where: str) -> None:
    if not isinstance(meta, dict):
        raise InvalidArgument(f"{where}: metadata must be a JSON object (a dict); got {type(meta).__name__}")
    if _metadata_depth(meta, METADATA_DEPTH_MAX) > METADATA_DEPTH_MAX:
        raise InvalidArgument(f"{where}: metadata is nested deeper than {METADATA_DEPTH_MAX} levels; flatten it")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{where}: metadata is not JSON-serialisable ({e}); store plain str, int, float, "
                              "bool, None, lists and dicts") from None


def check_payload(p: Payload, where: str) -> None:
    for name in ("text", "source", "namespace"):
        value = getattr(p, name)
        if not isinstance(value, str):
            raise InvalidArgument(f"{where}: {name} must be a str; got {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidArgument(f"{where}: {name} is not valid Unicode ({e.reason} at {e.start}); "
                                  "drop lone surrogates") from None
    for name in ("timestamp", "importance"):
        value = getattr(p, name)
        if not isinstance(value, (numbers.Real, np.floating, np.integer)) or isinstance(value, (bool, np.bool_)):
            raise InvalidArgument(f"{where}: {name} must be a number; got {type(value).__name__}")
        limit = FLOAT32_MAX if name == "importance" else math.inf  # importance is a float32 on the wire
        if not (math.isfinite(float(value)) and abs(float(value)) <= limit):
            raise InvalidArgument(f"{where}: {name} ({value}) must be a finite number"
                                  + (" within the float32 range" if limit < math.inf else ""))
    check_metadata(p.metadata, where)


def as_payloads(payloads, n: int) -> list[Payload]:
    """One Payload per vector (text becomes Payload(text)), every field checked."""
    if isinstance(payloads, (str, Payload)) or not hasattr(payloads, "__len__"):
        raise InvalidArgument("payloads must be a list with one Payload (or text str) per vector")
    if len(payloads) != n:
        raise InvalidArgument(f"got {n} vectors but {len(payloads)} payloads; pass one payload per vector")
    out = [Payload(text=p) if isinstance(p, str) else p for p in payloads]
    for i, p in enumerate(out):
        if not isinstance(p, Payload):
            raise InvalidArgument(f"payload {i} is a {type(p).__name__}; pass a Payload "
                                  "(mantis_jax.memory.semantic.Payload) or a text str")
        check_payload(p, f"payload {i}")
    return out
