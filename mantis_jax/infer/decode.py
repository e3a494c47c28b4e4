"""Autoregressive decoding: prefill plus a `lax.while_loop` over the static KV cache, in ONE jitted function.

Data in: left-padded prompt ids [B, T] with their mask [B, T] (True on real tokens), a donated KV cache from
`new_cache` with at least T + N slots, a PRNG key, a boolean stop set [V] (eos, and e.g. newline tokens for QA)
and the sampling knobs. Data out: `Generation(tokens [B, N], lengths [B], cache, layers [B, N])`: each row's new
tokens, pad after the row stopped, how many it produced (the stop token included) and the layers run per token.

Three entry points, one loop: `generate` (prefill + decode in one call: one dispatch, the fastest), and for a
caller that reuses a prompt (the engine: retrieved facts + question prefilled once) `prefill` -> `Prefilled`
(the cache, key mask, positions and last logits) and `decode(state, ...)`, which continues from it without
consuming it. `exit=EarlyExit(...)` (static) with a traced `exit_threshold` decodes with early exit
(infer/early_exit.py).

Left padding: a row's real tokens get positions 0..len-1 (`positions_bt`) and its pad slots are masked out of
attention (`kv_mask_bs`), so a batched row yields the same tokens as the prompt alone. N (max_new_tokens), the
model args and the shapes are static; the sampling knobs, the stop set, the exit threshold and a dynamic step
limit are traced, so one compilation serves every request of a shape. `TRACES` counts traces per function.

`generate_recompute` is the baseline without a cache: every step re-runs the full forward over the [B, T + N]
token buffer (same jitted while-loop style); greedy decoding by both gives the same tokens.
Params may be float or int8-quantized (`infer.quantize`): int8 weights are dequantized once per call, before the
loop (the call then holds a float copy as temporaries; a step does no work that does not change per step).
"""

from __future__ import annotations

import collections
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mantis_jax.infer import early_exit, quantize
from mantis_jax.infer.sampling import sample
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import forward, init_cache

TRACES: collections.Counter = collections.Counter()


class Generation(NamedTuple):
    tokens_bn: jax.Array  # [B, N] int32, pad_id after a row's stop token
    lengths_b: jax.Array  # [B] int32 tokens produced per row (stop token included)
    cache: dict  # the cache after the last step (pass it back in: it is donated and reused)
    layers_bn: jax.Array | None = None  # [B, N] int32 layers run to produce each token (0 after the stop)


class Prefilled(NamedTuple):
    """A prompt's decoding state: what `prefill` returns and `decode` continues from."""

    cache: dict  # KV cache holding the prompt (slots [0, T)); index = T
    kv_mask_bs: jax.Array  # [B, S] bool: valid key slots (left padding masked, every later slot open)
    next_pos_b: jax.Array  # [B] int32 position of each row's next token (its real prompt length)
    logits_bv: jax.Array  # [B, V] float32 next-token logits after the prompt (token 0 is sampled from them)


def new_cache(args: ModelArgs, batch: int, prompt_len: int, max_new_tokens: int) -> dict:
    """A zeroed KV cache with room for the prompt and every new token."""
    return init_cache(args, batch, prompt_len + max_new_tokens)


def prompt_positions(mask_bt: jax.Array) -> jax.Array:
    """Positions of left-padded rows: 0 at a row's first real token (pad slots get 0 and are masked anyway)."""
    return jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=1) - 1, 0)


def _sampler(key, stop_v, temperature, top_k, top_p, pad_id):
    def pick(logits_bv, step, done_b):
        tok_b = sample(logits_bv, jax.random.fold_in(key, step), temperature, top_k, top_p)
        tok_b = jnp.where(done_b, pad_id, tok_b)
        return tok_b, done_b | stop_v[tok_b]

    return pick


def _loop(first_logits_bv, step_logits, max_new_tokens, limit, pick, first_layers: int):
    """Samples token 0 from the prefill logits, then steps i = 1..N-1 feed token i-1 and sample token i.
    `step_logits(tok_b, i, carry) -> (logits_bv, layers_b, carry)`; token 0 counts `first_layers` layers."""
    B = first_logits_bv.shape[0]
    tok_b, done_b = pick(first_logits_bv, 0, jnp.zeros((B,), bool))
    out_bn = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(tok_b)
    layers_bn = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first_layers)
    limit = jnp.minimum(jnp.asarray(limit, jnp.int32), max_new_tokens)

    def cond(state):
        i, _, done_b = state[:3]
        return (i < limit) & ~jnp.all(done_b)

    def body(state):
        i, tok_b, done_b, out_bn, layers_bn, n_b, carry = state
        logits_bv, layers_b, carry = step_logits(tok_b, i, carry)
        new_b, new_done_b = pick(logits_bv, i, done_b)
        out_bn = jax.lax.dynamic_update_slice(out_bn, new_b[:, None], (0, i))
        layers_bn = jax.lax.dynamic_update_slice(layers_bn, jnp.where(done_b, 0, layers_b)[:, None], (0, i))
        return i + 1, new_b, new_done_b, out_bn, layers_bn, n_b + (~done_b).astype(jnp.int32), carry

    return cond, body, (jnp.ones((), jnp.int32), tok_b, done_b, out_bn, layers_bn, jnp.ones((B,), jnp.int32))


def _prefill(args: ModelArgs, params, cache: dict, tokens_bt, mask_bt) -> Prefilled:
    B, T = tokens_bt.shape
    S = cache["k"].shape[2]
    kv_mask_bs = jnp.concatenate([mask_bt.astype(bool), jnp.ones((B, S - T), bool)], axis=1)
    cache = dict(cache, index=jnp.zeros((), jnp.int32))  # overwrite from slot 0: stale slots are never attended
    logits_btv, aux = forward(args, params, tokens_bt, cache=cache, positions_bt=prompt_positions(mask_bt),
                              kv_mask_bs=kv_mask_bs)
    return Prefilled(aux["cache"], kv_mask_bs, jnp.sum(mask_bt.astype(jnp.int32), axis=1), logits_btv[:, -1])


def _decode(args: ModelArgs, params, state: Prefilled, key, stop_v, temperature, top_k, top_p, pad_id, limit,
            exit_threshold, max_new_tokens: int, exit: early_exit.EarlyExit | None) -> Generation:
    room = state.kv_mask_bs.shape[1] - state.cache["index"]

    def step_logits(tok_b, i, cache):
        positions_b1 = (state.next_pos_b + i - 1)[:, None]
        if exit is None:
            logits_b1v, aux = forward(args, params, tok_b[:, None], cache=cache, positions_bt=positions_b1,
                                      kv_mask_bs=state.kv_mask_bs)
            return logits_b1v[:, 0], jnp.full(tok_b.shape, args.n_layers, jnp.int32), aux["cache"]
        return early_exit.step(args, params, tok_b, positions_b1, cache, state.kv_mask_bs, exit_threshold, exit)

    pick = _sampler(key, stop_v, temperature, top_k, top_p, pad_id)
    limit = jnp.minimum(jnp.asarray(limit, jnp.int32), room + 1)  # token N-1 is sampled, never written
    cond, body, loop_state = _loop(state.logits_bv, step_logits, max_new_tokens, limit, pick, args.n_layers)
    _, _, _, out_bn, layers_bn, n_b, cache = jax.lax.while_loop(cond, body, loop_state + (state.cache,))
    return Generation(out_bn, n_b, cache, layers_bn)


def _check_room(S: int, T: int, max_new_tokens: int) -> None:
    if S < T + max_new_tokens:
        raise ValueError(f"KV cache has {S} slots but the prompt ({T}) + max_new_tokens ({max_new_tokens}) need "
                         f"{T + max_new_tokens}; make it with new_cache(args, B, {T}, {max_new_tokens})")


@functools.partial(jax.jit, static_argnames=("args",), donate_argnames=("cache",))
def prefill(args: ModelArgs, params, cache: dict, tokens_bt, mask_bt) -> Prefilled:
    """Runs the left-padded prompt [B, T] (mask [B, T]) through every layer into `cache` (donated, written from
    slot 0): the state `decode` continues from, as many times as wanted (each call copies nothing back into it)."""
    TRACES["prefill"] += 1
    return _prefill(args, quantize.dequantize_params(params), cache, tokens_bt, mask_bt)


@functools.partial(jax.jit, static_argnames=("args", "max_new_tokens", "exit"))
def decode(args: ModelArgs, params, state: Prefilled, key, stop_v, temperature, top_k, top_p, pad_id, limit,
           exit_threshold=1.0, *, max_new_tokens: int, exit: early_exit.EarlyExit | None = None) -> Generation:
    """Generates up to N = max_new_tokens tokens continuing a `prefill` state (not donated: it can be continued
    again, e.g. with other knobs); the returned cache holds the prompt and the new tokens.

    Early exit: `exit` (static, e.g. `EarlyExit(min_layer=2, confidence="softmax")`) compiles the layer-by-layer
    step of infer/early_exit.py, and `exit_threshold` (traced: one compilation serves every threshold) is the
    confidence at which a token stops running layers; >= 1.0 never exits (full depth, the same tokens as
    `exit=None`), 0.0 exits every token at `exit.min_layer`. `Generation.layers_bn` counts the layers run for
    each token (token 0 comes from the prompt's full-depth prefill).
    The cache must have room for N - 1 more tokens (the last token is sampled, never fed back).
    """
    TRACES["decode"] += 1
    _check_room(state.kv_mask_bs.shape[1], 1, max_new_tokens - 1)
    return _decode(args, quantize.dequantize_params(params), state, key, stop_v, temperature, top_k, top_p,
                   pad_id, limit, exit_threshold, max_new_tokens, exit)


@functools.partial(jax.jit, static_argnames=("args", "max_new_tokens", "exit"), donate_argnames=("cache",))
def generate(args: ModelArgs, params, cache: dict, tokens_bt, mask_bt, key, stop_v, temperature, top_k, top_p,
             pad_id, limit, exit_threshold=1.0, *, max_new_tokens: int,
             exit: early_exit.EarlyExit | None = None) -> Generation:
    """`prefill` + `decode` in one jitted call (one dispatch: the fastest path when the prompt is not reused).
    `limit` (traced, <= max_new_tokens) stops every row after that many tokens."""
    TRACES["generate"] += 1
    _check_room(cache["k"].shape[2], tokens_bt.shape[1], max_new_tokens)
    params = quantize.dequantize_params(params)  # int8 weights: dequantized once per call, not once per step
    state = _prefill(args, params, cache, tokens_bt, mask_bt)
    return _decode(args, params, state, key, stop_v, temperature, top_k, top_p, pad_id, limit, exit_threshold,
                   max_new_tokens, exit)


@functools.partial(jax.jit, static_argnames=("args", "max_new_tokens"))
def generate_recompute(args: ModelArgs, params, tokens_bt, mask_bt, key, stop_v, temperature, top_k, top_p,
                       pad_id, limit, *, max_new_tokens: int) -> Generation:
    """The no-cache baseline: each step runs the full forward over the [B, T + N] buffer. Cache field is {}."""
    TRACES["generate_recompute"] += 1
    params = quantize.dequantize_params(params)
    B, T = tokens_bt.shape
    buf_bs = jnp.concatenate([tokens_bt, jnp.full((B, max_new_tokens), pad_id, jnp.int32)], axis=1)
    mask_bs = jnp.concatenate([mask_bt.astype(bool), jnp.ones((B, max_new_tokens), bool)], axis=1)
    positions_bs = prompt_positions(mask_bs)

    def logits_at(buf_bs, col):
        logits_bsv, _ = forward(args, params, buf_bs, positions_bt=positions_bs,
                                kv_mask_bs=mask_bs)
        return jax.lax.dynamic_index_in_dim(logits_bsv, col, axis=1, keepdims=False)

    def step_logits(tok_b, i, buf_bs):
        buf_bs = jax.lax.dynamic_update_slice(buf_bs, tok_b[:, None], (0, T + i - 1))
        return logits_at(buf_bs, T + i - 1), jnp.full(tok_b.shape, args.n_layers, jnp.int32), buf_bs

    pick = _sampler(key, stop_v, temperature, top_k, top_p, pad_id)
    cond, body, state = _loop(logits_at(buf_bs, T - 1), step_logits, max_new_tokens, limit, pick, args.n_layers)
    _, _, _, out_bn, layers_bn, n_b, _ = jax.lax.while_loop(cond, body, state + (buf_bs,))
    return Generation(out_bn, n_b, {}, layers_bn)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int, batch: int | None = None):
    """Host-side: ids [batch, length] int32 with each prompt right-aligned, and the mask of real tokens.

    Rows beyond len(prompts) (to fill a fixed batch) hold a single pad token marked real, so they stay finite.
    """
    batch = batch or len(prompts)
    tokens = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), bool)
    for r, ids in enumerate(prompts):
        if not 0 < len(ids) <= length:
            raise ValueError(f"prompt {r} has {len(ids)} tokens; it must have 1..{length}")
        tokens[r, length - len(ids):] = ids
        mask[r, length - len(ids):] = True
    mask[len(prompts):, -1] = True
    return tokens, mask


def stop_mask(vocab_size: int, stop_ids: Sequence[int]) -> np.ndarray:
    mask = np.zeros((vocab_size,), bool)
    mask[np.asarray(list(stop_ids), np.int64)] = True
    return mask


def bucket(n: int, multiple: int, cap: int) -> int:
    """n rounded up to a multiple (so nearby prompt lengths share one compilation), at most cap."""
    return min(-(-n // multiple) * multiple, cap)
