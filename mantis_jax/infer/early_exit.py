"""Early-exit decoding (CALM-style): a token whose confidence passes a threshold stops running layers.

One decode step for tokens [B] at positions [B, 1] runs the L layers one at a time (unrolled, L is static). After
each layer l >= `min_layer` (1-based, l < L) the shared exit head (final norm + LM head, `logits_from_hidden`)
reads the hidden state and gives a confidence per row (`confidence`); a row whose confidence reaches the
threshold exits: its logits are that head's, its hidden state is frozen. Each later layer still writes that row's
keys/values for the position, computed from the frozen (exited) hidden state, so later tokens attend to every
layer as usual (CALM's state propagation). Compute is really skipped: each layer and each exit head sits in a
`lax.cond` on "any row still running", so at batch 1 an exited token runs only the key/value projections of the
skipped layers (`apply_block(kv_only=True)`: norm, two [D, G·Dh] matmuls, no attention, no feed-forward, and no
final head). With several rows the step runs a layer while any row needs it (the exited rows ignore its output).

Confidence (`EarlyExit.confidence`): "softmax" = the top-1 probability; "margin" = top-1 minus top-2 probability.
A threshold >= 1 never exits, so the step equals the full-depth step; 0 exits every token at `min_layer`.
Data out per step: logits [B, V], layers run [B] int32 (what a caller multiplies by a layer's FLOPs), new cache.
The exit head is trained by `model.exit_loss_weight` (model/early_exit.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import apply_block, embed, layer_params, logits_from_hidden

CONFIDENCES = ("softmax", "margin")


@dataclasses.dataclass(frozen=True)
class EarlyExit:
    """Static settings of the early-exit step (hashable: a `jax.jit` static argument)."""

    min_layer: int = 1  # the first layer (1-based) after which a token may exit
    confidence: str = "softmax"  # "softmax" (top-1 probability) or "margin" (top-1 minus top-2 probability)

    def check(self, n_layers: int) -> "EarlyExit":
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"early-exit confidence {self.confidence!r} must be one of {', '.join(CONFIDENCES)}")
        if not 1 <= self.min_layer <= n_layers:
            raise ValueError(f"early-exit min_layer ({self.min_layer}) must be in [1, {n_layers}] "
                             "(config.model.min_exit_layer)")
        return self


def confidence(logits_bv: jax.Array, kind: str) -> jax.Array:
    """Per-row confidence in [0, 1] from logits [B, V]: top-1 probability, or top-1 minus top-2 probability."""
    logits_bv = logits_bv.astype(jnp.float32)
    if kind == "softmax":
        return 1.0 / jnp.sum(jnp.exp(logits_bv - jnp.max(logits_bv, axis=-1, keepdims=True)), axis=-1)
    if kind == "margin":
        top_b2 = jax.lax.top_k(logits_bv, 2)[0]
        p1_b = 1.0 / jnp.sum(jnp.exp(logits_bv - top_b2[:, :1]), axis=-1)
        return p1_b * (1.0 - jnp.exp(top_b2[:, 1] - top_b2[:, 0]))
    raise ValueError(f"early-exit confidence {kind!r} must be one of {', '.join(CONFIDENCES)}")


def step(args: ModelArgs, params, tok_b, positions_b1, cache: dict, kv_mask_bs, threshold, exit: EarlyExit):
    """One decode step with early exit: (logits [B, V], layers run [B] int32, new cache). `params` float."""
    exit.check(args.n_layers)
    L, B = args.n_layers, tok_b.shape[0]
    index = cache["index"]
    threshold = jnp.asarray(threshold, jnp.float32)
    x_b1d = embed(args, params, tok_b[:, None])
    live_b = jnp.ones((B,), bool)
    layers_b = jnp.zeros((B,), jnp.int32)
    logits_bv = jnp.zeros((B, args.vocab_size), jnp.float32)
    new_layers = []
    for i in range(L):
        p_i = layer_params(args, params, i)
        slot = {n: c[i] for n, c in cache.items() if n != "index"}

        def run(x, slot, live_b, p_i=p_i):
            y, slot = apply_block(args, p_i, x, positions_b1, slot, index, kv_mask_bs)
            return jnp.where(live_b[:, None, None], y, x), slot

        def fill(x, slot, live_b, p_i=p_i):
            return apply_block(args, p_i, x, positions_b1, slot, index, kv_mask_bs, kv_only=True)

        x_b1d, slot = jax.lax.cond(jnp.any(live_b), run, fill, x_b1d, slot, live_b)
        new_layers.append(slot)
        layers_b = layers_b + live_b.astype(jnp.int32)
        if exit.min_layer <= i + 1 < L:
            def head(x, live_b, logits_bv):
                lg_bv = logits_from_hidden(args, params, x)[:, 0]
                out_b = live_b & (confidence(lg_bv, exit.confidence) >= threshold) & (threshold < 1.0)
                return live_b & ~out_b, jnp.where(out_b[:, None], lg_bv, logits_bv)

            live_b, logits_bv = jax.lax.cond(jnp.any(live_b), head, lambda x, lv, lg: (lv, lg), x_b1d, live_b,
                                             logits_bv)

    def final(x, live_b, logits_bv):
        return jnp.where(live_b[:, None], logits_from_hidden(args, params, x)[:, 0], logits_bv)

    logits_bv = jax.lax.cond(jnp.any(live_b), final, lambda x, lv, lg: lg, x_b1d, live_b, logits_bv)
    new_cache = {n: jnp.stack([s[n] for s in new_layers]) for n in new_layers[0]}
    return logits_bv, layers_b, dict(new_cache, index=index + 1)
