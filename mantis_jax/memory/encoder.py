"""The retrieval encoder: a text span → one unit vector, from the frozen LM's hidden states.

Tokens enter right-padded ([B, T] ids and a mask of real tokens); the frozen LM (`model.transformer.forward`)
gives the last layer's hidden states [B, T, D] (causal, so right padding never changes a real token's state).
Two encoders share that input:
  - `mean_pool`: the untrained baseline, the masked mean of the hidden states;
  - `RetrievalEncoder` (Stage 2, `python -m mantis_jax.memory.train`): the episodic SSM stack of
    `config.memory.episodic` (the same `MambaStack` the episodic memory writes with) runs over the hidden states,
    its outputs are mean-pooled over the real tokens and projected (D -> D, initialised to the identity).
Both are L2-normalised, exactly as the semantic index compares vectors (`memory.semantic.normalize`: inner
products are cosines). `encode_fn` returns one jitted function (LM + encoder) that the engine, Stage 2 and the
benchmarks call with host arrays; `flops_per_span` is its cost for the engine's compute accounting.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mantis_jax.model.args import ModelArgs
from mantis_jax.model.ssm import MambaStack, SSMArgs

_SENTENCE_RE = re.compile(r"[^.!?\n]+[.!?]*")


def split_sentences(text: str) -> list[str]:
    """Sentences of a text (ending at . ! ? or a newline), stripped; the engine's and Stage 2's span unit."""
    return [m.group(0).strip() for m in _SENTENCE_RE.finditer(text) if m.group(0).strip()]


def mean_pool(hidden_btd: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Masked mean over time -> [B, D] float32."""
    m = mask_bt.astype(jnp.float32)[..., None]
    return jnp.sum(hidden_btd.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def unit(x_bd: jax.Array) -> jax.Array:
    return x_bd / jnp.maximum(jnp.linalg.norm(x_bd, axis=-1, keepdims=True), 1e-6)


class RetrievalEncoder(nn.Module):
    """SSM stack over hidden states → masked mean → D×D projection (identity at init) → unit vector."""

    args: SSMArgs

    @nn.compact
    def __call__(self, hidden_btd, mask_bt):
        lengths_b = jnp.sum(mask_bt.astype(jnp.int32), axis=1)
        out_btd, _ = MambaStack(self.args, name="ssm")(hidden_btd.astype(jnp.float32), None, lengths_b)
        pooled_bd = mean_pool(out_btd, mask_bt)
        d = self.args.d_model
        proj = self.param("proj", lambda key, shape: jnp.eye(shape[0], dtype=jnp.float32), (d, d))
        return unit(pooled_bd @ proj)


def init_encoder(config, rng: jax.Array) -> dict:
    args = SSMArgs.from_config(config)
    hidden = jnp.zeros((1, 4, args.d_model), jnp.float32)
    return nn.unbox(jax.jit(RetrievalEncoder(args).init)(rng, hidden, jnp.ones((1, 4), bool)))["params"]


def lm_hidden(model_args: ModelArgs, lm_params, tokens_bt, mask_bt) -> jax.Array:
    """The frozen LM's last-layer hidden states [B, T, D] (no gradient flows into the LM)."""
    from mantis_jax.model.transformer import forward  # noqa: PLC0415

    _, aux = forward(model_args, jax.lax.stop_gradient(lm_params), tokens_bt)
    del mask_bt  # right padding: causal attention keeps real tokens' states independent of it
    return jax.lax.stop_gradient(aux["hidden"])


def encode_hidden(ssm_args: SSMArgs, enc_params, hidden_btd, mask_bt) -> jax.Array:
    """Unit vectors [B, D] from the LM's hidden states: the trained encoder when `enc_params` is given, else the
    mean-pooled baseline. Stage 2 with cached features (memory/pool.py) calls this on stored hidden states."""
    if enc_params is None:
        return unit(mean_pool(hidden_btd, mask_bt))
    return RetrievalEncoder(ssm_args).apply({"params": enc_params}, hidden_btd, mask_bt)


def embed(model_args: ModelArgs, ssm_args: SSMArgs, enc_params, lm_params, tokens_bt, mask_bt) -> jax.Array:
    """Unit vectors [B, D]: the trained encoder when `enc_params` is given, else the mean-pooled baseline."""
    return encode_hidden(ssm_args, enc_params, lm_hidden(model_args, lm_params, tokens_bt, mask_bt), mask_bt)


@functools.lru_cache(maxsize=8)
def hidden_fn(model_args: ModelArgs):
    """A jitted (lm_params, tokens [B, T], mask [B, T]) -> the frozen LM's hidden states [B, T, D]."""
    return jax.jit(lambda p, t, m: lm_hidden(model_args, p, t, m))


@functools.lru_cache(maxsize=8)
def encode_fn(model_args: ModelArgs, ssm_args: SSMArgs, trained: bool):
    """A jitted (enc_params, lm_params, tokens [B, T], mask [B, T]) -> unit vectors [B, D]."""
    if trained:
        return jax.jit(lambda e, p, t, m: embed(model_args, ssm_args, e, p, t, m))
    return jax.jit(lambda e, p, t, m: embed(model_args, ssm_args, None, p, t, m))


def right_pad(ids: list[list[int]], pad_id: int, multiple: int = 16, max_len: int | None = None):
    """Host side: ([B, T] int32 ids, [B, T] bool mask), T rounded up to `multiple` (one compile per bucket)."""
    longest = max(len(i) for i in ids)
    if max_len is not None:
        longest = min(longest, max_len)
    t = -(-longest // multiple) * multiple
    tokens = np.full((len(ids), t), pad_id, np.int32)
    mask = np.zeros((len(ids), t), bool)
    for r, row in enumerate(ids):
        row = row[:t]
        tokens[r, :len(row)] = row
        mask[r, :len(row)] = True
    return tokens, mask


def ssm_flops_per_token(args: SSMArgs) -> float:
    """Multiply-adds ×2 of one SSM block per token (projections, conv, scan) summed over the stack."""
    d, di, n, r, k = args.d_model, args.d_inner, args.d_state, args.rank, args.d_conv
    per_layer = 2 * (d * 2 * di + di * (r + 2 * n) + r * di + di * d + k * di) + 6 * di * n
    return float(args.n_layers * per_layer)


def flops_per_span(model_args: ModelArgs, ssm_args: SSMArgs, n_tokens: int, trained: bool) -> float:
    """FLOPs of encoding one span padded to `n_tokens`: the LM forward (its logits are computed too) plus, when
    trained, the SSM stack and the projection."""
    lm = forward_flops(model_args, n_tokens, model_args.n_layers, n_tokens * n_tokens)
    if not trained:
        return lm
    return lm + n_tokens * ssm_flops_per_token(ssm_args) + 2 * ssm_args.d_model ** 2


def forward_flops(args: ModelArgs, n_tokens: int, n_layers: float, score_pairs: float) -> float:
    """Matmul FLOPs of a forward over `n_tokens` positions through `n_layers` layers and the head, whose attention
    computed `score_pairs` (query, key) scores per layer: T x S for a call on an S-slot cache (every slot is
    scored, masked ones included), T x T for a cache-less call."""
    D, H, G, Dh, F = args.d_model, args.n_heads, args.n_kv_heads, args.head_dim, args.d_ff
    proj = 2 * (D * H * Dh + 2 * D * G * Dh + H * Dh * D)
    ffn = 2 * 3 * D * F * args.top_k + (2 * D * args.n_experts if args.is_moe else 0)
    scores = 2 * 2 * H * Dh * score_pairs  # q.k and p.v
    head = 2 * D * args.vocab_size
    return float(n_layers * (n_tokens * (proj + ffn) + scores) + n_tokens * head)
