"""Permute / unpermute: move token rows into expert-grouped order and combine expert outputs back.

Concept: with a `Routing` from `kernels.router` (slot s = t*K + k, `order_m[i]` = slot at grouped position i,
`position_tk` = its inverse), `permute` builds the expert input `xs_md[i] = x_td[order_m[i] // K]` (M = T*K rows,
each expert's rows contiguous) and `unpermute` builds the layer output `out_td[t] = sum_k w_tk[t, k] *
ys_md[position_tk[t, k]]`. Both directions are gathers (never scatter-adds), so they are deterministic and need
no atomics; each one's backward is the other gather: d x = unpermute(d xs, weights 1), d ys = permute(d out)
scaled by the slot's weight, d w = row dot products of d out with the gathered ys.

Data flow: two Pallas kernels with a row-gather inner step (`x_ref[idx_vector, columns]`, which Triton lowers
to a pointer gather), grid = (row blocks, column blocks). On GPU they run as Triton; with `interpret=True` in
the Pallas interpreter; on CPU and TPU the same gather-only custom_vjp runs with XLA gathers as its bodies (TPU:
Mosaic has no vector-indexed row gather, and XLA's gather is TPU's fast path). `impl="reference"` is the plain
jnp definition differentiated by autodiff, which turns each gather into a scatter-add in the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import common

BLOCK_ROWS = 64
MAX_BLOCK_COLS = 256


def permute_reference(x_td: jax.Array, order_m: jax.Array, k: int) -> jax.Array:
    return x_td[order_m // k]  # [M, D]


def unpermute_reference(ys_md: jax.Array, weights_tk: jax.Array, position_tk: jax.Array) -> jax.Array:
    ys_tkd = ys_md[position_tk]  # [T, K, D]
    out = jnp.einsum("tkd,tk->td", ys_tkd.astype(jnp.float32), weights_tk.astype(jnp.float32))
    return out.astype(ys_md.dtype)


def _gather_kernel(idx_ref, scale_ref, x_ref, o_ref):
    block_d = o_ref.shape[1]
    cols = pl.ds(pl.program_id(1) * block_d, block_d)
    rows = x_ref[idx_ref[...], cols].astype(jnp.float32)  # [BM, BD] gathered rows
    o_ref[...] = (rows * scale_ref[...][:, None]).astype(o_ref.dtype)


def _combine_kernel(pos_ref, w_ref, y_ref, o_ref, *, k):
    block_t, block_d = o_ref.shape
    cols = pl.ds(pl.program_id(1) * block_d, block_d)
    pos, w = pos_ref[...], w_ref[...]  # [BT, Kp]
    kcol = lax.broadcasted_iota(jnp.int32, pos.shape, 1)

    def add_slot(j, acc):  # column j picked by a masked sum: no dynamic lane indexing
        pos_j = jnp.sum(jnp.where(kcol == j, pos, 0), axis=1)  # [BT]
        w_j = jnp.sum(jnp.where(kcol == j, w, 0.0), axis=1)
        return acc + y_ref[pos_j, cols].astype(jnp.float32) * w_j[:, None]

    o_ref[...] = lax.fori_loop(0, k, add_slot, jnp.zeros((block_t, block_d), jnp.float32)).astype(o_ref.dtype)


def _gather_rows(x_nd, idx_m, scale_m, mode: str):
    """out[i] = x[idx[i]] * scale[i], as a kernel (or an XLA gather in mode "xla")."""
    if mode == "xla":
        return (x_nd[idx_m].astype(jnp.float32) * scale_m[:, None]).astype(x_nd.dtype)
    n_rows, d = idx_m.shape[0], x_nd.shape[1]
    bm, bd = BLOCK_ROWS, common.pow2_divisor(d, MAX_BLOCK_COLS)
    m_pad = common.cdiv(n_rows, bm) * bm
    idx_m = jnp.pad(idx_m.astype(jnp.int32), (0, m_pad - n_rows))
    scale_m = jnp.pad(scale_m.astype(jnp.float32), (0, m_pad - n_rows))
    out = pl.pallas_call(
        _gather_kernel,
        grid=(m_pad // bm, d // bd),
        in_specs=[pl.BlockSpec((bm,), lambda i, j: (i,)), pl.BlockSpec((bm,), lambda i, j: (i,)),
                  pl.no_block_spec],
        out_specs=pl.BlockSpec((bm, bd), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, d), x_nd.dtype),
        interpret=mode == "interpret",
        compiler_params=common.compiler_params(mode),
        name="moe_gather_rows",
    )(idx_m, scale_m, x_nd)
    return out[:n_rows]


def _combine(ys_md, weights_tk, position_tk, mode: str):
    """out[t] = sum_k w[t, k] * ys[pos[t, k]], as a kernel (or an XLA gather in mode "xla")."""
    if mode == "xla":
        return unpermute_reference(ys_md, weights_tk, position_tk)
    n_tokens, k = position_tk.shape
    d = ys_md.shape[1]
    bt, bd, k_pad = BLOCK_ROWS, common.pow2_divisor(d, MAX_BLOCK_COLS), common.next_pow2(k)
    t_pad = common.cdiv(n_tokens, bt) * bt
    pads = ((0, t_pad - n_tokens), (0, k_pad - k))
    pos = jnp.pad(position_tk.astype(jnp.int32), pads)
    w = jnp.pad(weights_tk.astype(jnp.float32), pads)
    out = pl.pallas_call(
        functools.partial(_combine_kernel, k=k),
        grid=(t_pad // bt, d // bd),
        in_specs=[pl.BlockSpec((bt, k_pad), lambda i, j: (i, 0)), pl.BlockSpec((bt, k_pad), lambda i, j: (i, 0)),
                  pl.no_block_spec],
        out_specs=pl.BlockSpec((bt, bd), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((t_pad, d), ys_md.dtype),
        interpret=mode == "interpret",
        compiler_params=common.compiler_params(mode),
        name="moe_combine",
    )(pos, w, ys_md)
    return out[:n_tokens]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _permute_kernel(x_td, order_m, position_tk, mode):
    k = position_tk.shape[1]
    return _gather_rows(x_td, order_m // k, jnp.ones(order_m.shape, jnp.float32), mode)


def _permute_fwd(x_td, order_m, position_tk, mode):
    return _permute_kernel(x_td, order_m, position_tk, mode), (order_m, position_tk)


def _permute_bwd(mode, res, g_md):
    order_m, position_tk = res
    ones_tk = jnp.ones(position_tk.shape, jnp.float32)
    return _combine(g_md, ones_tk, position_tk, mode), None, None


_permute_kernel.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _unpermute_kernel(ys_md, weights_tk, order_m, position_tk, mode):
    return _combine(ys_md, weights_tk, position_tk, mode)


def _unpermute_fwd(ys_md, weights_tk, order_m, position_tk, mode):
    out = _combine(ys_md, weights_tk, position_tk, mode)
    return out, (ys_md, weights_tk, order_m, position_tk)


def _unpermute_bwd(mode, res, g_td):
    ys_md, weights_tk, order_m, position_tk = res
    n_tokens, k = position_tk.shape
    d_ys = _gather_rows(g_td, order_m // k, weights_tk.reshape(-1)[order_m], mode)
    ys_tkd = _gather_rows(ys_md, position_tk.reshape(-1), jnp.ones((n_tokens * k,), jnp.float32), mode)
    d_w = jnp.einsum("tkd,td->tk", ys_tkd.reshape(n_tokens, k, -1).astype(jnp.float32), g_td.astype(jnp.float32))
    return d_ys, d_w.astype(weights_tk.dtype), None, None


_unpermute_kernel.defvjp(_unpermute_fwd, _unpermute_bwd)


def _mode(interpret: bool) -> str:
    """Where there is no kernel (CPU, TPU), the same gather-only custom_vjp runs on XLA gathers: autodiff of
    a gather would transpose it into a scatter-add, which XLA:CPU runs far slower."""
    mode = common.lowering("pallas", interpret, tpu_kernel=False)
    return "xla" if mode == "reference" else mode


def _check(what: str, rows: jax.Array, order_m: jax.Array, position_tk: jax.Array) -> None:
    if rows.ndim != 2:
        raise ValueError(f"{what}: rows must be 2-D [N, D], got shape {rows.shape}")
    if position_tk.ndim != 2 or order_m.shape != (position_tk.size,):
        raise ValueError(f"{what}: order_m {order_m.shape} must be [T*K] for position_tk {position_tk.shape}; "
                         "pass both from the same kernels.router.Routing")


def permute(x_td: jax.Array, order_m: jax.Array, position_tk: jax.Array, *, impl: str = "pallas",
            interpret: bool = False) -> jax.Array:
    """xs_md[i] = x_td[order_m[i] // K]: token rows in expert-grouped order. Differentiable in x."""
    common.check_impl(impl, "permute")
    _check("permute", x_td, order_m, position_tk)
    if impl == "reference":
        return permute_reference(x_td, order_m, position_tk.shape[1])
    return _permute_kernel(x_td, order_m, position_tk, _mode(interpret))


def unpermute(ys_md: jax.Array, weights_tk: jax.Array, order_m: jax.Array, position_tk: jax.Array, *,
              impl: str = "pallas", interpret: bool = False) -> jax.Array:
    """out_td[t] = sum_k weights_tk[t, k] * ys_md[position_tk[t, k]]. Differentiable in ys and weights."""
    common.check_impl(impl, "unpermute")
    _check("unpermute", ys_md, order_m, position_tk)
    if weights_tk.shape != position_tk.shape:
        raise ValueError(f"unpermute: weights {weights_tk.shape} must match position_tk {position_tk.shape}")
    if impl == "reference":
        return unpermute_reference(ys_md, weights_tk, position_tk)
    return _unpermute_kernel(ys_md, weights_tk, order_m, position_tk, _mode(interpret))
