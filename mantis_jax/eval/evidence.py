"""factworld's evidence report: does the system remember beyond its window, hallucinate less, at what compute?

For each kind of question (near: evidence in the prompt; far and cross_session: evidence more than a window before
the question; unanswerable: never stated, the right answer is "unknown") and each system, it reports exact match,
hallucination rate (an answer other than "unknown" that is wrong), abstention rate, ECE and FLOPs per question.
Systems: `attention_only` (the LM reads the prompt cut to the window it trained on, the engine's window; confidence
is the probability of its answer) and, when the checkpoint has the engine's parts, the engine under each policy
present (its trace gives FLOPs, the critic's score is its confidence). Records come from `factworld.eval_questions`
on the test split of the checkpoint's world (`--config.data.factworld_seed=N` evaluates on another).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from mantis_jax.data import factworld
from mantis_jax.eval import metrics as M
from mantis_jax.eval.lm import ModelLM
from mantis_jax.eval.qa import answer_questions
from mantis_jax.infer.runner import Generator, newline_ids
from mantis_jax.memory.encoder import forward_flops

MAX_NEW_TOKENS = 8
# A system answers records: (prediction, FLOPs, confidence in [0, 1]) per record.
System = Callable[[Sequence[dict]], list[tuple[str, float, float]]]


def window(config) -> int:
    """The tokens the model attends to at once: the engine's window (engine.window_tokens, else the training
    length data.seq_len), at most model.max_seq_len. Attention-only answers from this many tokens too."""
    return min(config.engine.window_tokens or config.data.seq_len, config.model.max_seq_len)


def records_by_kind(config, tokenizer, kinds: Sequence[str], n: int, distance: int) -> dict[str, list[dict]]:
    """`n` test records per kind; far / cross_session put `distance` tokens (of this tokenizer) of filler between
    the evidence and the question (0: the window, so the evidence is out of attention's reach)."""
    distance = distance or window(config)
    count = lambda text: len(tokenizer.encode(text))  # noqa: E731
    return {k: factworld.eval_questions("test", k, n, config=config, distance=distance, count_tokens=count)
            for k in kinds}


def attention_only(config, tokenizer, params, lm: ModelLM) -> System:
    """The LM alone: greedy answer from the window-truncated prompt; FLOPs of its prefill and decode."""
    args = lm.args
    span = window(config)
    room = span - MAX_NEW_TOKENS
    generator = Generator(args, params, tokenizer, batch_size=lm.batch_size, extra_stop_ids=newline_ids(tokenizer))

    def answer(records: Sequence[dict]) -> list[tuple[str, float, float]]:
        preds, _ = answer_questions(config, tokenizer, params, records, max_new_tokens=MAX_NEW_TOKENS,
                                    generator=generator, window=span)
        prompts = [factworld.prompt(r) for r in records]
        given = [(p, " " + a) for p, a in zip(prompts, preds) if a]  # the LM keeps the last `span` tokens too
        lls = iter([ll for ll, _ in lm.loglikelihood(given)] if given else [])
        out = []
        for p, a in zip(prompts, preds):
            n_prompt = min(room, len(tokenizer.encode(p, add_bos=True)))
            n_new = len(tokenizer.encode(" " + a)) + 1  # the answer and its stop token
            out.append((a, decode_flops(args, n_prompt, n_new, MAX_NEW_TOKENS), math.exp(next(lls)) if a else 0.0))
        return out

    return answer


def decode_flops(args, n_prompt: int, n_new: int, max_new: int) -> float:
    """FLOPs of a prefill of `n_prompt` tokens and `n_new - 1` cached decode steps on a cache of n_prompt +
    max_new slots, all layers: counted as the engine counts its own (memory/encoder.forward_flops)."""
    slots = n_prompt + max_new
    return (forward_flops(args, n_prompt, args.n_layers, n_prompt * slots)
            + max(0, n_new - 1) * forward_flops(args, 1, args.n_layers, slots))


def engine_system(engine, policy, lm: ModelLM) -> System:
    """The engine under `policy`: empty memory per record, the record's sessions read, then the question. FLOPs
    from its trace; confidence the critic's score when it verified, else the LM's probability of the candidate
    given the prompt the engine built."""

    def answer(records: Sequence[dict]) -> list[tuple[str, float, float]]:
        engine.policy = policy
        out = []
        for r in records:
            engine.forget()  # empty memory, no sessions; compiled functions stay
            for i, text in enumerate(r["sessions"] or [r["context"]]):
                engine.read(text, session=f"s{i}")
            a = engine.answer(r["question"])
            tr = a.trace
            if tr.critic_score is not None:
                conf = tr.critic_score if not tr.abstained else 1.0 - tr.critic_score
            else:
                conf = math.exp(lm.loglikelihood([(tr.prompt, " " + tr.candidate)])[0][0]) if tr.candidate else 0.0
            out.append((a.text, tr.flops_total, conf))
        return out

    return answer


def score_kind(records: Sequence[dict], answers: Sequence[tuple[str, float, float]]) -> tuple[dict, list[dict]]:
    correct, conf, abstained, samples = [], [], [], []
    for r, (pred, flops, c) in zip(records, answers):
        abstain = factworld.normalize_answer(pred) == factworld.UNKNOWN
        ok = factworld.exact_match(pred, r["answer"])
        correct.append(ok)
        abstained.append(abstain)
        conf.append(c)
        samples.append({"id": r["id"], "question": r["question"], "answer": r["answer"], "pred": pred,
                        "correct": ok, "flops": flops, "confidence": c})
    m = M.summary(correct, conf, abstained)
    m["em"] = m["accuracy"]
    m["flops_per_question"] = M.mean([s["flops"] for s in samples])
    return m, samples


def report(systems: dict[str, System], by_kind: dict[str, list[dict]]) -> dict:
    """{"systems": {name: {kind: metrics}}, "samples": {name: [...]}, "reliability": {name: bins}}."""
    out = {"systems": {}, "samples": {}, "reliability": {}}
    for name, system in systems.items():
        per_kind, all_samples = {}, []
        for kind, records in by_kind.items():
            m, samples = score_kind(records, system(records))
            per_kind[kind] = m
            all_samples += [dict(s, kind=kind) for s in samples]
        out["systems"][name] = per_kind
        out["samples"][name] = all_samples
        out["reliability"][name] = M.reliability_bins([s["confidence"] for s in all_samples],
                                                      [s["correct"] for s in all_samples])
    return out
