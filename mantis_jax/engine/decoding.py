"""The decoding head (TIDAL) at inference: the knob map, the observation, the head network and the engine's
modulated decode loop. Training (reward, rollouts, PPO) lives in control/decoding.py and control/train_decoding.py.

Every chunk of C generated tokens the head reads an observation of the decoding state and gives a Beta(alpha, beta)
over a modulation m in [0, 1]; `knobs(spec, m)` maps m to the sampling knobs of the next C tokens. The map is
monotone, each knob moving from its config `*_low` end (m = 0: conservative) to its `*_high` end (m = 1: diverse):
  temperature = t_low + m·(t_high − t_low)
  top_k       = round(k_low · (k_high / k_low)^m)    geometric; k_high = 0 means V (the whole vocabulary: off)
  top_p       = p_low + m·(p_high − p_low)           p = 1 keeps every token
  penalty     = r_low + m·(r_high − r_low)           CTRL repetition penalty on tokens of the recent window
At inference the engine acts with the Beta mean alpha / (alpha + beta): the same m for the same state (training
samples m). The tokens themselves are still sampled under those knobs, from keys folded from `config.seed`.

Observation [B, F] (F = D·observe_pooled + len(SCALARS)): optionally the mean of the last chunk's final hidden
states [D], then
  entropy         normalised entropy of the next-token distribution (the base model's raw logits)
  chunk_entropy   mean normalised entropy of the next-token distributions after each of the last C tokens
  chunk_repeat    share of the last C tokens that already occur earlier in the window
  distinct_1/2    distinct-1 and distinct-2 of the last `window` tokens
  hidden_std      log1p of the mean per-dimension std of the last chunk's final hidden states
  progress        chunk index / decoding.chunks (beyond 1 when the engine generates more than an episode)
The last C tokens before the first chunk are the prompt's (its last C hidden states and next-token entropies).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from mantis_jax import config as config_lib
from mantis_jax.engine.runtime import normalised_entropy
from mantis_jax.infer.sampling import filter_logits_rows, repetition_penalty
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import forward, logits_from_hidden

SCALARS = ("entropy", "chunk_entropy", "chunk_repeat", "distinct_1", "distinct_2", "hidden_std", "progress")
TRAIN_COMMAND = "python -m mantis_jax.control.train_decoding --checkpoint=<stage-1 workdir> --workdir={}"


class DecodingPolicyError(ValueError):
    """A decoding-policy workdir is missing, holds no weights, or belongs to another model."""


@dataclasses.dataclass(frozen=True)
class DecodingSpec:
    """Shapes, the knob map and the reward weights (static: hashable, from the config and the base model)."""

    d_model: int
    vocab_size: int
    chunk: int = 8
    chunks: int = 6
    window: int = 32
    d_hidden: int = 64
    observe_pooled: bool = True
    temperature: tuple[float, float] = (0.6, 1.4)
    top_k: tuple[int, int] = (8, 0)
    top_p: tuple[float, float] = (0.8, 1.0)
    penalty: tuple[float, float] = (1.0, 1.3)
    w_nll: float = 0.2
    w_band: float = 1.0
    band: tuple[float, float] = (0.1, 0.5)
    w_repeat: float = 1.0
    w_coherence: float = 0.5

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "DecodingSpec":
        d = config.decoding
        return cls(d_model=config.model.d_model, vocab_size=config.model.vocab_size, chunk=d.chunk, chunks=d.chunks,
                   window=d.window, d_hidden=d.d_hidden, observe_pooled=bool(d.get("observe_pooled", True)),
                   temperature=(float(d.temperature_low), float(d.temperature_high)),
                   top_k=(int(d.top_k_low), int(d.top_k_high)), top_p=(float(d.top_p_low), float(d.top_p_high)),
                   penalty=(float(d.penalty_low), float(d.penalty_high)), w_nll=float(d.w_nll),
                   w_band=float(d.w_band), band=(float(d.band_low), float(d.band_high)),
                   w_repeat=float(d.w_repeat), w_coherence=float(d.w_coherence))

    @property
    def n_features(self) -> int:
        return self.d_model * self.observe_pooled + len(SCALARS)

    @property
    def new_tokens(self) -> int:
        return self.chunk * self.chunks


class Knobs(NamedTuple):
    temperature: jax.Array  # [B] float
    top_k: jax.Array  # [B] int32 (>= V keeps every token)
    top_p: jax.Array  # [B] float
    penalty: jax.Array  # [B] float


def knobs(spec: DecodingSpec, m_b: jax.Array) -> Knobs:
    """The documented map m in [0, 1] -> sampling knobs (module docstring); monotone in m."""
    m_b = jnp.clip(jnp.asarray(m_b, jnp.float32), 0.0, 1.0)
    lerp = lambda lo_hi: lo_hi[0] + m_b * (lo_hi[1] - lo_hi[0])  # noqa: E731
    k_lo, k_hi = spec.top_k[0], spec.top_k[1] or spec.vocab_size
    top_k = jnp.round(k_lo * jnp.exp(m_b * math.log(k_hi / k_lo))).astype(jnp.int32)
    return Knobs(lerp(spec.temperature), jnp.clip(top_k, 1, spec.vocab_size), lerp(spec.top_p), lerp(spec.penalty))


def fixed_knobs(batch: int, temperature: float, top_k: int = 0, top_p: float = 1.0, penalty: float = 1.0) -> Knobs:
    """The same knobs for every row (a fixed sampling baseline); top_k 0 = off."""
    full = lambda v, dt: jnp.full((batch,), v, dt)  # noqa: E731
    return Knobs(full(temperature, jnp.float32), full(top_k, jnp.int32), full(top_p, jnp.float32),
                 full(penalty, jnp.float32))


def modulate(logits_bv, window_bw, kn: Knobs) -> jax.Array:
    """The logits sampled from: the repetition penalty on the window's tokens, then temperature, top-k, top-p."""
    return filter_logits_rows(repetition_penalty(logits_bv, seen_mask(window_bw, logits_bv.shape[-1]), kn.penalty),
                              kn.temperature, kn.top_k, kn.top_p)


# ---- the head: features -> Beta(alpha, beta) and a value ----

class DecodingNet(nn.Module):
    """features [B, F] -> {"alpha" [B], "beta" [B] (both > 1: a unimodal Beta), "value" [B]}."""

    spec: DecodingSpec

    @nn.compact
    def __call__(self, x_bf):
        s = self.spec
        x_bf = jnp.asarray(x_bf, jnp.float32)
        h = x_bf
        if s.observe_pooled:
            h = jnp.concatenate([nn.LayerNorm(name="pooled_norm")(x_bf[:, :s.d_model]), x_bf[:, s.d_model:]], -1)
        for i in range(2):
            h = nn.gelu(nn.Dense(s.d_hidden, name=f"hidden_{i}")(h))
        ab = nn.Dense(2, kernel_init=nn.initializers.normal(0.01), name="beta_params")(h)  # start near Beta(1.7, 1.7)
        ab = 1.0 + jax.nn.softplus(ab)
        return {"alpha": ab[:, 0], "beta": ab[:, 1], "value": nn.Dense(1, name="value")(h)[:, 0]}


@functools.partial(jax.jit, static_argnums=0)
def init(spec: DecodingSpec, key: jax.Array) -> dict:
    return DecodingNet(spec).init(key, jnp.zeros((1, spec.n_features), jnp.float32))["params"]


def apply(spec: DecodingSpec, params: dict, x_bf) -> dict:
    return DecodingNet(spec).apply({"params": params}, x_bf)


def beta_mean(alpha, beta) -> jax.Array:
    return alpha / (alpha + beta)


# ---- statistics of tokens and hidden states ----

def distinct(tokens_bw: jax.Array, n: int) -> jax.Array:
    """Distinct-n [B]: unique n-grams over n-grams in each row (exact: a pairwise comparison, no hashing)."""
    W = tokens_bw.shape[1] - n + 1
    grams_bwn = jnp.stack([tokens_bw[:, i:i + W] for i in range(n)], axis=-1)
    same_bww = jnp.all(grams_bwn[:, :, None, :] == grams_bwn[:, None, :, :], axis=-1)
    earlier_ww = jnp.tril(jnp.ones((W, W), bool), k=-1)  # j < i
    first_bw = ~jnp.any(same_bww & earlier_ww, axis=-1)  # the n-gram's first occurrence
    return jnp.sum(first_bw, axis=-1) / W


def tail_repeat(window_bw: jax.Array, n: int) -> jax.Array:
    """[B] share of the window's last n tokens that occur at an earlier position of the window."""
    W = window_bw.shape[1]
    same_bnw = window_bw[:, W - n:, None] == window_bw[:, None, :]
    earlier_nw = jnp.arange(W)[None, :] < (W - n + jnp.arange(n))[:, None]
    return jnp.mean(jnp.any(same_bnw & earlier_nw, axis=-1), axis=-1)


def features(spec: DecodingSpec, logits_bv, window_bw, hidden_bcd, entropy_bc, progress) -> jax.Array:
    """The observation [B, F] (module docstring) from the raw next-token logits, the last `window` tokens, the last
    chunk's final hidden states [B, C, D] and the normalised next-token entropies after each of them [B, C]."""
    h_bcd = hidden_bcd.astype(jnp.float32)
    B, C = logits_bv.shape[0], h_bcd.shape[1]
    scalars_bs = jnp.stack([normalised_entropy(logits_bv), jnp.mean(entropy_bc, axis=-1),
                            tail_repeat(window_bw, C), distinct(window_bw, 1), distinct(window_bw, 2),
                            jnp.log1p(jnp.mean(jnp.std(h_bcd, axis=1), axis=-1)),
                            jnp.broadcast_to(jnp.asarray(progress, jnp.float32), (B,))], axis=-1)
    if not spec.observe_pooled:
        return scalars_bs
    return jnp.concatenate([jnp.mean(h_bcd, axis=1), scalars_bs], axis=-1)


def seen_mask(window_bw: jax.Array, vocab: int) -> jax.Array:
    """[B, V] True on the tokens of each row's window (what the repetition penalty lowers)."""
    return jax.vmap(lambda w: jnp.zeros((vocab,), bool).at[w].set(True))(window_bw)


# ---- a trained head, loaded for the engine ----

@dataclasses.dataclass(frozen=True)
class DecodingHead:
    """A trained decoding policy: its spec (static) and head parameters; `workdir` names where it came from."""

    spec: DecodingSpec
    params: dict = dataclasses.field(hash=False, compare=False)
    workdir: str = ""

    def check(self, d_model: int, vocab_size: int) -> "DecodingHead":
        if (self.spec.d_model, self.spec.vocab_size) != (d_model, vocab_size):
            raise DecodingPolicyError(
                f"the decoding policy {self.workdir!r} was trained on a model with d_model {self.spec.d_model} and "
                f"vocab_size {self.spec.vocab_size}, not {d_model} / {vocab_size}; train one on this checkpoint: "
                f"{TRAIN_COMMAND.format(self.workdir or '<workdir>')}")
        return self


def load(workdir: str) -> DecodingHead:
    """The newest step of a decoding-policy workdir (control/train_decoding.py writes it): its config (JSON) and
    the head parameters of its saved state. One error naming the training command when there is none."""
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not workdir or not os.path.isdir(root):
        raise DecodingPolicyError(f"config.engine.decoding_policy ({workdir!r}) holds no trained decoding policy; "
                                  f"train one with: {TRAIN_COMMAND.format(workdir or '<workdir>')}")
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(root, item_names=("state", "config", "meta"), options=options)
    try:
        if manager.latest_step() is None:
            raise DecodingPolicyError(f"config.engine.decoding_policy ({workdir!r}) holds no saved step; train "
                                      f"one with: {TRAIN_COMMAND.format(workdir)}")
        got = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            config=ocp.args.JsonRestore(), state=ocp.args.StandardRestore()))
    finally:
        manager.close()
    config = config_lib.from_json(json.dumps(got.config))
    spec = DecodingSpec.from_config(config)
    params = jax.tree.map(jnp.asarray, got.state["params"])
    expected = jax.eval_shape(lambda: init(spec, jax.random.key(0)))
    shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)  # noqa: E731
    if jax.tree.structure(expected) != jax.tree.structure(params) or shapes(expected) != shapes(params):
        raise DecodingPolicyError(f"{workdir!r} holds a decoding head of another layout (an older observation?); "
                                  f"retrain it with: {TRAIN_COMMAND.format(workdir)}")
    return DecodingHead(spec, params, workdir)


# ---- the engine's decode loop ----

class Modulated(NamedTuple):
    tokens_n: jax.Array  # [N] int32, pad after the stop token
    length: jax.Array  # [] tokens produced (stop token included)
    m_k: jax.Array  # [K] the modulation of each chunk (K = ceil(N / C); chunks not reached keep 0)
    knobs: Knobs  # each [K]
    cache: dict


@functools.partial(jax.jit, static_argnames=("args", "spec", "max_new_tokens"), donate_argnames=("cache",))
def decode(args: ModelArgs, spec: DecodingSpec, params, head_params, cache: dict, first_logits_v, hidden_td,
           prompt_t, kv_mask_bs, prompt_len, stop_v, pad_id, key, expert_bias_le=None, *,
           max_new_tokens: int) -> Modulated:
    """Tokens sampled from the prefilled `cache` (one row) with knobs the head sets every C tokens (Beta mean).

    `hidden_td` [T, D] and `prompt_t` [T] are the prefilled prompt's last-layer hidden states and (left-padded)
    tokens: the first observation's last chunk and window (pads count as tokens when T < window). Every token
    runs every layer (the head observes the final hidden states), stopping at a stop token."""
    C, W, N, V = spec.chunk, spec.window, max_new_tokens, args.vocab_size
    K = -(-N // C)
    prompt_t = jnp.concatenate([jnp.full((max(W - prompt_t.shape[0], 0),), pad_id, jnp.int32),
                                prompt_t.astype(jnp.int32)])
    P = prompt_t.shape[0]
    hist_s = jnp.concatenate([prompt_t, jnp.full((N,), pad_id, jnp.int32)])
    tail_td = hidden_td[-C:] if hidden_td.shape[0] >= C else jnp.pad(hidden_td, ((C - hidden_td.shape[0], 0), (0, 0)),
                                                                       mode="edge")
    hid_cd = tail_td.astype(jnp.float32)
    ent_c = normalised_entropy(logits_from_hidden(args, params, tail_td[None].astype(hidden_td.dtype))[0])
    kn0 = fixed_knobs(1, 1.0)
    m0 = jnp.zeros((K,), jnp.float32)
    state = (jnp.zeros((), jnp.int32), first_logits_v.astype(jnp.float32)[None], jnp.zeros((), bool), hist_s,
             hid_cd, ent_c, kn0, m0, Knobs(*(jnp.zeros((K,), a.dtype) for a in kn0)), cache)

    def cond(state):
        i, _, done, *_ = state
        return (i < N) & ~done

    def body(state):
        i, logits_1v, _, hist_s, hid_cd, ent_c, kn, m_k, kn_k, cache = state
        window_1w = jax.lax.dynamic_slice_in_dim(hist_s, P + i - W, W)[None]
        k = i // C
        out = apply(spec, head_params, features(spec, logits_1v, window_1w, hid_cd[None], ent_c[None], k / spec.chunks))
        m_1 = beta_mean(out["alpha"], out["beta"])
        start = i % C == 0
        kn = jax.tree.map(lambda new, old: jnp.where(start, new, old), knobs(spec, m_1), kn)
        m_k = jnp.where(start, m_k.at[k].set(m_1[0]), m_k)
        kn_k = Knobs(*(jnp.where(start, a.at[k].set(v[0]), a) for a, v in zip(kn_k, kn)))
        tok = jax.random.categorical(jax.random.fold_in(key, i), modulate(logits_1v, window_1w, kn)[0]).astype(
            jnp.int32)
        hist_s = jax.lax.dynamic_update_index_in_dim(hist_s, tok, P + i, 0)
        positions = jnp.reshape(prompt_len + i, (1, 1))
        logits_11v, aux = forward(args, params, tok[None, None], cache=cache, positions_bt=positions,
                                  kv_mask_bs=kv_mask_bs, expert_bias_le=expert_bias_le)
        nxt_1v = logits_11v[:, 0].astype(jnp.float32)
        hid_cd = jax.lax.dynamic_update_index_in_dim(hid_cd, aux["hidden"][0, 0].astype(jnp.float32), i % C, 0)
        ent_c = jax.lax.dynamic_update_index_in_dim(ent_c, normalised_entropy(nxt_1v)[0], i % C, 0)
        return i + 1, nxt_1v, stop_v[tok], hist_s, hid_cd, ent_c, kn, m_k, kn_k, aux["cache"]

    n, _, _, hist_s, _, _, _, m_k, kn_k, cache = jax.lax.while_loop(cond, body, state)
    tokens = jnp.where(jnp.arange(N) < n, hist_s[P:], pad_id)
    return Modulated(tokens, n, m_k, kn_k, cache)
