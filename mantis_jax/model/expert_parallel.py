"""Expert parallelism: the MoE dispatch under `jax.shard_map`, tokens exchanged with `jax.lax.all_to_all`.

Data flow, per device (shard_map over the whole mesh; tokens split over every mesh axis, expert weights split on
their expert axis over `expert` and gathered on the others, as FSDP does):
  x_td [Tl, D], routing ids/weights [Tl, K]  (router and aux losses run outside, on the global token set)
  → sort the Tl·K slots by expert; gather each expert's slots into its buffer: send [E, C, D] (model/dispatch.py:
    slot k=0 of every token before k=1; the rows move by gathers, forward and backward)
  → all_to_all over `expert`: device j receives the buffers of its E/n experts from every peer [E/n, n·C, D]
  → SwiGLU of each local expert on its buffer (batched einsum)
  → all_to_all back, gather each slot's row, weighted sum over the K slots → y_td [Tl, D]
C, the rows per expert per source device (`dispatch.exchange_capacities`): with a capacity factor,
ceil(cf · Tl·K / E), dropping the overflow; dropless, the smallest of the ladder ceil(Tl·K / E) · 2^i (capped at
Tl) that holds the largest per-(device, expert) count of this step, agreed by a `pmax` and picked by `lax.switch`
(one compiled branch per size). A balanced router then exchanges and computes E·C = K·Tl rows per device, what
is routed, instead of the E·Tl that a fixed dropless buffer needs; the worst case is still E·Tl, never a drop.
(`lax.ragged_all_to_all` would send exactly K·Tl rows whatever the balance, but XLA:CPU does not implement it.)
Outputs and gradients equal the single-device layer whenever nothing is dropped (tests/parallel/test_expert.py).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mantis_jax.model import dispatch


class ExchangeInfo(NamedTuple):
    dropped_frac: jax.Array  # () share of the valid token slots dropped (0 when dropless)
    rows_per_device: jax.Array  # () int32 rows each device sent (= received and computed): E · C of this step


def active_expert_mesh(expert_axis: str = "expert"):
    """The mesh set by `jax.set_mesh` when it has an `expert_axis` of size > 1, else None (no EP to do)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or expert_axis not in mesh.axis_names or mesh.shape[expert_axis] <= 1:
        return None
    return mesh


def _exchange_ffn(x_td, ids_tk, weights_tk, order, w_gate_edf, w_up_edf, w_down_efd, *, cap: int, n_ep: int,
                  expert_axis: str):
    """One buffer size: (y_td [Tl, D], kept slots)."""
    T, D = x_td.shape
    K = ids_tk.shape[1]
    n_experts = order.counts_e.shape[0]
    e_local = n_experts // n_ep
    slots = dispatch.buffer_slots(order, ids_tk, cap)
    send = dispatch.dispatch_rows(x_td, slots, K).reshape(n_ep, e_local * cap, D)  # [peer, its experts' rows, D]
    recv = jax.lax.all_to_all(send, expert_axis, 0, 0)  # [source peer, my experts' rows, D]
    x_ecd = recv.reshape(n_ep, e_local, cap, D).transpose(1, 0, 2, 3).reshape(e_local, n_ep * cap, D)
    y_ecd = dispatch.swiglu_experts(x_ecd, w_gate_edf, w_up_edf, w_down_efd)
    back = y_ecd.reshape(e_local, n_ep, cap, D).transpose(1, 0, 2, 3).reshape(n_ep, e_local * cap, D)
    y_rd = jax.lax.all_to_all(back, expert_axis, 0, 0).reshape(n_experts * cap, D)  # my slots' rows again
    return dispatch.combine_rows(y_rd, slots, weights_tk), jnp.sum(slots.kept_m.astype(jnp.float32))


def _local_ep(x_td, ids_tk, weights_tk, valid_t, w_gate_edf, w_up_edf, w_down_efd, *, caps: tuple[int, ...],
              n_ep: int, expert_axis: str, all_axes: tuple[str, ...]):
    n_experts = w_gate_edf.shape[0] * n_ep
    order = dispatch.sort_slots(ids_tk, n_experts, valid_t)
    branches = [functools.partial(_exchange_ffn, cap=c, n_ep=n_ep, expert_axis=expert_axis) for c in caps]
    operands = (x_td, ids_tk, weights_tk, order, w_gate_edf, w_up_edf, w_down_efd)
    if len(caps) == 1:
        index = jnp.zeros((), jnp.int32)
        y_td, kept = branches[0](*operands)
    else:  # every device takes the same branch: the size that holds the largest count anywhere
        need = jax.lax.pmax(jnp.max(order.counts_e), all_axes)
        index = jnp.minimum(jnp.searchsorted(jnp.asarray(caps, jnp.int32), need), len(caps) - 1)
        y_td, kept = jax.lax.switch(index, branches, *operands)
    total = jnp.sum(valid_t.astype(jnp.float32)) * ids_tk.shape[1]
    kept, total = jax.lax.psum((kept, total), all_axes)
    rows = jnp.asarray(caps, jnp.int32)[index] * n_experts
    return y_td, (total - kept) / jnp.maximum(total, 1.0), rows


def ep_moe_ffn(x_td: jax.Array, ids_tk: jax.Array, weights_tk: jax.Array, w_gate_edf: jax.Array,
               w_up_edf: jax.Array, w_down_efd: jax.Array, mesh=None, *, capacity_factor: float | None = None,
               expert_axis: str = "expert") -> tuple[jax.Array, ExchangeInfo]:
    """Expert-parallel SwiGLU experts of a routed MoE layer: (y_td [T, D], ExchangeInfo).

    `ids_tk`/`weights_tk` are the router's top-k (ids distinct per token); `mesh` defaults to the one set by
    `jax.set_mesh`. `capacity_factor=None` is dropless. T need not divide the device count (it is padded)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty or expert_axis not in mesh.axis_names:
        raise ValueError(f"ep_moe_ffn needs a mesh with an {expert_axis!r} axis; build one with "
                         "mantis_jax.parallel.mesh.make_mesh and trace under jax.set_mesh(mesh)")
    n_ep = mesh.shape[expert_axis]
    T, D = x_td.shape
    K = ids_tk.shape[1]
    n_experts = w_gate_edf.shape[0]
    if n_experts % n_ep:
        raise ValueError(f"n_experts ({n_experts}) must be a multiple of the {expert_axis!r} mesh axis ({n_ep}); "
                         "set --config.mesh.expert to a divisor of config.moe.n_experts")
    all_axes = tuple(mesh.axis_names)
    n_shards = math.prod(mesh.shape[a] for a in all_axes)
    t_pad = -(-T // n_shards) * n_shards
    valid_t = jnp.arange(t_pad) < T
    if t_pad != T:  # e.g. one decode token on 8 devices: pad rows are never dispatched
        pad = t_pad - T
        x_td = jnp.pad(x_td, ((0, pad), (0, 0)))
        ids_tk = jnp.pad(ids_tk, ((0, pad), (0, 0)))
        weights_tk = jnp.pad(weights_tk, ((0, pad), (0, 0)))
    caps = dispatch.exchange_capacities(t_pad // n_shards, K, n_experts, capacity_factor)
    local = functools.partial(_local_ep, caps=caps, n_ep=n_ep, expert_axis=expert_axis, all_axes=all_axes)
    tokens = P(all_axes)
    experts = P(expert_axis)
    y_td, dropped, rows = jax.shard_map(
        local, mesh=mesh, in_specs=(tokens, tokens, tokens, tokens, experts, experts, experts),
        out_specs=(tokens, P(), P()), check_vma=True,
    )(x_td, ids_tk.astype(jnp.int32), weights_tk, valid_t, w_gate_edf, w_up_edf, w_down_efd)
    return y_td[:T], ExchangeInfo(dropped, rows)
