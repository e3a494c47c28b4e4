"""Consolidation of evicted episodic entries into semantic memory: dedup with provenance, the importance
formula against a hand computation, the bounded background queue, retries, crash recovery via the spool (a
process killed with SIGKILL mid-consolidation loses nothing acknowledged), and where the spool lives by default."""

import dataclasses
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from mantis_jax.config import default_config
from mantis_jax.memory.consolidation import Consolidator, decayed, entry_key, spool_dir_for
from mantis_jax.memory.semantic import SemanticMemory, Unavailable

D = 16


@dataclasses.dataclass
class Entry:  # what the episodic store hands to on_evict (duck-typed: no import of episodic.py)
    text: str
    token_range: tuple
    embedding: np.ndarray
    timestamp: int
    importance: float = 0.5
    uncertainty: float = 0.0
    source: str = "episodic"


def config(**overrides):
    c = default_config().memory.consolidation
    c.update(overrides)
    return c


def basis(i, scale=1.0):
    v = np.zeros(D, np.float32)
    v[i] = scale
    return v


def facts(mem):
    """{text: payload} of every stored fact (a search over the whole tiny store)."""
    n = mem.stats()["count"]
    r = mem.search(np.ones((1, D), np.float32), max(n, 1))
    return {p.text: p for p in r.payloads[0] if p is not None}


def test_dedup_merges_near_duplicates_and_keeps_provenance():
    mem = SemanticMemory.in_process(D)
    cons = Consolidator(mem, config(dedup_threshold=0.95), start=False)
    near = basis(0) + 0.05 * basis(1)  # cosine 0.9988 to basis(0)
    out = cons.consolidate([Entry("Paris is in France", (0, 5), basis(0), 10),
                            Entry("paris is in france.", (40, 45), near, 11, source="chat"),
                            Entry("The Nile is long", (5, 9), basis(2), 12)])
    assert out == {"stored": 2, "merged": 1, "dropped": 0}
    stored = facts(mem)
    assert set(stored) == {"Paris is in France", "The Nile is long"}
    prov = stored["Paris is in France"].metadata["provenance"]
    assert [(p["text"], p["token_range"], p["source"]) for p in prov] == [
        ("Paris is in France", [0, 5], "episodic"), ("paris is in france.", [40, 45], "chat")]
    # Later, a near-duplicate of a stored fact merges into it; re-consolidating an entry is idempotent.
    later = Entry("Paris: in France", (90, 94), basis(0) + 0.02 * basis(3), 500)
    assert cons.consolidate([later]) == {"stored": 0, "merged": 1, "dropped": 0}
    assert cons.consolidate([later])["merged"] == 1
    stored = facts(mem)
    assert mem.stats()["count"] == 2
    assert [p["text"] for p in stored["Paris is in France"].metadata["provenance"]] == [
        "Paris is in France", "paris is in france.", "Paris: in France"]
    assert stored["Paris is in France"].timestamp == 500.0
    vec, _ = mem.get([entry_key(Entry("Paris is in France", (0, 5), basis(0), 10))])
    np.testing.assert_allclose(vec[0], basis(0))  # the fact keeps its own vector


def test_importance_formula_and_min_importance():
    mem = SemanticMemory.in_process(D)
    cfg = config(recency_weight=0.4, novelty_weight=0.4, uncertainty_weight=0.2, decay_half_life=100.0,
                 min_importance=0.3, dedup_threshold=0.95)
    now = [1000.0]
    cons = Consolidator(mem, cfg, start=False, clock=lambda: now[0])
    cons.consolidate([Entry("anchor", (0, 1), basis(0), 1000)])  # empty memory: novelty 1, recency 1
    assert facts(mem)["anchor"].importance == pytest.approx(0.4 + 0.4)
    v = basis(0) + basis(1)  # cosine 1/sqrt(2) to the anchor
    cons.consolidate([Entry("new", (1, 2), v, 900, uncertainty=0.7)])
    want = 0.4 * 0.5 ** (100 / 100) + 0.4 * (1 - 1 / np.sqrt(2)) + 0.2 * 0.7
    assert facts(mem)["new"].importance == pytest.approx(want, rel=1e-5)
    # Old, not novel and certain: below min_importance, dropped (not merged: cosine 0.9 < 0.95).
    w = basis(0) * 0.9 + basis(2) * np.sqrt(1 - 0.81)
    assert cons.consolidate([Entry("stale", (2, 3), w, 0)]) == {"stored": 0, "merged": 0, "dropped": 1}
    # Merging decays the stored importance to now, then keeps the larger of it and the new score.
    now[0] = 1200.0
    cons.consolidate([Entry("anchor again", (3, 4), basis(0), 1200)])
    anchor = facts(mem)["anchor"]
    new_score = 0.4 * 1.0 + 0.4 * 0.0
    assert anchor.importance == pytest.approx(max(decayed(0.8, 200, 100.0), new_score), rel=1e-5)


def test_embed_fn_gives_the_stored_vector():
    mem = SemanticMemory.in_process(D, normalize=False)
    w = np.random.default_rng(0).normal(size=(D, D)).astype(np.float32)
    cons = Consolidator(mem, config(), start=False, embed_fn=lambda es: np.stack([e.embedding for e in es]) @ w)
    e = Entry("x", (0, 1), basis(3), 1)
    cons.consolidate([e])
    np.testing.assert_allclose(mem.get([entry_key(e)])[0][0], basis(3) @ w, rtol=1e-6)


def test_background_thread_with_bounded_queue():
    mem = SemanticMemory.in_process(D)
    with Consolidator(mem, config(queue_size=3, batch_size=2, min_importance=0.0)) as cons:
        for i in range(0, 16, 4):
            cons.on_evict([Entry(f"fact {j}", (j, j + 1), basis(j), j) for j in range(i, i + 4)])
        assert cons.flush(timeout=30)
        assert mem.stats()["count"] == 16
        assert cons.counts["accepted"] == cons.counts["stored"] == 16


class FlakyMemory:
    """A SemanticMemory whose writes fail `failures` times, like a service that is restarting."""

    def __init__(self, memory, failures):
        self.memory, self.failures = memory, failures

    def __getattr__(self, name):
        return getattr(self.memory, name)

    def add(self, *args, **kwargs):
        if self.failures > 0:
            self.failures -= 1
            raise Unavailable("service restarting")
        return self.memory.add(*args, **kwargs)


def test_failed_batches_are_retried_not_lost():
    mem = SemanticMemory.in_process(D)
    with Consolidator(FlakyMemory(mem, failures=2), config(min_importance=0.0)) as cons:
        cons.on_evict([Entry(f"fact {j}", (j, j + 1), basis(j), j) for j in range(5)])
        assert cons.flush(timeout=30)
        assert cons.counts["retries"] == 2 and "restarting" in cons.last_error
    assert mem.stats()["count"] == 5


def test_crash_loses_nothing_acknowledged(tmp_path):
    cfg = config(spool_dir=str(tmp_path / "spool"), min_importance=0.0)
    entries = [Entry(f"fact {j}", (j, j + 1), basis(j) + 0.1, j, uncertainty=0.5) for j in range(10)]
    down = Consolidator(FlakyMemory(SemanticMemory.in_process(D), failures=10 ** 9), cfg)
    down.on_evict(entries[:6])
    down.on_evict(entries[6:])  # acknowledged: fsynced in the spool, though the service never stored them
    down.close(timeout=0.2)  # the process "dies" with nothing stored

    mem = SemanticMemory.in_process(D)
    with Consolidator(mem, cfg) as restarted:  # replays the spool first
        assert restarted.flush(timeout=30)
        assert restarted.counts["accepted"] == 10
    assert sorted(facts(mem)) == sorted(e.text for e in entries)
    assert (tmp_path / "spool" / "spool.jsonl").stat().st_size == 0  # all stored: the spool restarts empty

    # A crash after storing but before the spool was marked done: the replay merges into itself, no duplicates.
    again = Consolidator(mem, cfg, start=False)
    again.on_evict(entries[:3])
    again.consolidate(entries[:3])
    again.close(timeout=0)  # "dies": the thread never ran, the spool still holds the 3 entries
    with Consolidator(mem, cfg) as replay:
        assert replay.flush(timeout=30) and replay.counts["accepted"] == 3
    assert mem.stats()["count"] == 10
    assert all(len(p.metadata["provenance"]) == 1 for p in facts(mem).values())


def test_spool_is_durable_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    auto = config()
    assert auto.spool_dir == "auto"
    durable = SemanticMemory.in_process(D, data_dir=str(tmp_path / "mem"))
    assert spool_dir_for(durable, "auto", "episodic") == str(tmp_path / "mem" / "consolidation" / "episodic")
    assert spool_dir_for(SemanticMemory.in_process(D), "auto", "episodic") is None  # nothing durable to protect
    remote = SemanticMemory.connect("127.0.0.1:7070,127.0.0.1:7071")  # channels connect lazily: no server needed
    there = spool_dir_for(remote, "auto", "a/b")
    assert there.startswith(str(tmp_path / "state" / "mantis_jax" / "consolidation")) and "a_b-" in there
    assert there != spool_dir_for(remote, "auto", "a_b") != spool_dir_for(SemanticMemory.connect("h:1"), "auto", "a/b")
    assert spool_dir_for(durable, "", "episodic") is None  # explicitly in memory: not crash-safe
    assert spool_dir_for(durable, str(tmp_path / "x"), "episodic") == str(tmp_path / "x")
    with pytest.raises(ValueError, match="spool_dir"):
        spool_dir_for(object(), "auto", "episodic")

    cons = Consolidator(durable, auto, start=False)
    cons.on_evict([Entry("kept", (0, 1), basis(0), 1)])
    assert os.path.getsize(os.path.join(cons.spool_dir, "spool.jsonl")) > 0
    with pytest.raises(ValueError, match="in use by another Consolidator"):  # two would truncate each other's spool
        Consolidator(durable, auto, start=False)
    cons.close(timeout=0)
    with Consolidator(durable, auto) as replay:
        assert replay.flush(timeout=30)
    assert set(facts(durable)) == {"kept"}


CHILD = """
import dataclasses, sys, time
import faiss, numpy as np
from mantis_jax.config import default_config
from mantis_jax.memory.consolidation import Consolidator
from mantis_jax.memory.semantic import SemanticMemory

@dataclasses.dataclass
class Entry:
    text: str
    token_range: tuple
    embedding: np.ndarray
    timestamp: int
    importance: float = 0.5

faiss.omp_set_num_threads(1)
cfg = default_config().memory.consolidation  # spool_dir "auto": under the memory's data dir
cfg.min_importance, cfg.dedup_threshold, cfg.batch_size = 0.0, 1.0, 8

def slow_embed(entries):  # consolidation lags behind the evictions, so the kill finds a backlog
    time.sleep(0.02)
    return np.stack([e.embedding for e in entries])

cons = Consolidator(SemanticMemory.in_process(D, data_dir=sys.argv[1]), cfg, embed_fn=slow_embed)
rng = np.random.default_rng(0)
for b in range(10 ** 6):
    entries = [Entry(f"fact {b} {j}", (j, j + 1), rng.normal(size=D).astype(np.float32), b) for j in range(4)]
    cons.on_evict(entries)
    print("\\n".join(e.text for e in entries), flush=True)  # acknowledged: on_evict returned
"""


def test_kill_9_mid_consolidation_loses_nothing_acknowledged(tmp_path):
    data_dir = str(tmp_path / "mem")
    child = subprocess.Popen([sys.executable, "-c", f"D = {D}\n" + CHILD, data_dir], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    acked, deadline = [], time.monotonic() + 60
    while len(acked) < 400 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            pytest.fail(f"the child exited early: {child.stderr.read()[-2000:]}")
        acked.append(line.strip())
    child.kill()  # SIGKILL while the background thread is consolidating a backlog
    child.wait(timeout=30)
    assert len(acked) >= 400

    mem = SemanticMemory.in_process(D, data_dir=data_dir)  # the store replays its own log
    assert mem.stats()["count"] < len(acked)  # some acknowledged entries existed only in the spool
    cfg = config(min_importance=0.0, dedup_threshold=1.0)
    with Consolidator(mem, cfg) as restarted:  # replays the spool under data_dir first
        assert restarted.flush(timeout=60)
    keys = [entry_key(Entry(t, (int(t.split()[2]), int(t.split()[2]) + 1), None, int(t.split()[1])))
            for t in acked]
    _, payloads = mem.get(keys)  # NotFound here would mean an acknowledged entry was lost
    assert [p.text for p in payloads] == acked
