"""Memory QA benchmark: exact match per question kind for attention-only answering vs the engine with memory.

    python benchmarks/memory_qa.py --checkpoint=runs/demo [--stage2=runs/demo_stage2] [--n=150]
        [--distances=512,8192,65536] [--n_long=20] [--json=out.json]

Baselines (measured in the same run): attention only, today's path (`eval.qa.answer_questions`: the whole
context and the question, cut from the left to max_seq_len - 8 tokens: longer than the demo model's training
window), and "window": the engine with its memory gates off (`engine.retrieve=never`: the last `data.seq_len`
tokens of the context and the question). Against them: the engine
(mantis_jax.engine) with a fresh memory per question, which reads the context (sentence spans, encoded by the
untrained mean-pooled encoder and, with --stage2, the trained one), then answers with the top `engine.top_k`
spans placed beside its window (`engine.memory_position`; `--memory_position=after,before` also answers each
question with the other order, from the same read). Kinds: near, far and cross_session at each distance (tokens
of filler between evidence and question), unanswerable; `--n` questions per kind (`--n_long` for distances above 4096, whose
contexts take long to read on a CPU). Also per kind: EM per wording of the evidence sentence (canonical /
alternative), the evidence's retrieval rank in the trace (recall@k of the engine's own search), retrieval ms per
question, and the mean compute (flops / flops_full).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from mantis_jax.data import factworld  # noqa: E402
from mantis_jax.engine.core import Engine  # noqa: E402
from mantis_jax.engine.policy import FixedPolicy  # noqa: E402
from mantis_jax.eval.qa import answer_questions  # noqa: E402
from mantis_jax.memory.train import load_encoder_params, wording  # noqa: E402


def records_for(config, kind: str, n: int, distance: int) -> list[dict]:
    return factworld.eval_questions("test", kind, n, config=config, distance=distance)


def engine_answers(engine: Engine, records: list[dict], policies: dict) -> dict[str, tuple[list, list]]:
    """{policy name: (predictions, traces)}: each record read once into a fresh memory, asked once per policy
    (name -> (policy, engine.memory_position))."""
    out = {name: ([], []) for name in policies}
    for r in records:
        engine.forget()
        if r["sessions"]:
            for i, s in enumerate(r["sessions"]):
                engine.read(s, session=f"s{i}")
        else:
            engine.read(r["context"])
        for name, (policy, position) in policies.items():
            engine.policy, engine.config.engine.memory_position = policy, position
            ans = engine.answer(r["question"])
            out[name][0].append(ans.text)
            out[name][1].append(ans.trace.to_dict())
    return out


def score(records, preds, traces=None) -> dict:
    hits = np.array([factworld.exact_match(p, r["answer"]) for p, r in zip(preds, records)], float)
    out = {"em": float(hits.mean()), "n": len(records)}
    words = [wording(r) if r["answerable"] else "" for r in records]
    for w in ("canonical", "alternative"):
        sel = np.array([x == w for x in words])
        if sel.any():
            out[f"em_{w}"] = float(hits[sel].mean())
            out[f"n_{w}"] = int(sel.sum())
    if traces is not None:
        ranks = []
        for r, t in zip(records, traces):
            if r["answerable"]:
                ev = r["context"][r["evidence_span"][0]:r["evidence_span"][1]]
                texts = [h["text"] for h in t["retrieved"]]
                ranks.append(texts.index(ev) if ev in texts else len(texts) + 99)
        if ranks:
            out["evidence_retrieved"] = float(np.mean(np.array(ranks) < 99))
            out["evidence_top1"] = float(np.mean(np.array(ranks) == 0))
        out["search_ms"] = float(np.mean([t["latency_ms"]["search"] for t in traces]))
        out["answer_ms"] = float(np.mean([t["latency_ms"]["total"] for t in traces]))
        out["compute"] = float(np.mean([t["compute"] for t in traces]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--stage2", default="")
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--n_long", type=int, default=20)
    ap.add_argument("--distances", default="512,8192,65536")
    ap.add_argument("--json", default="")
    ap.add_argument("--memory_position", default="before",
                    help="engine.memory_position values to compare (e.g. before,after); extras get a column each")
    a = ap.parse_args()
    engines = {"untrained": Engine.from_workdir(a.checkpoint)}
    if a.stage2:
        base = engines["untrained"]
        engines["stage2"] = Engine(base.config, base.params, base.tokenizer,
                                   encoder_params=load_encoder_params(a.stage2))
    config, tok, params = engines["untrained"].config, engines["untrained"].tokenizer, engines["untrained"].params
    kinds = [("near", 0), ("unanswerable", 0)]
    for d in (int(x) for x in a.distances.split(",")):
        kinds += [("far", d), ("cross_session", d)]
    results = {}
    columns = list(engines) + [f"{list(engines)[-1]}_{p}" for p in a.memory_position.split(",")[1:]]
    print(f"{'kind':22s} {'n':>4s} {'attention EM':>13s} {'window EM':>10s} "
          + " ".join(f"{k + ' EM':>15s}" for k in columns) + "  evidence in prompt / top-1  search ms  compute",
          flush=True)
    for kind, d in kinds:
        n = a.n_long if d > 4096 else a.n
        recs = records_for(config, kind, n, d or 2048)
        t0 = time.perf_counter()
        preds, _ = answer_questions(config, tok, params, recs, batch_size=8)
        row = {"attention": score(recs, preds), "attention_s": time.perf_counter() - t0}
        for name, engine in engines.items():
            t0 = time.perf_counter()
            first, *extra = a.memory_position.split(",")
            policies = {name: (FixedPolicy(retrieve="always"), first)}
            if name == "untrained":
                policies["window"] = (FixedPolicy(retrieve="never"), first)
            elif extra:  # prompt orders compared on the trained encoder's memory, same read
                policies.update({f"{name}_{p}": (FixedPolicy(retrieve="always"), p) for p in extra})
            for pname, (p, traces) in engine_answers(engine, recs, policies).items():
                row[pname] = score(recs, p, traces)
            row[f"{name}_s"] = time.perf_counter() - t0
        label = f"{kind}@{d}" if d else kind
        results[label] = row
        last = row[list(engines)[-1]]
        print(f"{label:22s} {n:4d} {row['attention']['em']:13.3f} {row['window']['em']:10.3f} "
              + " ".join(f"{row[k]['em']:15.3f}" for k in columns)
              + f"  {last.get('evidence_retrieved', float('nan')):.3f} / {last.get('evidence_top1', float('nan')):.3f}"
              + f"  {last['search_ms']:9.1f}  {last['compute']:.3f}", flush=True)
        if a.json:  # after every kind: a run cut short by its time limit keeps what it measured
            with open(a.json, "w") as f:
                json.dump({"date": time.strftime("%Y-%m-%d"), "args": vars(a), "results": results}, f, indent=1)
    for e in engines.values():
        e.close()


if __name__ == "__main__":
    main()
