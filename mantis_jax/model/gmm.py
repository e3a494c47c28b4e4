"""Grouped matmul: the expert computation of a dropless MoE, one function with several backends.

Concept: the M = T*K routed token rows arrive sorted by expert, `group_sizes_e[e]` rows for expert e; row i of
group e is multiplied by that expert's weight `w_edf[e]`: `y_mf[i] = x_md[i] @ w_edf[group(i)]`. Rows past
`sum(group_sizes_e)` give zeros. Nothing is dropped, whatever the imbalance.

Backends (`impl`), all differentiable in x and w:
- "ragged_dot": `jax.lax.ragged_dot`, XLA's own grouped matmul (a real grouped GEMM on GPU).
- "megablox": the Pallas TPU kernel `jax.experimental.pallas.ops.tpu.megablox.gmm` (TPU only; `interpret=True`
  runs it anywhere, slowly, for tests).
- "padded": block-sparse dense einsum. Each group is padded up to a multiple of `block_rows`, so every block of
  rows belongs to one expert; the blocks run as one batched einsum "nbd,ndf->nbf" against their experts'
  weights. The block count has a static bound (M + E*(block_rows-1)) // block_rows, so shapes are static and no
  row is ever dropped; the padding costs at most E*(block_rows-1) extra rows.
- "block_loop": the same padded layout, but one GEMM per *used* block in a `fori_loop` whose trip count is the
  number of blocks the groups really fill (dynamic), so the worst-case padding blocks cost nothing; a
  `custom_vjp` gives the backward as two more block loops (d x with transposed weights, d w accumulated per
  expert).
- "auto": the fastest measured on this platform (`AUTO_IMPL`, numbers in docs/perf/moe.md).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

GMM_IMPLS = ("ragged_dot", "megablox", "padded", "block_loop", "auto")
# Chosen by benchmarks/moe.py (docs/perf/moe.md). GPU and TPU are the documented defaults of those stacks until
# a measurement on that hardware replaces them.
AUTO_IMPL = {"cpu": "block_loop", "gpu": "ragged_dot", "tpu": "megablox"}


def resolve_impl(impl: str) -> str:
    if impl not in GMM_IMPLS:
        raise ValueError(f"grouped_matmul: impl={impl!r} is unknown; use one of {', '.join(GMM_IMPLS)} "
                         "(config.moe.gmm_impl)")
    if impl == "auto":
        return AUTO_IMPL.get(jax.default_backend(), "ragged_dot")
    return impl


def default_block_rows(n_rows: int, n_experts: int) -> int:
    """Rows per block of the padded backends: ~ half an expert's fair share, a power of two in [8, 128]."""
    share = max(1, n_rows // (2 * n_experts))
    return max(8, min(128, 1 << (share.bit_length() - 1)))


@jax.custom_vjp
def move_rows(a_nd, idx_m, inv_n):
    """out[m] = a[idx[m]], or 0 where idx[m] == N. The map is injective, so the backward pass is the gather
    d_a[n] = g[inv[n]] (0 where inv[n] == M) instead of XLA's scatter-add, which is slow on CPU."""
    a_ext = jnp.concatenate([a_nd, jnp.zeros((1, a_nd.shape[1]), a_nd.dtype)], axis=0)
    return a_ext[idx_m]


def _move_rows_fwd(a_nd, idx_m, inv_n):
    return move_rows(a_nd, idx_m, inv_n), (idx_m, inv_n)


def _move_rows_bwd(res, g_md):
    idx_m, inv_n = res
    return move_rows(g_md, inv_n, idx_m), None, None


move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


class _Layout(NamedTuple):
    n_blocks: int  # static bound on the blocks the padded groups fill
    src_j: jax.Array  # [N*b] x row held by padded row j, or M (nothing)
    dest_i: jax.Array  # [M] padded row of x row i, or N*b (rows past the groups)
    block_e: jax.Array  # [N] expert of each block
    n_used: jax.Array  # () blocks really filled: sum_e ceil(size_e / b)


def _layout(group_sizes_e, n_rows: int, n_experts: int, b: int) -> _Layout:
    """Each group padded to a multiple of b rows, groups back to back: the map between x rows and padded rows."""
    n_blocks = max(1, (n_rows + n_experts * (b - 1)) // b)  # static bound on sum_e ceil(size_e / b)
    n_pad = n_blocks * b
    sizes_e = group_sizes_e.astype(jnp.int32)
    start_e = jnp.cumsum(sizes_e) - sizes_e  # first row of each group in x
    blocks_e = -(-sizes_e // b)
    pend_e = jnp.cumsum(blocks_e) * b  # end row of each padded group
    pstart_e = pend_e - blocks_e * b
    rows_j = jnp.arange(n_pad, dtype=jnp.int32)
    e_j = jnp.searchsorted(pend_e, rows_j, side="right").astype(jnp.int32)
    e_jc = jnp.minimum(e_j, n_experts - 1)
    within_j = rows_j - pstart_e[e_jc]
    src_j = jnp.where((e_j < n_experts) & (within_j < sizes_e[e_jc]), start_e[e_jc] + within_j, n_rows)
    rows_i = jnp.arange(n_rows, dtype=jnp.int32)
    e_i = jnp.searchsorted(jnp.cumsum(sizes_e), rows_i, side="right").astype(jnp.int32)
    e_ic = jnp.minimum(e_i, n_experts - 1)
    dest_i = jnp.where(e_i < n_experts, pstart_e[e_ic] + rows_i - start_e[e_ic], n_pad)
    return _Layout(n_blocks, src_j, dest_i, e_jc[::b], jnp.sum(blocks_e))


def _padded(x_md, w_edf, group_sizes_e, block_rows: int):
    n_rows, d = x_md.shape
    lay = _layout(group_sizes_e, n_rows, w_edf.shape[0], block_rows)
    xp_nbd = move_rows(x_md, lay.src_j, lay.dest_i).reshape(lay.n_blocks, block_rows, d)  # [N, b, D]
    # Each block's expert weight by a one-hot matmul, whose transpose (d w) is a matmul too, not a scatter-add.
    onehot_ne = jax.nn.one_hot(lay.block_e, w_edf.shape[0], dtype=w_edf.dtype)
    w_ndf = jnp.einsum("ne,edf->ndf", onehot_ne, w_edf)  # [N, D, F]
    yp_nbf = jnp.einsum("nbd,ndf->nbf", xp_nbd, w_ndf, preferred_element_type=jnp.float32).astype(x_md.dtype)
    return move_rows(yp_nbf.reshape(lay.n_blocks * block_rows, -1), lay.dest_i, lay.src_j)


def _blocks_matmul(xp_pd, w_edf, block_e, n_used, b: int, transpose_w: bool = False):
    """yp[block j] = xp[block j] @ w[block_e[j]] (or its transpose) for the n_used filled blocks; the rest 0."""
    f = w_edf.shape[1] if transpose_w else w_edf.shape[2]

    def block(j, yp_pf):
        w_df = w_edf[block_e[j]]
        y_bf = jax.lax.dynamic_slice_in_dim(xp_pd, j * b, b, 0) @ (w_df.T if transpose_w else w_df)
        return jax.lax.dynamic_update_slice_in_dim(yp_pf, y_bf.astype(yp_pf.dtype), j * b, 0)

    return jax.lax.fori_loop(0, n_used, block, jnp.zeros((xp_pd.shape[0], f), xp_pd.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _block_loop_matmul(xp_pd, w_edf, block_e, n_used, b):
    return _blocks_matmul(xp_pd, w_edf, block_e, n_used, b)


def _block_loop_fwd(xp_pd, w_edf, block_e, n_used, b):
    return _blocks_matmul(xp_pd, w_edf, block_e, n_used, b), (xp_pd, w_edf, block_e, n_used)


def _block_loop_bwd(b, res, g_pf):
    xp_pd, w_edf, block_e, n_used = res
    d_x = _blocks_matmul(g_pf, w_edf, block_e, n_used, b, transpose_w=True)

    def block(j, d_w):
        x_bd = jax.lax.dynamic_slice_in_dim(xp_pd, j * b, b, 0)
        g_bf = jax.lax.dynamic_slice_in_dim(g_pf, j * b, b, 0)
        return d_w.at[block_e[j]].add(jnp.einsum("bd,bf->df", x_bd, g_bf, preferred_element_type=jnp.float32))

    d_w = jax.lax.fori_loop(0, n_used, block, jnp.zeros(w_edf.shape, jnp.float32))
    return d_x, d_w.astype(w_edf.dtype), None, None


_block_loop_matmul.defvjp(_block_loop_fwd, _block_loop_bwd)


def _block_loop(x_md, w_edf, group_sizes_e, block_rows: int):
    lay = _layout(group_sizes_e, x_md.shape[0], w_edf.shape[0], block_rows)
    xp_pd = move_rows(x_md, lay.src_j, lay.dest_i)  # [N*b, D]
    yp_pf = _block_loop_matmul(xp_pd, w_edf, lay.block_e, lay.n_used, block_rows)
    return move_rows(yp_pf, lay.dest_i, lay.src_j)


def _megablox(x_md, w_edf, group_sizes_e, interpret: bool):
    if jax.default_backend() != "tpu" and not interpret:
        raise ValueError(f"grouped_matmul: impl='megablox' is a TPU kernel and this backend is "
                         f"{jax.default_backend()!r}; use --config.moe.gmm_impl=auto (or ragged_dot / padded)")
    from jax.experimental.pallas.ops.tpu import megablox

    n_rows, d = x_md.shape
    f = w_edf.shape[2]
    tm = 128 if n_rows >= 128 else max(8, 1 << (n_rows - 1).bit_length())
    m_pad = -(-n_rows // tm) * tm
    x_pad = jnp.pad(x_md, ((0, m_pad - n_rows), (0, 0)))
    tiling = (tm, min(d, 128), min(f, 128))
    sizes_e = group_sizes_e.astype(jnp.int32)
    # megablox leaves rows past the last group unwritten (forward and backward); give them to the last group so
    # every row is defined, then zero them: the contract here is zeros with zero gradient.
    covered_e = sizes_e.at[-1].add(m_pad - jnp.sum(sizes_e))
    y = megablox.gmm(x_pad, w_edf, covered_e, x_md.dtype, tiling, None, None, False, interpret)
    live = jnp.arange(n_rows) < jnp.sum(sizes_e)
    return jnp.where(live[:, None], y[:n_rows], 0.0).astype(x_md.dtype)


def grouped_matmul(x_md: jax.Array, w_edf: jax.Array, group_sizes_e: jax.Array, *, impl: str = "auto",
                   block_rows: int | None = None, interpret: bool = False) -> jax.Array:
    """y_mf[i] = x_md[i] @ w_edf[group(i)] for expert-sorted rows; see the module docstring for backends."""
    if x_md.ndim != 2 or w_edf.ndim != 3 or x_md.shape[1] != w_edf.shape[1]:
        raise ValueError(f"grouped_matmul: need x [M, D] and w [E, D, F] with equal D; got x {x_md.shape}, "
                         f"w {w_edf.shape}")
    if group_sizes_e.shape != (w_edf.shape[0],):
        raise ValueError(f"grouped_matmul: group_sizes must be [E]=({w_edf.shape[0]},), got {group_sizes_e.shape}")
    impl = resolve_impl(impl)
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x_md, w_edf, group_sizes_e.astype(jnp.int32))
    if impl == "megablox":
        return _megablox(x_md, w_edf, group_sizes_e, interpret)
    b = block_rows or default_block_rows(x_md.shape[0], w_edf.shape[0])
    if b < 1:
        raise ValueError(f"grouped_matmul: block_rows={b} must be >= 1")
    if impl == "block_loop":
        return _block_loop(x_md, w_edf, group_sizes_e, b)
    return _padded(x_md, w_edf, group_sizes_e, b)


def grouped_matmul_reference(x_md: jax.Array, w_edf: jax.Array, group_sizes_e: jax.Array) -> jax.Array:
    """A loop over experts with row masks: the plain definition the backends are tested against."""
    rows_i = jnp.arange(x_md.shape[0])
    end_e = jnp.cumsum(group_sizes_e)
    y = jnp.zeros((x_md.shape[0], w_edf.shape[2]), jnp.float32)
    for e in range(w_edf.shape[0]):
        mask = (rows_i >= end_e[e] - group_sizes_e[e]) & (rows_i < end_e[e])
        y = y + jnp.where(mask[:, None], x_md.astype(jnp.float32) @ w_edf[e].astype(jnp.float32), 0.0)
    return y.astype(x_md.dtype)
