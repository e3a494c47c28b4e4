"""The critic: P(supported) of a candidate answer, from a small head on the frozen LM's hidden states.

Input text, as the LM saw questions in training: ` {evidence spans joined}\nQ: {question}\nA: {answer}`, tokenised
as prefix + answer (byte-level BPE splits at the space before the answer, so this equals tokenising it whole),
truncated to the last `critic.window` tokens (the question and answer survive; the oldest evidence goes) and
right-padded. One frozen LM forward gives, per example, features that padding never touches (masked means, gathers
at real positions):
  h_answer  [D]  mean of the last layer's hidden states over the answer tokens
  h_prompt  [D]  hidden state at the last prompt token (where the LM starts answering)
  lm        [4]  mean and min log-probability the LM gives the answer tokens, its top-1 probability where the
                 answer starts, and the share of answer tokens that occur in the prompt (the copy signal)
The head (LayerNorm on each hidden part → MLP → logit) is all that trains; `features` runs once per example, so
training the head is a loop over cached features. `Critic` is the engine's critic (`score`, `threshold`).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mantis_jax.model import transformer
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.summary import flops_per_token

N_LM_FEATURES = 4


def window(config) -> int:
    """Tokens the critic reads: config.critic.window, at most the window the LM trained on (data.seq_len; its
    hidden states past that length are out of distribution)."""
    return int(min(config.critic.window, config.data.seq_len, config.model.max_seq_len))


def prompt_text(question: str, evidence: list[str]) -> str:
    return f" {' '.join(e.strip() for e in evidence)}\nQ: {question}\nA:"


def encode(tokenizer, question: str, answer: str, evidence: list[str], window: int) -> tuple[list[int], int]:
    """(ids, number of answer tokens at their end), truncated to the last `window` tokens."""
    prefix = tokenizer.encode(prompt_text(question, evidence), add_bos=True)
    answer_ids = tokenizer.encode(" " + answer.strip(), add_bos=False) or [tokenizer.pad_id]
    answer_ids = answer_ids[:window - 1]
    ids = (prefix + answer_ids)[-window:]
    return ids, len(answer_ids)


def batch_arrays(encoded: list[tuple[list[int], int]], window: int, pad_id: int):
    """Right-padded tokens [B, W] and masks: real tokens [B, W], answer tokens [B, W]."""
    B = len(encoded)
    tokens = np.full((B, window), pad_id, np.int32)
    mask = np.zeros((B, window), np.float32)
    answer = np.zeros((B, window), np.float32)
    for b, (ids, n_ans) in enumerate(encoded):
        tokens[b, :len(ids)] = ids
        mask[b, :len(ids)] = 1.0
        answer[b, len(ids) - n_ans:len(ids)] = 1.0
    return tokens, mask, answer


@functools.partial(jax.jit, static_argnums=0)
def features(args: ModelArgs, lm_params, tokens_bt, mask_bt, answer_bt) -> dict:
    """The frozen LM's features of a padded batch (see the module docstring)."""
    # right padding under causal attention: no real token sees a pad; pad rows are never read
    logits_btv, aux = transformer.forward(args, lm_params, tokens_bt)
    hidden_btd = aux["hidden"].astype(jnp.float32)
    h_answer = jnp.einsum("bt,btd->bd", answer_bt, hidden_btd) / jnp.maximum(answer_bt.sum(-1, keepdims=True), 1)
    first = jnp.argmax(answer_bt, axis=-1)  # [B] first answer position
    prompt_end = jnp.maximum(first - 1, 0)
    h_prompt = jnp.take_along_axis(hidden_btd, prompt_end[:, None, None], axis=1)[:, 0]
    logp_btv = jax.nn.log_softmax(logits_btv)
    # the token at t is predicted at t - 1
    next_lp_bt = jnp.take_along_axis(logp_btv[:, :-1], tokens_bt[:, 1:, None], axis=-1)[..., 0]
    ans_next = answer_bt[:, 1:]
    n_ans = jnp.maximum(ans_next.sum(-1), 1)
    lp_mean = jnp.sum(next_lp_bt * ans_next, -1) / n_ans
    lp_min = jnp.min(jnp.where(ans_next > 0, next_lp_bt, 0.0), -1)
    top1 = jnp.exp(jnp.max(jnp.take_along_axis(logp_btv, prompt_end[:, None, None], axis=1)[:, 0], -1))
    prompt_bt = mask_bt * (1.0 - answer_bt)
    same_btt = (tokens_bt[:, :, None] == tokens_bt[:, None, :]) & (prompt_bt[:, None, :] > 0)  # [B, T, T]
    overlap = jnp.sum(answer_bt * jnp.any(same_btt, -1), -1) / jnp.maximum(answer_bt.sum(-1), 1)
    return {"h_answer": h_answer, "h_prompt": h_prompt, "lm": jnp.stack([lp_mean, lp_min, top1, overlap], -1)}


class CriticHead(nn.Module):
    d_hidden: int = 128

    @nn.compact
    def __call__(self, feats: dict) -> jax.Array:
        x = jnp.concatenate([nn.LayerNorm(name="answer_norm")(feats["h_answer"]),
                             nn.LayerNorm(name="prompt_norm")(feats["h_prompt"]),
                             feats["lm"] / 10.0], axis=-1)
        x = nn.gelu(nn.Dense(self.d_hidden, name="hidden")(x))
        return nn.Dense(1, name="out")(x)[:, 0]  # [B] logit of P(supported)


def init_head(d_model: int, d_hidden: int, key: jax.Array) -> dict:
    dummy = {"h_answer": jnp.zeros((1, d_model)), "h_prompt": jnp.zeros((1, d_model)),
             "lm": jnp.zeros((1, N_LM_FEATURES))}
    return jax.jit(CriticHead(d_hidden).init)(key, dummy)["params"]


@functools.partial(jax.jit, static_argnums=0)
def head_probs(d_hidden: int, head_params, feats: dict) -> jax.Array:
    return jax.nn.sigmoid(CriticHead(d_hidden).apply({"params": head_params}, feats))


def bce_loss(d_hidden: int, head_params, feats: dict, labels_b) -> jax.Array:
    logits = CriticHead(d_hidden).apply({"params": head_params}, feats)
    return jnp.mean(jnp.maximum(logits, 0) - logits * labels_b + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def ece(probs, labels, n_bins: int = 10) -> float:
    """Expected calibration error: Σ_bins (n_bin / n)·|mean label − mean P(supported)| over equal-width bins."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
    bins = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for k in range(n_bins):
        sel = bins == k
        if sel.any():
            total += sel.mean() * abs(labels[sel].mean() - probs[sel].mean())
    return float(total)


def auroc(probs, labels) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties counted half."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels) > 0.5
    pos, neg = probs[labels], probs[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def best_threshold(probs, labels, max_rejected: float = 0.1) -> float:
    """The highest threshold that still accepts all but `max_rejected` of the supported answers: the critic's
    accuracy cost (right answers turned into "unknown") stays within that share, and as many unsupported answers
    as possible are refused."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels) > 0.5
    positives = np.sort(probs[labels])
    if len(positives) == 0:
        return 0.5
    return float(positives[int(np.floor(max_rejected * len(positives)))])


@dataclasses.dataclass
class Critic:
    """The engine's critic: `score(question, answer, evidence) -> P(supported)`; abstain below `threshold`."""

    args: ModelArgs
    lm_params: dict
    tokenizer: object
    head_params: dict
    threshold: float
    window: int
    d_hidden: int

    @classmethod
    def from_workdir(cls, workdir: str, *, lm=None) -> "Critic":
        """A trained critic; `lm=(config, tokenizer, params)` reuses an LM already loaded (the engine's)."""
        from mantis_jax.control import store  # noqa: PLC0415
        from mantis_jax.train.checkpoint import load_for_inference  # noqa: PLC0415

        step, config, meta = store.read_json(workdir, store.CRITIC_COMMAND)
        if lm is None:
            lm = load_for_inference(meta["checkpoint"])
        _, tokenizer, lm_params = lm
        shapes = store.abstract(_head_shapes(config))
        state = store.restore_state(workdir, shapes, step)
        return cls(ModelArgs.from_config(config), lm_params, tokenizer, state["params"], float(meta["threshold"]),
                   window(config), int(config.critic.d_hidden))

    def score_many(self, items: list[tuple[str, str, list[str]]]) -> np.ndarray:
        encoded = [encode(self.tokenizer, q, a, ev, self.window) for q, a, ev in items]
        feats = features(self.args, self.lm_params, *map(jnp.asarray, batch_arrays(encoded, self.window,
                                                                                  self.tokenizer.pad_id)))
        return np.asarray(head_probs(self.d_hidden, self.head_params, feats))

    def score(self, question: str, answer: str, evidence: list[str]) -> float:
        return float(self.score_many([(question, answer, evidence)])[0])

    def flops(self, question: str = "", answer: str = "", evidence: list[str] | None = None) -> float:
        """FLOPs of one call: a forward pass of the LM over the padded window, whatever the text (the head is
        negligible)."""
        del question, answer, evidence
        return flops_per_token(self.args, self.window, training=False)["active"] * self.window


def _head_shapes(config) -> dict:
    """The critic's saved state shapes: {"step", "params", "opt_state"} (see train_critic)."""
    from mantis_jax.control import train_critic  # noqa: PLC0415

    return jax.eval_shape(lambda k: train_critic.init_state(config, k), jax.random.key(0))
