"""Expert parallelism: the MoE dispatch under `jax.shard_map`, tokens exchanged with `jax.lax.all_to_all`.

Data flow, per device (shard_map over the whole mesh; tokens split over every mesh axis, expert weights split on
their expert axis over `expert` and gathered on the others, as FSDP does):
  x_td [Tl, D], routing ids/weights [Tl, K]  (router and aux losses run outside, on the global token set)
  → bucket each (token, slot) into its expert's buffer: send [E, C, D]  (slot k=0 of every token before k=1)
  → all_to_all over `expert`: device j receives the buffers of its E/n experts from every peer [E/n, n·C, D]
  → SwiGLU of each local expert on its buffer (batched einsum, no grouped matmul needed)
  → all_to_all back, gather each slot's row, weighted sum over the K slots → y_td [Tl, D]
The buffer holds C rows per expert per source device: C = Tl (dropless: a token picks an expert at most once) or,
with a capacity factor, ceil(cf · Tl·K / E), dropping the overflow; the dropped share is returned for the step's
metrics. Outputs and gradients equal the single-device layer whenever nothing is dropped (tests/parallel).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def active_expert_mesh(expert_axis: str = "expert"):
    """The mesh set by `jax.set_mesh` when it has an `expert_axis` of size > 1, else None (no EP to do)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or expert_axis not in mesh.axis_names or mesh.shape[expert_axis] <= 1:
        return None
    return mesh


def buffer_rows(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float | None) -> int:
    """Rows per expert per source device: dropless (`None`) needs n_tokens; else ceil(cf · T·K / E)."""
    if capacity_factor is None:
        return n_tokens
    return max(1, min(n_tokens, math.ceil(capacity_factor * n_tokens * top_k / n_experts)))


def _slot_positions(ids_tk, valid_t, n_experts: int, cap: int):
    """Each (slot, token)'s row in its expert's buffer, k-major; returns (dest_kt, kept_kt)."""
    T, K = ids_tk.shape
    onehot_kte = jax.nn.one_hot(ids_tk.T, n_experts, dtype=jnp.int32) * valid_t[None, :, None].astype(jnp.int32)
    position_kte = jnp.cumsum(onehot_kte.reshape(K * T, n_experts), axis=0).reshape(K, T, n_experts) - 1
    pos_kt = jnp.sum(position_kte * onehot_kte, axis=-1)
    kept_kt = valid_t[None, :] & (pos_kt < cap)
    dest_kt = jnp.where(kept_kt, ids_tk.T * cap + pos_kt, n_experts * cap)  # out of range = dropped
    return dest_kt, kept_kt


def _local_ep(x_td, ids_tk, weights_tk, valid_t, w_gate_edf, w_up_edf, w_down_efd, *, n_experts: int,
              n_ep: int, cap: int, expert_axis: str, all_axes: tuple[str, ...]):
    T, D = x_td.shape
    K = ids_tk.shape[1]
    e_local = n_experts // n_ep
    dest_kt, kept_kt = _slot_positions(ids_tk, valid_t, n_experts, cap)
    x_ktd = jnp.broadcast_to(x_td[None], (K, T, D))
    send_md = jnp.zeros((n_experts * cap, D), x_td.dtype).at[dest_kt.reshape(-1)].add(
        x_ktd.reshape(K * T, D), mode="drop")
    send = send_md.reshape(n_ep, e_local * cap, D)  # [peer, its experts' rows, D]
    recv = jax.lax.all_to_all(send, expert_axis, 0, 0)  # [source peer, my experts' rows, D]
    x_ecd = recv.reshape(n_ep, e_local, cap, D).transpose(1, 0, 2, 3).reshape(e_local, n_ep * cap, D)

    h_ecf = (jax.nn.silu(jnp.einsum("ecd,edf->ecf", x_ecd, w_gate_edf))
             * jnp.einsum("ecd,edf->ecf", x_ecd, w_up_edf))
    y_ecd = jnp.einsum("ecf,efd->ecd", h_ecf, w_down_efd)

    back = y_ecd.reshape(e_local, n_ep, cap, D).transpose(1, 0, 2, 3).reshape(n_ep, e_local * cap, D)
    y_md = jax.lax.all_to_all(back, expert_axis, 0, 0).reshape(n_experts * cap, D)  # my tokens' rows again
    y_ktd = jnp.take(y_md, dest_kt, axis=0, mode="fill", fill_value=0)
    combine_kt = (weights_tk.T * kept_kt).astype(y_ktd.dtype)
    y_td = jnp.einsum("ktd,kt->td", y_ktd, combine_kt)

    dropped = jnp.sum((valid_t[None, :] & ~kept_kt).astype(jnp.float32))
    total = jnp.sum(valid_t.astype(jnp.float32)) * K
    dropped, total = jax.lax.psum((dropped, total), all_axes)
    return y_td, dropped / jnp.maximum(total, 1.0)


def ep_moe_ffn(x_td: jax.Array, ids_tk: jax.Array, weights_tk: jax.Array, w_gate_edf: jax.Array,
               w_up_edf: jax.Array, w_down_efd: jax.Array, mesh=None, *, capacity_factor: float | None = None,
               expert_axis: str = "expert") -> tuple[jax.Array, jax.Array]:
    """Expert-parallel SwiGLU experts of a routed MoE layer: (y_td [T, D], dropped_fraction scalar).

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
    cap = buffer_rows(t_pad // n_shards, K, n_experts, capacity_factor)

    def local(x, ids, w, valid, wg, wu, wd):
        return _local_ep(x, ids, w, valid, wg, wu, wd, n_experts=n_experts, n_ep=n_ep, cap=cap,
                         expert_axis=expert_axis, all_axes=all_axes)

    tokens = P(all_axes)
    experts = P(expert_axis)
    y_td, dropped = jax.shard_map(
        local, mesh=mesh, in_specs=(tokens, tokens, tokens, tokens, experts, experts, experts),
        out_specs=(tokens, P()), check_vma=True,
    )(x_td, ids_tk.astype(jnp.int32), weights_tk, valid_t, w_gate_edf, w_up_edf, w_down_efd)
    return y_td[:T], dropped
