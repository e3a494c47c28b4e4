"""Sampling the next token from logits [B, V]: temperature, top-k and top-p (nucleus), all pure functions.

Logits enter as float [B, V] with a PRNG key and the sampling knobs; token ids [B] int32 leave. The knobs are
traced values, not static arguments, so changing temperature / top-k / top-p between calls never re-traces the
decode loop that calls `sample`:
  temperature  0 = greedy (argmax); otherwise logits are divided by it before the filters
  top_k        keep the k highest logits (0 = off); ties are broken by index so exactly k tokens survive
  top_p        keep the smallest set of highest-probability tokens whose mass reaches p (1.0 = off)
The filters compose in the usual order (temperature → top-k → top-p on the renormalised survivors).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def _ranks(logits_bv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Order (indices by descending logit, stable) and each token's rank in it: both [B, V] int32."""
    order_bv = jnp.argsort(-logits_bv, axis=-1, stable=True).astype(jnp.int32)
    B, V = logits_bv.shape
    rows = jnp.arange(B)[:, None]
    ranks_bv = jnp.zeros((B, V), jnp.int32).at[rows, order_bv].set(jnp.arange(V, dtype=jnp.int32)[None, :])
    return order_bv, ranks_bv


def top_k_mask(logits_bv: jax.Array, k) -> jax.Array:
    """True on the k highest logits of each row (k <= 0 keeps all). k may be traced."""
    _, ranks_bv = _ranks(logits_bv)
    k = jnp.asarray(k, jnp.int32)
    return (ranks_bv < k) | (k <= 0)


def top_p_mask(logits_bv: jax.Array, p) -> jax.Array:
    """True on the smallest nucleus: tokens taken by descending probability until their mass reaches p.

    A token is kept when the probability mass strictly before it (in descending order) is < p, so the top token
    is always kept and p >= 1 keeps every token. p may be traced.
    """
    order_bv, ranks_bv = _ranks(logits_bv)
    probs_bv = jax.nn.softmax(logits_bv.astype(jnp.float32), axis=-1)
    sorted_bv = jnp.take_along_axis(probs_bv, order_bv, axis=-1)
    mass_before_bv = jnp.cumsum(sorted_bv, axis=-1) - sorted_bv  # exclusive cumsum, in sorted order
    keep_sorted_bv = mass_before_bv < jnp.asarray(p, jnp.float32)
    keep_bv = jnp.take_along_axis(keep_sorted_bv, ranks_bv, axis=-1)  # back to vocabulary order
    return keep_bv | (jnp.asarray(p, jnp.float32) >= 1.0)


def filter_logits(logits_bv: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Temperature-scaled logits with everything outside top-k, then outside the top-p nucleus, set to -inf."""
    t = jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
    scaled_bv = logits_bv.astype(jnp.float32) / t
    scaled_bv = jnp.where(top_k_mask(scaled_bv, top_k), scaled_bv, NEG_INF)
    return jnp.where(top_p_mask(scaled_bv, top_p), scaled_bv, NEG_INF)


def sample(logits_bv: jax.Array, key: jax.Array, temperature=1.0, top_k=0, top_p=1.0) -> jax.Array:
    """Next tokens [B] int32. temperature == 0 gives the argmax (the key is then unused)."""
    greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    filtered_bv = filter_logits(logits_bv, temperature, top_k, top_p)
    sampled_b = jax.random.categorical(key, filtered_bv, axis=-1).astype(jnp.int32)
    return jnp.where(jnp.asarray(temperature) <= 0, greedy_b, sampled_b)


def check_params(temperature: float, top_k: int, top_p: float) -> None:
    """Raises ValueError naming the bad knob and its valid range (host side, before any tracing)."""
    if not temperature >= 0:
        raise ValueError(f"temperature ({temperature}) must be >= 0 (0 = greedy)")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k ({top_k}) must be an integer >= 0 (0 = off)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p ({top_p}) must be in (0, 1] (1 = off)")
