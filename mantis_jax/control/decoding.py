"""The decoding policy (TIDAL) in training: the reward, the jitted rollout and the Beta policy's log-density.

The head, its observation and the knob map m -> (temperature, top-k, top-p, repetition penalty) are the engine's
(engine/decoding.py, re-exported here): the engine decodes with the same functions the rollouts train. Training
samples m ~ Beta(alpha, beta) every chunk of C tokens; evaluation and the engine act with the Beta mean.
Reward of a chunk, computed from the base model's UNMODULATED logits and the sampled tokens only (the action
changes which tokens are sampled, never the logits the reward reads):
  − w_nll·mean NLL − w_band·(mean normalised entropy outside [band_low, band_high])
  − w_repeat·(share of tokens already in the preceding window) + w_coherence·(share of bigrams seen in the corpus)
`rollout` runs one episode batch as ONE jitted program: the prompt's prefill, then a `lax.scan` over chunks with
an inner `lax.scan` over tokens on the KV cache; the knobs are traced per row, so one compilation serves every
action (and the fixed-knob baselines). PPO with GAE over chunks trains the head (control/train_decoding.py).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mantis_jax.engine.decoding import (SCALARS, DecodingNet, DecodingSpec, Knobs, apply, beta_mean,  # noqa: F401
                                        distinct, features, fixed_knobs, init, knobs, modulate,  # noqa: F401
                                        normalised_entropy, seen_mask, tail_repeat)  # noqa: F401
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import forward, init_cache

TERMS = ("nll", "band", "repeat", "coherence", "entropy")
M_EPS = 1e-4  # m is kept in [eps, 1 − eps] so the Beta log-density stays finite


def beta_log_prob(alpha, beta, m) -> jax.Array:
    """log Beta(m; alpha, beta) = (alpha−1)·log m + (beta−1)·log(1−m) − log B(alpha, beta)."""
    m = jnp.clip(m, M_EPS, 1.0 - M_EPS)
    return ((alpha - 1.0) * jnp.log(m) + (beta - 1.0) * jnp.log1p(-m)
            - jax.scipy.special.betaln(alpha, beta))


def beta_entropy(alpha, beta) -> jax.Array:
    dg = jax.scipy.special.digamma
    return (jax.scipy.special.betaln(alpha, beta) - (alpha - 1.0) * dg(alpha) - (beta - 1.0) * dg(beta)
            + (alpha + beta - 2.0) * dg(alpha + beta))


# ---- the reward ----

def chunk_reward(spec: DecodingSpec, raw_logits_bcv, tokens_bc, before_bw, bigrams_n) -> tuple[jax.Array, dict]:
    """(reward [B], terms {name: [B]}) of one chunk. `raw_logits_bcv` are the base model's logits that predicted
    each token (never the modulated ones), `before_bw` the W tokens before the chunk, `bigrams_n` the sorted ids
    prev·V + next of the corpus's bigrams (int32)."""
    C, W, V = tokens_bc.shape[1], before_bw.shape[1], raw_logits_bcv.shape[-1]
    logp_bcv = jax.nn.log_softmax(raw_logits_bcv.astype(jnp.float32), axis=-1)
    nll_bc = -jnp.take_along_axis(logp_bcv, tokens_bc[..., None], axis=-1)[..., 0]
    ent_b = jnp.mean(-jnp.sum(jnp.exp(logp_bcv) * logp_bcv, axis=-1), axis=-1) / math.log(V)
    band_b = jax.nn.relu(spec.band[0] - ent_b) + jax.nn.relu(ent_b - spec.band[1])
    ctx_bs = jnp.concatenate([before_bw, tokens_bc], axis=1)  # token i of the chunk sits at W + i
    idx_cw = jnp.arange(C)[:, None] + jnp.arange(W)[None, :]  # its W predecessors
    repeat_b = jnp.mean(jnp.any(ctx_bs[:, idx_cw] == tokens_bc[:, :, None], axis=-1), axis=-1)
    ids_bc = ctx_bs[:, W - 1:W - 1 + C] * V + tokens_bc
    pos_bc = jnp.clip(jnp.searchsorted(bigrams_n, ids_bc), 0, bigrams_n.shape[0] - 1)
    coherence_b = jnp.mean(bigrams_n[pos_bc] == ids_bc, axis=-1)
    terms = {"nll": jnp.mean(nll_bc, axis=-1), "band": band_b, "repeat": repeat_b, "coherence": coherence_b,
             "entropy": ent_b}
    reward = (-spec.w_nll * terms["nll"] - spec.w_band * band_b - spec.w_repeat * repeat_b
              + spec.w_coherence * coherence_b)
    return reward, terms


# ---- the jitted rollout ----

class Rollout(NamedTuple):
    features: jax.Array  # [B, K, F] what the head saw at each chunk
    m: jax.Array  # [B, K] the modulation acted on
    log_prob: jax.Array  # [B, K] of m under the head that acted
    value: jax.Array  # [B, K]
    reward: jax.Array  # [B, K]
    terms: dict  # {name: [B, K]}
    knobs: Knobs  # each [B, K]
    tokens: jax.Array  # [B, N] generated tokens
    nll: jax.Array  # [B, N] their NLL under the base model (unmodulated logits)


MODES = ("sample", "mean", "fixed")


def rollout(args: ModelArgs, spec: DecodingSpec, lm_params, head_params, prompt_bt, key, bigrams_n,
            fixed: Knobs | None = None, forced_bn=None, *, mode: str = "sample") -> Rollout:
    """Continues each prompt [B, T] (real tokens, T >= window) by N = chunk·chunks tokens.

    mode "sample" draws m from the head (training), "mean" acts with the Beta mean (evaluation), "fixed" uses
    `fixed` knobs for every chunk (baselines; m is then the head's mean, unused). `forced_bn` [B, N], when given,
    is fed instead of the sampled tokens (the reward must not depend on the knobs then: tests check it). The mode
    and the forcing are traced flags: every call with the same shapes runs the same compiled program.
    """
    if mode not in MODES or (mode == "fixed") != (fixed is not None):
        raise ValueError(f"mode {mode!r} must be one of {MODES}, with `fixed` knobs given exactly for 'fixed'")
    B, T = prompt_bt.shape
    if T < max(spec.window, spec.chunk):
        raise ValueError(f"prompts have {T} tokens but config.decoding.window ({spec.window}) and "
                         f"config.decoding.chunk ({spec.chunk}) need >= {max(spec.window, spec.chunk)}; raise "
                         "config.decoding.prompt_len")
    fixed = fixed_knobs(B, 1.0) if fixed is None else fixed
    forced = jnp.zeros((B, spec.new_tokens), jnp.int32) if forced_bn is None else forced_bn
    return _rollout(args, spec, lm_params, head_params, jnp.asarray(prompt_bt, jnp.int32), key, bigrams_n, fixed,
                    jnp.asarray(forced, jnp.int32), jnp.asarray(mode == "sample"), jnp.asarray(mode == "fixed"),
                    jnp.asarray(forced_bn is not None))


@functools.partial(jax.jit, static_argnames=("args", "spec"))
def _rollout(args: ModelArgs, spec: DecodingSpec, lm_params, head_params, prompt_bt, key, bigrams_n, fixed: Knobs,
             forced_bn, sample_m, use_fixed, use_forced) -> Rollout:
    B, T = prompt_bt.shape
    C, K, W, N = spec.chunk, spec.chunks, spec.window, spec.new_tokens
    cache = init_cache(args, B, T + N)
    logits_btv, aux = forward(args, lm_params, prompt_bt, cache=cache,
                              positions_bt=jnp.broadcast_to(jnp.arange(T), (B, T)))
    hist_bs = jnp.concatenate([prompt_bt, jnp.zeros((B, N), jnp.int32)], axis=1)
    hidden_bcd, ent_bc = aux["hidden"][:, -C:], normalised_entropy(logits_btv[:, -C:])

    def token_step(carry, step):
        cache, logits_bv, hist_bs, kn = carry
        pos, k_tok = step
        window_bw = jax.lax.dynamic_slice_in_dim(hist_bs, pos - W, W, axis=1)
        sampled_b = jax.random.categorical(k_tok, modulate(logits_bv, window_bw, kn), axis=-1).astype(jnp.int32)
        tok_b = jnp.where(use_forced, jax.lax.dynamic_index_in_dim(forced_bn, pos - T, 1, False), sampled_b)
        hist_bs = jax.lax.dynamic_update_slice_in_dim(hist_bs, tok_b[:, None], pos, axis=1)
        nxt_b1v, aux = forward(args, lm_params, tok_b[:, None], cache=cache,
                               positions_bt=jnp.full((B, 1), pos, jnp.int32))
        return (aux["cache"], nxt_b1v[:, 0], hist_bs, kn), (logits_bv, tok_b, aux["hidden"][:, 0],
                                                             normalised_entropy(nxt_b1v[:, 0]))

    def chunk_step(carry, k):
        cache, logits_bv, hist_bs, hidden_bcd, ent_bc = carry
        start = T + k * C
        before_bw = jax.lax.dynamic_slice_in_dim(hist_bs, start - W, W, axis=1)
        x_bf = features(spec, logits_bv, before_bw, hidden_bcd, ent_bc, k / K)
        out = apply(spec, head_params, x_bf)
        k_act, k_tok = jax.random.split(jax.random.fold_in(key, k))
        drawn_b = jnp.clip(jax.random.beta(k_act, out["alpha"], out["beta"]), M_EPS, 1.0 - M_EPS)
        m_b = jnp.where(sample_m, drawn_b, beta_mean(out["alpha"], out["beta"]))
        kn = jax.tree.map(lambda f, p: jnp.where(use_fixed, f, p), fixed, knobs(spec, m_b))
        steps = (start + jnp.arange(C), jax.random.split(k_tok, C))
        (cache, logits_bv, hist_bs, _), (raw_cbv, tok_cb, hid_cbd, ent_cb) = jax.lax.scan(
            token_step, (cache, logits_bv, hist_bs, kn), steps)
        raw_bcv, tokens_bc = jnp.swapaxes(raw_cbv, 0, 1), tok_cb.T
        reward_b, terms = chunk_reward(spec, raw_bcv, tokens_bc, before_bw, bigrams_n)
        nll_bc = -jnp.take_along_axis(jax.nn.log_softmax(raw_bcv, axis=-1), tokens_bc[..., None], axis=-1)[..., 0]
        ys = (x_bf, m_b, beta_log_prob(out["alpha"], out["beta"], m_b), out["value"], reward_b, terms, kn,
              tokens_bc, nll_bc)
        return (cache, logits_bv, hist_bs, jnp.swapaxes(hid_cbd, 0, 1), ent_cb.T), ys

    _, ys = jax.lax.scan(chunk_step, (aux["cache"], logits_btv[:, -1], hist_bs, hidden_bcd, ent_bc), jnp.arange(K))
    x, m, lp, v, r, terms, kn, tok_kbc, nll_kbc = ys
    bk = lambda a: jnp.swapaxes(a, 0, 1)  # noqa: E731  [K, B, ...] -> [B, K, ...]
    return Rollout(bk(x), bk(m), bk(lp), bk(v), bk(r), {n: bk(t) for n, t in terms.items()},
                   Knobs(*(bk(a) for a in kn)), jnp.transpose(tok_kbc, (1, 0, 2)).reshape(B, N),
                   jnp.transpose(nll_kbc, (1, 0, 2)).reshape(B, N))


def text_metrics(tokens_bn, nll_bn) -> dict:
    """Figures of generated text [B, N]: repetition rate (share of tokens that already occurred earlier in the
    row's continuation), distinct-2/3 (per row, averaged) and the perplexity under the base model."""
    tokens_bn = jnp.asarray(tokens_bn)
    N = tokens_bn.shape[1]
    earlier_nn = jnp.tril(jnp.ones((N, N), bool), k=-1)
    repeat = jnp.any((tokens_bn[:, :, None] == tokens_bn[:, None, :]) & earlier_nn, axis=-1)
    return {"repetition": float(jnp.mean(repeat)), "distinct_2": float(jnp.mean(distinct(tokens_bn, 2))),
            "distinct_3": float(jnp.mean(distinct(tokens_bn, 3))), "perplexity": float(jnp.exp(jnp.mean(nll_bn)))}
