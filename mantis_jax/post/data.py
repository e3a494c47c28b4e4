"""Post-training data: the chat JSONL schemas, the factworld generators, the chat template and SFT packing.

Three JSONL schemas (one object per line; docs/post.md has examples):
    sft         {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
                at least one assistant message; the loss covers assistant tokens only
    preference  {"messages": [... the prompt, no assistant turn last], "chosen": str, "rejected": str}
    grpo        {"messages": [... the prompt], "answer": str, "answerable": bool}   (a verifiable answer)
The chat template is factworld's own QA format, so a Stage-1 model reads it as it read its training documents:
    system → " {content}\\n"     user → "Q: {content}\\nA:"     assistant → " {content}\\n"
A factworld record (context, question, answer) is therefore exactly `factworld.prompt(record)` + " answer\\n".
Roles are tokenized piece by piece (byte-level BPE never merges across the newline / colon boundaries between
them), so the response mask is exact.

Generators (`generate(kind, world, split, n)`): QA records of factworld's `near` and `unanswerable` kinds
(`unanswerable` share set by the caller), about the entities of one split: SFT chats, preference pairs (chosen:
the right answer; rejected: another value of the asked attribute, preferably one stated in the context for
another entity, or "unknown" for a quarter of the answerable prompts; on an unanswerable prompt, chosen "unknown"
and rejected an invented value) and GRPO prompts. `python -m mantis_jax.post.data` writes them as JSONL.

SFT packing (`sft_dataset`): examples → (inputs, targets, loss_mask) → grain first-fit packing into rows of
`seq_len` → {"inputs", "targets", "loss_mask", "segment_ids", "positions"} [B, T]; segment ids start at 1 per
example in a row (0 = padding) and positions restart at 0, so the model attends within an example only.
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import Any, Iterable, Iterator, Sequence

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from mantis_jax.data import factworld
from mantis_jax.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
KINDS = ("sft", "preference", "grpo")
PACKED_KEYS = ("inputs", "targets", "loss_mask")


class PostDataError(ValueError):
    """A post-training example breaks its schema; the message names the file, the line and the fix."""


# ---- schemas ----------------------------------------------------------------------------------------------------
def check_example(example: Any, kind: str, where: str = "example") -> dict:
    """Returns the example when it fits the `kind` schema, else raises PostDataError naming the problem."""
    if not isinstance(example, dict) or not isinstance(example.get("messages"), list) or not example["messages"]:
        raise PostDataError(f"{where}: expected an object with a non-empty \"messages\" list (docs/post.md)")
    for i, m in enumerate(example["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise PostDataError(f"{where}: messages[{i}] must be {{\"role\": one of {list(ROLES)}, \"content\": "
                                f"str}}, got {m!r}")
    roles = [m["role"] for m in example["messages"]]
    if kind == "sft":
        if "assistant" not in roles:
            raise PostDataError(f"{where}: an SFT example needs at least one assistant message (the loss is on "
                                "assistant tokens only)")
    elif kind in ("preference", "grpo"):
        if roles[-1] == "assistant":
            raise PostDataError(f"{where}: the prompt's last message is an assistant turn; move it to "
                                + ("\"chosen\"" if kind == "preference" else "\"answer\""))
        fields = {"preference": (("chosen", str), ("rejected", str)),
                  "grpo": (("answer", str), ("answerable", bool))}[kind]
        for name, typ in fields:
            if not isinstance(example.get(name), typ):
                raise PostDataError(f"{where}: a {kind} example needs \"{name}\" ({typ.__name__})")
    else:
        raise PostDataError(f"unknown example kind {kind!r}; use one of {', '.join(KINDS)}")
    return example


def read_jsonl(path: str, kind: str) -> list[dict]:
    """Every example of a JSONL file, each checked against the `kind` schema."""
    if not os.path.isfile(path):
        raise PostDataError(f"no such file {path!r} (config.post.data); write one with python -m "
                            f"mantis_jax.post.data --kind={kind} --out={path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PostDataError(f"{path}:{n}: not JSON ({e})") from None
            out.append(check_example(obj, kind, f"{path}:{n}"))
    if not out:
        raise PostDataError(f"{path} holds no examples")
    return out


def write_jsonl(path: str, examples: Iterable[dict]) -> int:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
            n += 1
    os.replace(path + ".tmp", path)
    return n


# ---- the chat template ------------------------------------------------------------------------------------------
def render_piece(role: str, content: str) -> str:
    return {"system": f" {content}\n", "user": f"Q: {content}\nA:", "assistant": f" {content}\n"}[role]


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict], *, add_bos: bool = True) -> tuple[list[int], list[int]]:
    """(token ids, 1 on assistant tokens else 0) of the rendered messages; bos first when add_bos."""
    ids, mask = ([tokenizer.bos_id], [0]) if add_bos else ([], [])
    for m in messages:
        piece = tokenizer.encode(render_piece(m["role"], m["content"]))
        ids += piece
        mask += [int(m["role"] == "assistant")] * len(piece)
    return ids, mask


def prompt_and_response(tokenizer: Tokenizer, messages: Sequence[dict], response: str) -> tuple[list[int], int]:
    """Ids of prompt + assistant response, and the number of prompt ids (the response follows them)."""
    prompt, _ = encode_chat(tokenizer, messages)
    return prompt + tokenizer.encode(render_piece("assistant", response)), len(prompt)


# ---- factworld generators ---------------------------------------------------------------------------------------
def _is_unanswerable(i: int, share: float) -> bool:
    """Exactly `share` of the indices, spread evenly (floor((i + 1)·s) > floor(i·s))."""
    return int((i + 1) * share) > int(i * share)


def qa_records(world: factworld.World, split: str, n: int, unanswerable: float, start: int = 0) -> Iterator[dict]:
    for i in range(start, start + n):
        kind = "unanswerable" if _is_unanswerable(i, unanswerable) else "near"
        yield world.qa_record(split, kind, i)


def record_messages(record: dict) -> list[dict]:
    return [{"role": "system", "content": record["context"]}, {"role": "user", "content": record["question"]}]


def _wrong_answer(world: factworld.World, record: dict, r: random.Random) -> str:
    """A plausible wrong value of the asked attribute: one stated in the context when there is one."""
    attr, right = record["attribute"], record["answer"]
    if attr == "friend":
        in_context = set(re.findall(r"\b[A-Z][a-z]+\b", record["context"])) - set(factworld.TOWNS)
        size = world.split_size(record["split"])
        others = {world.name(world.entity_index(record["split"], j)) for j in r.sample(range(size), min(size, 8))}
        pool = sorted((in_context - {right, record["entity"]}) or (others - {right, record["entity"]}))
    else:
        vocab = factworld.VOCABS[attr]
        in_context = [v for v in vocab if v != right and f" {v}" in f" {record['context']}"]
        pool = in_context or [v for v in vocab if v != right]
    return r.choice(pool)


def generate(kind: str, world: factworld.World, split: str, n: int, *, unanswerable: float = 0.25,
             start: int = 0, seed: int = 0) -> Iterator[dict]:
    """`n` examples of `kind` (sft | preference | grpo) about the entities of `split`; a pure function of the
    arguments."""
    if kind not in KINDS:
        raise PostDataError(f"unknown example kind {kind!r}; use one of {', '.join(KINDS)}")
    for i, rec in enumerate(qa_records(world, split, n, unanswerable, start), start):
        messages = record_messages(rec)
        if kind == "sft":
            yield {"messages": messages + [{"role": "assistant", "content": rec["answer"]}]}
        elif kind == "grpo":
            yield {"messages": messages, "answer": rec["answer"], "answerable": rec["answerable"]}
        else:
            r = random.Random(f"{seed}-{split}-{i}")
            rejected = (factworld.UNKNOWN if rec["answerable"] and r.random() < 0.25
                        else _wrong_answer(world, rec, r))
            yield {"messages": messages, "chosen": rec["answer"], "rejected": rejected}


def load_examples(config, kind: str, split: str, n: int, *, start: int = 0) -> list[dict]:
    """The stage's examples: `config.post.data` (train split only) or `n` generated from the config's world."""
    if config.post.data and split == "train":
        return read_jsonl(config.post.data, kind)
    share = config.post.grpo_unanswerable if kind == "grpo" else 0.25
    return list(generate(kind, factworld.world_from_config(config), split, n, unanswerable=share, start=start,
                         seed=config.seed))


# ---- SFT packing ------------------------------------------------------------------------------------------------
class ChatToExample:
    """messages -> {"inputs", "targets", "loss_mask"} (next-token pairs; loss on assistant targets), at most
    `seq_len` long (longer chats keep their last tokens, where the responses are)."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int):
        self.tokenizer, self.seq_len = tokenizer, seq_len

    def __call__(self, example: dict) -> dict[str, np.ndarray]:
        ids, mask = encode_chat(self.tokenizer, example["messages"])
        ids, mask = ids[-(self.seq_len + 1):], mask[-(self.seq_len + 1):]
        return {"inputs": np.asarray(ids[:-1], np.int32), "targets": np.asarray(ids[1:], np.int32),
                "loss_mask": np.asarray(mask[1:], np.float32)}


class PackedToBatchRow:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seg = ex["inputs_segment_ids"].astype(np.int32)
        real = seg > 0
        return {"inputs": np.where(real, ex["inputs"], self.pad_id).astype(np.int32),
                "targets": np.where(real, ex["targets"], self.pad_id).astype(np.int32),
                "loss_mask": (ex["loss_mask"] * real).astype(np.float32), "segment_ids": seg,
                "positions": ex["inputs_positions"].astype(np.int32)}


def sft_dataset(examples: Sequence[dict], tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
                repeat: bool = True) -> grain.IterDataset:
    """Packed, shuffled, batched SFT rows (endless when `repeat`); the iterator's state is checkpointable."""
    ds = grain.MapDataset.source(list(examples)).map(ChatToExample(tokenizer, seq_len))
    if repeat:
        ds = ds.shuffle(seed=seed).repeat(None)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=64))
    packed = FirstFitPackIterDataset(it, length_struct={k: seq_len for k in PACKED_KEYS},
                                     num_packing_bins=max(batch_size, 8), seed=seed, shuffle_bins=repeat)
    return packed.map(PackedToBatchRow(tokenizer.pad_id)).batch(batch_size, drop_remainder=repeat)


def packing_efficiency(batches: Iterable[dict]) -> float:
    """Real tokens / window tokens over `batches` (segment id > 0 marks a real token)."""
    real = total = 0
    for b in batches:
        real += int(np.sum(b["segment_ids"] > 0))
        total += b["segment_ids"].size
    return real / max(total, 1)


def main(argv: list[str] | None = None) -> None:
    import argparse  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python -m mantis_jax.post.data",
                                description="Write factworld post-training examples as JSONL.")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--out", required=True, help="output .jsonl path")
    p.add_argument("--split", default="train", choices=factworld.SPLITS)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--unanswerable", type=float, default=0.25, help="share of unanswerable questions")
    p.add_argument("--seed", type=int, default=0, help="factworld seed (data.factworld_seed of the base model)")
    p.add_argument("--entities", type=int, default=2000, help="data.factworld_entities of the base model")
    a = p.parse_args(argv)
    world = factworld.World(a.seed, a.entities)
    n = write_jsonl(a.out, generate(a.kind, world, a.split, a.n, unanswerable=a.unanswerable, seed=a.seed))
    print(f"wrote {n} {a.kind} examples to {a.out}")


if __name__ == "__main__":
    main()
