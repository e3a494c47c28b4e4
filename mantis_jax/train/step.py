"""The pure training and evaluation steps.

`train_step(state, batch, rng) -> (state, metrics)`: forward, loss, backward, optimizer update; jitted once with
donation. Batches are dicts of arrays: inputs/targets int32 [B, T] and loss_mask float32 [B, T] (0 on padding,
weights > 1 allowed, e.g. on answer tokens). With `grad_accum = A` > 1 the batch holds A·B rows that are split into
A micro-batches whose gradients are averaged inside the step (one optimizer update per call).
Loss = weighted token cross-entropy + moe_loss (lb_loss_weight·lb_loss + z_loss_weight·z_loss) [+ the early-exit
loss of model/early_exit.py when model.exit_loss_weight > 0].
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mantis_jax.model.args import ModelArgs
from mantis_jax.model.early_exit import exit_loss
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


def loss_fn(params: Any, batch: dict, args: ModelArgs) -> tuple[jax.Array, dict]:
    logits, aux = forward(args, params, batch["inputs"])
    ce_bt, hit_bt = cross_entropy_and_hits(logits, batch["targets"])
    weights = batch["loss_mask"].astype(jnp.float32)
    valid = (weights > 0).astype(jnp.float32)
    n_valid = jnp.maximum(jnp.sum(valid), 1.0)
    weighted_ce = jnp.sum(ce_bt * weights) / jnp.maximum(jnp.sum(weights), 1e-6)
    ce = jnp.sum(ce_bt * valid) / n_valid
    correct = jnp.sum(hit_bt * valid)
    loss = weighted_ce + aux["moe_loss"]
    if args.exit_loss_weight > 0:  # intermediate layers also predict (model.exit_loss_weight)
        loss = loss + exit_loss(args, params, aux["layer_hidden"], batch["targets"], weights)
    metrics = {"loss": loss, "ce": ce, "accuracy": correct / n_valid, "tokens": jnp.sum(valid),
               "lb_loss": aux["lb_loss"], "z_loss": aux["z_loss"], "expert_load": aux["expert_load"],
               "dropped_frac": jnp.mean(aux["dropped_frac"])}
    return loss, metrics


def make_train_step(args: ModelArgs, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int = 1) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
        del rng  # MantisLM has no stochastic layers; the argument keeps every step's signature the same.
        if grad_accum == 1:
            (_, metrics), grads = grad_fn(state.params, batch, args)
        else:
            micro = jax.tree.map(lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)

            def body(acc, mb):
                (_, m), g = grad_fn(state.params, mb, args)
                return jax.tree.map(jnp.add, acc, (g, m)), None

            (_, m0), g0 = grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), args)
            (grads, metrics), _ = jax.lax.scan(body, (g0, m0), jax.tree.map(lambda x: x[1:], micro))
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            metrics = jax.tree.map(lambda m: m / grad_accum, metrics)
            metrics["tokens"] = metrics["tokens"] * grad_accum
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
