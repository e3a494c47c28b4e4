"""Early-exit decoding (CALM-style): a token whose confidence passes a threshold stops running layers.

One decode step for tokens [B] at positions [B, 1] runs the L layers one at a time (unrolled, L is static). After
each layer l >= `min_layer` (1-based, l < L) the shared exit head (final norm + LM head, `logits_from_hidden`)
reads the hidden state and gives a confidence per row (`confidence`); a row whose confidence reaches the
threshold exits: its logits are that head's, its hidden state is frozen. Each later layer still writes that row's
keys/values for the position, computed from the frozen (exited) hidden state, so later tokens attend to every
layer as usual (CALM's state propagation). Compute is really skipped: after each exit check a `lax.cond` on "any
row still running" either continues or only fills the remaining layers, so at batch 1 an exited token runs only
the key/value projections of the skipped layers (`apply_block(kv_only=True)`: norm, two [D, G·Dh] matmuls, no
attention, no feed-forward, no final head; all skipped layers in one pass vectorised over the layers). With
several rows the step runs a layer while any row needs it (the exited rows ignore its output).

The cache is only read inside the chain (`rows_out`: a layer attends as if its new row were written) and written
once per step, every layer's row for the position in one `dynamic_update_slice` per array: per token the cache
costs what the rows cost, not a copy of the whole cache (docs/perf/early_exit.md, 2026-12-01).

Confidence (`EarlyExit.confidence`): "softmax" = the top-1 probability; "margin" = top-1 minus top-2 probability.
A threshold >= 1 never exits, so the step equals the full-depth step; 0 exits every token at `min_layer`.
Data out per step: logits [B, V], layers run [B] int32 (what a caller multiplies by a layer's FLOPs), new cache.
The exit head is trained by `model.exit_loss_weight` (model/early_exit.py).
"""

from __future__ import annotations

import dataclasses
import functools

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
    if kind == "margin":  # two max passes: lax.top_k sorts the row on CPU
        top1_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
        first_bv = jnp.arange(logits_bv.shape[-1]) == jnp.argmax(logits_bv, axis=-1)[:, None]
        top2_b = jnp.max(jnp.where(first_bv, -jnp.inf, logits_bv), axis=-1)
        p1_b = 1.0 / jnp.sum(jnp.exp(logits_bv - top1_b1), axis=-1)
        return p1_b * (1.0 - jnp.exp(top2_b - top1_b1[:, 0]))
    raise ValueError(f"early-exit confidence {kind!r} must be one of {', '.join(CONFIDENCES)}")


def step(args: ModelArgs, params, tok_b, positions_b1, cache: dict, kv_mask_bs, threshold, exit: EarlyExit,
         expert_bias_le=None):
    """One decode step with early exit: (logits [B, V], layers run [B] int32, new cache). `params` float.
    `expert_bias_le` [L, E] (or None) is added to layer l's router logits, as in `forward(expert_bias_le=...)`.

    Traced as a chain of nested conditionals: layers before `min_layer` run unconditionally; after each exit
    check, `lax.cond(any row still running, next layer ..., fill the remaining layers' K/V)`. A token that exits
    at layer l therefore executes l - min_layer + 1 conditionals and nothing of the layers after l but their
    key/value projections (a flat chain of one cond per layer and per head costs more than it saves on a small
    model: docs/perf/early_exit.md). The stacked cache is only read inside the chain (`apply_block(rows_out=True)`:
    each layer attends as if its new row were written); the conditionals return the new token's K/V rows, and
    after the chain one `dynamic_update_slice` per cache array writes every layer's row in place. (Returning
    updated per-layer cache buffers from the conditionals and restacking them cost a copy of the whole cache per
    token, whatever the exit.)
    """
    exit.check(args.n_layers)
    L, B = args.n_layers, tok_b.shape[0]
    index = cache["index"]
    threshold = jnp.asarray(threshold, jnp.float32)
    layer_caches = {n: c for n, c in cache.items() if n != "index"}
    kv_params = kv_layer_params(args, params)

    def block(i, x, **kw):  # layer i's cache slice is taken here, inside the branch that reads it (no copy)
        slot = {n: c[i] for n, c in cache.items() if n != "index"}
        bias_e = None if expert_bias_le is None else expert_bias_le[i]
        return apply_block(args, layer_params(args, params, i), x, positions_b1, slot, index, kv_mask_bs,
                           bias_e, rows_out=True, **kw)

    def fill_from(i, x, live_b, logits_bv, layers_b):
        """Every row has exited: layers i.. only compute their keys/values for the exited states (one pass
        vectorised over every layer's key/value projections, a few ops whatever the number of layers skipped; the
        rows of layers before i are dropped)."""
        rows = jax.vmap(lambda p, slot: apply_block(args, p, x, positions_b1, slot, index, kv_mask_bs, kv_only=True,
                                                    rows_out=True)[1])(kv_params, layer_caches)
        return logits_bv, layers_b, [jax.tree.map(lambda r, j=j: r[j], rows) for j in range(i, L)]

    def run_from(i, x, live_b, logits_bv, layers_b):
        """Layers i.. for a batch in which some row still runs (exited rows keep their state, write K/V)."""
        if i == L:
            final_bv = logits_from_hidden(args, params, x)[:, 0]
            return jnp.where(live_b[:, None], final_bv, logits_bv), layers_b, []
        y, rows = block(i, x)
        x = jnp.where(live_b[:, None, None], y, x)
        layers_b = layers_b + live_b.astype(jnp.int32)
        if not exit.min_layer <= i + 1 < L:
            logits_bv, layers_b, rest = run_from(i + 1, x, live_b, logits_bv, layers_b)
            return logits_bv, layers_b, [rows] + rest
        head_bv = logits_from_hidden(args, params, x)[:, 0]
        out_b = live_b & (confidence(head_bv, exit.confidence) >= threshold) & (threshold < 1.0)
        live_b, logits_bv = live_b & ~out_b, jnp.where(out_b[:, None], head_bv, logits_bv)
        logits_bv, layers_b, rest = jax.lax.cond(
            jnp.any(live_b), functools.partial(run_from, i + 1), functools.partial(fill_from, i + 1),
            x, live_b, logits_bv, layers_b)
        return logits_bv, layers_b, [rows] + rest

    x_b1d = embed(args, params, tok_b[:, None])
    logits_bv, layers_b, rows = run_from(0, x_b1d, jnp.ones((B,), bool),
                                         jnp.zeros((B, args.vocab_size), jnp.float32), jnp.zeros((B,), jnp.int32))
    return logits_bv, layers_b, dict(write_rows(cache, rows), index=index + 1)


def kv_layer_params(args: ModelArgs, params) -> dict:
    """What a layer's key/value pass reads (its attention norm and attention), stacked over the L layers [L, ...]
    (loop-invariant: inside a decode loop XLA computes it once, before the loop)."""
    if args.scan_layers:
        return {n: params["layers"][n] for n in ("attn_norm", "attn")}
    layers = [layer_params(args, params, i) for i in range(args.n_layers)]
    return jax.tree.map(lambda *ps: jnp.stack(ps), *[{n: p[n] for n in ("attn_norm", "attn")} for p in layers])


def write_rows(cache: dict, rows: list) -> dict:
    """The cache with every layer's new-token rows written (`rows[l]`: {"k", "v": [B, 1, G, Dh], tails}): one
    in-place `dynamic_update_slice` per K/V array at slot `index`; the convolution tails are replaced whole."""
    new = {}
    for name, buf in cache.items():
        if name == "index":
            continue
        stacked = jnp.stack([r[name] for r in rows]).astype(buf.dtype)
        new[name] = (stacked if name.endswith("_tail") else
                     jax.lax.dynamic_update_slice(buf, stacked, (0, 0, cache["index"], 0, 0)))
    return new
