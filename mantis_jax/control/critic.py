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
and, from the text alone (host side, the whole evidence, `grounding`; zeros with `critic.grounding` off):
  ground    [2]  whether an evidence sentence states the answer, and the largest share of the question's names
                 (engine/memory.key_words) among the sentences that state it: a value copied from a sentence
                 about another entity, or one stated nowhere, has no sentence naming the asked entity beside it
The head (LayerNorm on each hidden part → MLP → logit) is all that trains; `features` runs once per example, so
training the head is a loop over cached features. After training, P(supported) = sigmoid(a·logit + b) with (a, b)
fitted on the val split (Platt scaling, `fit_platt`), and the abstain threshold is chosen on val's engine answers
(`abstain_threshold`). `Critic` is the engine's critic (`score`, `threshold`).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mantis_jax.engine.memory import key_words
from mantis_jax.model import transformer
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.summary import flops_per_token

N_LM_FEATURES = 4
BUCKET = 64  # the engine's critic pads a call to a multiple of this (at most its window): one compile per bucket
N_GROUND_FEATURES = 2
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_TOKEN = re.compile(r"[A-Za-z0-9]+")


def window(config) -> int:
    """Tokens the critic reads: config.critic.window, at most the window the LM trained on (data.seq_len; its
    hidden states past that length are out of distribution)."""
    return int(min(config.critic.window, config.data.seq_len, config.model.max_seq_len))


def bucket_length(n_tokens: int, window: int) -> int:
    """The padded length of a critic call over `n_tokens`: the next multiple of BUCKET, at most `window`."""
    return int(min(window, max(BUCKET, -(-n_tokens // BUCKET) * BUCKET)))


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


def grounding(question: str, answer: str, evidence: list[str]) -> np.ndarray:
    """[stated, named] in [0, 1] for one example: `stated` = 1 when some evidence sentence contains the answer's
    words as a contiguous run (case-insensitive); `named` = the largest share of the question's names
    (`key_words`) contained in such a sentence (0 when none states the answer). E.g. Q "Where does Tavo live?",
    evidence "Tavo lives in Brisk. Mira lives in Corvel.": "Brisk" -> [1, 1], "Corvel" -> [1, 0], "Dunholt" ->
    [0, 0]. Sentences end at . ! ? followed by a space, or at a line break."""
    target = [w.lower() for w in _TOKEN.findall(answer)]
    names = key_words(question)
    stated, named = 0.0, 0.0
    if not target or not names:
        return np.zeros(N_GROUND_FEATURES, np.float32)
    n = len(target)
    for sentence in _SENTENCE_END.split(" ".join(evidence)):
        toks = [w.lower() for w in _TOKEN.findall(sentence)]
        if any(toks[i:i + n] == target for i in range(len(toks) - n + 1)):
            stated = 1.0
            named = max(named, len(names & set(toks)) / len(names))
    return np.array([stated, named], np.float32)


def grounding_batch(items, enabled: bool = True) -> np.ndarray:
    """[B, N_GROUND_FEATURES] of (question, answer, evidence) triples; zeros when `enabled` is off (the ablation:
    the LM's features alone)."""
    if not enabled or not items:
        return np.zeros((len(items), N_GROUND_FEATURES), np.float32)
    return np.stack([grounding(q, a, ev) for q, a, ev in items]).reshape(len(items), N_GROUND_FEATURES)


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
                             feats["lm"] / 10.0, feats["ground"]], axis=-1)
        x = nn.gelu(nn.Dense(self.d_hidden, name="hidden")(x))
        return nn.Dense(1, name="out")(x)[:, 0]  # [B] logit of P(supported)


def init_head(d_model: int, d_hidden: int, key: jax.Array) -> dict:
    dummy = {"h_answer": jnp.zeros((1, d_model)), "h_prompt": jnp.zeros((1, d_model)),
             "lm": jnp.zeros((1, N_LM_FEATURES)), "ground": jnp.zeros((1, N_GROUND_FEATURES))}
    return jax.jit(CriticHead(d_hidden).init)(key, dummy)["params"]


@functools.partial(jax.jit, static_argnums=0)
def head_logits(d_hidden: int, head_params, feats: dict) -> jax.Array:
    return CriticHead(d_hidden).apply({"params": head_params}, feats)


def head_probs(d_hidden: int, head_params, feats: dict, calibration=(1.0, 0.0)) -> np.ndarray:
    """P(supported) [B] = sigmoid(a·logit + b), (a, b) = `calibration`."""
    a, b = calibration
    return 0.5 * (1.0 + np.tanh(0.5 * (a * np.asarray(head_logits(d_hidden, head_params, feats), np.float64) + b)))


def fit_platt(logits, labels, l2: float = 1e-4, iters: int = 100) -> tuple[float, float]:
    """Platt scaling: (a, b) minimising the mean binary cross-entropy of sigmoid(a·logit + b) against the labels
    (+ l2·(a − 1)² + l2·b², which keeps the fit finite on separable data); Newton's method from (1, 0) with a
    backtracking line search (saturated logits make the Hessian tiny and a full step overshoot)."""
    z, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    x = np.stack([z, np.ones_like(z)], axis=1)  # [N, 2]
    prior = np.array([1.0, 0.0])

    def objective(w):
        u = x @ w
        return np.mean(np.logaddexp(0.0, u) - y * u) + l2 * np.sum((w - prior) ** 2)

    w = prior.copy()
    for _ in range(iters):
        p = 0.5 * (1.0 + np.tanh(0.5 * (x @ w)))  # sigmoid without overflow
        grad = x.T @ (p - y) / len(y) + 2 * l2 * (w - prior)
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(y) + 2 * l2 * np.eye(2)
        step, t, f = np.linalg.solve(hess, grad), 1.0, objective(w)
        while objective(w - t * step) > f - 1e-4 * t * grad @ step and t > 1e-10:
            t *= 0.5
        w = w - t * step
        if np.max(np.abs(t * step)) < 1e-10:
            break
    return float(w[0]), float(w[1])


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


def abstain_outcomes(probs, correct, answerable, abstained, threshold: float) -> tuple[float, float]:
    """(accuracy, hallucination rate) of answers verified at `threshold`: an answer with P(supported) >= threshold
    stands, one below becomes "unknown" (right exactly when the question is unanswerable); an answer that already
    was "unknown" (`abstained`) stays as it was. Hallucination: answered (not "unknown") and wrong, over all."""
    probs = np.asarray(probs, np.float64)
    correct, answerable, abstained = (np.asarray(v, bool) for v in (correct, answerable, abstained))
    accept = ~abstained & (probs >= threshold)
    right = np.where(abstained, correct, np.where(accept, correct, ~answerable))
    return float(np.mean(right)), float(np.mean(accept & ~correct))


def abstain_threshold(probs, correct, answerable, abstained=None, max_loss: float = 0.1) -> float:
    """The threshold with the lowest hallucination rate whose accuracy is at least (1 − max_loss) × the accuracy
    without a critic (every answer stands): among the answers' own scores, 0 (accept all) and just above the
    highest (refuse all). Ties: the higher accuracy, then the lower threshold. `probs` of every answer (those of
    already-"unknown" answers are ignored), `correct` whether each answer is right, `answerable` whether its
    question has an answer, `abstained` whether the answer already is "unknown" (default: none is)."""
    probs = np.asarray(probs, np.float64)
    abstained = np.zeros(len(probs), bool) if abstained is None else np.asarray(abstained, bool)
    base, _ = abstain_outcomes(probs, correct, answerable, abstained, 0.0)
    scores = probs[~abstained]
    if len(scores) == 0:
        return 0.5
    candidates = np.unique(np.concatenate([[0.0], scores, [np.nextafter(scores.max(), np.inf)]]))
    best = None
    for t in candidates:
        acc, hall = abstain_outcomes(probs, correct, answerable, abstained, float(t))
        if acc >= (1.0 - max_loss) * base - 1e-12 and (best is None or (hall, -acc) < best[:2]):
            best = (hall, -acc, float(t))
    return best[2]


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
    calibration: tuple[float, float] = (1.0, 0.0)  # Platt (a, b): P = sigmoid(a·logit + b)
    grounding: bool = True  # the text features (`grounding`); off = zeros, as the head was trained

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
                   window(config), int(config.critic.d_hidden), tuple(meta.get("calibration", (1.0, 0.0))),
                   bool(config.critic.get("grounding", True)))

    def score_many(self, items: list[tuple[str, str, list[str]]]) -> np.ndarray:
        encoded = [encode(self.tokenizer, q, a, ev, self.window) for q, a, ev in items]
        # padded to the bucket of the longest input, not the whole window: features never read the padding
        length = bucket_length(max(len(ids) for ids, _ in encoded), self.window)
        feats = features(self.args, self.lm_params, *map(jnp.asarray, batch_arrays(encoded, length,
                                                                                  self.tokenizer.pad_id)))
        # to the host: the LM's params may be sharded over a mesh (the demo's), the head's sit on one device
        feats = {**jax.tree.map(np.asarray, feats), "ground": grounding_batch(items, self.grounding)}
        return head_probs(self.d_hidden, self.head_params, feats, self.calibration)

    def score(self, question: str, answer: str, evidence: list[str]) -> float:
        return float(self.score_many([(question, answer, evidence)])[0])

    def flops(self, question: str = "", answer: str = "", evidence: list[str] | None = None) -> float:
        """FLOPs of one call on this input: a forward pass of the LM over its padded length (`bucket_length` of
        the encoded text; the whole window when no text is given); the head is negligible."""
        length = self.window
        if question or answer or evidence:
            ids, _ = encode(self.tokenizer, question, answer, evidence or [], self.window)
            length = bucket_length(len(ids), self.window)
        return flops_per_token(self.args, length, training=False)["active"] * length


def _head_shapes(config) -> dict:
    """The critic's saved state shapes: {"step", "params", "opt_state"} (see train_critic)."""
    from mantis_jax.control import train_critic  # noqa: PLC0415

    return jax.eval_shape(lambda k: train_critic.init_state(config, k), jax.random.key(0))
