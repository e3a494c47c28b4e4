"""Memory QA at scale: the far / cross_session questions with the semantic memory service holding N distractors.

    python benchmarks/memory_scale.py --checkpoint=runs/demo --stage2=runs/demo_stage2 --workdir=runs/scale \
        [--spans=1000000] [--encode_minutes=20] [--n=20] [--kinds=far,cross_session] [--distance=512] [--json=F]

What runs: the real service process (`python -m mantis_jax.memory.server`, 127.0.0.1, ivfpq with the engine's
`memory.semantic` settings: nlist, pq_m, nprobe, refine_factor, trained on a sample once `train_min` vectors are
in) filled with `--spans` distractors: real factworld fact sentences (both wordings) about OTHER entities than the
test questions' (the train / val entities of the model's world, then entities of other seeds whose names no entity
of that world has), encoded by the engine's own retrieval encoder. The engine (`memory.semantic.address` = that
service, `memory.episodic.enabled=False` by default so every span of the question's document is stored in the
service and competes inside the ivfpq index; `--episodic` keeps the ring) reads each question's document and
answers; after each question the document's spans are removed again, the distractors stay. Baseline in the same
run: the same engine against a second, empty service (only the documents' own spans).

Reported per kind: EM (own spans only vs + N distractors), evidence in the prompt (top_k), retrieval time per
question (question encoding and the engine's search step, median and p95, ms), and the index's recall of the
evidence: exact top-k over the same vectors (brute force: what a perfect index returns) against the service's.

Cost: encoding N spans runs the frozen LM (and the Stage-2 SSM) forward on each. Vectors are cached under
`--workdir` (`distractors.f32`, appended in chunks, so an interrupted run resumes and reruns are free);
`--encode_minutes` bounds this run's encoding, and the run then uses the N it has (printed: `N reached`). The
filled service data dir is kept too (`service_<N>/`) and reloaded when N and the encoder match.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from mantis_jax.data import factworld  # noqa: E402

ENCODE_BATCH = 1024
ADD_BATCH = 8192
EXTRA_WORLDS = 8  # other seeds drawn from once the model's world runs out of other entities


# ----------------------------------------------------------------------------------------------- distractors
def _entity_sentences(facts: list[factworld.Fact], banned: set[str]) -> list[str]:
    """Every wording of every stated fact of one entity, unless it names a banned entity."""
    out = []
    for f in facts:
        if f.value is None or f.entity in banned or (f.attribute == "friend" and f.value in banned):
            continue
        out += [t.format(n=f.entity, v=f.value) for t in factworld.ATTRIBUTES[f.attribute][0]]
    return out


def distractor_sentences(world: factworld.World, n: int, *, splits=("train", "val"), seed: int = 0) -> list[str]:
    """`n` distinct fact sentences about entities no `test`-split question can ask about, in a fixed order.

    First the other splits' entities of `world` (other documents of the same world), shuffled; then entities of
    worlds with other seeds whose names are not names of `world` at all (so no sentence contradicts, or states,
    a fact of a test entity), each world's sentences shuffled. Raises when the supply runs out."""
    test_names = {world.name(world.entity_index("test", j)) for j in range(world.split_size("test"))}
    out, seen = [], set()

    def take(sentences):
        random.Random(seed).shuffle(sentences)
        for s in sentences:
            if s not in seen:
                seen.add(s)
                out.append(s)
                if len(out) == n:
                    return True
        return False

    own = [s for split in splits for j in range(world.split_size(split))
           for s in _entity_sentences(world.facts(split, j), test_names)]
    if n == 0 or take(own):
        return out
    all_names = {world.name(world.entity_index(split, j)) for split in factworld.SPLITS
                 for j in range(world.split_size(split))}
    for k in range(1, EXTRA_WORLDS + 1):
        other = factworld.World(world.seed + 1000 * k, world.n_entities)
        more = [s for split in factworld.SPLITS for j in range(other.split_size(split))
                for s in _entity_sentences(other.facts(split, j), all_names)]
        if take(more):
            return out
    raise ValueError(f"only {len(out)} distinct distractor sentences exist for this world; lower --spans")


# ------------------------------------------------------------------------------------------- vector cache
class VectorCache:
    """Unit vectors of the first `count` distractor sentences, a float32 file appended in chunks, and a meta file
    naming what produced them (a cache made by another encoder or another sentence list is refused)."""

    def __init__(self, workdir: str, dim: int, key: dict):
        os.makedirs(workdir, exist_ok=True)
        self.path, self.meta_path, self.dim = (os.path.join(workdir, "distractors.f32"),
                                               os.path.join(workdir, "distractors.json"), dim)
        self.key = key
        if os.path.exists(self.meta_path):
            with open(self.meta_path) as f:
                saved = json.load(f)
            if saved != key:
                raise ValueError(f"{self.meta_path} was made by {saved}, not {key}; use another --workdir or "
                                 "delete it to re-encode")
        else:
            with open(self.meta_path, "w") as f:
                json.dump(key, f)
        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        self.count = size // (4 * dim)
        if size % (4 * dim):  # a torn last chunk (killed mid-write): keep the whole rows
            with open(self.path, "r+b") as f:
                f.truncate(self.count * 4 * dim)

    def append(self, vectors: np.ndarray) -> None:
        with open(self.path, "ab") as f:
            f.write(np.ascontiguousarray(vectors, np.float32).tobytes())
            f.flush()
            os.fsync(f.fileno())
        self.count += len(vectors)

    def read(self, n: int) -> np.ndarray:
        return np.memmap(self.path, np.float32, "r", shape=(n, self.dim)) if n else np.zeros((0, self.dim),
                                                                                             np.float32)


def bulk_encoder(engine):
    """(texts -> unit vectors [N, D]) with the engine's encoder at a fixed batch: the same weights and math as
    `Engine.encode`, with the SSM's sequential scan (equal to its chunked one to float rounding; faster here)."""
    from mantis_jax.memory import encoder as enc  # noqa: PLC0415

    trained = engine.encoder_params is not None
    fn = enc.encode_fn(engine.args, dataclasses.replace(engine.ssm_args, scan_impl="sequential"), trained)
    tok = engine.tokenizer

    def encode(texts: list[str]) -> np.ndarray:
        ids = [tok.encode(t, add_bos=True)[:engine.args.max_seq_len] for t in texts]
        ids += [[tok.pad_id]] * (ENCODE_BATCH - len(ids)) if len(ids) < ENCODE_BATCH else []
        tokens, mask = enc.right_pad(ids, tok.pad_id)
        return np.asarray(fn(engine.encoder_params, engine.params, tokens, mask))[:len(texts)]
    return encode


def fill_cache(cache: VectorCache, texts: list[str], encode, minutes: float, out=print) -> int:
    """Encodes texts[cache.count:] in batches until done or `minutes` pass; returns the count cached."""
    t0 = time.perf_counter()
    start = cache.count
    while cache.count < len(texts) and (time.perf_counter() - t0) < 60 * minutes:
        chunk = texts[cache.count:cache.count + 8 * ENCODE_BATCH]
        cache.append(np.concatenate([encode(chunk[i:i + ENCODE_BATCH]) for i in range(0, len(chunk), ENCODE_BATCH)]))
        rate = (cache.count - start) / (time.perf_counter() - t0)
        out(f"  encoded {cache.count}/{len(texts)} distractors ({rate:.0f} spans/s)")
    return cache.count


# ------------------------------------------------------------------------------------------------ service
def service_flags(sem, threads: int = 1) -> list[str]:
    """Command-line flags of the service for the engine's `memory.semantic` ivfpq settings."""
    return ["--index", "ivfpq", "--nlist", str(sem.nlist), "--pq-m", str(sem.pq_m), "--pq-nbits", str(sem.pq_nbits),
            "--nprobe", str(sem.nprobe),
            "--refine-factor", str(sem.refine_factor), "--train-min", str(sem.train_min),
            "--train-sample", str(sem.train_sample), "--snapshot-interval", "0", "--threads", str(threads)]


def start_service(data_dir: str, dim: int, flags: list[str]):
    from mantis_jax.memory.server import launch  # noqa: PLC0415

    os.makedirs(data_dir, exist_ok=True)
    return launch(data_dir, dim, *flags, timeout_s=900)


def stop_service(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except Exception:  # noqa: BLE001 -- a service that does not stop is killed
            proc.kill()
            proc.wait()


def fill_service(memory, texts: list[str], vectors: np.ndarray, namespace: str, *, start: int = 0,
                 source: str = "distractor", out=print) -> float:
    """Adds rows as ids start..start+N-1 in batches, then snapshots; returns vectors/s. The service trains ivfpq
    on its own once `train_min` rows are in."""
    from mantis_jax.memory.semantic import Payload  # noqa: PLC0415

    t0 = time.perf_counter()
    for lo in range(0, len(texts), ADD_BATCH):
        hi = min(lo + ADD_BATCH, len(texts))
        memory.add(np.asarray(vectors[lo:hi]), [Payload(t, source=source, namespace=namespace)
                                                for t in texts[lo:hi]], ids=np.arange(start + lo, start + hi))
        if (lo // ADD_BATCH) % 16 == 0:
            out(f"  service: {hi}/{len(texts)} {source} rows added ({time.perf_counter() - t0:.0f} s)")
    memory.snapshot()
    return len(texts) / max(time.perf_counter() - t0, 1e-9)


def padded_vectors(real_nd: np.ndarray, total: int, path: str, sigma: float = 0.025) -> np.ndarray:
    """A file of `total` unit rows: the N real ones, then perturbed copies unit(real[i % N] + sigma * noise) (a
    cosine of ~0.95 to their source): entries that make the index 1M rows large for timing, NOT real sentences."""
    n, d = real_nd.shape
    if not os.path.exists(path) or os.path.getsize(path) != 4 * total * d:
        out = np.memmap(path + ".tmp", np.float32, "w+", shape=(total, d))
        out[:n] = real_nd
        for lo in range(n, total, 65536):
            hi = min(lo + 65536, total)
            rows = np.asarray(real_nd[np.arange(lo, hi) % n]) + sigma * np.random.default_rng(lo).standard_normal(
                (hi - lo, d), np.float32)
            out[lo:hi] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        out.flush()
        del out
        os.replace(path + ".tmp", path)
    return np.memmap(path, np.float32, "r", shape=(total, d))


class Scoped:
    """A SemanticMemory seen by one question: the spans it adds are removed on close; everything else (the
    distractors) stays. The engine's `Memory` closes it on `Engine.forget`."""

    def __init__(self, memory):
        self._memory, self.ids = memory, []

    def add(self, vectors, payloads, ids=None):
        out = self._memory.add(vectors, payloads, ids=ids)
        self.ids += [int(i) for i in out]
        return out

    def close(self) -> None:
        if self.ids:
            self._memory.remove(np.asarray(self.ids, np.int64))
            self.ids = []

    def __getattr__(self, name):
        return getattr(self._memory, name)


# ----------------------------------------------------------------------------------------------- measuring
def exact_scores(query_d: np.ndarray, own_nd: np.ndarray, distractors_nd: np.ndarray,
                 chunk: int = 262144) -> np.ndarray:
    """Inner products of the query with [own rows, then distractor rows] (brute force: the reference)."""
    scores = [own_nd @ query_d]
    for lo in range(0, len(distractors_nd), chunk):
        scores.append(np.asarray(distractors_nd[lo:lo + chunk]) @ query_d)
    return np.concatenate(scores)


def exact_top_k(scores: np.ndarray, k: int) -> list[int]:
    top = np.argpartition(-scores, min(k, len(scores) - 1))[:k]
    return [int(i) for i in top[np.argsort(-scores[top], kind="stable")]]


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms, float)
    return {"median": float(np.median(a)), "p95": float(np.percentile(a, 95)), "mean": float(a.mean())}


def evidence_of(record: dict) -> str:
    return record["context"][record["evidence_span"][0]:record["evidence_span"][1]]


def ask(engine, memory, record: dict) -> tuple[str, dict, list[str]]:
    """Reads the record's document into `memory` (a fresh engine Memory) and answers: (answer, trace, the spans
    read, in the order they were written)."""
    from mantis_jax.engine.core import split_spans  # noqa: PLC0415

    engine.forget(memory)
    e, spans = engine.config.engine, []
    sessions = record["sessions"] or [record["context"]]
    for i, text in enumerate(sessions):
        engine.read(text, session=f"s{i}")
        spans += split_spans(text, e.span, engine.tokenizer, e.span_tokens)
    ans = engine.answer(record["question"])
    return ans.text, ans.trace.to_dict(), spans


def summarize(records, preds, traces, recall_rows=None) -> dict:
    hits = [factworld.exact_match(p, r["answer"]) for p, r in zip(preds, records)]
    placed = [evidence_of(r) in [h["text"] for h in t["retrieved"]] for r, t in zip(records, traces)]
    out = {"n": len(records), "em": float(np.mean(hits)), "evidence_in_prompt": float(np.mean(placed)),
           "encode_ms": percentiles([t["latency_ms"]["encode"] for t in traces]),
           "search_ms": percentiles([t["latency_ms"]["search"] for t in traces]),
           "retrieval_ms": percentiles([t["latency_ms"]["encode"] + t["latency_ms"]["search"] for t in traces])}
    if recall_rows:
        for key in ("exact", "index", "overlap"):
            out[f"recall_{key}"] = float(np.mean([row[key] for row in recall_rows]))
        out["rpc_search_ms"] = percentiles([row["rpc_ms"] for row in recall_rows])
        out["recall_exact_at"] = {m: float(np.mean([row["exact_at"][m] for row in recall_rows]))
                                  for m in recall_rows[0]["exact_at"]}
    return out


def index_recall(memory, query_d: np.ndarray, own_nd: np.ndarray, spans: list[str], evidence: str,
                 distractors_nd: np.ndarray, k: int, namespace: str, prefixes=()) -> dict:
    """One question whose document's spans (`spans`, vectors `own_nd`) are in the service with the distractors:
    is the evidence in the exact top-k over the same vectors (brute force), in the service's top-k, and the
    overlap of the two top-k sets; `rpc_ms`: the time of that one search call; `exact_at`: for each size m in
    `prefixes`, is the evidence in the exact top-k with only the first m distractors (the curve over N)."""
    t0 = time.perf_counter()  # before the brute force: BLAS threads spinning after it would slow the service
    res = memory.search(query_d[None], k, namespace=namespace)
    rpc_ms = 1e3 * (time.perf_counter() - t0)
    scores = exact_scores(query_d, own_nd, distractors_nd)
    exact = exact_top_k(scores, k)
    n_own = len(own_nd)
    exact_ids = {("own", spans[i]) if i < n_own else ("d", i - n_own) for i in exact}
    found = [(int(i), p) for i, p in zip(res.ids[0], res.payloads[0]) if i >= 0 and p is not None]
    got_ids = {("d", i) if p.source in ("distractor", "padding") else ("own", p.text) for i, p in found}
    ev_score = max(scores[i] for i, t in enumerate(spans) if t == evidence)
    own_above = len({t for t, sc in zip(spans, scores[:n_own]) if sc > ev_score})  # distinct texts, as retrieved
    d_above = np.flatnonzero(scores[n_own:] > ev_score)
    return {"exact": ("own", evidence) in exact_ids, "index": ("own", evidence) in got_ids,
            "overlap": len(exact_ids & got_ids) / len(exact_ids), "rpc_ms": rpc_ms,
            "exact_at": {int(m): bool(own_above + int(np.sum(d_above < m)) < k) for m in prefixes}}


def report_line(label: str, row: dict, n_total: int, k: int) -> str:
    o, s = row["own"], row["scaled"]
    ms_ = lambda d: f"{d['median']:.1f}/{d['p95']:.1f}"  # noqa: E731
    return (f"{label} n={o['n']}: EM own spans {o['em']:.3f} / +{n_total} distractors {s['em']:.3f}; evidence in "
            f"the prompt {o['evidence_in_prompt']:.2f} / {s['evidence_in_prompt']:.2f}; evidence in top-{k}: exact "
            f"{s['recall_exact']:.2f}, ivfpq {s['recall_index']:.2f} (top-{k} overlap {s['recall_overlap']:.2f}); "
            f"retrieval ms median/p95: own {ms_(o['retrieval_ms'])} (encode {ms_(o['encode_ms'])}, search "
            f"{ms_(o['search_ms'])}), +N {ms_(s['retrieval_ms'])} (encode {ms_(s['encode_ms'])}, search "
            f"{ms_(s['search_ms'])}; one search RPC {ms_(s['rpc_search_ms'])}); exact evidence recall@{k} by N: "
            + ", ".join(f"{m}: {v:.2f}" for m, v in s["recall_exact_at"].items()))


# -------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--stage2", default="", help="Stage-2 workdir (the trained encoder); '' = mean-pooled")
    ap.add_argument("--workdir", required=True, help="vector cache and service data dirs (kept for reruns)")
    ap.add_argument("--spans", type=int, default=1_000_000, help="distractors in the service")
    ap.add_argument("--encode_minutes", type=float, default=20.0, help="encoding budget of this run")
    ap.add_argument("--n", type=int, default=20, help="questions per kind")
    ap.add_argument("--kinds", default="far,cross_session")
    ap.add_argument("--distance", type=int, default=512)
    ap.add_argument("--episodic", action="store_true", help="keep the episodic ring (default: spans go straight "
                                                            "to the service)")
    ap.add_argument("--pad_to", type=int, default=0,
                    help="timing only: fill the service up to this many rows with perturbed copies of the N real "
                         "distractors (labelled as such in the output)")
    ap.add_argument("--threads", type=int, default=1, help="FAISS threads in the services")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    if a.spans < 1 or a.n < 1:
        ap.error("--spans and --n must be >= 1")

    from mantis_jax.engine.core import Engine  # noqa: PLC0415
    from mantis_jax.engine.memory import Memory  # noqa: PLC0415
    from mantis_jax.memory.semantic import SemanticMemory  # noqa: PLC0415

    t_start = time.perf_counter()
    overrides = {"memory.episodic.enabled": bool(a.episodic)}
    engine = Engine.from_workdir(a.checkpoint, stage2=a.stage2 or "", overrides=overrides)
    config = engine.config
    sem, namespace, k = config.memory.semantic, config.memory.consolidation.namespace, config.engine.top_k
    world = factworld.world_from_config(config)
    t0 = time.perf_counter()
    texts = distractor_sentences(world, a.spans)
    print(f"{len(texts)} distractor sentences ({time.perf_counter() - t0:.0f} s), e.g. {texts[:3]}", flush=True)
    key = {"checkpoint": os.path.abspath(a.checkpoint), "stage2": os.path.abspath(a.stage2) if a.stage2 else "",
           "dim": int(sem.dim), "sentences": hashlib.sha1("\n".join(texts[:1000]).encode()).hexdigest()[:16]}
    cache = VectorCache(a.workdir, sem.dim, key)
    encode = bulk_encoder(engine)
    check = texts[:64]  # the bulk path equals the engine's own encoding of the same texts
    err = float(np.abs(encode(check) - engine.encode(check, cache=False)[0]).max())
    if err > 1e-4:
        raise RuntimeError(f"bulk encoding differs from Engine.encode by {err}")
    t0 = time.perf_counter()
    n = fill_cache(cache, texts, encode, a.encode_minutes)
    encode_s = time.perf_counter() - t0
    n = min(n, a.spans)
    if n == 0:
        raise SystemExit(f"no distractor is encoded in {a.workdir}; give --encode_minutes > 0")
    print(f"N reached: {n} distractors cached ({encode_s:.0f} s this run; bulk vs engine encoding max diff "
          f"{err:.1e})", flush=True)
    vectors = cache.read(n)

    procs, clients = [], []
    try:
        pad = max(a.pad_to - n, 0)
        data_dir = os.path.join(a.workdir, f"service_{n}" + (f"_pad{a.pad_to}" if pad else ""))
        if pad:
            vectors = padded_vectors(vectors, n + pad, os.path.join(a.workdir, f"padded_{n}_{a.pad_to}.f32"))
        marker = os.path.join(data_dir, "filled.json")
        if os.path.exists(data_dir) and not (os.path.exists(marker) and json.load(open(marker)) == key):
            shutil.rmtree(data_dir)  # a partial fill, or another encoder's vectors
        t0 = time.perf_counter()
        proc, address = start_service(data_dir, sem.dim, service_flags(sem, a.threads))
        procs.append(proc)
        load_s = time.perf_counter() - t0
        scale_mem = SemanticMemory.connect(address, token="", timeout_s=3600)  # an Add that trains ivfpq is slow
        clients.append(scale_mem)
        add_rate = None
        if scale_mem.stats()["count"] != n + pad:
            add_rate = fill_service(scale_mem, texts[:n], vectors[:n], namespace)
            if pad:
                fill_service(scale_mem, [texts[i % n] for i in range(n, n + pad)], vectors[n:], namespace,
                             start=n, source="padding")
            with open(marker, "w") as f:
                json.dump(key, f)
        if pad:
            print(f"PADDED (timing): the service holds {n} real distractors + {pad} perturbed copies of them",
                  flush=True)
        stats = scale_mem.stats()
        print(f"service at {address}: {stats['count']} entries, trained={stats.get('trained')}, "
              f"load {load_s:.0f} s, add rate {add_rate and round(add_rate)}/s", flush=True)
        base_dir = os.path.join(a.workdir, "service_empty")
        shutil.rmtree(base_dir, ignore_errors=True)
        proc, base_address = start_service(base_dir, sem.dim, service_flags(sem, a.threads))
        procs.append(proc)
        base_mem = SemanticMemory.connect(base_address, token="")
        clients.append(base_mem)

        results = {}
        prefixes = sorted({m for m in (0, 1000, 10_000, 100_000, 1_000_000) if m < n} | {n, n + pad})
        for kind in a.kinds.split(","):
            recs = factworld.eval_questions("test", kind, a.n, config=config, distance=a.distance)
            for mem in (base_mem, scale_mem):  # compiles and first calls, outside the timings
                ask(engine, Memory(config, semantic=Scoped(mem)), recs[0])
            rows = {"own": ([], []), "scaled": ([], [])}
            recall_rows = []
            for r in recs:
                for name, mem in (("own", base_mem), ("scaled", scale_mem)):
                    pred, trace, spans = ask(engine, Memory(config, semantic=Scoped(mem)), r)
                    rows[name][0].append(pred)
                    rows[name][1].append(trace)
                    if name == "scaled":
                        own, _ = engine.encode(spans)
                        q, _ = engine.encode([r["question"].strip()], cache=False)
                        recall_rows.append(index_recall(mem, q[0], own, spans, evidence_of(r), vectors, k,
                                                        namespace, prefixes))
                engine.forget(Memory(config, semantic=Scoped(base_mem)))  # removes the last question's spans
            results[kind] = {"own": summarize(recs, *rows["own"]),
                             "scaled": summarize(recs, *rows["scaled"], recall_rows)}
            print(report_line(f"{kind}@{a.distance}", results[kind], n + pad, k), flush=True)
        if scale_mem.stats()["count"] != n + pad:
            raise RuntimeError(f"the service holds {scale_mem.stats()['count']} entries after the questions, "
                               f"not {n + pad}")
    finally:
        engine.close()
        for client in clients:
            client.close()
        for proc in procs:
            stop_service(proc)
    out = {"date": time.strftime("%Y-%m-%d"), "args": vars(a), "n_distractors": n, "n_padding": pad,
           "encode_s": encode_s,
           "encoder": a.stage2 or "mean-pooled", "service": stats, "add_rate": add_rate, "results": results,
           "minutes": (time.perf_counter() - t_start) / 60}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
