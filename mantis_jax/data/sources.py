"""Document sources: random-access collections of tokenized documents, chosen by `config.data.source`.

Every source is a grain-compatible random-access data source: `len(source)` documents, `source[i]` the i-th
document's token ids as an int32 array (no begin/end markers; the pipeline adds them). Kinds:
- `factworld`: the bundled generator; document i is generated and tokenized on demand (nothing stored).
- `text`: text files (documents separated by a blank line, one per line, or one per file), tokenized in a stream
  into a cached token file and memory-mapped from there.
- `tokenized`: token files written by `python -m mantis_jax.data.preprocess` (a file or a directory of them).
- `tfds`: a TFDS data source (array_record; no TensorFlow needed): a prepared dataset's name or its directory.
- `hf`: an HF `datasets` dataset read with streaming (optional extra), tokenized into a cached token file.

A token file is a 4 KiB JSON header (after an 8-byte magic), the tokens (uint16 when the vocab fits, else uint32)
and the int64 document offsets; it is written in one streaming pass and read through `np.memmap`, never whole.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from mantis_jax.data import factworld
from mantis_jax.data.tokenizer import Tokenizer, check_compatible

MAGIC = b"MANTOK1\n"
HEADER_BYTES = 4096
TOKEN_SUFFIX = ".tok"
SEPARATORS = ("blank_line", "line", "file")
SOURCES = ("factworld", "text", "tokenized", "tfds", "hf")


class DataError(ValueError):
    """Missing, empty or unreadable data; the message names the path and the fix."""


# ---- token files ------------------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


def write_token_file(path: str, docs: Iterable[Sequence[int]], *, vocab_size: int, fingerprint: str = "",
                     meta: dict | None = None) -> dict:
    """Streams tokenized documents into a token file at `path` (atomically); returns its header."""
    dtype = token_dtype(vocab_size)
    offsets = [0]  # 8 bytes per document is the only thing held in memory
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(b"\0" * HEADER_BYTES)
        for ids in docs:
            arr = np.asarray(ids, dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                raise DataError(f"token id {int(arr.max())} out of range for vocab {vocab_size} writing {path}")
            f.write(arr.astype(dtype).tobytes())
            offsets.append(offsets[-1] + arr.size)
        pos = f.tell()
        pad = (-pos) % 8
        f.write(b"\0" * pad)
        header = {"format": "mantis-tokens-v1", "dtype": dtype.name, "n_tokens": offsets[-1],
                  "n_docs": len(offsets) - 1, "offsets_at": pos + pad, "vocab_size": vocab_size,
                  "tokenizer_fingerprint": fingerprint, "meta": meta or {}}
        f.write(np.asarray(offsets, np.int64).tobytes())
        blob = MAGIC + json.dumps(header).encode()
        if len(blob) > HEADER_BYTES:
            raise DataError(f"token file header for {path} exceeds {HEADER_BYTES} bytes; shorten its meta")
        f.seek(0)
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return header


def read_header(path: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"token file {path!r} does not exist; write one with "
                        "`python -m mantis_jax.data.preprocess pretokenize`")
    with open(path, "rb") as f:
        blob = f.read(HEADER_BYTES)
    if not blob.startswith(MAGIC):
        raise DataError(f"{path!r} is not a mantis token file (bad magic); pretokenize text with "
                        "`python -m mantis_jax.data.preprocess pretokenize`, or use --config.data.source=text")
    return json.loads(blob[len(MAGIC):].rstrip(b"\0").decode())


class TokenFileSource:
    """Documents of one or more token files (a file, a directory of *.tok, or a list), memory-mapped lazily.

    Pickles as its paths (worker processes re-open the maps) rather than as array contents.
    """

    def __init__(self, paths: str | Sequence[str], tokenizer: Tokenizer | None = None):
        if isinstance(paths, str):
            paths = (sorted(glob.glob(os.path.join(paths, f"*{TOKEN_SUFFIX}"))) if os.path.isdir(paths)
                     else [paths])
            if not paths:
                raise DataError(f"directory has no *{TOKEN_SUFFIX} token files; write them with "
                                "`python -m mantis_jax.data.preprocess pretokenize`")
        self.paths = list(paths)
        self.headers = [read_header(p) for p in self.paths]
        for p, h in zip(self.paths, self.headers):
            if tokenizer is not None:
                check_compatible(tokenizer, h["tokenizer_fingerprint"], what=f"token file {p}")
        counts = [h["n_docs"] for h in self.headers]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self._starts[-1] == 0:
            raise DataError(f"token files {self.paths} hold no documents; check the text they were made from")
        self._maps: list | None = None

    def _open(self):
        maps = []  # assigned whole at the end: grain reads from several threads at once
        for p, h in zip(self.paths, self.headers):
            n = h["n_tokens"]
            tokens = (np.memmap(p, np.dtype(h["dtype"]), "r", offset=HEADER_BYTES, shape=(n,)) if n
                      else np.zeros((0,), np.uint16))
            offsets = np.memmap(p, np.int64, "r", offset=h["offsets_at"], shape=(h["n_docs"] + 1,))
            maps.append((tokens, offsets))
        self._maps = maps

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        if self._maps is None:
            self._open()
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range [0, {len(self)})")
        f = int(np.searchsorted(self._starts, i, side="right")) - 1
        tokens, offsets = self._maps[f]
        j = i - int(self._starts[f])
        return np.asarray(tokens[offsets[j]:offsets[j + 1]], dtype=np.int32)

    def __getstate__(self):
        return {"paths": self.paths, "headers": self.headers, "_starts": self._starts, "_maps": None}

    def __setstate__(self, state):
        self.__dict__.update(state)

    @property
    def n_tokens(self) -> int:
        return sum(h["n_tokens"] for h in self.headers)


# ---- text ---------------------------------------------------------------------------------------------------
def resolve_paths(path: str, *, key: str = "config.data.path") -> list[str]:
    """Files named by `path`: comma-separated files, globs or directories (every regular file inside)."""
    if not path:
        raise DataError(f"{key} is empty; pass a file, a glob or a directory (or use --config.data.source=factworld)")
    out = []
    for part in (p.strip() for p in path.split(",") if p.strip()):
        if os.path.isdir(part):
            out += sorted(os.path.join(part, n) for n in os.listdir(part)
                          if os.path.isfile(os.path.join(part, n)) and not n.startswith("."))
        elif any(c in part for c in "*?["):
            out += sorted(glob.glob(part))
        elif os.path.isfile(part):
            out.append(part)
        else:
            raise DataError(f"{key}: {part!r} does not exist; check the path "
                            "(or use --config.data.source=factworld for the bundled corpus)")
    if not out:
        raise DataError(f"{key}={path!r} matches no files")
    return out


def iter_text_documents(paths: Sequence[str], separator: str = "blank_line") -> Iterator[str]:
    """Documents of text files, streamed: split at blank lines, at every line, or one per file."""
    if separator not in SEPARATORS:
        raise DataError(f"config.data.doc_separator ({separator!r}) must be one of {', '.join(SEPARATORS)}")
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            if separator == "file":
                text = f.read().strip("\n")
                if text.strip():
                    yield text
                continue
            lines: list[str] = []
            for line in f:
                line = line.rstrip("\n")
                if separator == "line":
                    if line.strip():
                        yield line
                elif line.strip():
                    lines.append(line)
                elif lines:
                    yield "\n".join(lines)
                    lines = []
            if lines:
                yield "\n".join(lines)


def iter_hf_documents(name: str, *, data_files: str = "", split: str = "train", text_field: str = "text",
                      config_name: str = "") -> Iterator[str]:
    """Texts of an HF `datasets` dataset, read with streaming=True (nothing is downloaded whole)."""
    try:
        import datasets
    except ImportError as e:
        raise DataError("config.data.source=hf needs the optional `datasets` package: "
                        "pip install 'mantis_jax[hf]'") from e
    kwargs = {"data_files": data_files.split(",")} if data_files else {}
    ds = datasets.load_dataset(name, config_name or None, split=split, streaming=True, **kwargs)
    for row in ds:
        if text_field not in row:
            raise DataError(f"HF dataset {name!r} rows have no field {text_field!r} (fields: {sorted(row)}); "
                            "set --config.data.text_field")
        text = row[text_field]
        if text and text.strip():
            yield text


def pretokenize(texts: Iterable[str], tokenizer: Tokenizer, out_path: str, *, batch_docs: int = 512,
                meta: dict | None = None) -> dict:
    """Tokenizes a stream of texts in batches into a token file; returns its header."""

    def docs():
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == batch_docs:
                yield from tokenizer.encode_batch(batch)
                batch = []
        if batch:
            yield from tokenizer.encode_batch(batch)

    return write_token_file(out_path, docs(), vocab_size=tokenizer.vocab_size,
                            fingerprint=tokenizer.fingerprint(), meta=meta)


def _cache_dir(config) -> str:
    return config.data.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "mantis_jax", "tokens")


def cached_text_tokens(paths: Sequence[str], tokenizer: Tokenizer, *, separator: str, cache_dir: str) -> str:
    """The token file for `paths` (tokenized once; reused while the files and tokenizer are unchanged)."""
    stats = []
    for p in paths:
        st = os.stat(p)
        stats.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
    if all(s[1] == 0 for s in stats):
        raise DataError(f"data files {list(paths)} are empty; give files with text")
    key = hashlib.sha256(repr((stats, separator, tokenizer.fingerprint())).encode()).hexdigest()[:16]
    out = os.path.join(cache_dir, f"{os.path.basename(paths[0])}-{key}{TOKEN_SUFFIX}")
    if not os.path.exists(out):
        header = pretokenize(iter_text_documents(paths, separator), tokenizer, out,
                             meta={"source": [s[0] for s in stats]})
        if header["n_docs"] == 0:
            os.remove(out)
            raise DataError(f"data files {list(paths)} hold no documents (only blank lines); give files with text")
    return out


# ---- on-the-fly sources -------------------------------------------------------------------------------------------
class FactworldSource:
    """Documents `[0, n_docs)` of one factworld split, generated and tokenized when asked for."""

    def __init__(self, world: factworld.World, split: str, n_docs: int, tokenizer: Tokenizer):
        if n_docs <= 0:
            raise DataError(f"factworld {split} needs > 0 documents, got {n_docs}; "
                            "set --config.data.factworld_docs / factworld_val_docs")
        self.world, self.split, self.n_docs, self.tokenizer = world, split, n_docs, tokenizer

    def __len__(self) -> int:
        return self.n_docs

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens(i)

    def tokens(self, i: int, hardness: float = 1.0) -> np.ndarray:
        """Document i's token ids; `hardness` < 1 lowers its odds of being a contrast or tail document."""
        return np.asarray(self.tokenizer.encode(self.world.document(self.split, int(i), hardness).text), np.int32)


class CurriculumDocument:
    """(stream position, document index) -> token ids, with contrast and tail documents ramped in linearly over
    the first `ramp_docs` documents of the training stream (`data.factworld_curriculum_docs`): early steps see
    the easier documents recall forms on, later ones the documents that defeat copying by type."""

    def __init__(self, source: FactworldSource, ramp_docs: int, process_count: int = 1):
        self.source, self.ramp_docs, self.process_count = source, ramp_docs, process_count

    def hardness(self, position: int) -> float:
        """Each process reads every process_count-th document: its position k is global document ~k * count."""
        return min(1.0, (position * self.process_count + 1) / self.ramp_docs)

    def __call__(self, position: int, index: int) -> np.ndarray:
        return self.source.tokens(index, self.hardness(position))


class TfdsSource:
    """A TFDS data source (array_record files; TensorFlow is not needed) whose `text_field` is tokenized."""

    def __init__(self, name_or_dir: str, *, split: str, tokenizer: Tokenizer, data_dir: str = "",
                 text_field: str = "text"):
        import tensorflow_datasets as tfds

        try:
            if os.path.isdir(name_or_dir):
                self._ds = tfds.builder_from_directory(name_or_dir).as_data_source(split=split)
            else:
                self._ds = tfds.data_source(name_or_dir, split=split, data_dir=data_dir or None, download=False)
        except Exception as e:  # tfds raises a variety of types for a missing dataset or split
            raise DataError(f"cannot open TFDS data source {name_or_dir!r} split {split!r}: {e}; prepare it "
                            "with file_format='array_record' and pass its name (with --config.data.data_dir) "
                            "or its directory") from e
        if len(self._ds) == 0:
            raise DataError(f"TFDS data source {name_or_dir!r} split {split!r} holds no documents")
        self.tokenizer, self.text_field = tokenizer, text_field
        first = self._ds[0]
        if text_field not in first:
            raise DataError(f"TFDS {name_or_dir!r} examples have no feature {text_field!r} (features: "
                            f"{sorted(first)}); set --config.data.text_field")

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> np.ndarray:
        text = self._ds[int(i)][self.text_field]
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self.tokenizer.encode(text), np.int32)


# ---- selection by config ------------------------------------------------------------------------------------------
def file_kind(path: str) -> str:
    """`tokenized` for a token file or a directory of them, else `text`."""
    if path.endswith(TOKEN_SUFFIX) or (os.path.isdir(path) and glob.glob(os.path.join(path, f"*{TOKEN_SUFFIX}"))):
        return "tokenized"
    return "text"


def open_source(config, tokenizer: Tokenizer, *, path: str | None = None, split: str = "train",
                kind: str | None = None):
    """The source `kind` (default config.data.source) reading `path` (default config.data.path).

    `split="val"` selects validation data: factworld's val entities, or for tfds/hf the split named by
    config.data.val_file.
    """
    d = config.data
    path = d.path if path is None else path
    kind = kind or d.source
    if kind not in SOURCES:
        raise DataError(f"config.data.source ({kind!r}) must be one of {', '.join(SOURCES)}")
    if kind == "factworld":
        world = factworld.world_from_config(config)
        n = d.factworld_docs if split == "train" else d.factworld_val_docs
        return FactworldSource(world, split, n, tokenizer)
    if kind == "tokenized":
        if not path:
            raise DataError("config.data.path is empty; pass a token file or a directory of them")
        if not os.path.exists(path):
            raise DataError(f"config.data.path {path!r} does not exist; write token files with "
                            "`python -m mantis_jax.data.preprocess pretokenize`")
        return TokenFileSource(path, tokenizer)
    if kind == "tfds":
        return TfdsSource(path, split=d.split if split == "train" else d.val_file, tokenizer=tokenizer,
                          data_dir=d.data_dir, text_field=d.text_field)
    os.makedirs(_cache_dir(config), exist_ok=True)
    if kind == "text":
        paths = resolve_paths(path)
        return TokenFileSource(cached_text_tokens(paths, tokenizer, separator=d.doc_separator,
                                                  cache_dir=_cache_dir(config)), tokenizer)
    # hf: stream once into a cached token file named by the query.
    hf_split = d.split if split == "train" else d.val_file
    key = hashlib.sha256(repr((path, d.hf_data_files, d.hf_config, hf_split, d.text_field,
                               tokenizer.fingerprint())).encode()).hexdigest()[:16]
    out = os.path.join(_cache_dir(config), f"hf-{key}{TOKEN_SUFFIX}")
    if not os.path.exists(out):
        header = pretokenize(iter_hf_documents(path, data_files=d.hf_data_files, split=hf_split,
                                               text_field=d.text_field, config_name=d.hf_config),
                             tokenizer, out, meta={"hf": path, "split": hf_split})
        if header["n_docs"] == 0:
            os.remove(out)
            raise DataError(f"HF dataset {path!r} split {hf_split!r} holds no documents")
    return TokenFileSource(out, tokenizer)


def tokenizer_sample(config, n_docs: int = 3000) -> Iterator[str]:
    """Texts to train a tokenizer on: a factworld sample, or the first `n_docs` documents of the text data."""
    d = config.data
    if d.source == "factworld":
        return factworld.world_from_config(config).tokenizer_sample(n_docs)
    if d.source == "text":
        docs = iter_text_documents(resolve_paths(d.path), d.doc_separator)
    elif d.source == "hf":
        docs = iter_hf_documents(d.path, data_files=d.hf_data_files, split=d.split, text_field=d.text_field,
                                 config_name=d.hf_config)
    else:
        raise DataError(f"config.data.source={d.source} holds tokens, not text: set --config.data.tokenizer to "
                        "the tokenizer.json it was made with")
    return (t for _, t in zip(range(n_docs), docs))
