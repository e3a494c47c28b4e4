"""Sparse mixture-of-experts feed-forward: route → permute → expert compute → unpermute.

Tokens enter as [B, T, D] and are flattened to [T, D] (T = all tokens). The router gives each token K experts
with renormalised weights; an optional expert bias [E] (one row of the meta-controller's [L, E]) is added to the
router logits before the top-k. Each expert is a SwiGLU FFN with weights [E, D, F] / [E, F, D]. Three dispatch
backends (`impl`), equal whenever no token is dropped:
  dense     every expert on every token, masked by the combine weights: the reference;
  ragged    tokens sorted by expert, grouped matmul (`lax.ragged_dot`), dropless;
  capacity  one-hot dispatch into per-expert buffers of capacity ceil(cf · T·K / E); overflow is dropped.
The grouped matmul of `ragged` has its own backends (`gmm_impl`, see model/gmm.py). The router (`router_impl`):
  reference         jnp softmax → top-k here (`route`), then an argsort groups the slots by expert;
  pallas            the fused kernel in kernels/router.py gives weights, ids and the grouping in one pass, and
                    kernels/permute.py moves the rows (Triton on GPU, Mosaic router on TPU, jnp on CPU);
  pallas_interpret  the same kernels run by the Pallas interpreter (tests on CPU; slow).
Aux outputs (never side channels): Switch load-balancing loss E·Σ_e f_e·P_e, router z-loss, expert load f [E],
fraction of dropped token slots.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kernels import permute as permute_kernels
from kernels import router as router_kernels
from mantis_jax.model import gmm as gmm_backends
from mantis_jax.model.layers import Dtype, constrain, logical_param
from mantis_jax.parallel import expert as expert_lib

ROUTER_IMPLS = ("reference", "pallas", "pallas_interpret")


class Routing(NamedTuple):
    weights_tk: jax.Array  # renormalised top-k weights, float32
    ids_tk: jax.Array  # int32 expert ids, distinct per token
    probs_te: jax.Array  # full softmax over experts, float32
    logits_te: jax.Array  # raw router logits (before bias), float32


def route(logits_te: jax.Array, top_k: int, bias_e: jax.Array | None = None) -> Routing:
    """Softmax over (logits + bias) in float32, top-k, weights renormalised to sum to 1."""
    logits_te = logits_te.astype(jnp.float32)
    biased = logits_te if bias_e is None else logits_te + bias_e.astype(jnp.float32)
    probs_te = jax.nn.softmax(biased, axis=-1)
    top_w, ids_tk = jax.lax.top_k(probs_te, top_k)
    weights_tk = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    return Routing(weights_tk, ids_tk.astype(jnp.int32), probs_te, logits_te)


def load_balancing_loss(probs_te: jax.Array, ids_tk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Switch loss E · Σ_e f_e · P_e with f_e the share of the T·K assignments that went to e; returns (loss, f)."""
    n_experts = probs_te.shape[-1]
    counts_e = jnp.sum(jax.nn.one_hot(ids_tk, n_experts, dtype=jnp.float32), axis=(0, 1))
    f_e = counts_e / ids_tk.size
    p_e = jnp.mean(probs_te, axis=0)
    return n_experts * jnp.sum(f_e * p_e), f_e


def router_z_loss(logits_te: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_te.astype(jnp.float32), axis=-1)))


class Permutation(NamedTuple):
    sort_idx: jax.Array  # [T*K] flat (token, slot) index of each sorted row
    group_sizes_e: jax.Array  # [E] rows per expert, int32


def permute(x_td: jax.Array, ids_tk: jax.Array, n_experts: int) -> tuple[jax.Array, Permutation]:
    """Gathers token copies into expert-grouped order: x_sorted [T*K, D]."""
    top_k = ids_tk.shape[-1]
    flat_ids = ids_tk.reshape(-1)
    sort_idx = jnp.argsort(flat_ids, stable=True)
    group_sizes_e = jnp.bincount(flat_ids, length=n_experts).astype(jnp.int32)
    x_sorted = jnp.take(x_td, sort_idx // top_k, axis=0)
    return x_sorted, Permutation(sort_idx, group_sizes_e)


def unpermute(y_sorted: jax.Array, perm: Permutation, weights_tk: jax.Array) -> jax.Array:
    """Inverse of `permute`: back to (token, slot) order, then the weighted sum over the K slots: [T, D]."""
    T, K = weights_tk.shape
    rows = jnp.arange(perm.sort_idx.shape[0], dtype=perm.sort_idx.dtype)
    inverse = jnp.zeros_like(perm.sort_idx).at[perm.sort_idx].set(rows, unique_indices=True)  # no second sort
    y_tkd = jnp.take(y_sorted, inverse, axis=0).reshape(T, K, -1)
    return jnp.einsum("tkd,tk->td", y_tkd, weights_tk.astype(y_tkd.dtype))


def swiglu_grouped(x_md, w_gate_edf, w_up_edf, w_down_efd, group_sizes_e, gmm_impl: str = "auto"):
    """Each group of rows (sorted by expert) through its expert's SwiGLU, with a grouped matmul."""
    gmm = functools.partial(gmm_backends.grouped_matmul, impl=gmm_impl)
    h_mf = jax.nn.silu(gmm(x_md, w_gate_edf, group_sizes_e)) * gmm(x_md, w_up_edf, group_sizes_e)
    return gmm(h_mf, w_down_efd, group_sizes_e)


def expert_compute_dense(x_td, w_gate_edf, w_up_edf, w_down_efd, combine_te):
    """Every expert on every token; the combine weights (zero off the top-k) mask the sum."""
    h_tef = jax.nn.silu(jnp.einsum("td,edf->tef", x_td, w_gate_edf)) * jnp.einsum("td,edf->tef", x_td, w_up_edf)
    y_ted = jnp.einsum("tef,efd->ted", h_tef, w_down_efd)
    return jnp.einsum("ted,te->td", y_ted, combine_te.astype(y_ted.dtype))


def expert_compute_switch(x_td, w_gate_edf, w_up_edf, w_down_efd, ids_tk, weights_tk):
    """Each (token, slot) through its one expert, chosen by `lax.switch`: only the T·K chosen experts' weights are
    read. For decoding (T·K < E, e.g. one token, top-2 of 4); a loop of T·K switches, so never for training."""
    T, K = ids_tk.shape
    branches = [lambda x_d, e=e: (jax.nn.silu(x_d @ w_gate_edf[e]) * (x_d @ w_up_edf[e])) @ w_down_efd[e]
                for e in range(w_gate_edf.shape[0])]
    rows = []
    for t in range(T):
        y_d = jnp.zeros((w_down_efd.shape[-1],), x_td.dtype)
        for k in range(K):
            y_d = y_d + weights_tk[t, k].astype(x_td.dtype) * jax.lax.switch(ids_tk[t, k], branches, x_td[t])
        rows.append(y_d)
    return jnp.stack(rows)


def capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


def capacity_dispatch(ids_tk, weights_tk, n_experts: int, cap: int):
    """One-hot dispatch [T, E, C] and combine [T, E, C]; slot k=0 of every token is placed before k=1, and so on.

    Returns (dispatch, combine, dropped_fraction)."""
    T, K = ids_tk.shape
    onehot_kte = jax.nn.one_hot(ids_tk.T, n_experts, dtype=jnp.int32)  # [K, T, E]
    position_kte = jnp.cumsum(onehot_kte.reshape(K * T, n_experts), axis=0).reshape(K, T, n_experts) - 1
    kept_kte = onehot_kte * (position_kte < cap)
    slot_kt = jnp.sum(position_kte * kept_kte, axis=-1)  # [K, T]
    slot_ktc = jax.nn.one_hot(slot_kt, cap, dtype=jnp.float32)
    dispatch_ktec = kept_kte.astype(jnp.float32)[..., None] * slot_ktc[:, :, None, :]
    dispatch_tec = jnp.sum(dispatch_ktec, axis=0)
    combine_tec = jnp.einsum("ktec,tk->tec", dispatch_ktec, weights_tk.astype(jnp.float32))
    dropped = (T * K - jnp.sum(kept_kte)).astype(jnp.float32) / (T * K)
    return dispatch_tec, combine_tec, dropped


def expert_compute_capacity(x_td, w_gate_edf, w_up_edf, w_down_efd, dispatch_tec, combine_tec):
    x_ecd = jnp.einsum("tec,td->ecd", dispatch_tec.astype(x_td.dtype), x_td)
    h_ecf = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x_ecd, w_gate_edf)) * jnp.einsum("ecd,edf->ecf", x_ecd, w_up_edf)
    y_ecd = jnp.einsum("ecf,efd->ecd", h_ecf, w_down_efd)
    return jnp.einsum("tec,ecd->td", combine_tec.astype(y_ecd.dtype), y_ecd)


def route_kernel(logits_te: jax.Array, top_k: int, bias_e: jax.Array | None = None,
                 interpret: bool = False) -> tuple[Routing, router_kernels.Routing]:
    """`route` through the fused router kernel, which also returns the expert grouping (order, positions,
    counts). The full softmax stays in jnp: only the load-balancing loss reads it."""
    logits_te = logits_te.astype(jnp.float32)
    grouping = router_kernels.route(logits_te, bias_e, k=top_k, impl="pallas", interpret=interpret)
    biased = logits_te if bias_e is None else logits_te + bias_e.astype(jnp.float32)
    probs_te = jax.nn.softmax(biased, axis=-1)
    return Routing(grouping.weights_tk, grouping.experts_tk, probs_te, logits_te), grouping


def _route(router_impl: str, logits_te, top_k: int, bias_e):
    """(Routing, kernel grouping or None)."""
    if router_impl == "reference":
        return route(logits_te, top_k, bias_e), None
    if router_impl in ("pallas", "pallas_interpret"):
        return route_kernel(logits_te, top_k, bias_e, interpret=router_impl == "pallas_interpret")
    raise ValueError(f"config.moe.router_impl ({router_impl!r}) must be one of {', '.join(ROUTER_IMPLS)}")


class MoEFeedForward(nn.Module):
    """Top-k of E SwiGLU experts. Returns (y [B, T, D], aux dict)."""

    n_experts: int
    top_k: int
    d_ff: int
    init_std: float
    impl: str = "ragged"
    capacity_factor: float = 1.25
    router_impl: str = "reference"
    gmm_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    expert_parallel: bool = False  # under a mesh with expert > 1: parallel/expert.py dispatch (all_to_all)

    @nn.compact
    def __call__(self, x_btd, expert_bias_e=None):
        B, T, D = x_btd.shape
        E, K, F = self.n_experts, self.top_k, self.d_ff
        init = nn.initializers.normal(self.init_std)
        out_init = nn.initializers.normal(self.init_std / jnp.sqrt(2.0))
        w_router = logical_param(self, "router", init, (D, E), ("embed", None), jnp.float32)
        w_gate = logical_param(self, "w_gate", init, (E, D, F), ("exp", "embed", "mlp"), self.param_dtype)
        w_up = logical_param(self, "w_up", init, (E, D, F), ("exp", "embed", "mlp"), self.param_dtype)
        w_down = logical_param(self, "w_down", out_init, (E, F, D), ("exp", "mlp", "embed"), self.param_dtype)
        w_gate, w_up, w_down = (w.astype(self.dtype) for w in (w_gate, w_up, w_down))

        x_td = x_btd.reshape(B * T, D).astype(self.dtype)
        logits_te = jnp.einsum("td,de->te", x_td.astype(jnp.float32), w_router)  # router in float32
        r, grouping = _route(self.router_impl, logits_te, K, expert_bias_e)
        lb_loss, load_e = load_balancing_loss(r.probs_te, r.ids_tk)
        dropped = jnp.zeros((), jnp.float32)

        ep_mesh = expert_lib.active_expert_mesh() if self.expert_parallel else None
        if ep_mesh is not None:  # each device computes its own experts; capacity bounds the exchange buffers
            cf = self.capacity_factor if self.impl == "capacity" else None
            y_td, dropped = expert_lib.ep_moe_ffn(x_td, r.ids_tk, r.weights_tk, w_gate, w_up, w_down, ep_mesh,
                                                  capacity_factor=cf)
        elif B * T * K < E:  # a decode step: computing only the chosen experts beats any dispatch
            y_td = expert_compute_switch(x_td, w_gate, w_up, w_down, r.ids_tk, r.weights_tk)
        elif self.impl == "dense":
            combine_te = jnp.sum(jax.nn.one_hot(r.ids_tk, E, dtype=jnp.float32) * r.weights_tk[..., None], axis=1)
            y_td = expert_compute_dense(x_td, w_gate, w_up, w_down, combine_te)
        elif self.impl == "ragged":
            if grouping is None:
                x_sorted, perm = permute(x_td, r.ids_tk, E)
                y_sorted = swiglu_grouped(x_sorted, w_gate, w_up, w_down, perm.group_sizes_e, self.gmm_impl)
                y_td = unpermute(y_sorted, perm, r.weights_tk)
            else:  # the kernel already grouped the slots: gather-only permute / combine, no sort here
                kw = dict(impl="pallas", interpret=self.router_impl == "pallas_interpret")
                x_sorted = permute_kernels.permute(x_td, grouping.order_m, grouping.position_tk, **kw)
                y_sorted = swiglu_grouped(x_sorted, w_gate, w_up, w_down, grouping.counts_e, self.gmm_impl)
                y_td = permute_kernels.unpermute(y_sorted, r.weights_tk, grouping.order_m, grouping.position_tk,
                                                 **kw)
        elif self.impl == "capacity":
            cap = capacity(B * T, K, E, self.capacity_factor)
            dispatch, combine, dropped = capacity_dispatch(r.ids_tk, r.weights_tk, E, cap)
            y_td = expert_compute_capacity(x_td, w_gate, w_up, w_down, dispatch, combine)
        else:
            raise ValueError(f"config.moe.impl ({self.impl!r}) must be one of dense, ragged, capacity")

        aux = {"lb_loss": lb_loss, "z_loss": router_z_loss(r.logits_te), "expert_load": load_e,
               "dropped_frac": dropped}
        y_btd = constrain(y_td.reshape(B, T, D).astype(self.dtype), ("batch", "length", "embed"))
        return y_btd, aux
