"""The pure training and evaluation steps.

`train_step(state, batch, rng) -> (state, metrics)`: forward, loss, backward, optimizer update; jitted once with
donation. Batches are dicts of arrays: inputs/targets int32 [B, T] and loss_mask float32 [B, T] (0 on padding,
weights > 1 allowed, e.g. on answer tokens). With `grad_accum = A` > 1 the batch holds A·B rows that are split into
A micro-batches whose gradients are summed inside one `lax.scan` (one optimizer update per call); the weighted
cross-entropy is divided once by the whole batch's weight, so accumulation equals one big batch.
Loss = Σ ce·w / Σ w (token cross-entropy weighted by loss_mask) + moe_loss (lb_loss_weight·lb_loss +
z_loss_weight·z_loss).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import forward
from mantis_jax.train.state import TrainState


def token_cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """Per-token cross-entropy in float32: [B, T]."""
    return cross_entropy_and_hits(logits_btv, targets_bt)[0]


def cross_entropy_and_hits(logits_btv: jax.Array, targets_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cross-entropy [B, T] in float32, whether the target is a top-1 token [B, T]).

    One max over the vocabulary serves both the stable log-sum-exp and the accuracy: a target is a hit when its
    logit equals the row's max (a tie counts as a hit), so no separate argmax pass reads the [B, T, V] logits.
    """
    logits = logits_btv.astype(jnp.float32)
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    target_logit = jnp.take_along_axis(logits, targets_bt[..., None], -1)[..., 0]
    lse = jnp.log(jnp.sum(jnp.exp(logits - row_max), axis=-1)) + row_max[..., 0]
    return lse - target_logit, target_logit >= row_max[..., 0]


def loss_sums(params: Any, batch: dict, args: ModelArgs) -> dict[str, jax.Array]:
    """One batch's loss terms as sums over its tokens (sums add across micro-batches; means would not).

    weighted_ce = Σ ce·w and weight = Σ w (w = loss_mask: the objective); ce_sum, correct and valid count tokens
    with w > 0 (the reported ce and accuracy); the MoE terms are this batch's own means."""
    logits, aux = forward(args, params, batch["inputs"])
    ce_bt, hit_bt = cross_entropy_and_hits(logits, batch["targets"])
    weights = batch["loss_mask"].astype(jnp.float32)
    valid = (weights > 0).astype(jnp.float32)
    return {"weighted_ce": jnp.sum(ce_bt * weights), "weight": jnp.sum(weights), "ce_sum": jnp.sum(ce_bt * valid),
            "correct": jnp.sum(hit_bt * valid), "valid": jnp.sum(valid), "moe_loss": aux["moe_loss"],
            "lb_loss": aux["lb_loss"], "z_loss": aux["z_loss"], "expert_load": aux["expert_load"],
            "dropped_frac": jnp.mean(aux["dropped_frac"])}


def metrics_of(sums: dict[str, jax.Array], n_micro: int = 1) -> dict[str, jax.Array]:
    """The step's metrics from loss sums accumulated over `n_micro` micro-batches (MoE terms: their mean)."""
    n_valid = jnp.maximum(sums["valid"], 1.0)
    moe = {k: sums[k] / n_micro for k in ("moe_loss", "lb_loss", "z_loss", "expert_load", "dropped_frac")}
    return {"loss": sums["weighted_ce"] / jnp.maximum(sums["weight"], 1e-6) + moe.pop("moe_loss"),
            "ce": sums["ce_sum"] / n_valid, "accuracy": sums["correct"] / n_valid, "tokens": sums["valid"], **moe}


def loss_fn(params: Any, batch: dict, args: ModelArgs) -> tuple[jax.Array, dict]:
    """Loss = Σ ce·w / Σ w + moe_loss over one batch; (loss, metrics)."""
    metrics = metrics_of(loss_sums(params, batch, args))
    return metrics["loss"], metrics


def make_train_step(args: ModelArgs, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int = 1) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """`train_step(state, batch, rng)`; with grad_accum = A the batch's A·B rows are A micro-batches in one scan.

    The objective is that of the whole batch: Σ ce·w over all its tokens divided once by their total weight
    (known before any forward pass: it is the mask's sum), plus the micro-batches' mean MoE loss. So micro-batches
    holding different numbers of weighted tokens (packing makes that normal) are not averaged as equals, and the
    accumulated gradient is the one-big-batch gradient (exactly so for a dense model; MoE aux losses are per
    micro-batch). Micro-batch i takes rows i, i+A, i+2A, ...: each device keeps its own rows (no resharding)."""

    def objective(params, batch, total_weight):
        sums = loss_sums(params, batch, args)
        return sums["weighted_ce"] / total_weight + sums["moe_loss"] / grad_accum, sums

    grad_fn = jax.grad(objective, has_aux=True)

    def train_step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
        del rng  # MantisLM has no stochastic layers; the argument keeps every step's signature the same.
        total_weight = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1e-6)
        if grad_accum == 1:
            grads, sums = grad_fn(state.params, batch, total_weight)
        else:
            micro = jax.tree.map(lambda x: jnp.swapaxes(
                x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]), 0, 1), batch)  # [A, B, ...]

            def body(acc, mb):
                return jax.tree.map(jnp.add, acc, grad_fn(state.params, mb, total_weight)), None

            shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), total_weight)
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
            (grads, sums), _ = jax.lax.scan(body, zeros, micro)
        metrics = metrics_of(sums, grad_accum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["lr"] = schedule(state.step)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(args: ModelArgs) -> Callable[[Any, dict], dict]:
    def eval_step(params: Any, batch: dict) -> dict:
        _, metrics = loss_fn(params, batch, args)
        return {k: metrics[k] for k in ("loss", "ce", "accuracy", "tokens")}

    return eval_step
