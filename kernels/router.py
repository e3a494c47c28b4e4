"""Fused MoE router: router logits -> top-k weights, expert ids, per-expert counts and the grouping permutation.

Concept: token t scores experts with `p = softmax(logits[t] + bias)` and keeps the K most probable (ties go to the
lowest expert id, as `lax.top_k` does). The gates (`weights_tk`): with K >= 2 the chosen probabilities
renormalised to sum to 1, which equals a softmax over the chosen logits alone; with K = 1 the chosen probability
itself, un-renormalised (as Switch does), since a renormalised single gate is always exactly 1 and the task loss
would then send the router no gradient. The dispatch needs the T*K token slots (slot s = t*K + k) grouped by
expert, stably: `order_m[i]` is the slot at grouped position i, `position_tk` is its inverse, `counts_e` the
group sizes.

Data flow: `route(logits_te, bias_e, k=K, impl=...)` -> `Routing`. The kernel runs one program per block of
`block_t` tokens: softmax; K rounds of masked argmax; each slot's rank among earlier slots of the same expert in
the block (a strictly-lower-triangular [BT, BT] @ [BT, E] matmul, an exclusive prefix count that lowers on both
Triton and Mosaic, unlike cumsum); the block's per-expert counts. Then a few [n_blocks, E] jnp ops turn block
counts into offsets, and position = offset[block, expert] + rank. Experts are padded to a power of two >= 16
(Triton's dot minimum; padded columns can never be chosen), tokens to a multiple of the block (padded rows are
masked out of every count). Gradients: `custom_vjp`; with K >= 2, d weights / d logits through the chosen logits
only; with K = 1, d p_j / d logits = p_j (onehot_j - p) reaches every logit.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import common

MAX_EXPERTS = 256


class Routing(NamedTuple):
    weights_tk: jax.Array  # [T, K] float32 gates: top-k probabilities, renormalised when K >= 2
    experts_tk: jax.Array  # [T, K] int32 expert ids, most probable first
    counts_e: jax.Array  # [E] int32 token slots per expert
    order_m: jax.Array  # [T*K] int32 slot (t*K + k) at each expert-grouped position
    position_tk: jax.Array  # [T, K] int32 grouped position of each slot (inverse of order_m)


def _check(logits_te: jax.Array, bias_e: jax.Array | None, k: int) -> None:
    if logits_te.ndim != 2:
        raise ValueError(f"route: logits must be [T, E], got shape {logits_te.shape}; reshape tokens to one axis")
    n_experts = logits_te.shape[1]
    if not 1 <= n_experts <= MAX_EXPERTS:
        raise ValueError(f"route: {n_experts} experts; the kernel supports 1..{MAX_EXPERTS} "
                         "(config.moe.n_experts)")
    if not 1 <= k <= n_experts:
        raise ValueError(f"route: k={k} must be in 1..{n_experts} (config.moe.top_k <= config.moe.n_experts)")
    if bias_e is not None and bias_e.shape != (n_experts,):
        raise ValueError(f"route: bias must be [E]=({n_experts},), got {bias_e.shape}")


def _positions(experts_tk: jax.Array, n_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stable counting sort of the flat expert ids: (counts_e, order_m, position_tk)."""
    n_tokens, k = experts_tk.shape
    flat_m = experts_tk.reshape(-1)
    order_m = jnp.argsort(flat_m, stable=True).astype(jnp.int32)
    slots_m = jnp.arange(n_tokens * k, dtype=jnp.int32)
    position_m = jnp.zeros_like(slots_m).at[order_m].set(slots_m, unique_indices=True)
    counts_e = jnp.zeros((n_experts,), jnp.int32).at[flat_m].add(1)
    return counts_e, order_m, position_m.reshape(n_tokens, k)


def gates(top_tk: jax.Array) -> jax.Array:
    """The chosen probabilities [.., K] as gates: renormalised to sum to 1 when K >= 2, as they are when K = 1."""
    if top_tk.shape[-1] == 1:
        return top_tk
    return top_tk / jnp.sum(top_tk, axis=-1, keepdims=True)


def route_reference(logits_te: jax.Array, bias_e: jax.Array | None = None, *, k: int) -> Routing:
    """Plain jnp routing; the kernel must reproduce it (ids and permutation exactly, weights to rounding)."""
    _check(logits_te, bias_e, k)
    x_te = logits_te.astype(jnp.float32)
    if bias_e is not None:
        x_te = x_te + bias_e.astype(jnp.float32)
    probs_te = jax.nn.softmax(x_te, axis=-1)
    top_tk, experts_tk = lax.top_k(probs_te, k)
    weights_tk = gates(top_tk)
    experts_tk = experts_tk.astype(jnp.int32)
    counts_e, order_m, position_tk = _positions(experts_tk, logits_te.shape[1])
    return Routing(weights_tk, experts_tk, counts_e, order_m, position_tk)


def _router_kernel(x_ref, b_ref, w_ref, id_ref, rank_ref, cnt_ref, *, k, n_experts, n_tokens):
    block_t, e_pad = x_ref.shape
    k_pad = w_ref.shape[1]
    col = lax.broadcasted_iota(jnp.int32, (block_t, e_pad), 1)
    kcol = lax.broadcasted_iota(jnp.int32, (block_t, k_pad), 1)
    row = pl.program_id(0) * block_t + lax.broadcasted_iota(jnp.int32, (block_t, e_pad), 0)
    real_col = col < n_experts
    x = jnp.where(real_col, x_ref[...].astype(jnp.float32) + b_ref[...][None, :], -jnp.inf)
    m = jnp.max(x, axis=1, keepdims=True)
    ex = jnp.exp(x - m)
    p = ex / jnp.sum(ex, axis=1, keepdims=True)  # [BT, Ep]; same formula as jax.nn.softmax

    def pick(j, carry):
        w, ids, taken = carry
        cand = jnp.where((taken == 0.0) & real_col, p, -1.0)  # probabilities are >= 0: -1 marks "not available"
        best = jnp.max(cand, axis=1, keepdims=True)  # [BT, 1]
        idx = jnp.min(jnp.where(cand == best, col, e_pad), axis=1, keepdims=True)  # lowest id among ties
        taken = jnp.where(col == idx, 1.0, taken)
        w = jnp.where(kcol == j, best, w)
        ids = jnp.where(kcol == j, idx, ids)
        return w, ids, taken

    init = (jnp.zeros((block_t, k_pad), jnp.float32), jnp.zeros((block_t, k_pad), jnp.int32),
            jnp.zeros((block_t, e_pad), jnp.float32))
    w, ids, taken = lax.fori_loop(0, k, pick, init)
    w_ref[...] = w if k == 1 else w / jnp.sum(w, axis=1, keepdims=True)  # padded columns hold 0
    id_ref[...] = ids

    chosen = jnp.where(row < n_tokens, taken, 0.0)  # [BT, Ep] multi-hot; padded tokens count nowhere
    r = lax.broadcasted_iota(jnp.int32, (block_t, block_t), 0)
    c = lax.broadcasted_iota(jnp.int32, (block_t, block_t), 1)
    earlier = jnp.where(c < r, 1.0, 0.0)  # [BT, BT] strictly lower triangular
    # Exact in any matmul precision: 0/1 inputs, integer sums <= BT, f32 accumulation.
    before = jnp.dot(earlier, chosen, preferred_element_type=jnp.float32)  # [BT, Ep]

    def rank_of(j, ranks):
        ids_j = jnp.sum(jnp.where(kcol == j, ids, 0), axis=1, keepdims=True)  # [BT, 1]
        rank_j = jnp.sum(jnp.where(col == ids_j, before, 0.0), axis=1, keepdims=True)
        return jnp.where(kcol == j, rank_j.astype(jnp.int32), ranks)

    rank_ref[...] = lax.fori_loop(0, k, rank_of, jnp.zeros((block_t, k_pad), jnp.int32))
    cnt_ref[...] = jnp.sum(chosen, axis=0).astype(jnp.int32)


def default_block_t(n_tokens: int, n_experts: int) -> int:
    """Tokens per program: a power of two in [16, 128], smaller for wide E so a block stays ~8K elements."""
    e_pad = max(16, common.next_pow2(n_experts))
    return max(16, min(common.next_pow2(n_tokens), 128, 8192 // e_pad))


def _route_kernel_call(logits_te, bias_e, k: int, mode: str, block_t: int | None) -> Routing:
    n_tokens, n_experts = logits_te.shape
    e_pad = max(16, common.next_pow2(n_experts))
    k_pad = common.next_pow2(k)
    bt = block_t or default_block_t(n_tokens, n_experts)
    if bt < 16 or bt & (bt - 1):
        raise ValueError(f"route: block_t={bt} must be a power of two >= 16 (Triton block shapes)")
    n_blocks = common.cdiv(n_tokens, bt)
    x_te = jnp.pad(logits_te, ((0, n_blocks * bt - n_tokens), (0, e_pad - n_experts)))
    b_e = jnp.pad(bias_e.astype(jnp.float32), (0, e_pad - n_experts))
    kernel = functools.partial(_router_kernel, k=k, n_experts=n_experts, n_tokens=n_tokens)
    tok_block = lambda i: (i, 0)  # noqa: E731
    w_tk, ids_tk, rank_tk, cnt_ne = pl.pallas_call(
        kernel,
        grid=(n_blocks,),
        in_specs=[pl.BlockSpec((bt, e_pad), tok_block), pl.BlockSpec((e_pad,), lambda i: (0,))],
        out_specs=[pl.BlockSpec((bt, k_pad), tok_block), pl.BlockSpec((bt, k_pad), tok_block),
                   pl.BlockSpec((bt, k_pad), tok_block), pl.BlockSpec((None, e_pad), tok_block)],
        out_shape=[jax.ShapeDtypeStruct((n_blocks * bt, k_pad), jnp.float32),
                   jax.ShapeDtypeStruct((n_blocks * bt, k_pad), jnp.int32),
                   jax.ShapeDtypeStruct((n_blocks * bt, k_pad), jnp.int32),
                   jax.ShapeDtypeStruct((n_blocks, e_pad), jnp.int32)],
        interpret=mode == "interpret",
        compiler_params=common.compiler_params(mode),
        name="moe_router",
    )(x_te, b_e)
    weights_tk, experts_tk, rank_tk = (a[:n_tokens, :k] for a in (w_tk, ids_tk, rank_tk))
    cnt_ne = cnt_ne[:, :n_experts]
    counts_e = jnp.sum(cnt_ne, axis=0)
    # Grouped position = (slots of lower experts) + (slots of this expert in earlier blocks) + rank in block.
    offset_ne = (jnp.cumsum(counts_e) - counts_e)[None, :] + jnp.cumsum(cnt_ne, axis=0) - cnt_ne
    block_t_ = jnp.arange(n_tokens, dtype=jnp.int32) // bt
    position_tk = offset_ne[block_t_[:, None], experts_tk] + rank_tk
    slots_m = jnp.arange(n_tokens * k, dtype=jnp.int32)
    order_m = jnp.zeros_like(slots_m).at[position_tk.reshape(-1)].set(slots_m, unique_indices=True)
    return Routing(weights_tk, experts_tk, counts_e.astype(jnp.int32), order_m, position_tk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _route_kernel(logits_te, bias_e, k, mode, block_t):
    return _route_kernel_call(logits_te, bias_e, k, mode, block_t)


def _route_fwd(logits_te, bias_e, k, mode, block_t):
    out = _route_kernel_call(logits_te, bias_e, k, mode, block_t)
    return out, (out.weights_tk, out.experts_tk, logits_te, bias_e)


def _route_bwd(k, mode, block_t, res, g):
    weights_tk, experts_tk, logits_te, bias_e = res
    g_tk = g.weights_tk.astype(jnp.float32)
    if k == 1:  # weight = p_j of the full softmax: d logit_i = g p_j (onehot_j(i) - p_i)
        probs_te = jax.nn.softmax(logits_te.astype(jnp.float32) + bias_e.astype(jnp.float32), axis=-1)
        d_te = (g_tk * weights_tk) * (jax.nn.one_hot(experts_tk[:, 0], logits_te.shape[1]) - probs_te)
    else:  # weights = softmax over the chosen logits: d logit_j = w_j (g_j - sum_i w_i g_i); other logits get 0
        d_tk = weights_tk * (g_tk - jnp.sum(weights_tk * g_tk, axis=-1, keepdims=True))
        rows_t1 = jnp.arange(logits_te.shape[0])[:, None]
        d_te = jnp.zeros(logits_te.shape, jnp.float32).at[rows_t1, experts_tk].add(d_tk)
    return d_te.astype(logits_te.dtype), jnp.sum(d_te, axis=0).astype(bias_e.dtype)


_route_kernel.defvjp(_route_fwd, _route_bwd)


def route(logits_te: jax.Array, bias_e: jax.Array | None = None, *, k: int, impl: str = "pallas",
          interpret: bool = False, block_t: int | None = None) -> Routing:
    """Routes T tokens over E experts. impl: "pallas" (kernel; jnp reference on CPU unless interpret) |
    "reference". Differentiable in logits and bias through `weights_tk`."""
    common.check_impl(impl, "route")
    _check(logits_te, bias_e, k)
    mode = common.lowering(impl, interpret, tpu_kernel=True)
    if mode == "reference":
        return route_reference(logits_te, bias_e, k=k)
    if bias_e is None:
        bias_e = jnp.zeros((logits_te.shape[1],), jnp.float32)
    return _route_kernel(logits_te, bias_e, k, mode, block_t)
