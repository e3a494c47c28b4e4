"""Capacity dispatch: token slots into per-expert buffers of a fixed number of rows, and back.

With E experts and `cap` rows per expert, slot (k, t) (token t's k-th choice) gets row e·cap + c of the flat
[E·cap, D] buffer when it is the c-th slot of expert e in k-major order (slot 0 of every token before slot 1, so
first choices are kept first) and c < cap; later slots are dropped. `sort_slots` sorts the slots by expert once;
`buffer_slots` turns that into both directions of the slot <-> row map as index arrays, so the rows move by
gathers both ways (`dispatch_rows`, `combine_rows`; their backward passes are gathers too), never by a one-hot
einsum or a scatter-add of rows. Used by the single-device capacity backend (`capacity_ffn`) and by expert
parallelism (model/expert_parallel.py), whose exchange buffers are these buffers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mantis_jax.model import gmm as gmm_backends


def capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """Buffer rows per expert for `n_tokens` tokens: ceil(cf · T·K / E), at least 1 and at most T (a token picks
    an expert at most once, so T rows never drop anything)."""
    return max(1, min(n_tokens, math.ceil(capacity_factor * n_tokens * top_k / n_experts)))


class SlotOrder(NamedTuple):
    """The T·K token slots, k-major (m = k·T + t: slot 0 of every token before slot 1), sorted by expert."""

    order_m: jax.Array  # [K*T] slot at each sorted position (invalid slots last)
    rank_m: jax.Array  # [K*T] each slot's rank among its expert's slots (k-major), or K*T for an invalid slot
    counts_e: jax.Array  # [E] valid slots routed to each expert
    start_e: jax.Array  # [E] first sorted position of each expert


def sort_slots(ids_tk: jax.Array, n_experts: int, valid_t: jax.Array | None = None) -> SlotOrder:
    """Stable sort of the k-major slots by expert; tokens where `valid_t` is False (padding) count nowhere."""
    T, K = ids_tk.shape
    flat_m = ids_tk.T.reshape(-1).astype(jnp.int32)
    if valid_t is not None:
        flat_m = jnp.where(jnp.tile(valid_t, K), flat_m, n_experts)  # sorts after every expert
    order_m = jnp.argsort(flat_m, stable=True).astype(jnp.int32)
    counts_e = jnp.zeros((n_experts + 1,), jnp.int32).at[flat_m].add(1)[:n_experts]
    start_e = jnp.cumsum(counts_e) - counts_e
    sorted_pos_m = jnp.zeros_like(order_m).at[order_m].set(jnp.arange(K * T, dtype=jnp.int32),
                                                          unique_indices=True)  # int inverse, no row scatter
    rank_m = jnp.where(flat_m < n_experts, sorted_pos_m - start_e[jnp.minimum(flat_m, n_experts - 1)], K * T)
    return SlotOrder(order_m, rank_m, counts_e, start_e)


class Slots(NamedTuple):
    """Where each slot sits in per-expert buffers of `cap` rows ([E, cap] flattened, row r = e·cap + c)."""

    src_r: jax.Array  # [E*cap] k-major slot held by each buffer row, or K*T (an empty row)
    row_m: jax.Array  # [K*T] buffer row of each slot, or E*cap (dropped or invalid)
    kept_m: jax.Array  # [K*T] bool: the slot has a row (an expert keeps its first `cap` slots, k-major)


def buffer_slots(order: SlotOrder, ids_tk: jax.Array, cap: int) -> Slots:
    """Both directions of the slot <-> buffer-row map as index arrays, so rows move by gathers only."""
    n_experts, n_slots = order.counts_e.shape[0], order.order_m.shape[0]
    c_c = jnp.arange(cap, dtype=jnp.int32)
    pos_ec = order.start_e[:, None] + c_c[None, :]
    filled_ec = c_c[None, :] < order.counts_e[:, None]
    src_r = jnp.where(filled_ec, order.order_m[jnp.minimum(pos_ec, n_slots - 1)], n_slots).reshape(-1)
    kept_m = order.rank_m < cap
    row_m = jnp.where(kept_m, ids_tk.T.reshape(-1) * cap + order.rank_m, n_experts * cap)
    return Slots(src_r, row_m.astype(jnp.int32), kept_m)


def dispatch_rows(x_td: jax.Array, slots: Slots, top_k: int) -> jax.Array:
    """The expert buffers [E*cap, D]: row r = x of the token of slot src_r[r] (zeros where empty), by a gather
    whose backward is a gather too (gmm.move_rows)."""
    x_md = jnp.tile(x_td, (top_k, 1))  # [K*T, D], k-major like the slots
    return gmm_backends.move_rows(x_md, slots.src_r, slots.row_m)


def combine_rows(y_rd: jax.Array, slots: Slots, weights_tk: jax.Array) -> jax.Array:
    """y_td[t] = Σ_k w[t, k] · y_rd[row of slot (k, t)] (dropped slots add nothing), by gathers."""
    T, K = weights_tk.shape
    y_md = gmm_backends.move_rows(y_rd, slots.row_m, slots.src_r)  # [K*T, D], zeros where dropped
    return jnp.einsum("ktd,kt->td", y_md.reshape(K, T, -1), weights_tk.T.astype(y_md.dtype))


def swiglu_experts(x_ecd, w_gate_edf, w_up_edf, w_down_efd):
    """Each expert's SwiGLU on its own buffer [E, C, D] (a batched einsum: every row is computed)."""
    h_ecf = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x_ecd, w_gate_edf)) * jnp.einsum("ecd,edf->ecf", x_ecd, w_up_edf)
    return jnp.einsum("ecf,efd->ecd", h_ecf, w_down_efd)


def capacity_ffn(x_td, ids_tk, weights_tk, w_gate_edf, w_up_edf, w_down_efd, cap: int):
    """Per-expert buffers of `cap` rows, overflow dropped: (y_td, dropped fraction of the T·K slots)."""
    E, (T, K), D = w_gate_edf.shape[0], ids_tk.shape, x_td.shape[1]
    slots = buffer_slots(sort_slots(ids_tk, E), ids_tk, cap)
    x_ecd = dispatch_rows(x_td, slots, K).reshape(E, cap, D)
    y_ecd = swiglu_experts(x_ecd, w_gate_edf, w_up_edf, w_down_efd)
    y_td = combine_rows(y_ecd.reshape(E * cap, D), slots, weights_tk)
    dropped = (T * K - jnp.sum(slots.kept_m.astype(jnp.int32))).astype(jnp.float32) / (T * K)
    return y_td, dropped


def exchange_capacities(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float | None) -> tuple[int, ...]:
    """Rows per expert per device of the expert-parallel exchange buffers (model/expert_parallel.py), one per
    compiled branch, smallest first; the buffers a device sends hold n_experts × that many rows.

    With a capacity factor: one size, `capacity(n_tokens, ...)`, overflow dropped. Dropless (None): a ladder
    c0 = ceil(T·K / E) (what a balanced router needs: E·c0 ≈ K·T rows, what is routed), 2·c0, 4·c0, ... up to
    T (the worst case: every token on one expert, so nothing is ever dropped). Each step takes the smallest size
    >= the largest per-(device, expert) count, so a device sends E·C rows with K·T <= E·C < 2·E·max_count
    (and E·C <= E·T). memory.py sizes the same buffers with this function."""
    if capacity_factor is not None:
        return (capacity(n_tokens, top_k, n_experts, capacity_factor),)
    caps = [capacity(n_tokens, top_k, n_experts, 1.0)]
    while caps[-1] < n_tokens:
        caps.append(min(2 * caps[-1], n_tokens))
    return tuple(caps)
