"""MMLU, TruthfulQA MC1/MC2, GSM8K and HaluEval, scored as lm-evaluation-harness scores them.

Each `score_*` takes an LM (`loglikelihood`, `generate`: see lm.py) and records from `formats.py`, and returns
{"metrics": {...}, "samples": [...]}: accuracy, hallucination rate (answered and wrong), abstention rate and ECE
(confidence = the model's normalised probability of its choice, or of its generated answer) plus each task's own
figures. A `verifier` (the critic: `score(question, answer, evidence) -> P(supported)` and a `threshold`) turns
low-support generated answers into abstentions and is HaluEval's detector; without one the LM judges.
"""

from __future__ import annotations

import decimal
import math
import re
from typing import Sequence

import numpy as np

from mantis_jax.eval import metrics as M
from mantis_jax.eval.lm import cut_at_stop

LETTERS = "ABCD"
# The 6-shot QA prompt of the TruthfulQA paper (used by lm-evaluation-harness for MC1/MC2).
TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain.")
GSM8K_STOP = ("Question:", "\n\n")
HALUEVAL_PROMPT = ("Knowledge: {knowledge}\nQuestion: {question}\nAnswer: {answer}\n"
                   "Is the answer supported by the knowledge? Answer Yes or No.\nJudgement:")


def _batched_choices(lm, items: list[tuple[str, Sequence[str]]]) -> list[np.ndarray]:
    """Log-likelihoods of every item's options in one `loglikelihood` call (the LM batches them)."""
    flat = [(ctx, o) for ctx, opts in items for o in opts]
    lls = [ll for ll, _ in lm.loglikelihood(flat)] if flat else []
    out, i = [], 0
    for _, opts in items:
        out.append(np.asarray(lls[i:i + len(opts)], np.float64))
        i += len(opts)
    return out


# ---- MMLU ------------------------------------------------------------------------------------------------------
def mmlu_question(rec: dict, with_answer: bool) -> str:
    text = rec["question"].strip() + "\n" + "".join(f"{L}. {c}\n" for L, c in zip(LETTERS, rec["choices"]))
    return text + "Answer:" + (f" {LETTERS[rec['answer']]}\n\n" if with_answer else "")


def mmlu_prompt(rec: dict, shots: Sequence[dict] = ()) -> str:
    subject = rec["subject"].replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return head + "".join(mmlu_question(s, True) for s in shots) + mmlu_question(rec, False)


def score_mmlu(lm, records: Sequence[dict], dev: dict[str, list[dict]] | None = None, k: int = 0) -> dict:
    """Accuracy by the log-likelihood of " A" .. " D" after the question (k dev examples of its subject first)."""
    dev = dev or {}
    items = [(mmlu_prompt(r, dev.get(r["subject"], [])[:k]), [f" {L}" for L in LETTERS]) for r in records]
    correct, conf, samples, per_subject = [], [], [], {}
    for r, ll in zip(records, _batched_choices(lm, items)):
        p = M.softmax(ll)
        pred = int(np.argmax(ll))
        correct.append(pred == r["answer"])
        conf.append(float(p[pred]))
        per_subject.setdefault(r["subject"], []).append(correct[-1])
        samples.append({"subject": r["subject"], "question": r["question"], "pred": LETTERS[pred],
                        "answer": LETTERS[r["answer"]], "loglik": ll.round(4).tolist()})
    metrics = M.summary(correct, conf)
    metrics["subjects"] = {s: M.mean(v) for s, v in sorted(per_subject.items())}
    return {"metrics": metrics, "samples": samples}


# ---- TruthfulQA ------------------------------------------------------------------------------------------------
def truthfulqa_context(question: str) -> str:
    return TRUTHFULQA_PREAMBLE + "\n\nQ: " + question + "\nA:"


def score_truthfulqa(lm, records: Sequence[dict]) -> dict:
    """MC1: the single true answer has the highest log-likelihood. MC2: the normalised probability mass of the
    true answers, exp(ll) summed over true / over all."""
    items = []
    for r in records:
        ctx = truthfulqa_context(r["question"])
        items += [(ctx, [" " + c for c in r["mc1"]["choices"]]), (ctx, [" " + c for c in r["mc2"]["choices"]])]
    lls = _batched_choices(lm, items)
    mc1, mc2, conf, samples = [], [], [], []
    for i, r in enumerate(records):
        ll1, ll2 = lls[2 * i], lls[2 * i + 1]
        pred = int(np.argmax(ll1))
        mc1.append(r["mc1"]["labels"][pred] == 1)
        conf.append(float(M.softmax(ll1)[pred]))
        p = np.exp(ll2 - ll2.max())
        true = np.asarray(r["mc2"]["labels"], bool)
        mc2.append(float(p[true].sum() / p.sum()))
        samples.append({"question": r["question"], "mc1_pred": r["mc1"]["choices"][pred], "mc1": mc1[-1],
                        "mc2": mc2[-1]})
    metrics = M.summary(mc1, conf)
    metrics.update(mc1=M.mean(mc1), mc2=M.mean(mc2))
    return {"metrics": metrics, "samples": samples}


# ---- GSM8K -----------------------------------------------------------------------------------------------------
_NUMBER = r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"


def normalize_number(text: str) -> str | None:
    """A number's canonical text: no $, no thousands commas, no trailing zeros ("1,000.50" -> "1000.5")."""
    cleaned = text.replace("$", "").replace(",", "").strip().rstrip(".")
    try:
        value = decimal.Decimal(cleaned)
    except decimal.InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a GSM8K-style solution: after "####", else after "the answer is", else the last
    number in the text (lm-evaluation-harness's strict and flexible extraction, in that order)."""
    text = text.replace("\u2212", "-")  # a typographic minus
    for pattern in (r"####\s*(" + _NUMBER + ")", r"[Tt]he (?:final )?answer is:?\s*(" + _NUMBER + ")"):
        m = re.search(pattern, text)
        if m:
            return normalize_number(m.group(1))
    found = re.findall(_NUMBER, text)
    return normalize_number(found[-1]) if found else None


def gsm8k_prompt(rec: dict, shots: Sequence[dict] = ()) -> str:
    return "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots) + (
        f"Question: {rec['question']}\nAnswer:")


def score_gsm8k(lm, records: Sequence[dict], shots: Sequence[dict] = (), *, max_new_tokens: int = 256,
                verifier=None) -> dict:
    """Exact match of the extracted number; confidence is the completion's probability under the LM, or the
    verifier's P(supported) (below its threshold the answer is an abstention, as is a completion with no number)."""
    prompts = [gsm8k_prompt(r, shots) for r in records]
    completions = [cut_at_stop(c, GSM8K_STOP) for c in lm.generate(prompts, max_new_tokens=max_new_tokens,
                                                                      stop=GSM8K_STOP)]
    answered = [(p, c) for p, c in zip(prompts, completions) if c.strip()]
    seq_ll = iter([ll for ll, _ in lm.loglikelihood(answered)] if answered else [])
    correct, conf, abstained, samples = [], [], [], []
    for r, c in zip(records, completions):
        gold, pred = extract_answer(r["answer"].split("####")[-1]), extract_answer(c)
        conf_lm = math.exp(next(seq_ll)) if c.strip() else 0.0
        abstain = False
        if verifier is not None:
            support = float(verifier.score(r["question"], c, []))
            conf_lm, abstain = support, support < verifier.threshold
        correct.append(pred is not None and pred == gold and not abstain)
        conf.append(conf_lm)
        abstained.append(abstain or pred is None)
        samples.append({"question": r["question"], "completion": c, "pred": pred, "answer": gold})
    return {"metrics": M.summary(correct, conf, abstained), "samples": samples}


# ---- HaluEval --------------------------------------------------------------------------------------------------
def score_halueval(lm, records: Sequence[dict], verifier=None) -> dict:
    """Hallucination detection: each record gives two judgments (its right answer: supported; its hallucinated
    answer: not). The detector's P(supported) is the verifier's score, else the LM's normalised probability of
    " Yes" against " No". Reports accuracy over judgments, ECE, and the share of hallucinated answers accepted."""
    pairs = [(r, a, label) for r in records for a, label in ((r["right_answer"], 1), (r["hallucinated_answer"], 0))]
    if verifier is not None:
        support = [float(verifier.score(r["question"], a, [r["knowledge"]])) for r, a, _ in pairs]
        threshold = float(verifier.threshold)
    else:
        items = [(HALUEVAL_PROMPT.format(knowledge=r["knowledge"], question=r["question"], answer=a),
                  [" Yes", " No"]) for r, a, _ in pairs]
        support = [float(M.softmax(ll)[0]) for ll in _batched_choices(lm, items)]
        threshold = 0.5
    correct, conf, samples = [], [], []
    for (r, a, label), s in zip(pairs, support):
        judged = int(s >= threshold)
        correct.append(judged == label)
        conf.append(s if judged else 1.0 - s)
        samples.append({"question": r["question"], "answer": a, "supported": bool(label), "p_supported": s})
    metrics = M.summary(correct, conf)
    accepted = [s >= threshold for (_, _, label), s in zip(pairs, support) if label == 0]
    metrics["hallucination_rate"] = M.mean(accepted)  # hallucinated answers the detector let through
    metrics["detector"] = "critic" if verifier is not None else "lm"
    return {"metrics": metrics, "samples": samples}

