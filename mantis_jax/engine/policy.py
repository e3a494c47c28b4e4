"""The engine's decision interface: what a policy sees (`StateSummary`) and what it sets (`Decisions`).

At prefill the engine computes a `StateSummary` of the query (jnp arrays, batchable: a leading batch axis on every
field works the same) and asks a policy `decide(summary) -> Decisions`. A policy is any object with that method:
`FixedPolicy` reads the explicit settings in `config.engine`; the learned meta-controller (mantis_jax.control)
implements the same method, deterministic at inference. A critic is any object with
`score(question, answer, evidence) -> float` (P(supported)) and a `threshold`; the engine calls it only when
`Decisions.verify` is true and answers "unknown" below the threshold.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import flax.struct
import jax.numpy as jnp
import ml_collections
import numpy as np

# The order of `StateSummary.features()`: pooled [D] first, then these scalars, one each.
SCALAR_FEATURES = ("entropy", "context_fill", "episodic_fill", "semantic_fill", "best_score", "exit_confidence")


@flax.struct.dataclass
class StateSummary:
    """What the engine knows about a query at prefill, before any decision.

    pooled [D]           mean of the last layer's hidden states over the prompt (padding masked)
    entropy []           entropy of the next-token distribution at the last prompt position / log V, in [0, 1]
    context_fill []      prompt tokens / window
    episodic_fill []     episodic store items / capacity, in [0, 1]
    semantic_fill []     semantic memory items / capacity, in [0, 1]
    best_score []        best retrieval score of the question's encoding against memory (0 when memory is empty)
    exit_confidence []   top-1 probability at the first exit layer (`model.min_exit_layer`), last prompt position
    """

    pooled: jnp.ndarray
    entropy: jnp.ndarray
    context_fill: jnp.ndarray
    episodic_fill: jnp.ndarray
    semantic_fill: jnp.ndarray
    best_score: jnp.ndarray
    exit_confidence: jnp.ndarray

    def features(self) -> jnp.ndarray:
        """A flat float32 vector for a policy network: pooled [D], then SCALAR_FEATURES in order -> [D + 6]
        (with a leading batch axis [B, D + 6] when the fields carry one)."""
        scalars = [jnp.asarray(getattr(self, name), jnp.float32)[..., None] for name in SCALAR_FEATURES]
        return jnp.concatenate([jnp.asarray(self.pooled, jnp.float32)] + scalars, axis=-1)

    @staticmethod
    def feature_dim(d_model: int) -> int:
        return d_model + len(SCALAR_FEATURES)


@dataclasses.dataclass
class Decisions:
    """The five gates for one query.

    exit_threshold   per-token confidence at which decoding stops running layers (1.0 = full depth)
    episodic         read the episodic store (recent spans of this session)
    semantic         search the semantic memory (consolidated spans of every session)
    expert_bias      [L, E] added to each layer's router logits; None = zeros
    verify           run the critic on the answer and abstain below its threshold
    probs            each gate's probability, for the trace (empty for fixed policies)
    """

    exit_threshold: float = 1.0
    episodic: bool = True
    semantic: bool = True
    expert_bias: np.ndarray | None = None
    verify: bool = False
    probs: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"exit_threshold": float(self.exit_threshold), "episodic": bool(self.episodic),
                "semantic": bool(self.semantic), "verify": bool(self.verify),
                "expert_bias": None if self.expert_bias is None else np.asarray(self.expert_bias).tolist(),
                "probs": {k: float(v) for k, v in self.probs.items()}}


@runtime_checkable
class Policy(Protocol):
    def decide(self, summary: StateSummary) -> Decisions: ...


@runtime_checkable
class Critic(Protocol):
    threshold: float

    def score(self, question: str, answer: str, evidence: list[str]) -> float: ...


@dataclasses.dataclass
class FixedPolicy:
    """The explicit settings of `config.engine`: the same decisions for every query."""

    retrieve: str = "always"  # always | never
    exit_threshold: float = 1.0
    verify: bool = False

    def __post_init__(self):
        if self.retrieve not in ("always", "never"):
            raise ValueError(f"config.engine.retrieve ({self.retrieve!r}) must be 'always' or 'never'")
        if not 0.0 < self.exit_threshold <= 1.0:
            raise ValueError(f"config.engine.exit_threshold ({self.exit_threshold}) must be in (0, 1]")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> FixedPolicy:
        e = config.engine
        return cls(retrieve=e.retrieve, exit_threshold=float(e.exit_threshold), verify=bool(e.verify))

    def decide(self, summary: StateSummary) -> Decisions:
        del summary  # a fixed policy does not look at the query
        on = self.retrieve == "always"
        return Decisions(exit_threshold=self.exit_threshold, episodic=on, semantic=on, expert_bias=None,
                         verify=self.verify, probs={})
