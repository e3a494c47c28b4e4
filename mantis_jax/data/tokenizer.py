"""Tokenizer: byte-level BPE (HF `tokenizers`) with MANTIS's special tokens and a fingerprint.

A `Tokenizer` is either trained on text (`Tokenizer.train(texts, vocab_size)`; any iterator of strings, usually a
sample of the corpus) or loaded from any `tokenizer.json` (`Tokenizer.load(path)`, e.g. GPT-2's from a local
path). Special tokens it lacks are appended: padding, begin/end of document and reserved markers for memory and QA.
Text enters through `encode` and leaves through `decode`; `answer_mask(ids)` marks the tokens of QA answers
(what follows `A:` at the start of a line, up to and including the end of that line), which the data pipeline uses
to weight the loss.

The model's vocab is `padded_vocab_size` (the raw size rounded up to a multiple of 128). A checkpoint stores
`fingerprint()` beside the saved `tokenizer.json`; `check_compatible` refuses a tokenizer that differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mantis_jax.config import VOCAB_MULTIPLE
FILENAME = "tokenizer.json"
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
MEMORY_START, MEMORY_END = "<|mem|>", "<|/mem|>"
QUESTION, ANSWER, FACT, UNKNOWN_ANSWER = "<|q|>", "<|a|>", "<|fact|>", "<|unknown|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, MEMORY_START, MEMORY_END, QUESTION, ANSWER, FACT, UNKNOWN_ANSWER)
# Tokens other tokenizer.json files use for the same roles; reused instead of adding ours.
_ALIASES = {PAD: ("<pad>", "[PAD]"), BOS: ("<|endoftext|>", "<s>", "[CLS]"),
            EOS: ("<|endoftext|>", "</s>", "[SEP]")}


class TokenizerMismatchError(ValueError):
    """A checkpoint or token file was made with a different tokenizer than the one given."""


class Tokenizer:
    """Byte-level BPE with special-token ids `pad_id`, `bos_id`, `eos_id` (and markers in `special_ids`)."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self._tok = tok
        missing = []
        self.special_ids: dict[str, int] = {}
        for name in SPECIAL_TOKENS:
            ids = [tok.token_to_id(t) for t in (name, *_ALIASES.get(name, ()))]
            ids = [i for i in ids if i is not None]
            if ids:
                self.special_ids[name] = ids[0]
            else:
                missing.append(name)
        if missing:
            tok.add_special_tokens(missing)
            for name in missing:
                self.special_ids[name] = tok.token_to_id(name)
        self.pad_id = self.special_ids[PAD]
        self.bos_id = self.special_ids[BOS]
        self.eos_id = self.special_ids[EOS]
        vocab = tok.get_vocab(with_added_tokens=True)
        # Printable ASCII is its own spelling in the byte-level alphabet, so "A" and ":" are token strings.
        self._a_id = tok.token_to_id("A")
        self._colon_id = tok.token_to_id(":")
        all_ids = sorted(vocab.values())
        decoded = tok.decode_batch([[i] for i in all_ids], skip_special_tokens=False)
        self._newline_ids = np.array([i for i, s in zip(all_ids, decoded) if "\n" in s], np.int64)
        self._fingerprint: str | None = None

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> "Tokenizer":
        """Trains a byte-level BPE of `vocab_size` tokens (special tokens included) on an iterator of texts."""
        floor = 256 + len(SPECIAL_TOKENS)
        if vocab_size < floor:
            raise ValueError(f"tokenizer vocab_size ({vocab_size}) must be >= {floor} (256 bytes + special "
                             f"tokens); raise --config.data.tokenizer_vocab")
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                      special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """Loads a `tokenizer.json` (or a directory holding one); adds special tokens it lacks."""
        file = os.path.join(path, FILENAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no tokenizer at {path!r}: expected a tokenizer.json file or a directory "
                                    f"holding {FILENAME}; set --config.data.tokenizer='' to train one")
        try:
            tok = tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{file!r} is not a valid HF tokenizer.json: {e}") from e
        return cls(tok)

    def save(self, path: str) -> str:
        """Writes `tokenizer.json` to `path` (a directory, or a file path ending in .json); returns the file."""
        file = path if path.endswith(".json") else os.path.join(path, FILENAME)
        os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
        tmp = file + ".tmp"
        self._tok.save(tmp)
        os.replace(tmp, file)
        return file

    # ---- text <-> ids ---------------------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Raw number of tokens, special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def to_json(self) -> str:
        return self._tok.to_str()

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the canonical tokenizer JSON: equal iff encodings are equal."""
        if self._fingerprint is None:
            canonical = json.dumps(json.loads(self._tok.to_str()), sort_keys=True, separators=(",", ":"))
            self._fingerprint = hashlib.sha256(canonical.encode()).hexdigest()[:16]
        return self._fingerprint

    # ---- answer spans ---------------------------------------------------------------------------------------
    def answer_mask(self, ids: np.ndarray) -> np.ndarray:
        """1.0 on answer tokens: after `A` `:` at a line start, through the token that ends the line.

        Byte-level pre-tokenization splits `\\nA: Brisk\\n` into `\\n`, `A`, `:`, ` Brisk`, `\\n`, so the rule
        works on ids alone (no offsets): any token stream from this tokenizer, including pre-tokenized files.
        The line end (newline or end-of-document) is part of the answer: it teaches the model where to stop.
        """
        ids = np.asarray(ids)
        mask = np.zeros(ids.shape, np.float32)
        if self._a_id is None or self._colon_id is None or ids.size < 3:
            return mask
        ends = np.isin(ids, self._newline_ids) | (ids == self.eos_id) | (ids == self.bos_id)
        line_start = np.concatenate([[True], ends[:-1]])
        starts = np.flatnonzero(line_start[:-2] & (ids[:-2] == self._a_id) & (ids[1:-1] == self._colon_id)) + 2
        if starts.size == 0:
            return mask
        end_pos = np.flatnonzero(ends)
        k = np.searchsorted(end_pos, starts)  # first line end at or after the answer's start
        stops = np.where(k < end_pos.size, end_pos[np.minimum(k, end_pos.size - 1)] + 1, ids.size)
        delta = np.zeros(ids.size + 1, np.int32)
        np.add.at(delta, starts, 1)
        np.add.at(delta, stops, -1)
        return (np.cumsum(delta[:-1]) > 0).astype(np.float32)


def check_compatible(tokenizer: Tokenizer, saved_fingerprint: str, *, what: str = "checkpoint") -> None:
    """Raises TokenizerMismatchError when `tokenizer` is not the one a checkpoint (or token file) was made with."""
    if saved_fingerprint and tokenizer.fingerprint() != saved_fingerprint:
        raise TokenizerMismatchError(
            f"the {what} was made with tokenizer {saved_fingerprint} but the given tokenizer is "
            f"{tokenizer.fingerprint()} (vocab {tokenizer.vocab_size}); use the tokenizer.json saved beside the "
            f"{what} (--config.data.tokenizer=<that path>) or re-create the {what} with this tokenizer")

