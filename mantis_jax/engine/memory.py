"""The engine's two memory tiers behind one object: spans in, scored spans out.

`Memory.write(spans)` takes encoded spans (text, token range, unit vector, session) into the episodic store (the
recent tier, a bounded ring); entries it evicts go through consolidation (`memory.consolidation`) into semantic
memory (long-term: in-process FAISS by default, the gRPC service when `memory.semantic.address` is set). With
`memory.episodic.enabled` off, spans go straight to semantic memory; with `memory.semantic.enabled` off, evicted
spans are forgotten. `Memory.search(query, k, episodic=..., semantic=...)` asks the tiers the policy turned on and
returns the k best distinct spans, best first, each with its score (the cosine of unit vectors) and its tier.
`rerank(question, hits, k, weight)` is the hybrid step after a wider search (`engine.search_candidates`): the
dense score plus `weight` times a lexical match between the question's words and the span's (below).
Everything here is host side: it runs between device calls.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re

import ml_collections
import numpy as np

from mantis_jax.memory.consolidation import Consolidator
from mantis_jax.memory.episodic import EpisodicStore
from mantis_jax.memory.semantic import Payload, SemanticMemory, SemanticMemoryError

log = logging.getLogger(__name__)


_WORD = re.compile(r"[A-Za-z0-9]+")


def words(text: str) -> set[str]:
    """Lower-cased runs of letters and digits: "What is Tavo's job?" -> {what, is, tavo, s, job}."""
    return {w.lower() for w in _WORD.findall(text)}


def key_words(question: str) -> set[str]:
    """The question's names: its capitalised words after the first ("What is Tavo's job?" -> {tavo}); all its
    words when it has none (a question without a name still gets the idf-weighted overlap)."""
    found = _WORD.findall(question)
    names = {w.lower() for w in found[1:] if w[0].isupper()}
    return names or {w.lower() for w in found}


def lexical_scores(question: str, texts: list[str]) -> list[float]:
    """For each candidate text, the share of the question's key-word weight it contains, in [0, 1].

    Key words are the question's names (`key_words`: the entity a question asks about is what a dense match to
    "<another name> lives in <town>" loses). A key word's weight is its rarity among the candidates themselves,
    idf(w) = log(m / df(w)) with m candidates and df(w) of them containing it (no corpus statistics: the
    candidate set is the estimate): a word every candidate contains and a word none contains weigh nothing.
    All-zero when no key word separates the candidates."""
    q, sets = key_words(question), [words(t) for t in texts]
    m = len(sets)
    idf = {w: math.log(m / df) for w in q if (df := sum(w in s for s in sets))}
    total = sum(idf.values())
    if not total:
        return [0.0] * m
    return [sum(v for w, v in idf.items() if w in s) / total for s in sets]


def rerank(question: str, hits: list["Hit"], k: int, weight: float, min_share: float = 0.0) -> list["Hit"]:
    """The k best of `hits` by dense score + weight * lexical score (stable: equal totals keep the dense order).
    With `min_share` > 0, hits whose lexical score is below min_share x the best hit's are dropped first (an
    entity filter: when the asked name is among the candidates, sentences about other names do not reach the
    prompt). The hits keep their dense score (what `engine.min_score` and the policy's best_score read)."""
    if weight == 0.0 and min_share == 0.0:
        return hits[:k]
    lex = lexical_scores(question, [h.text for h in hits])
    floor = min_share * max(lex, default=0.0)
    keep = [i for i in range(len(hits)) if lex[i] >= floor]
    order = sorted(keep, key=lambda i: -(hits[i].score + weight * lex[i]))
    return [hits[i] for i in order[:k]]


class MemoryUnavailable(RuntimeError):
    """The semantic memory service cannot be reached; the message names the config key and the fix."""


@dataclasses.dataclass
class Span:
    text: str
    token_range: tuple[int, int]
    vector: np.ndarray  # [D] float32 unit vector
    session: str


@dataclasses.dataclass
class Hit:
    text: str
    score: float
    tier: str  # episodic | semantic
    session: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def connect_semantic(config: ml_collections.ConfigDict) -> SemanticMemory:
    """`config.memory.semantic` as a SemanticMemory; a service address is checked now (one clear error, or a
    logged fall-back to the in-process backend with `engine.semantic_fallback`)."""
    sem = config.memory.semantic
    memory = SemanticMemory.from_config(sem)
    if not sem.address:
        return memory
    try:
        memory.health()
        return memory
    except SemanticMemoryError as e:
        memory.close()
        message = (f"the semantic memory service at config.memory.semantic.address={sem.address!r} is unreachable "
                   f"({type(e).__name__}); start it with `python -m mantis_jax.memory.server --data-dir DIR "
                   f"--dim {sem.dim}` and pass its host:port, or set --config.memory.semantic.address='' for the "
                   "in-process backend")
        if not config.engine.semantic_fallback:
            raise MemoryUnavailable(message) from None
        log.warning("%s; falling back to the in-process backend (config.engine.semantic_fallback)", message)
        fallback = ml_collections.ConfigDict(sem.to_dict())
        fallback.address = ""
        return SemanticMemory.from_config(fallback)


class Memory:
    """Episodic store + consolidation + semantic memory, as `config.memory` enables them."""

    def __init__(self, config: ml_collections.ConfigDict, semantic: SemanticMemory | None = None):
        self.config = config
        ep, sem = config.memory.episodic, config.memory.semantic
        self.semantic: SemanticMemory | None = None
        self.consolidator: Consolidator | None = None
        if sem.enabled:
            self.semantic = semantic if semantic is not None else connect_semantic(config)
        self.episodic: EpisodicStore | None = None
        if ep.enabled:
            if self.semantic is not None:
                self.consolidator = Consolidator(self.semantic, config.memory.consolidation)
            on_evict = self.consolidator.on_evict if self.consolidator is not None else None
            self.episodic = EpisodicStore(ep.store_capacity, ep.d_model, on_evict)
        self._namespace = config.memory.consolidation.namespace

    # ------------------------------------------------------------------------------------------ writes
    def write(self, spans: list[Span]) -> None:
        if not spans:
            return
        if self.episodic is not None:
            self.episodic.add_many([dict(text=s.text, token_range=s.token_range, embedding=s.vector,
                                         source=s.session) for s in spans])
        elif self.semantic is not None:  # no recent tier: every span is long-term at once
            payloads = [Payload(text=s.text, source=s.session, namespace=self._namespace,
                                metadata={"token_range": list(s.token_range)}) for s in spans]
            self.semantic.add(np.stack([s.vector for s in spans]), payloads)

    def settle(self) -> None:
        """Waits until every evicted span is stored in semantic memory (before a search)."""
        if self.consolidator is not None:
            self.consolidator.flush()

    # ------------------------------------------------------------------------------------------- reads
    def counts(self) -> dict[str, int]:
        return {"episodic": len(self.episodic) if self.episodic is not None else 0,
                "semantic": int(self.semantic.stats()["count"]) if self.semantic is not None else 0}

    def fill(self) -> tuple[float, float]:
        """(episodic items / store capacity, semantic items / engine.semantic_capacity), each in [0, 1]."""
        c = self.counts()
        cap = self.config.memory.episodic.store_capacity
        return min(c["episodic"] / cap, 1.0), min(c["semantic"] / self.config.engine.semantic_capacity, 1.0)

    def search(self, query_d: np.ndarray, k: int, *, episodic: bool = True, semantic: bool = True) -> list[Hit]:
        """The k best distinct spans (by text) over the enabled tiers the caller asks, best first."""
        query_d = np.asarray(query_d, np.float32)
        hits: list[Hit] = []
        if episodic and self.episodic is not None and len(self.episodic):
            hits += [Hit(e.text, s, "episodic", e.source) for s, e in self.episodic.search(query_d, k)]
        if semantic and self.semantic is not None:
            self.settle()
            if self.semantic.stats()["count"]:
                res = self.semantic.search(query_d[None], k, namespace=self._namespace)
                hits += [Hit(p.text, float(s), "semantic", p.source)
                         for i, s, p in zip(res.ids[0], res.scores[0], res.payloads[0]) if i >= 0 and p is not None]
        best: dict[str, Hit] = {}
        for h in sorted(hits, key=lambda h: -h.score):
            best.setdefault(h.text, h)
        return list(best.values())[:k]

    def close(self) -> None:
        if self.consolidator is not None:
            self.consolidator.close()
        if self.semantic is not None:
            self.semantic.close()
