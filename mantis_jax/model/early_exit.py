"""The early-exit training loss: intermediate layers predict the next token through the shared exit head.

With `model.exit_loss_weight` w > 0, MantisLM returns every layer's output (`aux["layer_hidden"]` [L, B, T, D]);
`exit_loss` decodes layers min_exit_layer..L-1 (1-based) with the model's own final norm and LM head
(`logits_from_hidden`, the head early-exit decoding reads in infer/early_exit.py) and returns
w · mean over those layers of the loss-mask-weighted token cross-entropy (normalised like the main loss). The
last layer is the main loss already. The trainer adds this term to the loss (train/step.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import logits_from_hidden


def exit_layers(args: ModelArgs) -> range:
    """The 1-based layers that get an exit loss: min_exit_layer .. L-1."""
    return range(args.min_exit_layer, args.n_layers)


def exit_loss(args: ModelArgs, params, layer_hidden_lbtd: jax.Array, targets_bt, weights_bt) -> jax.Array:
    """w · mean_l weighted cross-entropy of layer l's exit logits (0 when there is no intermediate layer)."""
    layers = exit_layers(args)
    if args.exit_loss_weight <= 0 or not layers:
        return jnp.zeros((), jnp.float32)
    weights_bt = weights_bt.astype(jnp.float32)
    total = jnp.maximum(jnp.sum(weights_bt), 1e-6)
    losses = []
    for layer in layers:
        logits_btv = logits_from_hidden(args, params, layer_hidden_lbtd[layer - 1])
        lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
        target_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
        losses.append(jnp.sum((lse_bt - target_bt) * weights_bt) / total)
    return args.exit_loss_weight * jnp.mean(jnp.stack(losses))
