"""Episodic memory: the recent window of hidden states compressed into a fixed-size SSM state, and its host store.

Two halves:
- `EpisodicMemory`, a pure functional core the engine runs under `jit`:
  `init(batch) -> state`, `update(params, state, hidden, mask) -> state` (feeds hidden states [B, T, D] through
  the selective-SSM stack of `mantis_jax.model.ssm`; the state is one conv window and one [Di, N] SSM state per
  layer, the same size whatever the length fed), and `read(params, state, query) -> vectors` (a query of d_model
  is projected into the state space, C_q = W_c q, and the per-layer read-outs h·C_q, gated and projected back,
  are summed into vectors of d_model).
- `EpisodicStore`, host-side and thread-safe: a bounded ring of recent `EpisodicEntry`s (text span, token range,
  embedding, timestamp from a monotonic counter, importance). When full it evicts exactly the oldest entries, in
  order, and hands them to `on_evict(entries)` (consolidation into semantic memory listens there). `save`/`load`
  keep it across restarts in one .npz file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mantis_jax.model.layers import RMSNorm, logical_param
from mantis_jax.model.ssm import DTYPES, MambaStack, SSMArgs, SSMCache, init_caches


@flax.struct.dataclass
class EpisodicState:
    """Per-sequence memory: one SSM cache per layer and the number of tokens absorbed so far."""

    caches: tuple[SSMCache, ...]
    tokens_seen_b: jax.Array  # [B] int32


class _EpisodicNet(nn.Module):
    """Parameters of the memory: the SSM stack (writes) and the read heads (one per layer)."""

    args: SSMArgs

    def setup(self):
        a = self.args
        pdt = DTYPES[a.param_dtype]
        self.stack = MambaStack(a)
        self.query_norm = RMSNorm(eps=a.norm_eps, dtype=jnp.float32, param_dtype=pdt)
        shape = lambda *s: (a.n_layers,) + s
        self.read_c = logical_param(self, "read_c", nn.initializers.lecun_normal(batch_axis=(0,)),
                                    shape(a.d_model, a.d_state), ("layers", "embed", "ssm_state"), pdt)
        self.read_gate = logical_param(self, "read_gate", nn.initializers.lecun_normal(batch_axis=(0,)),
                                       shape(a.d_model, a.d_inner), ("layers", "embed", "ssm_inner"), pdt)
        self.read_out = logical_param(self, "read_out", nn.initializers.lecun_normal(batch_axis=(0,)),
                                      shape(a.d_inner, a.d_model), ("layers", "ssm_inner", "embed"), pdt)

    def write(self, hidden_btd, caches, lengths_b):
        _, caches = self.stack(hidden_btd, caches, lengths_b)
        return caches

    def read(self, query_bqd, caches):
        q = self.query_norm(query_bqd.astype(jnp.float32))
        h_lben = jnp.stack([c.ssm_bdn for c in caches])  # [L, B, Di, N]
        c_lbqn = jnp.einsum("bqd,ldn->lbqn", q, self.read_c.astype(jnp.float32))
        r_lbqe = jnp.einsum("lben,lbqn->lbqe", h_lben, c_lbqn)
        gate_lbqe = nn.silu(jnp.einsum("bqd,lde->lbqe", q, self.read_gate.astype(jnp.float32)))
        return jnp.einsum("lbqe,led->bqd", r_lbqe * gate_lbqe, self.read_out.astype(jnp.float32))

    def __call__(self, hidden_btd, caches, lengths_b, query_bqd):
        return self.read(query_bqd, self.write(hidden_btd, caches, lengths_b))


@dataclasses.dataclass(frozen=True)
class EpisodicMemory:
    """Pure functional episodic memory; every method is jittable and side-effect free."""

    args: SSMArgs

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "EpisodicMemory":
        return cls(SSMArgs.from_config(config))

    @property
    def net(self) -> _EpisodicNet:
        return _EpisodicNet(self.args)

    def init_params(self, rng: jax.Array) -> dict:
        """Parameters (unboxed; their logical axes are in `param_axes`)."""
        return nn.meta.unbox(jax.jit(self._init_boxed)(rng))

    def param_axes(self) -> dict:
        """Logical axis names of every parameter, for `nn.logical_to_mesh_sharding`."""
        boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
        return nn.get_partition_spec(boxed)

    def _init_boxed(self, rng):
        a = self.args
        hidden = jnp.zeros((1, 1, a.d_model), DTYPES[a.dtype])
        return self.net.init(rng, hidden, init_caches(a, 1), None, jnp.zeros((1, 1, a.d_model)))

    def init(self, batch: int) -> EpisodicState:
        """The empty memory for `batch` sequences."""
        return EpisodicState(caches=init_caches(self.args, batch), tokens_seen_b=jnp.zeros((batch,), jnp.int32))

    def _check_width(self, x: jax.Array, what: str) -> None:
        if x.shape[-1] != self.args.d_model:
            raise ValueError(f"episodic memory {what} has width {x.shape[-1]} but config.memory.episodic.d_model is "
                             f"{self.args.d_model}; it must equal config.model.d_model")

    def update(self, params: dict, state: EpisodicState, hidden_btd: jax.Array,
               mask_bt: jax.Array | None = None) -> EpisodicState:
        """Absorbs hidden states [B, T, D]; tokens where `mask_bt` is False are skipped (they leave the state as it
        was, wherever they sit). The returned state has the same shapes whatever T."""
        self._check_width(hidden_btd, "hidden")
        bsz, t, _ = hidden_btd.shape
        if mask_bt is None:
            lengths_b = jnp.full((bsz,), t, jnp.int32)
        else:
            if mask_bt.shape != (bsz, t):
                raise ValueError(f"mask shape {mask_bt.shape} must be [B, T] = {(bsz, t)} like hidden's first axes")
            # Valid tokens to the front, in order (stable sort), so the padding is one suffix the SSM skips.
            order_bt = jnp.argsort(~mask_bt.astype(bool), axis=1, stable=True)
            hidden_btd = jnp.take_along_axis(hidden_btd, order_bt[..., None], axis=1)
            lengths_b = jnp.sum(mask_bt.astype(jnp.int32), axis=1)
        caches = self.net.apply(params, hidden_btd.astype(DTYPES[self.args.dtype]), state.caches, lengths_b,
                                method=_EpisodicNet.write)
        return EpisodicState(caches=caches, tokens_seen_b=state.tokens_seen_b + lengths_b)

    def read(self, params: dict, state: EpisodicState, query: jax.Array) -> jax.Array:
        """Read-out vectors of d_model for queries [B, D] or [B, Q, D] (same leading shape back)."""
        self._check_width(query, "query")
        squeeze = query.ndim == 2
        query_bqd = query[:, None] if squeeze else query
        out = self.net.apply(params, query_bqd, state.caches, method=_EpisodicNet.read)
        return out[:, 0] if squeeze else out


# ----------------------------------------------------------------------------------------------------------------
# Host-side store.


@dataclasses.dataclass(frozen=True, eq=False)
class EpisodicEntry:
    """One remembered span. `timestamp` comes from the store's monotonic counter (not wall time)."""

    text: str
    token_range: tuple[int, int]
    embedding: np.ndarray  # [d_model] float32, read-only
    timestamp: int
    importance: float
    uncertainty: float = 0.0
    source: str = ""

    def __post_init__(self):
        emb = np.array(self.embedding, dtype=np.float32)
        if emb.ndim != 1:
            raise ValueError(f"EpisodicEntry.embedding must be one vector [d_model], got shape {emb.shape}")
        emb.flags.writeable = False
        start, end = (int(v) for v in self.token_range)
        if not 0 <= start <= end:
            raise ValueError(f"EpisodicEntry.token_range {self.token_range} must be (start, end) with "
                             "0 <= start <= end")
        object.__setattr__(self, "embedding", emb)
        object.__setattr__(self, "token_range", (start, end))
        object.__setattr__(self, "timestamp", int(self.timestamp))
        object.__setattr__(self, "importance", float(self.importance))
        object.__setattr__(self, "uncertainty", float(self.uncertainty))

    def __eq__(self, other):
        if not isinstance(other, EpisodicEntry):
            return NotImplemented
        fields = ("text", "token_range", "timestamp", "importance", "uncertainty", "source")
        return all(getattr(self, f) == getattr(other, f) for f in fields) and \
            np.array_equal(self.embedding, other.embedding)

    __hash__ = None


class EpisodicStore:
    """Bounded, thread-safe ring of the most recent entries, oldest first.

    `on_evict(entries)` receives every evicted entry exactly once, oldest first, in eviction order. It runs while
    the store's (re-entrant) lock is held so that the order holds across threads: keep it short (hand the entries to
    a queue) and do not block on another thread that writes to this store.
    """

    _FORMAT = 1

    def __init__(self, capacity: int, dim: int,
                 on_evict: Callable[[list[EpisodicEntry]], None] | None = None):
        if capacity <= 0 or dim <= 0:
            raise ValueError(f"EpisodicStore needs capacity > 0 and dim > 0, got capacity={capacity}, dim={dim}; "
                             "see config.memory.episodic.store_capacity and config.model.d_model")
        self.capacity = int(capacity)
        self.dim = int(dim)
        self.on_evict = on_evict
        self._entries: deque[EpisodicEntry] = deque()
        self._clock = 0
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, on_evict=None) -> "EpisodicStore":
        return cls(config.memory.episodic.store_capacity, config.memory.episodic.d_model, on_evict)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def clock(self) -> int:
        """The timestamp the next entry will get."""
        with self._lock:
            return self._clock

    def add(self, text: str, token_range: tuple[int, int], embedding, importance: float = 1.0,
            uncertainty: float = 0.0, source: str = "") -> EpisodicEntry:
        """Appends one entry (timestamped now); evicts the oldest if the ring is full. Returns the entry."""
        return self.add_many([dict(text=text, token_range=token_range, embedding=embedding, importance=importance,
                                   uncertainty=uncertainty, source=source)])[0]

    def add_many(self, items: Iterable[dict]) -> list[EpisodicEntry]:
        """Appends several entries atomically, with consecutive timestamps."""
        items = [dict(dict(importance=1.0, uncertainty=0.0, source=""), **item) for item in items]
        for item in items:
            emb = np.asarray(item["embedding"])
            if emb.shape != (self.dim,):
                raise ValueError(f"embedding shape {emb.shape} must be ({self.dim},) = (d_model,) of this store")
            if not np.all(np.isfinite(emb)):
                raise ValueError("embedding has NaN or inf values; the model produced a non-finite hidden state")
        with self._lock:
            made = [EpisodicEntry(timestamp=self._clock + i, **item) for i, item in enumerate(items)]
            self._clock += len(made)  # only once every entry is valid: a bad item adds nothing
            self._entries.extend(made)
            self._evict_locked(len(self._entries) - self.capacity)
            return made

    def evict(self, n: int) -> list[EpisodicEntry]:
        """Removes the n oldest entries now (through `on_evict`, like overflow does); returns them."""
        with self._lock:
            return self._evict_locked(n)

    def _evict_locked(self, n: int) -> list[EpisodicEntry]:
        n = min(max(n, 0), len(self._entries))
        gone = [self._entries.popleft() for _ in range(n)]
        if gone and self.on_evict is not None:
            self.on_evict(gone)
        return gone

    def entries(self) -> list[EpisodicEntry]:
        """A snapshot, oldest first."""
        with self._lock:
            return list(self._entries)

    def recent(self, n: int) -> list[EpisodicEntry]:
        """The n newest entries, oldest first."""
        with self._lock:
            return list(self._entries)[max(len(self._entries) - n, 0):]

    def embeddings(self) -> np.ndarray:
        """[len, dim] float32, oldest first."""
        with self._lock:
            if not self._entries:
                return np.zeros((0, self.dim), np.float32)
            return np.stack([e.embedding for e in self._entries])

    def search(self, query, k: int) -> list[tuple[float, EpisodicEntry]]:
        """The k entries with the highest inner product with `query` [dim], best first."""
        query = np.asarray(query, np.float32)
        if query.shape != (self.dim,):
            raise ValueError(f"query shape {query.shape} must be ({self.dim},)")
        with self._lock:
            entries = list(self._entries)
            scores = self.embeddings() @ query
        order = np.argsort(-scores, kind="stable")[:k]
        return [(float(scores[i]), entries[i]) for i in order]

    def save(self, path: str) -> None:
        """Writes the store to one .npz file (atomically: a temp file, then rename)."""
        with self._lock:
            entries = list(self._entries)
            meta = dict(format=self._FORMAT, capacity=self.capacity, dim=self.dim, clock=self._clock,
                        entries=[dict(text=e.text, token_range=list(e.token_range), timestamp=e.timestamp,
                                      importance=e.importance, uncertainty=e.uncertainty, source=e.source)
                                 for e in entries])
            embeddings = self.embeddings()
        tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
        with open(tmp, "wb") as f:
            np.savez(f, embeddings=embeddings, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, on_evict=None) -> "EpisodicStore":
        """Reads a store written by `save` (same capacity, entries, timestamps and clock)."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"no episodic store at {path!r}; write one with EpisodicStore.save")
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes().decode())
            embeddings = data["embeddings"]
        if meta.get("format") != cls._FORMAT:
            raise ValueError(f"{path!r} has store format {meta.get('format')}, this code reads {cls._FORMAT}")
        store = cls(meta["capacity"], meta["dim"], on_evict)
        store._entries.extend(EpisodicEntry(embedding=emb, **dict(e, token_range=tuple(e["token_range"])))
                              for e, emb in zip(meta["entries"], embeddings))
        store._clock = int(meta["clock"])
        return store
