"""Stage-3 episodes: one factworld question answered by the engine under the acting policy, and its outcome.

Episode `i` of a split is QA record i // 4 of kind KINDS[i % 4] (near, far, cross_session, unanswerable): the
engine starts with empty memory, reads the record's context (each session of a cross_session record as its own
session), and answers the question with the policy it is given. The outcome counts what ran from the trace:
  correct            exact match of the final answer ("unknown" is right on an unanswerable question)
  candidate_correct  exact match of the answer before the critic's verdict
  latency            reward.latency_fraction over model passes: the prefill, the retrieval prefill when spans were
                     placed, the critic call; the full path has all three (the retrieval one when memory held spans)
  compute            trace.flops / the full path's (trace.flops_full, plus a critic call when none ran)
Everything is deterministic given the policy's actions: the same episode index and actions give the same outcome.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from mantis_jax.control import reward
from mantis_jax.data import factworld
from mantis_jax.engine.memory import Memory
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


def outcome(answer, rec: dict, n_layers: int, critic_flops: float = 0.0) -> reward.Outcome:
    """`critic_flops`: one critic call, part of the full path even when this query did not verify (the engine's
    flops_full counts the critic only when it ran)."""
    tr = answer.trace
    critic_calls = int(tr.critic_score is not None)
    flops_full = tr.flops_full + (critic_flops if not critic_calls else 0.0)
    passes = 1 + int(bool(tr.retrieved)) + critic_calls
    full_passes = 1 + int(sum(tr.memory.values()) > 0) + 1
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

    def _fresh_memory(self) -> None:
        e = self.engine
        e.memory.close()
        e.memory = Memory(e.config)
        e.sessions.clear()
        e._offsets.clear()  # noqa: SLF001 (the engine has no reset yet; these are its per-session read offsets)
        e.session = "default"

    def run(self, index: int, policy) -> Episode:
        rec = record(self.world, self.split, index, self.distance)
        self._fresh_memory()
        for s, text in enumerate(rec["sessions"] or [rec["context"]]):
            self.engine.read(text, session=f"s{s}")
        self.engine.policy = policy
        answer = self.engine.answer(rec["question"])
        decisions = Decisions(**{k: v for k, v in answer.trace.decisions.items() if k != "expert_bias"})
        critic = self.engine.critic
        critic_flops = float(critic.flops()) if critic is not None and hasattr(critic, "flops") else 0.0
        return Episode(outcome(answer, rec, self.engine.args.n_layers, critic_flops), decisions,
                       {"id": rec["id"], "kind": rec["kind"], "answer": answer.text,
                        "candidate": answer.trace.candidate, "expected": rec["answer"],
                        "trace": answer.trace})
