"""Critic training examples from factworld: (question, candidate answer, evidence, label = supported).

Positives are correct answers with their evidence. Negatives are answers the evidence does not support:
  wrong_value       a value of the right type drawn from the attribute's vocabulary (names for `friend`)
  context_value     a value of the right type stated in the context for another entity (a copy mistake)
  unanswerable      a value given to a question whose attribute is never stated
  evidence_removed  the correct value, with the sentence that states it cut from the context
  own               the model's own greedy answers (right ones are positives, wrong ones negatives; "unknown"
                    answers are left out: they are abstentions, not claims)
  engine            the engine's own answers to Stage-3 episodes (near, far, cross_session, unanswerable; always
                    retrieve), with what it read as evidence (the retrieved spans and the window): the answers,
                    evidence and mistakes the critic judges when it is deployed (`engine_answers`)
A third of the answerable examples use far contexts (the evidence, then filler), two thirds near ones. Every
example is a pure function of (world, split, index), apart from the model's answers.
"""

from __future__ import annotations

import random
import re
from typing import Callable

from mantis_jax.data import factworld as fw
from mantis_jax.engine.policy import FixedPolicy

NEGATIVE_KINDS = ("wrong_value", "context_value", "unanswerable", "evidence_removed")
FAR_DISTANCE = 48  # filler tokens after the evidence in the far-context examples


def _example(record: dict, answer: str, evidence: list[str], label: bool, kind: str,
             answerable: bool | None = None) -> dict:
    return {"question": record["question"], "answer": answer, "evidence": evidence, "label": float(label),
            "kind": kind, "answerable": record["answerable"] if answerable is None else answerable,
            "id": record["id"]}


def _vocab(world: fw.World, attribute: str, r: random.Random) -> list[str]:
    if attribute in fw.VOCABS:
        return list(fw.VOCABS[attribute])
    return [world.name(r.randrange(world.n_entities)) for _ in range(16)]  # friend: other entities' names


def wrong_value(world: fw.World, record: dict, r: random.Random) -> str:
    return r.choice([v for v in _vocab(world, record["attribute"], r) if v != record["answer"]])


def context_values(record: dict) -> list[str]:
    """Values of the record's attribute type that the context states (for anyone), other than the answer."""
    if record["attribute"] not in fw.VOCABS:
        return []
    return [v for v in fw.VOCABS[record["attribute"]]
            if v != record["answer"] and re.search(rf"\b{re.escape(v)}\b", record["context"])]


def without_evidence(record: dict) -> str:
    start, end = record["evidence_span"]
    return (record["context"][:start] + record["context"][end:]).replace("  ", " ").strip()


def examples(world: fw.World, split: str, n: int, *, seed: int = 0,
             answer_fn: Callable[[list[dict]], list[str]] | None = None, own_share: float = 0.25) -> list[dict]:
    """`n` examples of a split, about half of them supported. With `answer_fn` (records -> the model's answers),
    about `own_share` of them are the model's own answers to near and unanswerable questions."""
    r = random.Random(f"critic-{seed}-{split}")
    out: list[dict] = []
    if answer_fn is not None and own_share > 0:
        n_own = int(n * own_share)
        records = [world.qa_record(split, "near" if i % 4 else "unanswerable", 10_000 + i) for i in range(n_own)]
        for rec, pred in zip(records, answer_fn(records)):
            pred = fw.normalize_answer(pred)
            if pred and pred != fw.UNKNOWN:
                out.append(_example(rec, pred, [rec["context"]], fw.exact_match(pred, rec["answer"]), "own"))
    i = 0
    while len(out) < n:
        kind = "supported" if i % 2 == 0 else NEGATIVE_KINDS[(i // 2) % len(NEGATIVE_KINDS)]
        if kind == "unanswerable":
            rec = world.qa_record(split, "unanswerable", i)
            out.append(_example(rec, wrong_value(world, rec, r), [rec["context"]], False, kind))
        else:
            # near contexts, and far ones (the evidence, then filler: what a prompt with a retrieved span looks like)
            rec = world.qa_record(split, "far" if (i // 2) % 3 == 2 else "near", i, distance=FAR_DISTANCE)
            if kind == "supported":
                out.append(_example(rec, rec["answer"], [rec["context"]], True, kind))
            elif kind == "evidence_removed":
                out.append(_example(rec, rec["answer"], [without_evidence(rec)], False, kind, answerable=False))
            elif kind == "context_value" and context_values(rec):
                out.append(_example(rec, r.choice(context_values(rec)), [rec["context"]], False, kind))
            else:
                out.append(_example(rec, wrong_value(world, rec, r), [rec["context"]], False, "wrong_value"))
        i += 1
    r.shuffle(out)
    return out[:n]


def engine_answers(env, n: int) -> list[dict]:
    """The engine's answers to episodes 0 .. n-1 of `env` (control/episodes.EngineEpisodes: its split) under the
    always-retrieve, never-verify policy: examples of kind "engine" (label = the answer is right), each also with
    `abstained` (the engine itself said "unknown", or nothing) and `episode_kind`."""
    policy = FixedPolicy(retrieve="always", exit_threshold=1.0, verify=False)
    out = []
    for i in range(n):
        ep = env.run(i, policy)
        tr = ep.info["trace"]
        answer = fw.normalize_answer(tr.candidate)
        record = {"question": tr.question, "answerable": ep.info["kind"] != "unanswerable", "id": ep.info["id"]}
        example = _example(record, tr.candidate, [tr.prompt.rsplit("\nQ:", 1)[0].strip()],
                           fw.exact_match(tr.candidate, ep.info["expected"]), "engine")
        out.append(dict(example, abstained=answer in ("", fw.UNKNOWN), episode_kind=ep.info["kind"]))
    return out
