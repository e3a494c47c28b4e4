"""In-process semantic memory (the same store the service runs): every index kind against an exact numpy
reference, deletions, IVF training, compaction, durability (snapshot + log replay, torn log tail), bad input,
and IVF inverted lists on disk (equal to in RAM, across restarts, compaction and conversion)."""

import math
import os
import sqlite3
import threading
import time

import faiss
import numpy as np
import pytest

from mantis_jax.config import default_config, validate
from mantis_jax.memory.semantic import (IndexSpec, InvalidArgument, NotFound, Payload, ResourceExhausted,
                                        SemanticMemory, SemanticStore)
from mantis_jax.memory.semantic import ondisk_lists, wal

D = 16
SPEC = dict(nlist=8, pq_m=8, pq_nbits=4, nprobe=8, hnsw_m=16, ef_search=64)  # ivfpq trains at 39*16 = 624


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """Tiny indexes: OpenMP threads only contend on a shared 2-core machine (and spin while they wait)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n, seed, d=D, centers=12):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d))
    return (c[rng.integers(0, centers, n)] + 0.35 * rng.normal(size=(n, d))).astype(np.float32)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def exact_topk(ref: dict, q, k):
    """Reference: brute-force cosine top-k over the live {id: vector} dict."""
    ids = np.array(sorted(ref))
    s = unit(q) @ unit(np.stack([ref[i] for i in ids])).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(s, order, 1)


def check_against_reference(mem, ref, q, k, min_recall):
    r = mem.search(q, k)
    want_ids, want_scores = exact_topk(ref, q, k)
    live = set(ref)
    assert all(int(i) in live for i in r.ids.ravel()), "a deleted or unknown id came back"
    for row_ids, row_pay in zip(r.ids, r.payloads):
        assert [p.text for p in row_pay] == [f"fact {i}" for i in row_ids], "payload does not belong to its id"
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(r.ids, want_ids)])
    assert recall >= min_recall, recall
    if min_recall == 1.0:
        np.testing.assert_allclose(r.scores, want_scores, atol=1e-5)


@pytest.mark.parametrize("kind,min_recall", [("flat", 1.0), ("ivfpq", 0.9), ("hnsw", 0.9)])
def test_round_trip_with_deletions_matches_exact_reference(kind, min_recall):
    mem = SemanticMemory.in_process(D, index=kind, **SPEC)
    x = clustered(900, seed=1)
    ids = np.random.default_rng(2).choice(2 ** 62, 900, replace=False).astype(np.int64)  # arbitrary 64-bit ids
    for lo in range(0, 900, 300):  # ivfpq crosses its training threshold on the third batch
        mem.add(x[lo:lo + 300], [Payload(f"fact {i}") for i in ids[lo:lo + 300]], ids=ids[lo:lo + 300])
    ref = dict(zip(ids.tolist(), x))
    q = clustered(40, seed=3)
    check_against_reference(mem, ref, q, 5, min_recall)
    gone = ids[::7]
    assert mem.remove(gone) == len(gone)
    for i in gone.tolist():
        del ref[i]
    check_against_reference(mem, ref, q, 5, min_recall)
    r = mem.search(x[::7], 5)  # the deleted vectors themselves as queries
    assert not np.isin(r.ids, gone).any()
    vecs, pays = mem.get(ids[1:4])
    np.testing.assert_allclose(vecs, unit(x[1:4]), atol=1e-6)
    assert [p.text for p in pays] == [f"fact {i}" for i in ids[1:4]]
    with pytest.raises(NotFound):
        mem.get(gone[:2])
    # Upsert: same id, new vector and payload.
    mem.add(x[500:501] * -1, [Payload(f"fact {ids[1]}", source="updated")], ids=ids[1:2])
    _, pays = mem.get(ids[1:2])
    assert pays[0].source == "updated"
    assert mem.search(-x[500:501], 1).ids[0, 0] == ids[1]
    assert mem.stats()["count"] == len(ref)


def test_ivf_training_keeps_every_vector_searchable():
    mem = SemanticMemory.in_process(D, index="ivfpq", **SPEC)
    x = clustered(700, seed=4)
    mem.add(x[:600], [Payload(f"fact {i}") for i in range(600)], ids=np.arange(600))
    assert not mem.stats()["trained"]  # below 624: exact search over the buffer
    np.testing.assert_array_equal(mem.search(x[:600], 1).ids[:, 0], np.arange(600))
    mem.add(x[600:], [Payload(f"fact {i}") for i in range(600, 700)], ids=np.arange(600, 700))
    stats = mem.stats()
    assert stats["trained"] and stats["count"] == 700
    index = mem._backend.store.index.index  # the trained FAISS index holds every stored row
    assert index.ntotal == 700 and index.is_trained
    # Every list probed and 40 * refine_factor PQ candidates re-ranked exactly: each vector finds itself first.
    top1 = mem.search(x, 40, nprobe=SPEC["nlist"]).ids[:, 0]
    np.testing.assert_array_equal(top1, np.arange(700))


def test_failed_training_keeps_every_acknowledged_write(tmp_path, monkeypatch):
    """A training failure (FAISS out of memory, say) after the add was logged must not fail the add, mark the index
    trained, or leave a log the restart cannot replay: the exact buffer keeps serving and training is retried."""
    attempts = []

    def failing_train(index, sample_nd):
        attempts.append(len(sample_nd))
        raise RuntimeError("Error in void faiss::Clustering::train: simulated allocation failure")

    monkeypatch.setattr(faiss.IndexIVFPQ, "train", failing_train)
    x = clustered(760, seed=40)
    mem = SemanticMemory.in_process(D, index="ivfpq", data_dir=str(tmp_path), **SPEC)
    first = mem.add(x[:650], [Payload(f"fact {i}") for i in range(650)])  # crosses 624: training fails
    second = mem.add(x[650:700], [Payload(f"fact {i}") for i in range(650, 700)])  # < 10% more: no retry yet
    np.testing.assert_array_equal(np.concatenate([first, second]), np.arange(700))  # no id handed out twice
    stats = mem.stats()
    assert attempts == [650] and not stats["trained"] and "simulated allocation failure" in stats["train_error"]
    ref = dict(zip(range(700), x[:700]))
    check_against_reference(mem, ref, clustered(30, seed=41), 5, 1.0)  # exact search over every row
    mem.close()
    monkeypatch.undo()
    again = SemanticMemory.in_process(D, index="ivfpq", data_dir=str(tmp_path), **SPEC)  # replays the whole log
    stats = again.stats()
    assert stats["count"] == 700 and stats["trained"] and stats["train_error"] == ""
    np.testing.assert_array_equal(again.add(x[700:], [Payload(f"fact {i}") for i in range(700, 760)]),
                                  np.arange(700, 760))
    ref.update(zip(range(700, 760), x[700:]))
    check_against_reference(again, ref, clustered(30, seed=41), 5, 0.9)


def test_history_of_a_failed_ivfpq_add_replays(tmp_path):
    """A data dir written with `--nlist 64 --train-min 10` before that was refused: its log holds an add whose
    training failed (answered INTERNAL, half-applied) and a second add that reused its ids. Restarted with a valid
    train_min, it replays: the second add's entries (the acknowledged ones) are what is stored."""
    x = clustered(20, seed=43)
    log = wal.Wal(str(tmp_path / "wal.0.log"))
    for lo, label in ((0, "failed"), (10, "acknowledged")):
        log.append(wal.encode_add(np.arange(10), unit(x[lo:lo + 10]), [Payload(f"{label} {i}") for i in range(10)],
                                  assigned=True))
    log.close()
    spec = IndexSpec(dim=D, kind="ivfpq", nlist=64, pq_m=8, pq_nbits=4, train_min=64)
    store = SemanticStore(spec, str(tmp_path))
    assert store.stats()["count"] == 10 and not store.stats()["trained"]
    assert [p.text for p in store.get(np.arange(10))[1]] == [f"acknowledged {i}" for i in range(10)]
    np.testing.assert_array_equal(store.add(x[:2], [Payload("new")] * 2), [10, 11])  # past the replayed ids
    store.close()


def test_ivfpq_train_min_must_cover_its_clusters():
    with pytest.raises(ValueError, match=r"train_min \(10\) must be 0 \(= 39 x 64\) or at least .* = 64"):
        IndexSpec(dim=D, kind="ivfpq", nlist=64, pq_m=8, pq_nbits=4, train_min=10)
    with pytest.raises(ValueError, match=r"train_sample \(32\) must be at least"):
        IndexSpec(dim=D, kind="ivfpq", nlist=64, pq_m=8, pq_nbits=4, train_sample=32)
    IndexSpec(dim=D, kind="ivfpq", nlist=64, pq_m=8, pq_nbits=4, train_min=64)  # enough points for k-means
    IndexSpec(dim=D, kind="flat", nlist=64, train_min=10)  # only ivfpq trains
    cfg = default_config()
    cfg.memory.semantic.index, cfg.memory.semantic.nlist, cfg.memory.semantic.train_min = "ivfpq", 64, 10
    with pytest.raises(ValueError, match=r"config.memory.semantic.train_min \(10\)"):
        validate(cfg)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_compaction_after_many_deletions(kind):
    mem = SemanticMemory.in_process(D, index=kind, **SPEC)
    x = clustered(300, seed=5)
    mem.add(x, [Payload(f"fact {i}") for i in range(300)], ids=np.arange(300))
    mem.remove(np.arange(0, 300, 2)[:40])  # 13% stale: tombstones
    assert mem.stats()["rows"] == 300
    mem.remove(np.arange(0, 300, 2)[40:])  # 50% stale: rebuilt from the live rows
    stats = mem.stats()
    assert stats["rows"] == stats["count"] == 150 and stats["stale_fraction"] == 0.0
    check_against_reference(mem, {i: x[i] for i in range(1, 300, 2)}, clustered(20, seed=6), 4,
                            1.0 if kind == "flat" else 0.9)


def test_namespace_filter_and_l2_metric():
    mem = SemanticMemory.in_process(D, index="flat", metric="l2", normalize=False)
    x = clustered(200, seed=7)
    mem.add(x, [Payload(f"fact {i}", namespace="even" if i % 2 == 0 else "odd") for i in range(200)],
            ids=np.arange(200))
    r = mem.search(x[:10], 3, namespace="odd")
    assert (r.ids % 2 == 1).all()
    d2 = ((x[1::2][None] - x[:10, None]) ** 2).sum(-1)  # reference: brute force over the odd rows
    np.testing.assert_array_equal(r.ids, np.arange(1, 200, 2)[np.argsort(d2, axis=1)[:, :3]])
    np.testing.assert_allclose(r.scores, -np.sort(d2, axis=1)[:, :3], rtol=1e-4)
    assert (mem.search(x[:2], 3, namespace="nobody").ids == -1).all()


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
def test_snapshot_and_log_replay(tmp_path, kind):
    x = clustered(800, seed=8)
    mem = SemanticMemory.in_process(D, index=kind, data_dir=str(tmp_path), **SPEC)
    mem.add(x[:400], [Payload(f"fact {i}") for i in range(400)], ids=np.arange(400))
    assert mem.snapshot() == 1
    mem.add(x[400:], [Payload(f"fact {i}") for i in range(400, 800)], ids=np.arange(400, 800))  # log only
    mem.remove(np.arange(0, 800, 10))
    before = mem.search(x[:50], 5)
    mem.close()  # no final snapshot: the next open loads snapshot 1 and replays the log
    again = SemanticMemory.in_process(D, index=kind, data_dir=str(tmp_path), **SPEC)
    assert again.stats()["count"] == 720 and again.stats()["generation"] == 1
    after = again.search(x[:50], 5)
    np.testing.assert_array_equal(after.ids, before.ids)
    assert [[p.text for p in row] for row in after.payloads] == [[f"fact {i}" for i in row] for row in before.ids]
    assert again.snapshot() == 2
    again.close()
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(("wal", "snap"))) == ["snap.2", "wal.2.log"]


def test_torn_log_tail_is_dropped(tmp_path):
    mem = SemanticMemory.in_process(D, data_dir=str(tmp_path))
    x = clustered(20, seed=9)
    mem.add(x[:10], [Payload(f"fact {i}") for i in range(10)], ids=np.arange(10))
    mem.close()
    with open(tmp_path / "wal.0.log", "ab") as f:  # a crash in the middle of writing an (unacknowledged) record
        f.write(wal._HEADER.pack(wal._MAGIC, 1000, 0) + b"partial")
    again = SemanticMemory.in_process(D, data_dir=str(tmp_path))
    assert again.stats()["count"] == 10
    again.add(x[10:], [Payload(f"fact {i}") for i in range(10, 20)], ids=np.arange(10, 20))
    again.close()
    assert SemanticMemory.in_process(D, data_dir=str(tmp_path)).stats()["count"] == 20


def test_payload_rows_with_null_numbers_read_back(tmp_path):
    """Rows stored before non-finite numbers were refused hold NULL (SQLite's NaN): reads must not fail."""
    mem = SemanticMemory.in_process(D, data_dir=str(tmp_path))
    ids = mem.add(clustered(2, seed=42), [Payload("a", timestamp=2.0), Payload("b", importance=0.5)])
    with sqlite3.connect(tmp_path / "payloads.sqlite") as conn:
        conn.execute("UPDATE payloads SET timestamp = NULL, importance = NULL WHERE id = ?", (int(ids[0]),))
    first, second = mem.get(ids)[1]
    assert math.isnan(first.timestamp) and math.isnan(first.importance) and first.text == "a"
    assert (second.timestamp, second.importance) == (0.0, 0.5)


def test_bad_input_is_rejected_and_changes_nothing():
    mem = SemanticMemory.in_process(D, max_k=64, max_batch=100)
    x = clustered(10, seed=10)
    mem.add(x, [Payload(f"fact {i}") for i in range(10)], ids=np.arange(10))
    nan = x[:2].copy()
    nan[1, 3] = np.nan
    bad = [
        (lambda: mem.add(x[:, :5], ["a"] * 10), InvalidArgument, "dimension 5"),
        (lambda: mem.add([["a"] * D], ["a"]), InvalidArgument, "numeric"),
        (lambda: mem.add(nan, ["a", "b"]), InvalidArgument, "NaN or inf"),
        (lambda: mem.add(np.full((1, D), np.inf), ["a"]), InvalidArgument, "NaN or inf"),
        (lambda: mem.add(np.zeros((0, D)), []), InvalidArgument, "non-empty"),
        (lambda: mem.add(x[:2], ["a"]), InvalidArgument, "payloads"),
        (lambda: mem.add(x[:2], ["a", "b"], ids=[5, 5]), InvalidArgument, "duplicates"),
        (lambda: mem.add(x[:1], ["a"], ids=[-1]), InvalidArgument, "-1"),
        (lambda: mem.add(np.ones((101, D)), ["a"] * 101), ResourceExhausted, "limit"),
        (lambda: mem.search(x, 0), InvalidArgument, "k (0)"),
        (lambda: mem.search(x, 10 ** 9), InvalidArgument, "k (1000000000)"),
        (lambda: mem.search(x[:, :3], 2), InvalidArgument, "dimension 3"),
        (lambda: mem.search(nan, 2), InvalidArgument, "NaN"),
        (lambda: mem.search(np.zeros((0, D)), 2), InvalidArgument, "non-empty"),
        (lambda: mem.remove([3, 999]), NotFound, "999"),
        (lambda: mem.remove([]), InvalidArgument, "non-empty"),
        (lambda: mem.get([77]), NotFound, "77"),
    ]
    for call, error, words in bad:
        with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
            call()
    assert mem.stats()["count"] == 10  # the remove with one unknown id removed nothing
    np.testing.assert_array_equal(mem.search(x, 1).ids[:, 0], np.arange(10))


def test_concurrent_readers_during_writes():
    mem = SemanticMemory.in_process(D, index="flat")
    base = clustered(200, seed=11)
    mem.add(base, [Payload(f"fact {i}") for i in range(200)], ids=np.arange(200))
    errors, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            r = mem.search(base[:8], 1)
            if not (r.ids[:, 0] == np.arange(8)).all() or r.payloads[0][0].text != "fact 0":
                errors.append(r.ids[:, 0])

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    extra = clustered(400, seed=12) * 0.01 - 5.0  # far from the base rows: never a better match
    for lo in range(0, 400, 20):
        ids = np.arange(1000 + lo, 1020 + lo)
        mem.add(extra[lo:lo + 20], [Payload(f"fact {i}") for i in ids], ids=ids)
        mem.remove(ids[:5])
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert mem.stats()["count"] == 200 + 300


def test_from_config_builds_in_process_memory():
    cfg = default_config().memory.semantic
    cfg.dim, cfg.k = D, 3
    mem = SemanticMemory.from_config(cfg)
    x = clustered(5, seed=13)
    mem.add(x, ["a", "b", "c", "d", "e"])
    assert mem.search(x[:1]).ids.shape == (1, 3) and mem.search(x[:1]).payloads[0][0].text == "a"


def test_durable_compaction_survives_restart(tmp_path):
    x = clustered(200, seed=14)
    mem = SemanticMemory.in_process(D, index="hnsw", data_dir=str(tmp_path), **SPEC)
    mem.add(x, [Payload(f"fact {i}") for i in range(200)], ids=np.arange(200))
    mem.remove(np.arange(0, 200, 2))  # 50% stale: compaction writes a new vectors file in a new snapshot
    stats = mem.stats()
    assert stats["generation"] == 1 and stats["rows"] == 100 and stats["wal_bytes"] == 0
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("vectors")) == ["vectors.1.f32"]
    mem.add(x[:2] * -1, ["late a", "late b"], ids=[1000, 1001])  # logged after the compacted snapshot
    before = mem.search(x[:30], 4)
    mem.close()
    again = SemanticMemory.in_process(D, index="hnsw", data_dir=str(tmp_path), **SPEC)
    after = again.search(x[:30], 4)
    np.testing.assert_array_equal(after.ids, before.ids)
    assert not np.isin(after.ids, np.arange(0, 200, 2)).any()
    assert again.get([1001])[1][0].text == "late b"


def test_periodic_snapshot_timer(tmp_path):
    store = SemanticStore(IndexSpec(dim=D), str(tmp_path), snapshot_interval_s=0.1)
    store.add(clustered(5, seed=15), [Payload("a")] * 5)
    deadline = time.monotonic() + 20
    while store.stats()["generation"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = store.stats()
    assert stats["generation"] >= 1 and stats["wal_bytes"] == 0
    store.close()


ONDISK = dict(nlist=16, pq_m=8, pq_nbits=4, nprobe=4, train_min=2000, ondisk_merge_rows=700)


def lists_files(path):
    return sorted(n for n in os.listdir(path) if ondisk_lists.LISTS_FILE.match(n))


def test_ondisk_lists_equal_in_ram_and_survive_restart(tmp_path):
    x = clustered(5000, seed=20)
    ids = np.random.default_rng(21).choice(2 ** 62, 5000, replace=False).astype(np.int64)  # arbitrary 64-bit ids
    gone = ids[:4000:13]  # 308 deletions (6%): tombstones, no compaction
    mems = {}
    for name, on in (("ram", False), ("disk", True)):
        mem = mems[name] = SemanticMemory.in_process(D, index="ivfpq", data_dir=str(tmp_path / name), ondisk=on,
                                                     **ONDISK)
        mem.add(x[:3000], [Payload(f"fact {i}") for i in ids[:3000]], ids=ids[:3000])  # trains at 2000
        assert mem.snapshot() == 1
        for lo in range(3000, 5000, 400):  # the log only; on disk: merged into a new base every 700+ rows
            mem.add(x[lo:lo + 400], [Payload(f"fact {i}") for i in ids[lo:lo + 400]], ids=ids[lo:lo + 400])
        mem.remove(gone)
    disk = mems["disk"]._backend.store.index.index
    assert isinstance(disk, ondisk_lists.OnDiskIVF) and isinstance(disk.base, faiss.OnDiskInvertedLists)
    assert disk.base.read_only and (disk.base_rows, disk.delta.ntotal) == (4600, 400)  # searched as one
    assert lists_files(tmp_path / "disk") == sorted([disk.saved_name, disk.base_name])  # nothing in between
    unsaved = disk.base_name
    assert mems["disk"].stats()["ondisk"] and not mems["ram"].stats()["ondisk"]
    q = clustered(60, seed=22)
    want = mems["ram"].search(q, 10)
    got = mems["disk"].search(q, 10)
    np.testing.assert_array_equal(got.ids, want.ids)  # same training, same list order: the same answers
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)
    ref = {i: v for i, v in zip(ids.tolist(), x) if i not in set(gone.tolist())}
    check_against_reference(mems["disk"], ref, q, 10, 0.9)
    for mem in mems.values():
        mem.close()  # no snapshot: a restart loads snapshot 1 and replays the log

    # RAM holds no codes: the in-RAM snapshot's index file carries them (pq bytes + 8-byte id per vector); the
    # on-disk one holds only list offsets, and the codes are in the lists file it names.
    codes = 3000 * (disk.delta.code_size + 8)
    assert os.path.getsize(tmp_path / "ram" / "snap.1" / "index.faiss") > codes
    assert os.path.getsize(tmp_path / "disk" / "snap.1" / "index.faiss") < codes / 5

    again = SemanticMemory.in_process(D, index="ivfpq", data_dir=str(tmp_path / "disk"), ondisk=True, **ONDISK)
    index = again._backend.store.index.index
    assert index.base_rows + index.delta.ntotal == 5000 and unsaved not in lists_files(tmp_path / "disk")
    assert os.path.getsize(os.path.join(tmp_path / "disk", index.saved_name)) >= codes
    after = again.search(q, 10)
    np.testing.assert_array_equal(after.ids, want.ids)
    assert [[p.text for p in row] for row in after.payloads] == [[f"fact {i}" for i in row] for row in want.ids]
    assert not np.isin(again.search(x[:4000:13], 10).ids, gone).any()  # deleted ids never come back
    assert again.snapshot() == 2
    assert index.delta.ntotal == 0 and index.base_rows == 5000 and lists_files(tmp_path / "disk") == [
        index.saved_name]
    # More than compact_ratio deleted: rows renumbered, lists rebuilt into a new file, in a new snapshot.
    again.remove(ids[4000:])
    stats = again.stats()
    assert stats["rows"] == stats["count"] == 5000 - len(gone) - 1000 and stats["generation"] == 3
    ram = SemanticMemory.in_process(D, index="ivfpq", data_dir=str(tmp_path / "ram"), **ONDISK)
    ram.remove(ids[4000:])
    want = ram.search(q, 10)
    np.testing.assert_array_equal(again.search(q, 10).ids, want.ids)
    again.close()
    # Switching a data dir between on-disk and in-RAM lists converts them on load, with the same answers.
    for on in (False, True, True):
        mem = SemanticMemory.in_process(D, index="ivfpq", data_dir=str(tmp_path / "disk"), ondisk=on, **ONDISK)
        index = mem._backend.store.index.index
        assert isinstance(index, ondisk_lists.OnDiskIVF) == on
        assert isinstance(ondisk_lists.lists_of(index), faiss.OnDiskInvertedLists if on else faiss.ArrayInvertedLists)
        np.testing.assert_array_equal(mem.search(q, 10).ids, want.ids)
        assert not np.isin(mem.search(x[4000:], 10).ids, ids[4000:]).any()
        mem.snapshot()
        mem.close()
        assert len(lists_files(tmp_path / "disk")) == int(on)


def test_ondisk_needs_a_data_dir_and_ivfpq():
    with pytest.raises(ValueError, match="data dir"):
        SemanticMemory.in_process(D, index="ivfpq", ondisk=True, **SPEC)
    with pytest.raises(ValueError, match="ivfpq"):
        SemanticMemory.in_process(D, index="hnsw", ondisk=True, **SPEC)
    cfg = default_config()
    cfg.memory.semantic.index, cfg.memory.semantic.ondisk = "flat", True
    with pytest.raises(ValueError, match="index=ivfpq"):
        validate(cfg)
