"""Semantic memory benchmark: recall@10 of ivfpq and hnsw against exact flat search, QPS in-process vs. through
the gRPC service (batch 1 and 64, p50/p99 latency), add throughput with the fsynced log, and ivfpq with its
inverted lists on disk (`ondisk`) against the same index with the lists in RAM (QPS, load time, resident memory).

    python benchmarks/semantic.py                  # 1M x 256 clustered vectors (~10 min on 2 CPU cores)
    python benchmarks/semantic.py --quick          # 100K x 256
    python benchmarks/semantic.py --ondisk-only    # only flat (the recall baseline) and on-disk vs. in-RAM lists

Every figure is a ratio against a baseline measured in the same run: recall against flat search, service QPS
against in-process QPS on the same snapshot, durable add rate against the in-memory (no log) add rate, on-disk
lists against in-RAM lists (each loaded from the same snapshot in a fresh process, so resident memory is its own).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mantis_jax.memory.semantic import IndexSpec, Payload, SemanticMemory, SemanticStore  # noqa: E402
from mantis_jax.memory.server import launch  # noqa: E402

ADD_BATCH = 1024


def clustered(n: int, d: int, seed: int, n_total: int = 0) -> np.ndarray:
    """Random but clustered, like fact embeddings: 1000 topics, n_total/32 facts around them (a few paraphrases
    each), n points around the facts. Topics and facts depend only on (n_total, d); `seed` draws the points."""
    rng = np.random.default_rng(1234)
    topics = rng.standard_normal((1000, d), dtype=np.float32)
    n_fact = max((n_total or n) // 32, 1)
    facts = topics[rng.integers(0, 1000, n_fact)] + 0.5 * rng.standard_normal((n_fact, d), np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for lo in range(0, n, 65536):  # chunked: no temporary twice the size of the data
        m = min(65536, n - lo)
        out[lo:lo + m] = facts[rng.integers(0, n_fact, m)] + 0.4 * rng.standard_normal((m, d), np.float32)
    return out


def payloads(lo: int, hi: int) -> list[Payload]:
    return [Payload(f"fact {i}: a text span of about this length", source="bench", timestamp=float(i))
            for i in range(lo, hi)]


def fill(store, x, label):
    t0 = time.perf_counter()
    for lo in range(0, len(x), ADD_BATCH):
        hi = min(lo + ADD_BATCH, len(x))
        store.add(x[lo:hi], payloads(lo, hi), ids=np.arange(lo, hi))
        if lo % (ADD_BATCH * 128) == 0:
            print(f"  {label}: {hi}/{len(x)} added ({time.perf_counter() - t0:.0f} s)", flush=True)
    return len(x) / (time.perf_counter() - t0)


def recall(ids_bk, truth_bk):
    k = truth_bk.shape[1]
    return float(np.mean([len(set(a[:k]) & set(b)) / k for a, b in zip(ids_bk, truth_bk)]))


def timed_search(search, q, batch, n_calls):
    """(QPS, p50 ms, p99 ms) of `n_calls` calls of `batch` queries each (after 3 warm-up calls)."""
    for i in range(3):
        search(q[i * batch:(i + 1) * batch])
    lat = []
    t0 = time.perf_counter()
    for i in range(n_calls):
        lo = (i * batch) % (len(q) - batch + 1)
        s = time.perf_counter()
        search(q[lo:lo + batch])
        lat.append(time.perf_counter() - s)
    qps = n_calls * batch / (time.perf_counter() - t0)
    return qps, 1e3 * float(np.percentile(lat, 50)), 1e3 * float(np.percentile(lat, 99))


def rss_mb() -> dict:
    """Resident memory of this process (MB): anonymous (heap: in-RAM lists) and file-backed (mapped files)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith("Rss"))
    return {k: int(v.split()[0]) / 1024 for k, v in fields.items()}


def probe(args) -> None:
    """Child process: loads the ivfpq snapshot in `args.probe_dir` with lists on disk or in RAM, then searches."""
    faiss.omp_set_num_threads(args.threads)
    q, truth = np.load(os.path.join(args.workdir, "q.npy")), np.load(os.path.join(args.workdir, "truth.npy"))
    before = rss_mb()
    t0 = time.perf_counter()
    spec = IndexSpec(dim=args.dim, kind="ivfpq", nlist=1024, pq_m=32, refine_factor=8, ondisk=args.probe == "disk")
    store = SemanticStore(spec, args.probe_dir, snapshot_interval_s=0)
    out = {"load_s": time.perf_counter() - t0, "anon_load": rss_mb()["RssAnon"] - before["RssAnon"]}
    store.search(q, 10, with_payloads=False)  # warm-up, as for the in-RAM ivfpq rows above
    for nprobe in args.nprobe:
        t0 = time.perf_counter()
        ids = store.search(q, 10, nprobe=nprobe, with_payloads=False).ids
        out[f"qps{nprobe}"] = len(q) / (time.perf_counter() - t0)
        out[f"recall{nprobe}"] = recall(ids, truth)
    after = rss_mb()
    out.update(anon=after["RssAnon"] - before["RssAnon"], file=after["RssFile"] - before["RssFile"],
               ondisk=store.stats()["ondisk"])
    print("PROBE " + json.dumps(out), flush=True)


def ondisk_section(args, work, x, q, truth, add_mem) -> list[str]:
    """Fills an ivfpq store with on-disk lists, snapshots it, and loads that snapshot twice in fresh processes:
    lists in RAM (converted on load) and lists on disk (mapped). Returns the report lines."""
    data_dir = os.path.join(work, "ondisk")
    shutil.rmtree(data_dir, ignore_errors=True)
    spec = IndexSpec(dim=x.shape[1], kind="ivfpq", nlist=1024, pq_m=32, refine_factor=8, ondisk=True,
                     train_min=min(65536, len(x) // 2), train_sample=65536)
    store = SemanticStore(spec, data_dir, snapshot_interval_s=0)
    add_disk = fill(store, x, "ivfpq, lists on disk (fsynced log)")
    t0 = time.perf_counter()
    store.snapshot()  # merges the rows still in RAM into the lists file
    snap_s = time.perf_counter() - t0
    store.close()
    del store
    np.save(os.path.join(work, "q.npy"), q)
    np.save(os.path.join(work, "truth.npy"), truth)
    res = {}
    for mode in ("ram", "disk"):
        cmd = [sys.executable, os.path.abspath(__file__), "--probe", mode, "--probe-dir", data_dir, "--workdir", work,
               "--dim", str(x.shape[1]), "--threads", str(args.threads), "--nprobe", *map(str, args.nprobe)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        res[mode] = json.loads([line for line in out.splitlines() if line.startswith("PROBE ")][-1][6:])
    with open(os.path.join(data_dir, "MANIFEST.json")) as f:
        lists_mb = os.path.getsize(os.path.join(data_dir, json.load(f)["lists"])) / 2 ** 20
    ram, disk = res["ram"], res["disk"]
    lines = [f"\nivfpq lists on disk vs. in RAM ({len(x)} x {x.shape[1]}; each loaded from the same snapshot in a "
             f"fresh process; lists file {lists_mb:.0f} MB; warm page cache):",
             f"  {'lists':6s} {'load s':>7s} {'RssAnon MB':>10s} {'RssFile MB':>10s} " +
             " ".join(f"{'QPS np=' + str(n):>10s} {'recall':>6s}" for n in args.nprobe)]
    for name, r in (("RAM", ram), ("disk", disk)):
        lines.append(f"  {name:6s} {r['load_s']:7.2f} {r['anon']:10.1f} {r['file']:10.1f} " +
                     " ".join(f"{r[f'qps{n}']:10.0f} {r[f'recall{n}']:6.4f}" for n in args.nprobe))
    lines.append("  disk/RAM QPS: " + ", ".join(f"nprobe={n} {disk[f'qps{n}'] / ram[f'qps{n}']:.2f}"
                                                  for n in args.nprobe)
                 + f"; RssAnon disk/RAM {disk['anon'] / max(ram['anon'], 1e-9):.2f}"
                 + f"; add rate with on-disk lists and the fsynced log, incl. training and merges {add_disk:.0f}/s "
                   f"({add_disk / add_mem:.2f}x in-memory flat); final snapshot (merge) {snap_s:.1f} s")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="100K vectors, fewer queries")
    p.add_argument("--n", type=int, default=0, help="vectors (default 1M, 100K with --quick)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=0)
    p.add_argument("--hnsw-n", type=int, default=0, help="vectors in the hnsw index (default: --n)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    p.add_argument("--ef", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--threads", type=int, default=1,
                   help="FAISS OpenMP threads here and in the service (1: a shared 2-core machine)")
    p.add_argument("--workdir", default="")
    p.add_argument("--ondisk-only", action="store_true", help="only flat search and on-disk vs. in-RAM lists")
    p.add_argument("--probe", choices=("ram", "disk"), help=argparse.SUPPRESS)  # child process of the ondisk part
    p.add_argument("--probe-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        return probe(args)
    n = args.n or (100_000 if args.quick else 1_000_000)
    nq = args.queries or (500 if args.quick else 1000)
    d = args.dim
    work = args.workdir or tempfile.mkdtemp(prefix="semantic_bench_")
    print(f"semantic memory benchmark: {n} x {d} clustered vectors, {nq} queries, k=10, workdir {work}", flush=True)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    x = clustered(n, d, seed=0)
    q = clustered(nq, d, seed=1, n_total=n)  # unseen points of the same distribution
    rows = []

    # Exact baseline (and the in-memory add rate: no log, no fsync).
    flat = SemanticStore(IndexSpec(dim=d, kind="flat"), None)
    add_mem = fill(flat, x, "flat (in memory)")
    t0 = time.perf_counter()
    truth = flat.search(q, 10, with_payloads=False).ids
    flat_qps = nq / (time.perf_counter() - t0)
    rows.append(("flat exact (baseline)", "-", 1.0, flat_qps, 1.0))
    del flat
    if args.ondisk_only:
        print(f"flat: {flat_qps:.0f} QPS at batch {nq}; in-memory add rate {add_mem:.0f}/s")
        print("\n".join(ondisk_section(args, work, x, q, truth, add_mem)))
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        return

    # ivfpq, durable: the add rate with the fsynced log, then recall and in-process QPS.
    data_dir = os.path.join(work, "ivfpq")
    shutil.rmtree(data_dir, ignore_errors=True)
    spec = IndexSpec(dim=d, kind="ivfpq", nlist=1024, pq_m=32, refine_factor=8, train_min=min(65536, n // 2),
                     train_sample=65536)
    ivf = SemanticStore(spec, data_dir, snapshot_interval_s=0)
    add_wal = fill(ivf, x, "ivfpq (fsynced log)")
    ivf.search(q, 10, with_payloads=False)  # warm-up: page in the codes and raw rows once
    for nprobe in args.nprobe:
        t0 = time.perf_counter()
        ids = ivf.search(q, 10, nprobe=nprobe, with_payloads=False).ids
        qps = nq / (time.perf_counter() - t0)
        rows.append(("ivfpq PQ32 refine x8", f"nprobe={nprobe}", recall(ids, truth), qps, qps / flat_qps))
    nprobe = 32
    ivf.snapshot()
    ivf.close()
    extra = clustered(32 * ADD_BATCH, d, seed=5, n_total=n)
    extra_ids = np.arange(n, n + len(extra))

    def add_extra(mem):
        t0 = time.perf_counter()
        for lo in range(0, len(extra), ADD_BATCH):
            mem.add(extra[lo:lo + ADD_BATCH], payloads(n + lo, n + lo + ADD_BATCH), ids=extra_ids[lo:lo + ADD_BATCH])
        return len(extra) / (time.perf_counter() - t0)

    # In-process and through the service, each on the snapshot just written (same files, same page cache).
    ivf = SemanticStore(spec, data_dir, snapshot_interval_s=0)
    local = {b: timed_search(lambda z: ivf.search(z, 10, nprobe=nprobe), q, b, calls)
             for b, calls in ((1, 300), (64, 30))}
    add_wal_trained = add_extra(ivf)  # into the trained index, fsynced log
    ivf.close()
    proc, address = launch(data_dir, d, "--index", "ivfpq", "--nlist", "1024", "--pq-m", "32",
                           "--refine-factor", "8", "--snapshot-interval", "0", "--threads", str(args.threads),
                           timeout_s=600)
    try:
        mem = SemanticMemory.connect(address, token="")
        remote = {b: timed_search(lambda z: mem.search(z, 10, nprobe=nprobe), q, b, calls)
                  for b, calls in ((1, 300), (64, 30))}
        add_service = add_extra(mem)  # the same vectors again (upserts), through gRPC
    finally:
        proc.send_signal(signal.SIGKILL)  # skip the final snapshot: this index is thrown away
        proc.wait()

    # hnsw (in memory).
    hn = args.hnsw_n or n
    hnsw = SemanticStore(IndexSpec(dim=d, kind="hnsw", hnsw_m=32, ef_construction=80), None)
    t0 = time.perf_counter()
    fill(hnsw, x[:hn], "hnsw")
    hnsw_build = time.perf_counter() - t0
    truth_h = truth
    if hn < n:
        sub = SemanticStore(IndexSpec(dim=d, kind="flat"), None)
        fill(sub, x[:hn], "flat subset")
        truth_h = sub.search(q, 10, with_payloads=False).ids
    for ef in args.ef:
        t0 = time.perf_counter()
        ids = hnsw.search(q, 10, ef_search=ef, with_payloads=False).ids
        qps = nq / (time.perf_counter() - t0)
        rows.append((f"hnsw M32 ({hn} vectors)", f"ef={ef}", recall(ids, truth_h), qps, qps / flat_qps))

    print(f"\nrecall@10 against exact flat search ({n} x {d}; flat QPS {flat_qps:.0f} at batch {nq}):")
    print(f"  {'index':28s} {'setting':12s} {'recall@10':>9s} {'QPS':>9s} {'QPS/flat':>9s}")
    for name, setting, r, qps, ratio in rows:
        print(f"  {name:28s} {setting:12s} {r:9.4f} {qps:9.0f} {ratio:9.2f}")
    print(f"\nivfpq nprobe={nprobe}, k=10, with payloads: in-process vs. gRPC service on the same snapshot")
    print(f"  {'batch':>5s} {'in-proc QPS':>11s} {'service QPS':>11s} {'ratio':>6s} {'p50 ms in/svc':>14s} "
          f"{'p99 ms in/svc':>14s}")
    for b in (1, 64):
        (lq, l50, l99), (rq, r50, r99) = local[b], remote[b]
        print(f"  {b:5d} {lq:11.0f} {rq:11.0f} {rq / lq:6.2f} {l50:6.2f}/{r50:<7.2f} {l99:6.2f}/{r99:<7.2f}")
    print(f"\nadd throughput (batches of {ADD_BATCH}, vectors/s, ratio to in-memory flat): in memory, no log "
          f"{add_mem:.0f}; ivfpq with fsynced log {add_wal:.0f} ({add_wal / add_mem:.2f}x, includes training); "
          f"into the trained ivfpq with fsynced log {add_wal_trained:.0f} ({add_wal_trained / add_mem:.2f}x); "
          f"through the service {add_service:.0f} ({add_service / add_mem:.2f}x)")
    print(f"hnsw build: {hnsw_build:.0f} s for {hn} vectors")
    print("\n".join(ondisk_section(args, work, x, q, truth, add_mem)))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
