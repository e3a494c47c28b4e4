"""The grain input pipeline: documents -> packed windows of seq_len + 1 -> shuffled, batched numpy dicts.

Documents enter from a source (`sources.open_source`): token ids per document. Each becomes
`<bos> ids <eos>` (bos optional) with its answer mask (`Tokenizer.answer_mask`); documents are shuffled with
`data.shuffle_seed` (a new order each epoch), packed into windows of `seq_len + 1` tokens (`data.packing`:
concat-then-split, or first-fit which keeps each document whole in one window, padding the rest) and batched.
With `data.factworld_curriculum_docs` the shuffled factworld indices are generated at their stream position's
hardness (`sources.CurriculumDocument`). A batch leaves as
    {"inputs": int32 [B, T], "targets": int32 [B, T], "loss_mask": float32 [B, T], "answer_mask": float32 [B, T]}
with targets = inputs shifted by one, loss_mask 0 on padding and on the bos that follows an eos (it carries no
information), and `data.answer_loss_weight` on answer tokens. B is the per-process batch
(`data.batch_size / process_count`): each JAX process reads its own shard of documents.

The train dataset is endless; `iter(datasets.train)` is a grain `DatasetIterator` whose `get_state()` /
`set_state()` (JSON-serializable dicts) are saved in checkpoints so a run resumes at the same batch. Validation
comes from `data.val_split` (the last fraction of the source's documents) or `data.val_file`, never both; for
factworld it is the val-split entities.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import grain
import numpy as np
from grain.experimental import (ConcatThenSplitIterDataset, FirstFitPackIterDataset, FlatMapIterDataset,
                                FlatMapTransform)

from mantis_jax.data import sources
from mantis_jax.data.sources import DataError
from mantis_jax.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


class DocumentToExample:
    """ids -> {"tokens": <bos> ids <eos>, "answer": answer mask}; a class so worker processes can pickle it."""

    def __init__(self, tokenizer: Tokenizer, add_bos: bool):
        self.tokenizer, self.add_bos = tokenizer, add_bos

    def __call__(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        tok = self.tokenizer
        head = [tok.bos_id] if self.add_bos else []
        tokens = np.concatenate([np.asarray(head, np.int32), np.asarray(ids, np.int32),
                                 np.asarray([tok.eos_id], np.int32)])
        return {"tokens": tokens, "answer": tok.answer_mask(tokens)}


class WindowToBatchRow:
    """A packed window of seq_len + 1 -> inputs / targets / loss_mask / answer_mask of length seq_len."""

    def __init__(self, pad_id: int, bos_id: int, answer_weight: float):
        self.pad_id, self.bos_id, self.answer_weight = pad_id, bos_id, answer_weight

    def __call__(self, ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        real = ex["tokens_segment_ids"] > 0  # 0 marks the zero padding of a final partial window
        tokens = np.where(real, ex["tokens"], self.pad_id).astype(np.int32)
        targets = tokens[1:]
        valid = real[1:] & (targets != self.bos_id)
        answer = (ex["answer"][1:] > 0) & valid
        loss_mask = valid * np.where(answer, self.answer_weight, 1.0)
        return {"inputs": tokens[:-1], "targets": targets, "loss_mask": loss_mask.astype(np.float32),
                "answer_mask": answer.astype(np.float32)}


class Datasets(NamedTuple):
    """`train`: endless batched grain IterDataset; `val`: finite one (None when there is no validation data)."""
    train: grain.IterDataset
    val: grain.IterDataset | None
    batch_size: int  # per process
    seq_len: int

    def val_batches(self, max_batches: int | None = None) -> list[Batch]:
        """Validation batches, the same every call; the last is padded to full batch size (loss_mask 0)."""
        if self.val is None:
            return []
        out = []
        for batch in self.val:
            if max_batches is not None and len(out) >= max_batches:
                break
            out.append(pad_batch(batch, self.batch_size))
        return out


def pad_batch(batch: Batch, batch_size: int) -> Batch:
    """Pads a short final batch with rows whose loss_mask is 0 so every batch has the same shape."""
    n = batch["inputs"].shape[0]
    if n == batch_size:
        return batch
    return {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


class SplitLongDocument(FlatMapTransform):
    """Cuts an example longer than a window into window-sized pieces (first-fit packing never splits)."""

    max_fan_out = 1 << 30

    def __init__(self, window: int):
        self.window = window

    def flat_map(self, ex: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        n = len(ex["tokens"])
        return [{k: v[i:i + self.window] for k, v in ex.items()} for i in range(0, n, self.window)]


def resolve_packing(config) -> str:
    """`auto` is first_fit for factworld (a question must share its window with its evidence), else concat."""
    packing = config.data.packing
    if packing == "auto":
        return "first_fit" if config.data.source == "factworld" else "concat"
    return packing


def pack(docs: grain.MapDataset, *, tokenizer: Tokenizer, seq_len: int, add_bos: bool, answer_weight: float,
         packing: str = "concat", bins: int = 16, seed: int = 0) -> grain.IterDataset:
    """Token-id documents -> rows of seq_len, packed into windows of seq_len + 1.

    concat: concatenate and cut (no padding; documents straddle windows). first_fit: whole documents placed into
    `bins` windows at a time, the rest padded (documents longer than a window are cut into pieces first).
    """
    # grain's default (16 threads, 500 documents ahead) would starve the training step on a small host; a
    # batch needs tens of documents, so a short buffer keeps up.
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=128)
    examples = docs.map(DocumentToExample(tokenizer, add_bos)).to_iter_dataset(read)
    window = seq_len + 1
    lengths = {"tokens": window, "answer": window}
    if packing == "concat":
        packed = ConcatThenSplitIterDataset(examples, length_struct=lengths)
    elif packing == "first_fit":
        pieces = FlatMapIterDataset(examples, SplitLongDocument(window))
        packed = FirstFitPackIterDataset(pieces, length_struct=lengths, num_packing_bins=bins, seed=seed,
                                         shuffle_bins=True)
    else:
        raise DataError(f"config.data.packing ({packing!r}) must be one of auto, concat, first_fit")
    return packed.map(WindowToBatchRow(tokenizer.pad_id, tokenizer.bos_id if add_bos else -1, answer_weight))


def _shard(ds: grain.MapDataset, process_index: int, process_count: int, what: str) -> grain.MapDataset:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index ({process_index}) must be in [0, process_count={process_count})")
    if len(ds) < process_count:
        raise DataError(f"{what} has {len(ds)} documents, fewer than the {process_count} processes reading it; "
                        "give more data")
    return ds[process_index::process_count]


def _with_workers(ds: grain.IterDataset, worker_count: int) -> grain.IterDataset:
    if worker_count <= 0:
        return ds
    from absl import flags

    # grain's worker processes read absl flags; outside absl.app.run they are unparsed and would raise.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))


def make_datasets(config, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1) -> Datasets:
    """The train and validation datasets `config.data` describes, for one JAX process."""
    d = config.data
    if d.val_split > 0 and d.val_file:
        raise DataError("config.data.val_split and config.data.val_file are both set; use one: "
                        "--config.data.val_split=0 or --config.data.val_file=''")
    if d.batch_size % process_count:
        raise DataError(f"config.data.batch_size ({d.batch_size}) must be divisible by the number of processes "
                        f"({process_count})")
    batch = d.batch_size // process_count
    train_src = sources.open_source(config, tokenizer)
    train_docs = grain.MapDataset.source(train_src)
    val_docs = None
    if d.val_file and d.source in ("tfds", "hf"):  # val_file names the validation split
        val_docs = grain.MapDataset.source(sources.open_source(config, tokenizer, split="val"))
    elif d.val_file:  # a text or token file, whatever the training source
        kind = sources.file_kind(d.val_file)
        val_docs = grain.MapDataset.source(sources.open_source(config, tokenizer, path=d.val_file, split="val",
                                                               kind=kind))
    elif d.source == "factworld":
        if d.val_split > 0:
            raise DataError("config.data.val_split does not apply to factworld (its validation data are the "
                            "val-split entities); set --config.data.val_split=0")
        val_docs = grain.MapDataset.source(sources.open_source(config, tokenizer, split="val"))
    elif d.val_split > 0:
        n = len(train_docs)
        n_val = max(process_count, int(round(n * d.val_split)))
        if n_val >= n:
            raise DataError(f"config.data.val_split ({d.val_split}) leaves no training documents out of {n}; "
                            "lower it or give more data")
        train_docs, val_docs = train_docs[: n - n_val], train_docs[n - n_val:]
    options = dict(tokenizer=tokenizer, seq_len=d.seq_len, add_bos=d.add_bos, answer_weight=d.answer_loss_weight,
                   packing=resolve_packing(config), bins=max(batch, 8), seed=d.shuffle_seed)
    curriculum = d.source == "factworld" and d.factworld_curriculum_docs > 0
    if curriculum:  # shuffle document indices; generate each at its stream position's hardness
        train_docs = grain.MapDataset.range(len(train_src))
    train_docs = _shard(train_docs, process_index, process_count, "the training data")
    train_docs = train_docs.shuffle(seed=d.shuffle_seed).repeat(None)  # reshuffled every epoch
    if curriculum:
        train_docs = train_docs.map_with_index(
            sources.CurriculumDocument(train_src, d.factworld_curriculum_docs, process_count))
    train = pack(train_docs, **options).batch(batch, drop_remainder=True)
    train = _with_workers(train, d.worker_count)
    val = None
    if val_docs is not None:
        val_docs = _shard(val_docs, process_index, process_count, "the validation data")
        val = pack(val_docs, **options).batch(batch, drop_remainder=False)
    return Datasets(train, val, batch, d.seq_len)


def build_tokenizer(config, *, sample_docs: int = 3000) -> Tokenizer:
    """`config.data.tokenizer` if set, else a BPE of `data.tokenizer_vocab` trained on `sample_docs` documents."""
    if config.data.tokenizer:
        return Tokenizer.load(config.data.tokenizer)
    return Tokenizer.train(sources.tokenizer_sample(config, sample_docs), config.data.tokenizer_vocab)


def iterator_state_to_json(iterator: grain.DatasetIterator) -> str:
    """The iterator's position as JSON (what a checkpoint stores)."""
    return json.dumps(iterator.get_state())


def restore_iterator_state(iterator: grain.DatasetIterator, state: str | dict[str, Any]) -> grain.DatasetIterator:
    """Moves `iterator` to a saved position (from `iterator_state_to_json` or `get_state()`)."""
    iterator.set_state(json.loads(state) if isinstance(state, str) else state)
    return iterator

