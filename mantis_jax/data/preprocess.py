"""Data preparation CLIs: pretokenize text into token files, split text into train/val parts, write factworld.

    python -m mantis_jax.data.preprocess pretokenize --input 'corpus/*.txt' --out data/tokens \
        [--tokenizer tokenizer.json | --vocab 4096] [--shard_docs 100000]
    python -m mantis_jax.data.preprocess pretokenize --hf json --hf_data_files rows.jsonl --out data/tokens
    python -m mantis_jax.data.preprocess split --input corpus.txt --out data/parts --val_fraction 0.05 --seed 0
    python -m mantis_jax.data.preprocess factworld --out data/factworld

`pretokenize` streams documents (never the whole corpus) into `part-NNNNN.tok` files plus the `tokenizer.json`
they were made with; train on them with `--config.data.source=tokenized --config.data.path=data/tokens
--config.data.tokenizer=data/tokens/tokenizer.json`. `split` assigns each document to train or val by a seeded
hash of its index, so the same seed always gives the same parts.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import sys
from typing import Iterator

from mantis_jax.data import factworld, sources
from mantis_jax.data.sources import DataError
from mantis_jax.data.tokenizer import Tokenizer


def _documents(args) -> Iterator[str]:
    if args.hf:
        return sources.iter_hf_documents(args.hf, data_files=args.hf_data_files, split=args.split,
                                         text_field=args.text_field, config_name=args.hf_config)
    if not args.input:
        raise DataError("pretokenize needs --input (files, globs or a directory) or --hf (an HF dataset)")
    paths = sources.resolve_paths(args.input, key="--input")
    if all(os.path.getsize(p) == 0 for p in paths):
        raise DataError(f"--input files {paths} are empty; give files with text")
    return sources.iter_text_documents(paths, args.separator)


def pretokenize(args) -> list[str]:
    """Writes token files (and tokenizer.json) to args.out; returns the token file paths."""
    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    else:
        tok = Tokenizer.train(itertools.islice(_documents(args), args.tokenizer_sample), args.vocab)
    os.makedirs(args.out, exist_ok=True)
    tok.save(args.out)
    docs = _documents(args)
    written, part = [], 0
    while True:
        chunk = list(itertools.islice(docs, args.shard_docs))  # one shard's texts at a time
        if not chunk:
            break
        path = os.path.join(args.out, f"part-{part:05d}{sources.TOKEN_SUFFIX}")
        header = sources.pretokenize(chunk, tok, path)
        print(f"{path}: {header['n_docs']} documents, {header['n_tokens']} tokens ({header['dtype']})")
        written.append(path)
        part += 1
    if not written:
        raise DataError("the input holds no documents (only blank lines?); nothing was written")
    return written


def _is_val(seed: int, index: int, fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64 < fraction


def split(args) -> dict[str, int]:
    """Writes train.txt and val.txt (documents separated by blank lines); returns document counts."""
    if not 0.0 < args.val_fraction < 1.0:
        raise DataError(f"--val_fraction ({args.val_fraction}) must be in (0, 1)")
    paths = sources.resolve_paths(args.input, key="--input")
    os.makedirs(args.out, exist_ok=True)
    counts = {"train": 0, "val": 0}
    files = {k: open(os.path.join(args.out, f"{k}.txt"), "w", encoding="utf-8") for k in counts}
    try:
        for i, doc in enumerate(sources.iter_text_documents(paths, args.separator)):
            part = "val" if _is_val(args.seed, i, args.val_fraction) else "train"
            # Blank-line separated output so the parts read back with the default doc_separator.
            files[part].write(("\n\n" if counts[part] else "") + doc.replace("\n\n", "\n"))
            counts[part] += 1
    finally:
        for f in files.values():
            f.write("\n")
            f.close()
    if counts["train"] == 0 or counts["val"] == 0:
        raise DataError(f"split gave {counts} documents; need at least one in each part (more data or another "
                        "--val_fraction)")
    print(f"{args.out}: {counts['train']} train, {counts['val']} val documents")
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mantis_jax.data.preprocess", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pt = sub.add_parser("pretokenize", help="text or an HF dataset -> token files + tokenizer.json")
    pt.add_argument("--input", default="", help="files, globs or a directory (comma-separated)")
    pt.add_argument("--out", required=True, help="output directory")
    pt.add_argument("--tokenizer", default="", help="tokenizer.json to use; default: train one on the input")
    pt.add_argument("--vocab", type=int, default=4096, help="vocab size when training a tokenizer")
    pt.add_argument("--tokenizer_sample", type=int, default=20000, help="documents to train a tokenizer on")
    pt.add_argument("--shard_docs", type=int, default=100000, help="documents per token file")
    pt.add_argument("--separator", default="blank_line", choices=sources.SEPARATORS)
    pt.add_argument("--hf", default="", help="HF dataset name or builder (json, text, parquet), streamed")
    pt.add_argument("--hf_data_files", default="")
    pt.add_argument("--hf_config", default="")
    pt.add_argument("--split", default="train")
    pt.add_argument("--text_field", default="text")
    sp = sub.add_parser("split", help="text -> reproducible train.txt / val.txt")
    sp.add_argument("--input", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--val_fraction", type=float, default=0.05)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--separator", default="blank_line", choices=sources.SEPARATORS)
    sub.add_parser("factworld", help="write a factworld corpus (options: python -m mantis_jax.data.factworld -h)")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "factworld":  # its own parser owns every option after the command
        factworld.main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pretokenize":
            pretokenize(args)
        else:
            split(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
