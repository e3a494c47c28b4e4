"""Sparse mixture-of-experts feed-forward: route → permute → expert compute → unpermute.

Tokens enter as [B, T, D] and are flattened to [T, D] (T = all tokens). The router gives each token K experts
and their gates (`route`, through kernels/router.py: probabilities renormalised to sum to 1 when K >= 2, the
un-renormalised probability when K = 1, as Switch does, so that the task loss trains the router); an optional
expert bias [E] (one row of the meta-controller's [L, E]) is added to the router logits before the top-k. Each
expert is a SwiGLU FFN with weights [E, D, F] / [E, F, D]. Three dispatch backends (`impl`), equal whenever no
token is dropped:
  dense     every expert on every token, masked by the combine weights: the reference;
  ragged    tokens grouped by expert as the router grouped them, grouped matmul (model/gmm.py), dropless;
  capacity  per-expert buffers of ceil(cf · T·K / E) rows filled by gathers (model/dispatch.py); overflow dropped.
With `expert_parallel` under a mesh whose `expert` axis is > 1, the experts run on their own devices instead
(model/expert_parallel.py; dropless unless impl is capacity). The router (`router_impl`):
  reference         the jnp reference of kernels/router.py (softmax, top-k, an argsort groups the slots);
  pallas            the fused kernel in kernels/router.py gives weights, ids and the grouping in one pass, and
                    kernels/permute.py moves the rows (Triton on GPU, Mosaic router on TPU, jnp on CPU);
  pallas_interpret  the same kernels run by the Pallas interpreter (tests on CPU; slow).
Aux outputs (never side channels): Switch load-balancing loss E·Σ_e f_e·P_e, router z-loss, expert load f [E],
fraction of dropped token slots.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kernels import permute as permute_kernels
from kernels import router as router_kernels
from mantis_jax.model import dispatch, expert_parallel
from mantis_jax.model import gmm as gmm_backends
from mantis_jax.model.layers import Dtype, constrain, logical_param

ROUTER_IMPLS = ("reference", "pallas", "pallas_interpret")


class Routing(NamedTuple):
    weights_tk: jax.Array  # [T, K] float32 gates (kernels/router.py: renormalised when K >= 2, p itself at K = 1)
    ids_tk: jax.Array  # [T, K] int32 expert ids, distinct per token
    probs_te: jax.Array  # [T, E] full softmax over experts, float32 (the load-balancing loss reads it)
    logits_te: jax.Array  # [T, E] raw router logits (before bias), float32 (the z-loss reads them)
    grouping: router_kernels.Routing  # the slots grouped by expert: counts, order, positions


def route(logits_te: jax.Array, top_k: int, bias_e: jax.Array | None = None,
          router_impl: str = "reference") -> Routing:
    """The router's top-k and gates from `kernels.router.route` (the one routing function: its jnp reference or
    the fused kernel, by `router_impl`), plus the full softmax the load-balancing loss needs."""
    if router_impl not in ROUTER_IMPLS:
        raise ValueError(f"config.moe.router_impl ({router_impl!r}) must be one of {', '.join(ROUTER_IMPLS)}")
    logits_te = logits_te.astype(jnp.float32)
    grouping = router_kernels.route(logits_te, bias_e, k=top_k,
                                    impl="reference" if router_impl == "reference" else "pallas",
                                    interpret=router_impl == "pallas_interpret")
    biased = logits_te if bias_e is None else logits_te + bias_e.astype(jnp.float32)
    probs_te = jax.nn.softmax(biased, axis=-1)
    return Routing(grouping.weights_tk, grouping.experts_tk, probs_te, logits_te, grouping)


def load_balancing_loss(probs_te: jax.Array, ids_tk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Switch loss E · Σ_e f_e · P_e with f_e the share of the T·K assignments that went to e; returns (loss, f)."""
    n_experts = probs_te.shape[-1]
    counts_e = jnp.sum(jax.nn.one_hot(ids_tk, n_experts, dtype=jnp.float32), axis=(0, 1))
    f_e = counts_e / ids_tk.size
    p_e = jnp.mean(probs_te, axis=0)
    return n_experts * jnp.sum(f_e * p_e), f_e


def router_z_loss(logits_te: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_te.astype(jnp.float32), axis=-1)))


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
    expert_parallel: bool = False  # under a mesh with expert > 1: model/expert_parallel.py dispatch (all_to_all)

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
        r = route(logits_te, K, expert_bias_e, self.router_impl)
        lb_loss, load_e = load_balancing_loss(r.probs_te, r.ids_tk)
        dropped = jnp.zeros((), jnp.float32)

        ep_mesh = expert_parallel.active_expert_mesh() if self.expert_parallel else None
        if ep_mesh is not None:  # each device computes its own experts (model/expert_parallel.py)
            cf = self.capacity_factor if self.impl == "capacity" else None
            y_td, info = expert_parallel.ep_moe_ffn(x_td, r.ids_tk, r.weights_tk, w_gate, w_up, w_down, ep_mesh,
                                                    capacity_factor=cf)
            dropped = info.dropped_frac
        elif B * T * K < E:  # a decode step: computing only the chosen experts beats any dispatch
            y_td = expert_compute_switch(x_td, w_gate, w_up, w_down, r.ids_tk, r.weights_tk)
        elif self.impl == "dense":
            combine_te = jnp.sum(jax.nn.one_hot(r.ids_tk, E, dtype=jnp.float32) * r.weights_tk[..., None], axis=1)
            y_td = expert_compute_dense(x_td, w_gate, w_up, w_down, combine_te)
        elif self.impl == "ragged":  # rows grouped by expert as the router grouped them: gathers both ways
            g = r.grouping
            kw = dict(impl="reference") if self.router_impl == "reference" else dict(
                impl="pallas", interpret=self.router_impl == "pallas_interpret")
            x_sorted = permute_kernels.permute(x_td, g.order_m, g.position_tk, **kw)
            y_sorted = swiglu_grouped(x_sorted, w_gate, w_up, w_down, g.counts_e, self.gmm_impl)
            y_td = permute_kernels.unpermute(y_sorted, r.weights_tk, g.order_m, g.position_tk, **kw)
        elif self.impl == "capacity":
            cap = dispatch.capacity(B * T, K, E, self.capacity_factor)
            y_td, dropped = dispatch.capacity_ffn(x_td, r.ids_tk, r.weights_tk, w_gate, w_up, w_down, cap)
        else:
            raise ValueError(f"config.moe.impl ({self.impl!r}) must be one of dense, ragged, capacity")

        aux = {"lb_loss": lb_loss, "z_loss": router_z_loss(r.logits_te), "expert_load": load_e,
               "dropped_frac": dropped}
        y_btd = constrain(y_td.reshape(B, T, D).astype(self.dtype), ("batch", "length", "embed"))
        return y_btd, aux
