"""Data pipeline benchmark: tokens/s of the grain pipeline per source, against the memory-mapped token file.

    python benchmarks/data_pipeline.py            # seq_len 256, batch 32, 200 batches per source
    python benchmarks/data_pipeline.py --quick    # 40 batches per source

Baseline: packed batches read from a pre-tokenized, memory-mapped token file (the cheapest source). Measured in the
same run: factworld generated and tokenized on the fly (the demo's source), text pretokenization throughput
(`sources.pretokenize`, what `python -m mantis_jax.data.preprocess pretokenize` does), and the raw generator rate.
Every figure is printed with its ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mantis_jax import config as C  # noqa: E402
from mantis_jax.data import factworld, pipeline, sources  # noqa: E402


def pipeline_rate(cfg, tok, n_batches: int) -> float:
    """Training tokens per second (inputs) out of make_datasets' train iterator, after one warm-up batch."""
    it = iter(pipeline.make_datasets(cfg, tok).train)
    next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * cfg.data.batch_size * cfg.data.seq_len / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=2048)
    args = ap.parse_args()
    n_batches = 40 if args.quick else 200
    n_docs = 3000 if args.quick else 20000

    cfg = C.default_config()
    cfg.data.seq_len, cfg.data.batch_size, cfg.data.tokenizer_vocab = args.seq_len, args.batch_size, args.vocab
    cfg.data.answer_loss_weight = 2.0
    t0 = time.perf_counter()
    tok = pipeline.build_tokenizer(cfg)
    print(f"tokenizer: vocab {tok.vocab_size} trained on a 3000-document sample in {time.perf_counter() - t0:.2f} s")

    with tempfile.TemporaryDirectory() as tmp:
        world = factworld.world_from_config(cfg)
        t0 = time.perf_counter()
        texts = list(world.iter_documents("train", 0, n_docs))
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        header = sources.pretokenize(texts, tok, os.path.join(tmp, "fw.tok"))
        pretok_rate = header["n_tokens"] / (time.perf_counter() - t0)
        gen_rate = header["n_tokens"] / gen_s  # generator alone, in (BPE) tokens per second

        file_cfg = C.default_config()
        file_cfg.data.update(cfg.data.to_dict())
        file_cfg.data.source, file_cfg.data.path = "tokenized", os.path.join(tmp, "fw.tok")
        base = pipeline_rate(file_cfg, tok, n_batches)
        fw_rate = pipeline_rate(cfg, tok, n_batches)

    print(f"\nseq_len {args.seq_len}, batch {args.batch_size}, {n_batches} batches, {os.cpu_count()} CPUs visible")
    print(f"{'what':48s} {'tokens/s':>12s} {'vs baseline':>12s}")
    rows = [("pipeline, memory-mapped token file (baseline)", base),
            ("pipeline, factworld generated on the fly", fw_rate),
            ("pretokenize (encode + write token file)", pretok_rate),
            ("factworld generator alone (no tokenizer)", gen_rate)]
    for name, rate in rows:
        print(f"{name:48s} {rate:12,.0f} {rate / base:11.2f}x")


if __name__ == "__main__":
    main()
