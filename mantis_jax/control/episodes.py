"""Stage-3 episodes: one factworld question answered by the engine under the acting policy, and its outcome.

Episode `i` of a split is QA record i // 4 of kind KINDS[i % 4] (near, far, cross_session, unanswerable): the
engine starts with empty memory, reads the record's context (each session of a cross_session record as its own
session), and answers the question with the policy it is given. The outcome counts what ran from the trace:
  correct            exact match of the final answer ("unknown" is right on an unanswerable question)
  candidate_correct  exact match of the answer before the critic's verdict
  latency            reward.latency_fraction over model passes: the prefill, the second prefill (retrieved spans
                     placed, or an expert bias), the critic call; the full path has all three (the retrieval one
                     when memory has spans to place)
  compute            trace.flops / trace.flops_full (the full path: full depth, retrieval, a critic call)
Everything is deterministic given the policy's actions: the same episode index and actions give the same outcome.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from mantis_jax.control import reward
from mantis_jax.data import factworld
from mantis_jax.engine.policy import Decisions


@dataclasses.dataclass
class Episode:
    outcome: reward.Outcome
    decisions: Decisions
    info: dict  # kind, answer, candidate, record id, ...


class Environment(Protocol):
    def run(self, index: int, policy) -> Episode: ...


def record(world: factworld.World, split: str, index: int, distance: int) -> dict:
    kind = factworld.KINDS[index % len(factworld.KINDS)]
    return world.qa_record(split, kind, index // len(factworld.KINDS), distance=distance)


def outcome(answer, rec: dict, n_layers: int) -> reward.Outcome:
    tr = answer.trace
    critic_calls = int(tr.critic_score is not None)
    flops_full = tr.flops_full
    passes = tr.prefills + critic_calls
    full_passes = tr.full_prefills + 1  # and a critic call
    latency = reward.latency_fraction(tr.layers_per_token or [n_layers], n_layers, passes, full_passes)
    return reward.Outcome(correct=factworld.exact_match(answer.text, rec["answer"]),
                          candidate_correct=factworld.exact_match(tr.candidate, rec["answer"]),
                          confidence=tr.critic_score, latency=latency,
                          compute=min(tr.flops_total / flops_full, 1.0) if flops_full else 1.0)


class EngineEpisodes:
    """Episodes on one engine (its jitted steps compile once); memory is emptied before each episode."""

    def __init__(self, engine, split: str = "train", distance: int = 256):
        self.engine, self.split, self.distance = engine, split, distance
        self.world = factworld.world_from_config(engine.config)

    def run(self, index: int, policy) -> Episode:
        rec = record(self.world, self.split, index, self.distance)
        self.engine.reset()
        for s, text in enumerate(rec["sessions"] or [rec["context"]]):
            self.engine.read(text, session=f"s{s}")
        self.engine.policy = policy
        answer = self.engine.answer(rec["question"])
        decisions = Decisions(**{k: v for k, v in answer.trace.decisions.items() if k != "expert_bias"})
        return Episode(outcome(answer, rec, self.engine.args.n_layers), decisions,
                       {"id": rec["id"], "kind": rec["kind"], "answer": answer.text,
                        "candidate": answer.trace.candidate, "expected": rec["answer"],
                        "trace": answer.trace})
