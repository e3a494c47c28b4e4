"""The semantic memory service as a real process on a free loopback port: round trips per index kind (equal to
the in-process backend), bad input, auth, kill -9 during concurrent adds, snapshot + log replay, concurrent
readers, a sharded client equal to one big index, ivfpq with on-disk inverted lists across a kill -9, and the
inputs adversarial testing found (extreme magnitudes, non-finite payload numbers, one error contract for client
and in-process backend, deep metadata, an explicit id of 2^63 - 1, ivfpq train_min below its clusters).
TLS: test_server_tls.py."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import faiss
import grpc
import numpy as np
import pytest

from mantis_jax.memory.semantic import (InvalidArgument, NotFound, Payload, ResourceExhausted, SemanticMemory,
                                        SemanticMemoryError, Unauthenticated)
from mantis_jax.memory.semantic.proto import semantic_pb2 as pb
from mantis_jax.memory.semantic.proto import semantic_pb2_grpc as pb_grpc
from mantis_jax.memory.server import launch

D = 16
TOKEN = "test-token-123"
SMALL = ["--nlist", "8", "--pq-m", "8", "--pq-nbits", "4", "--nprobe", "8", "--hnsw-m", "16", "--ef-search", "64",
         "--threads", "1"]
SPEC = dict(nlist=8, pq_m=8, pq_nbits=4, nprobe=8, hnsw_m=16, ef_search=64)


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # same as the servers' --threads 1, so results are bit-comparable
    yield
    faiss.omp_set_num_threads(before)


def clustered(n, seed, d=D, centers=12):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d))
    return (c[rng.integers(0, centers, n)] + 0.35 * rng.normal(size=(n, d))).astype(np.float32)


def stop(proc, sig=signal.SIGTERM):
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    """One flat service with a token and a 1 MB request limit, shared by the tests that do not restart it."""
    data = str(tmp_path_factory.mktemp("token_server"))
    env = dict(os.environ, MANTIS_SEMANTIC_TOKEN=TOKEN)
    proc, address = launch(data, D, *SMALL, "--max-request-mb", "1", "--max-k", "64", env=env)
    yield address
    stop(proc)


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
def test_round_trip_each_kind_equals_in_process(tmp_path, kind):
    proc, address = launch(str(tmp_path), D, "--index", kind, *SMALL)
    try:
        remote = SemanticMemory.connect(address, token="")
        local = SemanticMemory.in_process(D, index=kind, **SPEC)
        x = clustered(900, seed=1)
        ids = np.random.default_rng(2).choice(2 ** 62, 900, replace=False).astype(np.int64)
        for mem in (remote, local):
            for lo in range(0, 900, 300):  # ivfpq trains on the third batch
                got = mem.add(x[lo:lo + 300], [Payload(f"fact {i}", source="t", metadata={"i": int(i)})
                                               for i in ids[lo:lo + 300]], ids=ids[lo:lo + 300])
                np.testing.assert_array_equal(got, ids[lo:lo + 300])
            assert mem.remove(ids[::9]) == 100
        q = clustered(30, seed=3)
        r, want = remote.search(q, 6), local.search(q, 6)
        np.testing.assert_array_equal(r.ids, want.ids)  # same index code, same answers
        np.testing.assert_allclose(r.scores, want.scores, atol=1e-6)
        assert r.payloads == want.payloads
        assert all(p.metadata["i"] == i for row_i, row_p in zip(r.ids, r.payloads) for i, p in zip(row_i, row_p))
        assert not np.isin(remote.search(x[::9], 6).ids, ids[::9]).any()
        vecs, pays = remote.get(ids[1:3])
        np.testing.assert_allclose(vecs, local.get(ids[1:3])[0])
        assert [p.text for p in pays] == [f"fact {i}" for i in ids[1:3]]
        stats = remote.stats()
        assert stats["count"] == 800 and stats["index"] == kind and stats["trained"]
        assert remote.health() == "SERVING"
    finally:
        stop(proc)


def test_bad_input_gets_clear_status_and_changes_nothing(token_server):
    mem = SemanticMemory.connect(token_server, token=TOKEN)
    x = clustered(10, seed=4)
    base = mem.stats()["count"]
    ids = mem.add(x, [Payload(f"fact {i}") for i in range(10)])
    nan = x[:2].copy()
    nan[0, 0] = np.nan
    cases = [
        (lambda: mem.add(x[:, :7], ["a"] * 10), InvalidArgument, "dimension 7"),
        (lambda: mem.add(nan, ["a", "b"]), InvalidArgument, "NaN or inf"),
        (lambda: mem.search(np.full((1, D), np.inf), 1), InvalidArgument, "NaN or inf"),
        (lambda: mem.search(x, 0), InvalidArgument, "k"),
        (lambda: mem.search(x, 65), InvalidArgument, "k"),
        (lambda: mem.search(np.zeros((0, D)), 1), InvalidArgument, "non-empty"),
        (lambda: mem.add(np.zeros((0, D)), []), InvalidArgument, "non-empty"),
        (lambda: mem.remove([int(ids[0]), 10 ** 17]), NotFound, "unknown"),
        (lambda: mem.get([10 ** 17 + 1]), NotFound, "unknown"),
        (lambda: mem.add(np.ones((20000, D)), ["a"] * 20000), ResourceExhausted, "max-request-mb"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words):
            call()
    # Malformed bytes straight through the stub: INVALID_ARGUMENT, not a crash.
    stub = pb_grpc.SemanticMemoryStub(grpc.insecure_channel(token_server))
    auth = (("authorization", f"Bearer {TOKEN}"),)
    with pytest.raises(grpc.RpcError) as err:
        stub.Search(pb.SearchRequest(queries=pb.Matrix(rows=2, dim=D, data=b"\0" * 12), k=1), metadata=auth)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in err.value.details()
    assert mem.health() == "SERVING"
    assert mem.stats()["count"] == base + 10
    np.testing.assert_array_equal(mem.search(x, 1).ids[:, 0], ids)


def test_token_auth(token_server):
    x = clustered(3, seed=5)
    for token, words in (("", "missing token"), ("wrong", "wrong token")):
        with pytest.raises(Unauthenticated, match=words):
            SemanticMemory.connect(token_server, token=token).search(x, 1)
        with pytest.raises(Unauthenticated):
            SemanticMemory.connect(token_server, token=token).add(x, ["a", "b", "c"])
    assert SemanticMemory.connect(token_server, token=TOKEN).health() == "SERVING"


def test_concurrent_readers_during_writes(token_server):
    mem = SemanticMemory.connect(token_server, token=TOKEN)
    base = clustered(50, seed=6) + 3.0
    ids = mem.add(base, [Payload(f"reader fact {i}", namespace="readers") for i in range(50)])
    errors, done = [], threading.Event()

    def reader():
        client = SemanticMemory.connect(token_server, token=TOKEN)
        while not done.is_set():
            r = client.search(base[:16], 1, namespace="readers")
            if not (r.ids[:, 0] == ids[:16]).all() or r.payloads[3][0].text != "reader fact 3":
                errors.append(r.ids[:, 0])

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for step in range(15):
        new = mem.add(clustered(20, seed=100 + step), [Payload("writer", namespace="readers")] * 20)
        mem.remove(new[:10])
    done.set()
    for t in threads:
        t.join()
    assert not errors


def test_kill_9_during_concurrent_adds_loses_nothing_acknowledged(tmp_path):
    proc, address = launch(str(tmp_path), D, "--threads", "1")
    acked: dict[int, str] = {}
    lock = threading.Lock()

    def writer(w):
        client = SemanticMemory.connect(address, token="", timeout_s=10)
        for b in range(10 ** 6):
            ids = np.arange(20) + (w * 10 ** 9 + b * 20)
            texts = [f"w{w} b{b} #{i}" for i in ids]
            try:
                client.add(np.random.default_rng(int(ids[0])).normal(size=(20, D)), texts, ids=ids)
            except SemanticMemoryError:
                return  # the service died: this batch was never acknowledged
            with lock:
                acked.update(zip(ids.tolist(), texts))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    client = SemanticMemory.connect(address, token="")
    deadline = time.monotonic() + 30
    while len(acked) < 600 and time.monotonic() < deadline:
        time.sleep(0.02)
    client.snapshot()  # a snapshot in the middle of the stream, then more acknowledged writes in the new log
    n_at_snapshot = len(acked)
    while len(acked) < n_at_snapshot + 600 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    for t in threads:
        t.join()
    proc.wait()
    assert len(acked) >= 1200

    proc, address = launch(str(tmp_path), D, "--threads", "1")
    try:
        again = SemanticMemory.connect(address, token="")
        ids = np.array(sorted(acked))
        vecs, pays = again.get(ids)  # NotFound here would mean an acknowledged id was lost
        assert [p.text for p in pays] == [acked[i] for i in ids.tolist()]
        np.testing.assert_array_equal(again.search(vecs[:200], 1).ids[:, 0], ids[:200])
        assert again.stats()["generation"] >= 1
    finally:
        stop(proc)


def test_snapshot_then_log_replay_after_crash(tmp_path):
    proc, address = launch(str(tmp_path), D, "--index", "hnsw", *SMALL)
    mem = SemanticMemory.connect(address, token="")
    x = clustered(400, seed=7)
    mem.add(x[:200], [Payload(f"fact {i}") for i in range(200)], ids=np.arange(200))
    assert mem.snapshot() == 1
    mem.add(x[200:], [Payload(f"fact {i}") for i in range(200, 400)], ids=np.arange(200, 400))
    mem.remove(np.arange(0, 400, 20))
    before = mem.search(x[:40], 5)
    stop(proc, signal.SIGKILL)
    proc, address = launch(str(tmp_path), D, "--index", "hnsw", *SMALL)
    try:
        again = SemanticMemory.connect(address, token="")
        after = again.search(x[:40], 5)
        np.testing.assert_array_equal(after.ids, before.ids)
        assert after.payloads == before.payloads
        stats = again.stats()
        assert stats["count"] == 380 and stats["generation"] == 1 and stats["wal_bytes"] > 0
    finally:
        stop(proc)
    # A clean stop (SIGTERM) takes a final snapshot: the log is empty on the next start.
    proc, address = launch(str(tmp_path), D, "--index", "hnsw", *SMALL)
    try:
        stats = SemanticMemory.connect(address, token="").stats()
        assert stats["generation"] == 2 and stats["wal_bytes"] == 0 and stats["count"] == 380
    finally:
        stop(proc)


def test_sharded_client_equals_one_big_index(tmp_path):
    for i in range(2):
        (tmp_path / f"s{i}").mkdir()
    shards = [launch(str(tmp_path / f"s{i}"), D, "--threads", "1") for i in range(2)]
    try:
        sharded = SemanticMemory.connect(",".join(a for _, a in shards), token="")
        big = SemanticMemory.in_process(D)
        x = clustered(500, seed=8)
        ids = np.random.default_rng(9).choice(10 ** 12, 500, replace=False)
        texts = [f"fact {i}" for i in ids]
        sharded.add(x, texts, ids=ids)
        big.add(x, texts, ids=ids)
        counts = [s["count"] for s in sharded.stats()["shards"]]
        assert sum(counts) == 500 and min(counts) > 150  # both shards hold a share
        auto = sharded.add(x[:4] * 2, ["auto"] * 4)  # no ids: the client draws them, each lands on its shard
        big.add(x[:4] * 2, ["auto"] * 4, ids=auto)
        q = clustered(25, seed=10)
        a, b = sharded.search(q, 7), big.search(q, 7)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
        assert a.payloads == b.payloads
        with pytest.raises(NotFound):
            sharded.remove([int(ids[0]), int(ids[1]), 7])  # 7 is unknown: nothing is removed on any shard
        assert sharded.stats()["count"] == 504
        sharded.remove(ids[:100])
        big.remove(ids[:100])
        a, b = sharded.search(q, 7), big.search(q, 7)
        np.testing.assert_array_equal(a.ids, b.ids)
        vecs, pays = sharded.get(ids[100:110])
        np.testing.assert_allclose(vecs, big.get(ids[100:110])[0])
        assert [p.text for p in pays] == texts[100:110]
    finally:
        for proc, _ in shards:
            stop(proc)


def test_token_from_file_or_environment(tmp_path, monkeypatch):
    from mantis_jax.memory.server import read_token

    monkeypatch.setenv("MY_TOKEN", "from-env")
    assert read_token("", "MY_TOKEN") == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    assert read_token(str(tmp_path / "token"), "MY_TOKEN") == "from-file"  # the file wins
    (tmp_path / "empty").write_text("")
    with pytest.raises(SystemExit, match="empty"):
        read_token(str(tmp_path / "empty"), "MY_TOKEN")


def test_ondisk_lists_survive_kill_9_and_equal_in_ram(tmp_path):
    args = ("--index", "ivfpq", *SMALL, "--ondisk", "--ondisk-merge-rows", "300")
    local = SemanticMemory.in_process(D, index="ivfpq", **SPEC)  # in-RAM lists: the reference
    x = clustered(1200, seed=11)
    ids = np.random.default_rng(12).choice(2 ** 62, 1200, replace=False).astype(np.int64)
    proc, address = launch(str(tmp_path), D, *args)
    try:
        remote = SemanticMemory.connect(address, token="")
        for mem in (remote, local):
            mem.add(x[:800], [Payload(f"fact {i}") for i in ids[:800]], ids=ids[:800])  # trains (624 rows)
        assert remote.snapshot() == 1
        for mem in (remote, local):
            mem.add(x[800:], [Payload(f"fact {i}") for i in ids[800:]], ids=ids[800:])  # the log only
            mem.remove(ids[::11])
        q = clustered(30, seed=13)
        want = local.search(q, 6)
        np.testing.assert_array_equal(remote.search(q, 6).ids, want.ids)
        assert remote.stats()["ondisk"]
    finally:
        stop(proc, signal.SIGKILL)
    proc, address = launch(str(tmp_path), D, *args)
    try:
        again = SemanticMemory.connect(address, token="")
        stats = again.stats()
        assert stats["ondisk"] and stats["generation"] == 1 and stats["count"] == 1200 - len(ids[::11])
        after = again.search(q, 6)
        np.testing.assert_array_equal(after.ids, want.ids)
        np.testing.assert_allclose(after.scores, want.scores, atol=1e-6)
        assert not np.isin(again.search(x[::11], 6).ids, ids[::11]).any()
    finally:
        stop(proc)
    with open(tmp_path / "MANIFEST.json") as f:  # the final snapshot names the one lists file left
        manifest = json.load(f)
    assert manifest["generation"] == 2
    assert [n for n in os.listdir(tmp_path) if n.endswith(".ivfdata")] == [manifest["lists"]]


# ------------------------------------------------------------------ inputs found by adversarial testing
def both(address):
    """The service and the in-process backend, which must answer every input alike."""
    return {"service": SemanticMemory.connect(address, token=TOKEN), "in-process": SemanticMemory.in_process(D)}


def test_huge_and_tiny_components_are_normalised_without_overflow(token_server):
    u = clustered(3, seed=20)
    u_unit = u / np.linalg.norm(u, axis=1, keepdims=True)
    x = np.concatenate([u * 1e20, u * 1e-30, u]).astype(np.float32)  # 1e20^2 overflows float32, 1e-30^2 underflows
    for name, mem in both(token_server).items():
        ids = mem.add(x, [f"magnitude {i}" for i in range(9)], ids=np.arange(9) + 10 ** 15)
        vecs, _ = mem.get(ids)
        np.testing.assert_allclose(vecs, np.tile(u_unit, (3, 1)), atol=1e-6, err_msg=name)  # each the unit direction
        r = mem.search(u[:1] * 1e20, 3)
        assert set(r.ids[0].tolist()) == {ids[0], ids[3], ids[6]}, name  # the same direction at every scale
        np.testing.assert_allclose(r.scores[0], 1.0, atol=1e-5, err_msg=name)
        mem.remove(ids)
    raw = SemanticMemory.in_process(D, normalize=False)  # without normalisation the scores would overflow: refused
    with pytest.raises(InvalidArgument, match="norm above"):
        raw.add(u * 1e20, ["a", "b", "c"])


def test_non_finite_payload_numbers_are_refused_and_not_logged(token_server):
    x = clustered(2, seed=21)
    bad = [Payload("t", timestamp=float("nan")), Payload("i", importance=float("inf")),
           Payload("i", importance=1e39), Payload("t", timestamp=-float("inf"))]  # importance is float32 on the wire
    for name, mem in both(token_server).items():
        before = mem.stats()
        for p in bad:
            with pytest.raises(InvalidArgument, match="must be a finite number"):
                mem.add(x, [Payload("fine"), p])
        after = mem.stats()
        assert (after["count"], after["wal_bytes"]) == (before["count"], before["wal_bytes"]), name
        ids = mem.add(x, [Payload("ok", timestamp=1.5, importance=0.25)] * 2)
        assert [(p.timestamp, p.importance) for p in mem.get(ids)[1]] == [(1.5, 0.25)] * 2  # reads still work


def test_one_error_contract_for_client_and_in_process(token_server):
    x = clustered(2, seed=22)
    cases = [
        (lambda m: m.search(x, -1), r"k \(-1\)"),
        (lambda m: m.search(x, 2 ** 32), r"k \(4294967296\)"),
        (lambda m: m.search(x, 1e9), r"k \(1000000000.0\)"),
        (lambda m: m.search(x, True), r"k \(True\)"),
        (lambda m: m.search(x, 3, nprobe=-1), r"nprobe \(-1\)"),
        (lambda m: m.search(x, 3, nprobe=0), r"nprobe \(0\)"),  # the wire's "unset" must not hide it
        (lambda m: m.search(x, 3, ef_search=2 ** 40), r"ef_search"),
        (lambda m: m.search(x, 3, ef_search=2.0), r"ef_search"),
        (lambda m: m.get([1.5]), "integers"),  # not silently truncated to id 1
        (lambda m: m.remove([2 ** 64 - 1]), "64-bit"),
        (lambda m: m.add(x, ["a", "b"], ids=[1.0, 2.0]), "integers"),
        (lambda m: m.add(x, [Payload(5), Payload("b")]), "text must be a str"),
        (lambda m: m.add(x, ["a", 7]), "pass a Payload"),
        (lambda m: m.add(x, ["a", Payload("b", metadata={"f": object()})]), "JSON-serialisable"),
        (lambda m: m.add(x, ["a", Payload("b", metadata=[1])]), "must be a JSON object"),
        (lambda m: m.add(x, ["a", "\ud800"]), "not valid Unicode"),
    ]
    for name, mem in both(token_server).items():
        before = mem.stats()
        for call, words in cases:
            with pytest.raises(InvalidArgument, match=words):
                call(mem)
        assert mem.stats()["count"] == before["count"] and mem.stats()["wal_bytes"] == before["wal_bytes"], name


def deep(levels):
    meta = {"leaf": 1}
    for _ in range(levels - 1):
        meta = {"a": meta}
    return meta


def test_deeply_nested_metadata_is_invalid_argument(token_server):
    x = clustered(1, seed=23)
    stub = pb_grpc.SemanticMemoryStub(grpc.insecure_channel(token_server))
    auth = (("authorization", f"Bearer {TOKEN}"),)
    for levels in (100_000, 65):  # the decoder's recursion limit, and just past the store's depth limit
        request = pb.AddRequest(vectors=pb.Matrix(rows=1, dim=D, data=x.astype("<f4").tobytes()), payloads=[
            pb.Payload(text="deep", metadata_json='{"a":' * (levels - 1) + '{"leaf":1}' + "}" * (levels - 1),
                       present=True)])
        with pytest.raises(grpc.RpcError) as err:
            stub.Add(request, metadata=auth)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nested deeper" in err.value.details()
    for name, mem in both(token_server).items():
        with pytest.raises(InvalidArgument, match="nested deeper than 64"):
            mem.add(x, [Payload("deep", metadata=deep(100_000))])
        ids = mem.add(x, [Payload("deep", metadata=deep(64))])  # at the limit: stored and read back whole
        assert mem.get(ids)[1][0].metadata == deep(64), name


def test_explicit_top_id_never_blocks_assigned_ids(tmp_path):
    proc, address = launch(str(tmp_path), D, "--threads", "1")
    x = clustered(12, seed=24)
    top = 2 ** 63 - 1
    try:
        mem = SemanticMemory.connect(address, token="")
        mem.add(x[:2], ["top", "five"], ids=[top, 5])
        first = mem.add(x[2:8], [f"auto {i}" for i in range(6)])  # counter from 0, stepping over the explicit 5
        np.testing.assert_array_equal(first, [0, 1, 2, 3, 4, 6])
        assert mem.get([5])[1][0].text == "five"  # not overwritten by an assigned id
        mem.remove([top])
        stop(proc, signal.SIGKILL)  # the log replays: explicit ids must not move the counter there either
        proc, address = launch(str(tmp_path), D, "--threads", "1")
        mem = SemanticMemory.connect(address, token="")
        np.testing.assert_array_equal(mem.add(x[8:10], ["after kill a", "after kill b"]), [7, 8])
        mem.add(x[10:11], ["top again"], ids=[top])
        stop(proc)  # a clean stop snapshots the counter
        proc, address = launch(str(tmp_path), D, "--threads", "1")
        mem = SemanticMemory.connect(address, token="")
        np.testing.assert_array_equal(mem.add(x[11:12], ["after snapshot"]), [9])
        assert mem.stats()["count"] == 11 and mem.get([top])[1][0].text == "top again"
    finally:
        stop(proc)


def test_ivfpq_train_min_below_its_clusters_is_refused_at_start_up(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mantis_jax.memory.server", "--data-dir", str(tmp_path), "--dim", "16",
                          "--index", "ivfpq", "--nlist", "64", "--pq-m", "8", "--train-min", "10"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "train_min (10) must be 0 (= 39 x 256) or at least max(nlist, 2**pq_nbits) = 256" in out.stderr
    assert not os.path.exists(tmp_path / "wal.0.log")  # refused before the data dir was touched
