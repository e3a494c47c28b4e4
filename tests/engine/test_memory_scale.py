"""The memory-at-scale benchmark's path (benchmarks/memory_scale.py) on a tiny instance: distractor sentences name
no test entity, the vector cache resumes and refuses another encoder's vectors, and the real service (ivfpq,
trained) filled with a few thousand encoded distractors returns what a brute-force search over the same vectors
returns: the evidence for a question whose encoding is known, with the timing fields of the trace filled."""

import importlib.util
import os
import re

import ml_collections
import numpy as np
import pytest

from mantis_jax.data import factworld
from mantis_jax.engine.core import Engine
from mantis_jax.engine.memory import Memory
from mantis_jax.memory.semantic import SemanticMemory


def _benchmark():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "memory_scale.py")
    spec = importlib.util.spec_from_file_location("memory_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ms = _benchmark()
TEMPLATES = [re.compile("^" + re.escape(t).replace(r"\{n\}", r"(?P<n>[A-Z][a-z]+)").replace(r"\{v\}", "(.+)") + "$")
             for templates, _ in factworld.ATTRIBUTES.values() for t in templates]


def _subject(sentence: str) -> str:
    for t in TEMPLATES:
        m = t.match(sentence)
        if m:
            return m.group("n")
    raise AssertionError(f"not a factworld fact sentence: {sentence!r}")


def test_distractors_are_fact_sentences_about_other_entities():
    world = factworld.World(0, 300)
    texts = ms.distractor_sentences(world, 6000)  # more than the 270 train/val entities state: other seeds too
    assert len(texts) == len(set(texts)) == 6000
    assert ms.distractor_sentences(world, 100) == texts[:100]  # a fixed order: a cached prefix stays valid
    names = {s: {world.name(world.entity_index(s, j)) for j in range(world.split_size(s))} for s in factworld.SPLITS}
    every = set().union(*names.values())
    subjects = [_subject(t) for t in texts]
    assert not set(subjects) & names["test"]
    words = {w for t in texts for w in re.findall(r"[A-Z][a-z]+", t)}
    assert not words & names["test"]  # not as a friend either
    own = sum(s in names["train"] | names["val"] for s in subjects)
    assert 0 < own < len(texts) and all(s not in every for s in subjects[own:])  # own world first, then others


def test_vector_cache_resumes_and_refuses_another_encoder(tmp_path):
    key = {"stage2": "a", "dim": 4}
    cache = ms.VectorCache(str(tmp_path), 4, key)
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    cache.append(rows[:2])
    cache.append(rows[2:])
    with open(cache.path, "ab") as f:
        f.write(b"\0" * 6)  # a torn chunk
    again = ms.VectorCache(str(tmp_path), 4, key)
    assert again.count == 3
    np.testing.assert_array_equal(again.read(3), rows)
    with pytest.raises(ValueError, match="another --workdir"):
        ms.VectorCache(str(tmp_path), 4, {"stage2": "b", "dim": 4})


@pytest.fixture(scope="module")
def scaled(stage1, tmp_path_factory):
    """(engine, service client, distractor texts, their vectors): 3000 distractors in a trained ivfpq service."""
    workdir, _ = stage1
    engine = Engine.from_workdir(workdir, overrides={"memory.episodic.enabled": False})
    root = str(tmp_path_factory.mktemp("scale"))
    texts = ms.distractor_sentences(factworld.world_from_config(engine.config), 3000)
    cache = ms.VectorCache(root, engine.config.memory.semantic.dim, {"test": 1})
    assert ms.fill_cache(cache, texts, ms.bulk_encoder(engine), minutes=5, out=lambda *_: None) == 3000
    vectors = np.array(cache.read(3000))
    np.testing.assert_allclose(vectors[:8], engine.encode(texts[:8], cache=False)[0], atol=1e-5)
    sem = ml_collections.ConfigDict(engine.config.memory.semantic.to_dict())
    sem.nlist, sem.pq_m, sem.pq_nbits, sem.nprobe, sem.train_min, sem.train_sample = 16, 8, 4, 16, 1000, 2000
    proc, address = ms.start_service(os.path.join(root, "service"), sem.dim, ms.service_flags(sem))
    memory = SemanticMemory.connect(address, token="")
    try:
        ms.fill_service(memory, texts, vectors, engine.config.memory.consolidation.namespace, out=lambda *_: None)
        yield engine, memory, texts, vectors
    finally:
        engine.close()
        memory.close()
        ms.stop_service(proc)


def test_the_service_returns_the_evidence_brute_force_finds(scaled):
    engine, memory, texts, vectors = scaled
    config, namespace = engine.config, engine.config.memory.consolidation.namespace
    stats = memory.stats()
    assert stats["index"] == "ivfpq" and stats["trained"] and stats["count"] == 3000
    record = factworld.eval_questions("test", "far", 1, config=config, distance=64)[0]
    evidence = ms.evidence_of(record)
    # A question whose encoding is known: the evidence sentence itself (cosine 1 with its span).
    rigged = dict(record, question=evidence)
    pred, trace, spans = ms.ask(engine, Memory(config, semantic=ms.Scoped(memory)), rigged)
    assert trace["retrieved"][0]["text"] == evidence and trace["retrieved"][0]["score"] > 0.999
    assert memory.stats()["count"] == 3000 + len(spans)  # the document's spans are in the service
    own, _ = engine.encode(spans)
    q, _ = engine.encode([evidence], cache=False)
    row = ms.index_recall(memory, q[0], own, spans, evidence, vectors, 3, namespace, prefixes=(0, 1000, 3000))
    assert row["exact"] and row["index"] and row["exact_at"] == {0: True, 1000: True, 3000: True}
    # The real question: the service's top 3 are brute force's top 3 (every list probed, exact re-ranking).
    q, _ = engine.encode([record["question"]], cache=False)
    real = ms.index_recall(memory, q[0], own, spans, evidence, vectors, 3, namespace, prefixes=())
    scores = ms.exact_scores(q[0], own, vectors)
    top = ms.exact_top_k(scores, 3)
    assert scores[top[0]] == scores.max() and scores[top[0]] >= scores[top[1]] >= scores[top[2]]
    assert real["overlap"] == 1.0 and real["exact"] == real["index"]
    out = ms.summarize([rigged], [pred], [trace], [row])
    for field in ("encode_ms", "search_ms", "retrieval_ms", "rpc_search_ms"):
        assert out[field]["median"] > 0 and out[field]["p95"] >= out[field]["median"]
    assert out["retrieval_ms"]["median"] == pytest.approx(out["encode_ms"]["median"] + out["search_ms"]["median"])
    assert out["evidence_in_prompt"] == 1.0 and out["recall_index"] == 1.0
    engine.forget(Memory(config, semantic=ms.Scoped(memory)))  # the question's spans leave, the distractors stay
    assert memory.stats()["count"] == 3000
    res = memory.search(q, 5, namespace=namespace)
    assert all(p.source == "distractor" for p in res.payloads[0] if p is not None)
