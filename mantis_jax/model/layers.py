"""The transformer's building blocks: RMSNorm, rotary embeddings, grouped-query attention with a static KV cache,
and the SwiGLU feed-forward.

Without a KV cache, attention runs in causal query blocks (`causal_attention`): block i's queries score only the
keys up to the block's end, skipping the upper triangle that a full masked T x T computes and throws away.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`) and the main activations are
constrained by logical names (`nn.with_logical_constraint`); the mapping to a device mesh lives in the config
(`config.mesh.rules`), never here. Parameters are stored in `param_dtype` and cast to the compute `dtype`;
normalisation, softmax and rotary angles are computed in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
NEG_INF = -1e30  # finite, so a fully masked row gives a uniform softmax instead of NaN
MAX_ATTN_BLOCKS = 16  # query blocks per attention call: bounds the unrolled ops (and compile time) at long T


def query_blocks(T: int, block_q: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges of the causal query blocks: rows of `block_q` (grown so there are at most
    MAX_ATTN_BLOCKS), the last one possibly shorter; one block when block_q is 0 or >= T."""
    if block_q <= 0 or block_q >= T:
        return [(0, T)]
    size = max(block_q, -(-T // MAX_ATTN_BLOCKS))
    return [(lo, min(lo + size, T)) for lo in range(0, T, size)]


def causal_attention(q_btgqk, keys_bsgk, values_bsgk, mask_bts, block_q: int, dtype) -> jax.Array:
    """softmax(q·kᵀ/√Dh + mask)·v for grouped queries [B, T, G, q, Dh] over keys/values [B, S, G, Dh].

    `mask_bts` [B or 1, T, S] is True where query t may see key s. With block_q > 0 (and no cache, S == T, the mask
    causal), query rows [lo, hi) see only keys [0, hi): each block computes its [hi - lo, hi] scores, so the work
    is ~(T + block)/2T of the full T x T, and every row with a visible key gets the unblocked result (the skipped
    keys would get probability exactly 0). Scores and softmax in float32, probabilities cast to `dtype`.
    """
    T, S = q_btgqk.shape[1], keys_bsgk.shape[1]
    blocks = query_blocks(T, block_q)
    if len(blocks) > 1 and S != T:
        raise ValueError(f"blocked causal attention needs one key per query position (got {T} queries, {S} keys): "
                         "use block_q=0 with a KV cache")
    scale = q_btgqk.shape[-1] ** -0.5
    outs = []
    for lo, hi in blocks:
        end = hi if len(blocks) > 1 else S  # one block: every key slot (a cache's S may exceed T)
        scores = jnp.einsum("btgqk,bsgk->bgqts", q_btgqk[:, lo:hi], keys_bsgk[:, :end],
                            preferred_element_type=jnp.float32) * scale
        scores = jnp.where(mask_bts[:, None, None, lo:hi, :end], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        outs.append(jnp.einsum("bgqts,bsgk->btgqk", probs, values_bsgk[:, :end]))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def causal_conv(x_btgk: jax.Array, w_lgk: jax.Array, tail_blgk: jax.Array | None = None,
                segment_ids_bt: jax.Array | None = None):
    """y_t = x_t + sum_{j=1..W-1} w[j-1] * x_{t-j}: a depthwise causal convolution over the time axis (residual form).

    x [B, T, G, Dh]; w [W-1, G, Dh] (lag 1 first); `tail` [B, W-1, G, Dh] holds the W-1 inputs before x (oldest
    first; None = zeros, the start of a sequence). Returns (y, the new tail: the last W-1 inputs of tail ++ x).
    With `segment_ids_bt` (packed sequences, no tail) a lag term counts only within the same segment.
    """
    lags, T = w_lgk.shape[0], x_btgk.shape[1]
    if tail_blgk is None:
        tail_blgk = jnp.zeros((x_btgk.shape[0], lags) + x_btgk.shape[2:], x_btgk.dtype)
    full = jnp.concatenate([tail_blgk.astype(x_btgk.dtype), x_btgk], axis=1)  # [B, W-1+T, G, Dh]
    y = x_btgk
    if segment_ids_bt is not None:
        seg_full = jnp.concatenate([jnp.full((x_btgk.shape[0], lags), -1, segment_ids_bt.dtype), segment_ids_bt], 1)
    for j in range(1, lags + 1):
        term = w_lgk[j - 1] * full[:, lags - j:lags - j + T]
        if segment_ids_bt is not None:  # packed examples: no key mixes in a token of the example before it
            same_bt = seg_full[:, lags - j:lags - j + T] == segment_ids_bt
            term = term * same_bt[:, :, None, None].astype(term.dtype)
        y = y + term
    return y, full[:, -lags:]


def logical_param(module: nn.Module, name: str, init, shape, axes, dtype) -> jax.Array:
    """`module.param` with logical axis names attached (unboxed when read)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Logical sharding constraint; a no-op outside a mesh + rules context."""
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    """y = x / rms(x) * scale, computed in float32, returned in `dtype`."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = logical_param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,),
                              self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def apply_rope(x_bthk: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half form) on the last axis of [B, T, H, Dh]."""
    half = x_bthk.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [Dh/2]
    angles = positions_bt.astype(jnp.float32)[:, :, None] * inv_freq  # [B, T, Dh/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x_bthk.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthk.dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention with an optional static-size KV cache.

    Without a cache, keys are the T input positions. With a cache ({"k", "v"}: [B, S, G, Dh]), the T new keys are
    written at slots [index, index + T) and every query attends to cache slots <= its own slot, so a prefill call
    followed by one-token steps equals the full forward pass. `kv_mask` [B, S] marks valid key slots (left padding).

    `kv_conv` W > 1 mixes each key and value with the W-1 before it (`causal_conv`, before RoPE; weights start at
    0): a key then says which tokens precede its own, the previous-token half of an induction (copy) circuit that
    plain attention must build from two layers. The cache then also holds the last W-1 raw keys and values
    ("k_tail", "v_tail": [B, W-1, G, Dh]); masked (padding) positions enter the convolution as zeros.

    `segment_ids_bt` [B, T] (packed training rows, no cache): a query sees only keys of its own segment, so
    examples packed into one row never attend to each other (nor mix through the convolution); the caller gives
    positions that restart at 0 in each segment.
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    init_std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    block_q: int = 0  # causal query-block rows without a cache (0 = one block); see causal_attention
    kv_conv: int = 0  # width of the causal convolution on keys and values (0 or 1 = none)

    @nn.compact
    def __call__(self, x_btd, positions_bt, cache=None, cache_index=None, kv_mask_bs=None, segment_ids_bt=None,
                 kv_only=False, rows_out=False):
        """(output [B, T, D], new cache or None); `kv_only` (with a cache): write the keys/values, output None.
        `rows_out` (with a cache, one new token): attend as if the token's key/value were written, but return only
        the new rows {"k", "v": [B, 1, G, Dh], tails} instead of the updated [B, S, G, Dh] buffers, so a caller
        holding the cache can write every layer's row at once (early-exit decoding: infer/early_exit.py)."""
        B, T, D = x_btd.shape
        if segment_ids_bt is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) work without a KV cache only; decode one sequence per row")
        if rows_out and (cache is None or T != 1):
            raise ValueError(f"rows_out needs a KV cache and one new token per row (got T={T})")
        H, G, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        init = nn.initializers.normal(self.init_std)
        out_init = nn.initializers.normal(self.init_std / jnp.sqrt(2.0))
        wq = logical_param(self, "wq", init, (D, H, Dh), ("embed", "heads", "head_dim"), self.param_dtype)
        wk = logical_param(self, "wk", init, (D, G, Dh), ("embed", "kv_heads", "head_dim"), self.param_dtype)
        wv = logical_param(self, "wv", init, (D, G, Dh), ("embed", "kv_heads", "head_dim"), self.param_dtype)
        wo = logical_param(self, "wo", out_init, (H, Dh, D), ("heads", "head_dim", "embed"), self.param_dtype)
        x = x_btd.astype(self.dtype)
        q_bthk = jnp.einsum("btd,dhk->bthk", x, wq.astype(self.dtype))
        k_btgk = jnp.einsum("btd,dgk->btgk", x, wk.astype(self.dtype))
        v_btgk = jnp.einsum("btd,dgk->btgk", x, wv.astype(self.dtype))
        new_tails = {}
        if self.kv_conv > 1:
            if kv_mask_bs is not None:  # padding enters the convolution as zeros (as a sequence start does)
                start_slot = 0 if cache is None else cache_index
                keep_bt = jax.lax.dynamic_slice_in_dim(kv_mask_bs, start_slot, T, axis=1).astype(self.dtype)
                k_btgk, v_btgk = k_btgk * keep_bt[:, :, None, None], v_btgk * keep_bt[:, :, None, None]
            kv = {"k": k_btgk, "v": v_btgk}
            for name, raw in kv.items():
                w = logical_param(self, f"{name}_conv", nn.initializers.zeros, (self.kv_conv - 1, G, Dh),
                                  ("kv_conv", "kv_heads", "head_dim"), self.param_dtype).astype(self.dtype)
                tail = None
                if cache is not None:  # slot 0 starts a sequence: a reused cache's old tail must not leak in
                    tail = cache[f"{name}_tail"] * (cache_index > 0).astype(cache[f"{name}_tail"].dtype)
                kv[name], new_tails[f"{name}_tail"] = causal_conv(raw, w, tail, segment_ids_bt)
            k_btgk, v_btgk = kv["k"], kv["v"]
        q_bthk = constrain(apply_rope(q_bthk, positions_bt, self.rope_theta), ("batch", "length", "heads", "head_dim"))
        k_btgk = constrain(apply_rope(k_btgk, positions_bt, self.rope_theta),
                           ("batch", "length", "kv_heads", "head_dim"))

        if cache is None:
            keys, values, new_cache = k_btgk, v_btgk, None
            q_slots = jnp.arange(T)
        elif rows_out:  # the buffers as if written: the row selected in at slot `index` (the same values as below)
            new_cache = {"k": k_btgk.astype(cache["k"].dtype), "v": v_btgk.astype(cache["v"].dtype)}
            new_cache.update({n: t.astype(cache[n].dtype) for n, t in new_tails.items()})
            if kv_only:
                return None, new_cache
            at_s = (jnp.arange(cache["k"].shape[1]) == cache_index)[None, :, None, None]
            keys = jnp.where(at_s, new_cache["k"], cache["k"])
            values = jnp.where(at_s, new_cache["v"], cache["v"])
            keys, values = keys.astype(self.dtype), values.astype(self.dtype)
            q_slots = cache_index + jnp.arange(T)
        else:
            start = (0, cache_index, 0, 0)
            keys = jax.lax.dynamic_update_slice(cache["k"], k_btgk.astype(cache["k"].dtype), start)
            values = jax.lax.dynamic_update_slice(cache["v"], v_btgk.astype(cache["v"].dtype), start)
            new_cache = {"k": keys, "v": values}
            new_cache.update({n: t.astype(cache[n].dtype) for n, t in new_tails.items()})
            if kv_only:
                return None, new_cache
            keys, values = keys.astype(self.dtype), values.astype(self.dtype)
            q_slots = cache_index + jnp.arange(T)
        S = keys.shape[1]
        mask_ts = jnp.arange(S)[None, :] <= q_slots[:, None]  # causal over slots
        mask_bts = mask_ts[None] if kv_mask_bs is None else mask_ts[None] & kv_mask_bs[:, None, :].astype(bool)
        if segment_ids_bt is not None:  # packed rows: attention stays inside each example
            mask_bts = mask_bts & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])

        q_btgqk = q_bthk.reshape(B, T, G, H // G, Dh)
        # Query blocks need the keys to be the T input positions (no cache: slot s is position s, causal mask).
        block_q = self.block_q if cache is None else 0
        out_btgqk = causal_attention(q_btgqk, keys, values, mask_bts, block_q, self.dtype)
        out_bthk = out_btgqk.reshape(B, T, H, Dh)
        out_btd = jnp.einsum("bthk,hkd->btd", out_bthk, wo.astype(self.dtype))
        return constrain(out_btd, ("batch", "length", "embed")), new_cache


class SwiGLU(nn.Module):
    """Dense feed-forward: down(silu(x·W_gate) ⊙ x·W_up)."""

    d_ff: int
    init_std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd):
        D, F = x_btd.shape[-1], self.d_ff
        init = nn.initializers.normal(self.init_std)
        out_init = nn.initializers.normal(self.init_std / jnp.sqrt(2.0))
        w_gate = logical_param(self, "w_gate", init, (D, F), ("embed", "mlp"), self.param_dtype)
        w_up = logical_param(self, "w_up", init, (D, F), ("embed", "mlp"), self.param_dtype)
        w_down = logical_param(self, "w_down", out_init, (F, D), ("mlp", "embed"), self.param_dtype)
        x = x_btd.astype(self.dtype)
        h_btf = jax.nn.silu(x @ w_gate.astype(self.dtype)) * (x @ w_up.astype(self.dtype))
        h_btf = constrain(h_btf, ("batch", "length", "mlp"))
        return constrain(h_btf @ w_down.astype(self.dtype), ("batch", "length", "embed"))
