"""factworld QA with the LM alone: records answered greedily with the cached decoder, scored by exact match.

Records (from `factworld.eval_questions`) enter; each becomes `factworld.prompt(record)` (context, `Q: ...`,
`A:`), generation stops at a newline or eos, and the first line of the completion is the prediction. Metrics:
overall exact-match accuracy, and separately over answerable records and unanswerable ones (whose answer is
"unknown"), with their counts. Prompts longer than the window keep their last tokens (the question).
"""

from __future__ import annotations

from typing import Sequence

from mantis_jax.data import factworld
from mantis_jax.infer.runner import Generator, newline_ids
from mantis_jax.model.args import ModelArgs


def _accuracy(hits: list[bool]) -> float:
    return sum(hits) / len(hits) if hits else float("nan")


def answer_questions(config, tokenizer, params, records: Sequence[dict], *, max_new_tokens: int = 8,
                     batch_size: int = 16, generator: Generator | None = None,
                     window: int | None = None) -> tuple[list[str], dict]:
    """(predictions, metrics) for QA records; pass `generator` to reuse its compilations across calls. `window`
    (default: the model's max_seq_len) bounds prompt + answer: longer prompts keep their last tokens."""
    if not records:
        raise ValueError("answer_questions got no records; pass factworld.eval_questions(...) output")
    if generator is None:
        generator = Generator(ModelArgs.from_config(config), params, tokenizer,
                              batch_size=min(batch_size, len(records)), extra_stop_ids=newline_ids(tokenizer))
    keep = (window or config.model.max_seq_len) - max_new_tokens
    if keep < 1:
        raise ValueError(f"window ({window}) leaves no room for a prompt before {max_new_tokens} new tokens")
    prompts = [tokenizer.encode(factworld.prompt(r), add_bos=True)[-keep:] for r in records]
    ids, stats = generator.generate_ids(prompts, max_new_tokens=max_new_tokens, temperature=0.0, truncate=True,
                                        measure_ttft=False)
    completions = [tokenizer.decode(i) for i in ids]
    predictions = [c.split("\n", 1)[0].strip() for c in completions]
    hits = [factworld.exact_match(p, r["answer"]) for p, r in zip(predictions, records)]
    answerable = [h for h, r in zip(hits, records) if r["answerable"]]
    unanswerable = [h for h, r in zip(hits, records) if not r["answerable"]]
    metrics = {"accuracy": _accuracy(hits), "n": len(hits),
               "answerable_accuracy": _accuracy(answerable), "n_answerable": len(answerable),
               "unanswerable_accuracy": _accuracy(unanswerable), "n_unanswerable": len(unanswerable),
               "tokens_per_s": stats.tokens_per_s}
    return predictions, metrics
