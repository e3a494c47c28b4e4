"""The engine's device steps: prefill a prompt once into a KV cache, then decode greedily from that cache.

`prefill(args, params, cache, tokens [1, T], mask [1, T], ...)` runs the prompt through every layer, writes the
cache and returns what the policy's state summary needs (pooled last-layer hidden state over the real tokens,
the next-token distribution's normalised entropy, the top-1 probability at the first exit layer) and the first
token's logits. `decode(args, params, cache, ...)` continues from exactly that cache: one token per step in a
`lax.while_loop` until a stop token or `max_new_tokens`. Each step is `infer.early_exit.step`: a token whose
confidence at a layer >= `model.min_exit_layer` reaches the (traced) exit threshold stops running layers, the
skipped layers' cache entries filled from its exited state; threshold 1.0 is full depth. `decode` reports how many
layers each token ran. Both take the policy's expert bias [L, E] (added to each layer's router logits) as a traced
argument: one compile serves every bias value, and None (no bias) is the unbiased program. Both are jitted once per
(shape, max_new_tokens, bias or none); the host side (retrieval, the trace) runs between them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mantis_jax.infer.decode import prompt_positions
from mantis_jax.infer.early_exit import EarlyExit, step
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import forward


class Prefill(NamedTuple):
    cache: dict
    first_logits_v: jax.Array  # [V] float32, next-token logits after the prompt
    pooled_d: jax.Array  # [D] mean of the last layer's hidden states over the real prompt tokens
    entropy: jax.Array  # [] entropy of softmax(first_logits) / log V
    exit_confidence: jax.Array  # [] top-1 probability after `exit_layer` layers at the last position
    kv_mask_bs: jax.Array  # [1, S] real prompt slots and every generation slot
    hidden_td: jax.Array  # [T, D] the last layer's hidden states (the decoding head's first observation)
    expert_load_le: jax.Array  # [L, E] share of the padded prompt's top-k router assignments per expert and layer


class Decoded(NamedTuple):
    tokens_n: jax.Array  # [N] int32, pad after the stop token
    length: jax.Array  # [] tokens produced (stop token included)
    layers_n: jax.Array  # [N] layers each produced token ran (0 after the stop)
    cache: dict


def normalised_entropy(logits_xv: jax.Array) -> jax.Array:
    """Entropy / log V over the last axis ([..., V] -> [...]): the summary's and the decoding head's."""
    logp = jax.nn.log_softmax(logits_xv.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1) / jnp.log(logits_xv.shape[-1])


@functools.partial(jax.jit, static_argnames=("args", "exit_layer"), donate_argnames=("cache",))
def prefill(args: ModelArgs, params, cache: dict, tokens_bt, mask_bt, expert_bias_le=None, *,
            exit_layer: int) -> Prefill:
    """Prompt [1, T] (left-padded) through all layers into `cache` (from slot 0); the summary's device half.
    `exit_layer` 0 skips the exit-layer pass (exit_confidence is then 0); `expert_bias_le` [L, E] or None."""
    B, T = tokens_bt.shape
    S = cache["k"].shape[2]
    kv_mask_bs = jnp.concatenate([mask_bt.astype(bool), jnp.ones((B, S - T), bool)], axis=1)
    cache = dict(cache, index=jnp.zeros((), jnp.int32))
    positions = prompt_positions(mask_bt)
    logits_btv, aux = forward(args, params, tokens_bt, cache=cache, positions_bt=positions, kv_mask_bs=kv_mask_bs,
                              expert_bias_le=expert_bias_le)
    m = mask_bt.astype(jnp.float32)[..., None]
    pooled = jnp.sum(aux["hidden"].astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    first = logits_btv[0, -1]
    conf = jnp.zeros((), jnp.float32)
    if exit_layer:  # the confidence the early-exit gate would see: the first exit layer's head, last position
        exit_logits, _ = forward(args, params, tokens_bt, exit_layer=exit_layer, positions_bt=positions,
                                 kv_mask_bs=mask_bt.astype(bool), expert_bias_le=expert_bias_le)
        conf = jnp.max(jax.nn.softmax(exit_logits[0, -1]))
    return Prefill(aux["cache"], first, pooled[0], normalised_entropy(first), conf, kv_mask_bs, aux["hidden"][0],
                   aux["expert_load"])


@functools.partial(jax.jit, static_argnames=("args", "max_new_tokens", "exit"), donate_argnames=("cache",))
def decode(args: ModelArgs, params, cache: dict, first_logits_v, kv_mask_bs, prompt_len, stop_v, pad_id,
           threshold, expert_bias_le=None, *, max_new_tokens: int, exit: EarlyExit) -> Decoded:
    """Greedy tokens from the prefilled `cache`: token 0 from `first_logits_v`, then one early-exit step per
    token at confidence `threshold` (1.0 = every layer), routed with `expert_bias_le` [L, E] (or None)."""
    tok = jnp.argmax(first_logits_v).astype(jnp.int32)
    out_n = jnp.full((max_new_tokens,), pad_id, jnp.int32).at[0].set(tok)
    layers_n = jnp.zeros((max_new_tokens,), jnp.int32).at[0].set(args.n_layers)  # token 0 came from the prefill

    def cond(state):
        i, tok, done, *_ = state
        return (i < max_new_tokens) & ~done

    def body(state):
        i, tok, done, out_n, layers_n, cache = state
        positions = jnp.reshape(prompt_len + i - 1, (1, 1))
        logits_bv, layers_b, cache = step(args, params, tok[None], positions, cache, kv_mask_bs, threshold, exit,
                                         expert_bias_le)
        new = jnp.argmax(logits_bv[0]).astype(jnp.int32)
        out_n = out_n.at[i].set(new)
        layers_n = layers_n.at[i].set(layers_b[0])
        return i + 1, new, stop_v[new], out_n, layers_n, cache

    state = (jnp.ones((), jnp.int32), tok, stop_v[tok], out_n, layers_n, cache)
    n, _, _, out_n, layers_n, cache = jax.lax.while_loop(cond, body, state)
    return Decoded(out_n, n, layers_n, cache)
