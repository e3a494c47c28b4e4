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


def row_norms(x_nd: np.ndarray) -> np.ndarray:
    """[N] float64 norms of float32 rows. Rows whose float32 squared norm could have overflowed or underflowed are
    summed again in float64, where no float32 component's square does (1e20 squares to 1e40, 1e-30 to 1e-60), so
    any finite non-zero row has a finite, non-zero norm."""
    sq = np.einsum("nd,nd->n", x_nd, x_nd)
    norms = np.sqrt(sq.astype(np.float64))
    risky = ~((sq > 1e-30) & (sq < 1e30))
    if risky.any():
        rows = x_nd[risky].astype(np.float64)
        norms[risky] = np.sqrt(np.einsum("nd,nd->n", rows, rows))
    return norms


def normalize_rows(x_nd: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    """Unit float32 rows of finite non-zero rows, whatever their magnitude (extreme ones divided in float64)."""
    norms = row_norms(x_nd) if norms is None else norms
    out = x_nd / norms.astype(np.float32)[:, None]
    risky = ~((norms > 1e-15) & (norms < 1e15))
    if risky.any():
        out[risky] = (x_nd[risky] / norms[risky, None]).astype(np.float32)
    return out


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
    finite = np.isfinite(x_nd) if x_nd.dtype == np.float32 else np.isfinite(x_nd) & (np.abs(x_nd) <= FLOAT32_MAX)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=1))[:5].tolist()
        raise InvalidArgument(f"{what} contain NaN or inf, or values beyond the float32 range (rows {bad}); "
                              "drop or fix those rows")
    x_nd = x_nd.astype(np.float32, copy=False)
    if normalize:
        norms = row_norms(x_nd)
        zero = norms == 0
        if zero.any():
            raise InvalidArgument(f"{what} contain all-zero rows (rows {np.flatnonzero(zero)[:5].tolist()}, in "
                                  "float32), which cannot be normalised; drop them")
        x_nd = normalize_rows(x_nd, norms)
    elif dim is not None:
        big = row_norms(x_nd) > RAW_NORM_MAX
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
        bound = max_k if max_k is not None else "max_k"
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
    if type(meta) is not dict and not isinstance(meta, dict):
        raise InvalidArgument(f"{where}: metadata must be a JSON object (a dict); got {type(meta).__name__}")
    if not meta:
        return
    too_deep = InvalidArgument(f"{where}: metadata is nested deeper than {METADATA_DEPTH_MAX} levels; flatten it")
    try:
        text = json.dumps(meta)
    except RecursionError:
        raise too_deep from None
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{where}: metadata is not JSON-serialisable ({e}); store plain str, int, float, "
                              "bool, None, lists and dicts") from None
    # Only a text with more brackets than the limit can nest that deep: the walk runs for those alone.
    if text.count("{") + text.count("[") > METADATA_DEPTH_MAX and _metadata_depth(meta, METADATA_DEPTH_MAX) > \
            METADATA_DEPTH_MAX:
        raise too_deep


def _finite(value, name: str, where: str, limit: float) -> None:
    if not isinstance(value, (numbers.Real, np.floating, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise InvalidArgument(f"{where}: {name} must be a number; got {type(value).__name__}")
    try:
        x = float(value)
    except OverflowError:  # an int beyond float64
        x = math.inf
    if not (math.isfinite(x) and abs(x) <= limit):
        raise InvalidArgument(f"{where}: {name} ({value}) must be a finite number"
                              + (" within the float32 range" if limit < math.inf else ""))


def check_payload(p: Payload, where: str) -> None:
    for name in ("text", "source", "namespace"):
        value = getattr(p, name)
        if type(value) is not str and not isinstance(value, str):
            raise InvalidArgument(f"{where}: {name} must be a str; got {type(value).__name__}")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InvalidArgument(f"{where}: {name} is not valid Unicode ({e.reason} at {e.start}); "
                                      "drop lone surrogates") from None
    _finite(p.timestamp, "timestamp", where, math.inf)
    _finite(p.importance, "importance", where, FLOAT32_MAX)  # importance is a float32 on the wire
    check_metadata(p.metadata, where)


_BRACKET_STEP = np.zeros(256, np.int8)
_BRACKET_STEP[[ord("{"), ord("[")]], _BRACKET_STEP[[ord("}"), ord("]")]] = 1, -1


def _json_depth(text: str) -> int:
    """Deepest nesting of brackets in a JSON text written by json.dumps (ASCII). Its strings may hold brackets, so
    they go first: drop escaped backslashes, then escaped quotes; what remains between quotes is string content."""
    structure = "".join(text.replace("\\\\", "").replace('\\"', "").split('"')[::2])
    return int(np.cumsum(_BRACKET_STEP[np.frombuffer(structure.encode(), np.uint8)], dtype=np.int32).max(initial=0))


_NUMBER_TYPES = {float, int, np.float64, np.float32, np.int64, np.int32}


def _all_valid(payloads: list) -> bool:
    """Every payload valid, by a few whole-batch checks (C loops); False sends the batch to the per-payload checks,
    which find the culprit and name it."""
    if set(map(type, payloads)) != {Payload}:
        return False
    strings = [p.text for p in payloads] + [p.source for p in payloads] + [p.namespace for p in payloads]
    numeric = [p.timestamp for p in payloads], [p.importance for p in payloads]
    metas = [p.metadata for p in payloads]
    if not set(map(type, strings)) <= {str} or not all(set(map(type, v)) <= _NUMBER_TYPES for v in numeric) or \
            set(map(type, metas)) != {dict}:
        return False
    metas = [m for m in metas if m]  # {} (the common case) needs no encoding
    try:
        "".join(strings).encode("utf-8")
        timestamps, importances = (np.asarray(v, np.float64) for v in numeric)
        text = json.dumps(metas) if metas else "[]"
    except (UnicodeEncodeError, OverflowError, TypeError, ValueError, RecursionError):
        return False
    return bool(np.isfinite(timestamps).all() and (np.abs(importances) <= FLOAT32_MAX).all()
                and _json_depth(text) - 1 <= METADATA_DEPTH_MAX)  # - 1: the list around them


def as_payloads(payloads, n: int) -> list[Payload]:
    """One Payload per vector (text becomes Payload(text)), every field checked."""
    if isinstance(payloads, (str, Payload)) or not hasattr(payloads, "__len__"):
        raise InvalidArgument("payloads must be a list with one Payload (or text str) per vector")
    if len(payloads) != n:
        raise InvalidArgument(f"got {n} vectors but {len(payloads)} payloads; pass one payload per vector")
    out = [Payload(text=p) if isinstance(p, str) else p for p in payloads]
    if _all_valid(out):
        return out
    for i, p in enumerate(out):
        if not isinstance(p, Payload):
            raise InvalidArgument(f"payload {i} is a {type(p).__name__}; pass a Payload "
                                  "(mantis_jax.memory.semantic.Payload) or a text str")
        check_payload(p, f"payload {i}")
    return out
