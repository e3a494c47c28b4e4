"""Sampling the next token from logits [B, V]: temperature, top-k and top-p (nucleus), all pure functions.

Logits enter as float [B, V] with a PRNG key and the sampling knobs; token ids [B] int32 leave. The knobs are
traced values, not static arguments, so changing temperature / top-k / top-p between calls never re-traces the
decode loop that calls `sample`:
  temperature  0 = greedy (argmax); otherwise logits are divided by it before the filters
  top_k        keep the k highest logits (0 = off); ties are broken by index so exactly k tokens survive
  top_p        keep the smallest set of highest-probability tokens whose mass reaches p (1.0 = off)
The filters compose in the usual order (temperature → top-k → top-p on the renormalised survivors).

Cost: greedy decoding is one argmax (the sampling branch is a `lax.cond` that does not run); a filter that is off
is skipped the same way. A filter that is on sorts the row's values once (`lax.top_k` over V) and keeps the
first n tokens of that order (`_top_n_mask`): no argsort, no rank scatter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def _sorted_desc(logits_bv: jax.Array) -> jax.Array:
    """Each row's values in descending order [B, V]."""
    return jax.lax.top_k(logits_bv, logits_bv.shape[-1])[0]


def _top_n_mask(logits_bv: jax.Array, sorted_bv: jax.Array, n_b: jax.Array) -> jax.Array:
    """True on the n highest logits of each row, ties broken by index (so exactly n survive); n_b >= 1 [B]."""
    n_b = jnp.clip(n_b, 1, logits_bv.shape[-1])
    cut_b1 = jnp.take_along_axis(sorted_bv, (n_b - 1)[:, None], axis=-1)  # the n-th value
    above_bv = logits_bv > cut_b1
    tied_bv = logits_bv == cut_b1
    room_b1 = n_b[:, None] - jnp.sum(above_bv, axis=-1, keepdims=True)  # tied tokens that still fit
    return above_bv | (tied_bv & (jnp.cumsum(tied_bv, axis=-1) <= room_b1))


def top_k_mask(logits_bv: jax.Array, k) -> jax.Array:
    """True on the k highest logits of each row (k <= 0 keeps all). k may be traced."""
    k = jnp.asarray(k, jnp.int32)
    n_b = jnp.broadcast_to(k, logits_bv.shape[:1])
    return _top_n_mask(logits_bv, _sorted_desc(logits_bv), n_b) | (k <= 0)


def top_p_mask(logits_bv: jax.Array, p) -> jax.Array:
    """True on the smallest nucleus: tokens taken by descending probability until their mass reaches p.

    A token is kept when the probability mass strictly before it (in descending order, ties by index) is < p, so
    the top token is always kept and p >= 1 keeps every token. p may be traced.
    """
    p = jnp.asarray(p, jnp.float32)
    sorted_bv = _sorted_desc(logits_bv)
    probs_bv = jax.nn.softmax(sorted_bv.astype(jnp.float32), axis=-1)  # softmax is order-free: sorted probs
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    n_b = jnp.sum(mass_before_bv < p, axis=-1).astype(jnp.int32)  # a prefix: mass_before only grows
    return _top_n_mask(logits_bv, sorted_bv, n_b) | (p >= 1.0)


def filter_logits(logits_bv: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Temperature-scaled logits with everything outside top-k, then outside the top-p nucleus, set to -inf.
    A filter that is off (top_k 0, top_p 1) is skipped at run time (`lax.cond`), not computed and discarded."""
    t = jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
    scaled_bv = logits_bv.astype(jnp.float32) / t
    top_k, top_p = jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)
    scaled_bv = jax.lax.cond(top_k > 0, lambda x: jnp.where(top_k_mask(x, top_k), x, NEG_INF), lambda x: x,
                             scaled_bv)
    return jax.lax.cond(top_p < 1.0, lambda x: jnp.where(top_p_mask(x, top_p), x, NEG_INF), lambda x: x,
                        scaled_bv)


def sample(logits_bv: jax.Array, key: jax.Array, temperature=1.0, top_k=0, top_p=1.0) -> jax.Array:
    """Next tokens [B] int32. temperature == 0 gives the argmax (the key is then unused, nothing is sorted)."""

    def sampled(logits_bv):
        filtered_bv = filter_logits(logits_bv, temperature, top_k, top_p)
        return jax.random.categorical(key, filtered_bv, axis=-1).astype(jnp.int32)

    def greedy(logits_bv):
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    return jax.lax.cond(jnp.asarray(temperature) <= 0, greedy, sampled, logits_bv)


def check_params(temperature: float, top_k: int, top_p: float) -> None:
    """Raises ValueError naming the bad knob and its valid range (host side, before any tracing)."""
    if not temperature >= 0:
        raise ValueError(f"temperature ({temperature}) must be >= 0 (0 = greedy)")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k ({top_k}) must be an integer >= 0 (0 = off)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p ({top_p}) must be in (0, 1] (1 = off)")


def filter_logits_rows(logits_bv: jax.Array, temperature_b, top_k_b, top_p_b) -> jax.Array:
    """`filter_logits` with per-row knobs [B] (a decoding policy sets each row's own): temperature-scaled logits
    outside each row's top-k (k <= 0 keeps all) and top-p nucleus (p >= 1 keeps all) set to -inf. Both filters
    always run (no `lax.cond` on a per-row predicate); one sort serves both."""
    B, V = logits_bv.shape
    t_b1 = jnp.maximum(jnp.broadcast_to(jnp.asarray(temperature_b, jnp.float32), (B,)), 1e-6)[:, None]
    scaled_bv = logits_bv.astype(jnp.float32) / t_b1
    k_b = jnp.broadcast_to(jnp.asarray(top_k_b, jnp.int32), (B,))
    p_b = jnp.broadcast_to(jnp.asarray(top_p_b, jnp.float32), (B,))
    sorted_bv = _sorted_desc(scaled_bv)
    keep_k_bv = _top_n_mask(scaled_bv, sorted_bv, jnp.where(k_b > 0, k_b, V))
    probs_bv = jax.nn.softmax(jnp.where(jnp.arange(V) < jnp.where(k_b > 0, k_b, V)[:, None], sorted_bv, NEG_INF),
                              axis=-1)  # the nucleus is taken among the top-k survivors, renormalised
    n_b = jnp.sum(jnp.cumsum(probs_bv, axis=-1) - probs_bv < p_b[:, None], axis=-1).astype(jnp.int32)
    keep_p_bv = _top_n_mask(scaled_bv, sorted_bv, n_b) | (p_b >= 1.0)[:, None]
    return jnp.where(keep_k_bv & keep_p_bv, scaled_bv, NEG_INF)


def repetition_penalty(logits_bv: jax.Array, seen_bv: jax.Array, penalty_b) -> jax.Array:
    """The CTRL repetition penalty with a per-row factor [B] (1 = off): a logit of a token already seen (seen_bv
    [B, V] bool) is divided by the factor when positive and multiplied by it when negative."""
    r_b1 = jnp.broadcast_to(jnp.asarray(penalty_b, jnp.float32), logits_bv.shape[:1])[:, None]
    logits_bv = logits_bv.astype(jnp.float32)
    penalised_bv = jnp.where(logits_bv > 0, logits_bv / r_b1, logits_bv * r_b1)
    return jnp.where(seen_bv, penalised_bv, logits_bv)
