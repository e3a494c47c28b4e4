"""Stage 2 on a bounded pool of training records, with the frozen LM's hidden states computed once.

The LM is frozen during Stage 2, so the hidden states of a sentence never change: recomputing them every step
(the LM forward is most of a step's cost) is wasted work. With `retrieval.pool = N` the batches draw from N
fixed train records (near-range records with distinct (entity, attribute), so two questions of one batch never
share an answer), a fresh permutation every epoch; with `retrieval.cache_features` the hidden states of every text
a batch can hold (questions, their contexts' sentences, one filler per record) are computed once into a
`HiddenCache` ([n_tokens, D] float32 per text, in memory) and the encoder trains on them, many steps in the time of
one on-the-fly step. The batch of step s is a pure function of (seed, pool, s), so resume stays exact.

Hard negatives per question: `retrieval.context_negatives` other sentences of its context (and its filler), then
`retrieval.attribute_negatives` evidence sentences of other pool records with the same attribute (another
entity: the same template, so only the entity tells them apart). No negative states a fact that is the answer
of a question in the same batch (matched by (entity, attribute), whatever the wording).
"""

from __future__ import annotations

import random
import re

import numpy as np

from mantis_jax.data import factworld
from mantis_jax.memory import encoder as enc

ENCODE_ROWS = 64  # texts per LM call while filling the cache: one compilation


def _fact_patterns() -> list[tuple[re.Pattern, str]]:
    out = []
    for attribute, (templates, _) in factworld.ATTRIBUTES.items():
        for t in templates:
            rx = re.escape(t).replace(re.escape("{n}"), r"(?P<n>\S+?)").replace(re.escape("{v}"), r"(?P<v>.+?)")
            out.append((re.compile(rf"^{rx}$"), attribute))
    return out


_PATTERNS = _fact_patterns()


def fact_key(sentence: str) -> tuple[str, str] | None:
    """(entity, attribute) a fact sentence states, in any wording; None for a filler."""
    for rx, attribute in _PATTERNS:
        m = rx.match(sentence)
        if m:
            return m.group("n"), attribute
    return None


class PoolBatches:
    """Step s -> (questions [B], keys [B * (1 + negatives)]), the layout of train.Batches: keys[:B] are the
    evidence sentences, then each question's hard negatives in order."""

    def __init__(self, config):
        self.world = factworld.world_from_config(config)
        self.rt, self.seed = config.retrieval, config.seed
        n = self.rt.pool
        self.records: list[dict] = []  # question, evidence, others (context sentences and a filler), key
        seen, j = set(), 0
        while len(self.records) < n:
            if j > 50 * n:
                raise ValueError(f"config.retrieval.pool ({n}) exceeds the distinct train facts factworld can "
                                 f"ask about ({len(self.records)} found); lower it")
            rec = self.world.qa_record("train", "near", j, distance=0)
            j += 1
            key = (rec["entity"], rec["attribute"])
            if key in seen:
                continue
            seen.add(key)
            start, end = rec["evidence_span"]
            ev = rec["context"][start:end]
            others = [s for s in enc.split_sentences(rec["context"]) if s != ev]
            others.append(self.world.filler(random.Random(f"stage2-pool-{self.seed}-{j}")))
            self.records.append({"question": rec["question"], "evidence": ev, "others": others, "key": key})
        self.by_attribute: dict[str, list[int]] = {}
        for i, r in enumerate(self.records):
            self.by_attribute.setdefault(r["key"][1], []).append(i)
        self._perm: tuple[int, list[int]] = (-1, [])

    @property
    def negatives(self) -> int:
        return self.rt.context_negatives + self.rt.attribute_negatives

    @property
    def steps_per_epoch(self) -> int:
        return len(self.records) // self.rt.batch_size

    def texts(self) -> list[str]:
        """Every text a batch can hold (what the cache must hold)."""
        out = {t for r in self.records for t in (r["question"], r["evidence"], *r["others"])}
        return sorted(out)

    def _order(self, epoch: int) -> list[int]:
        if self._perm[0] != epoch:
            order = list(range(len(self.records)))
            random.Random(f"stage2-pool-order-{self.seed}-{epoch}").shuffle(order)
            self._perm = (epoch, order)
        return self._perm[1]

    def batch(self, step: int) -> tuple[list[str], list[str]]:
        B = self.rt.batch_size
        epoch, k = divmod(step, self.steps_per_epoch)
        chosen = [self.records[i] for i in self._order(epoch)[k * B:(k + 1) * B]]
        answers = {r["key"] for r in chosen}
        questions, evidence, negatives = [], [], []
        for i, rec in enumerate(chosen):
            r = random.Random(f"stage2-{self.seed}-{step}-{i}")
            own = [s for s in rec["others"] if fact_key(s) not in answers]
            r.shuffle(own)
            own = own[:self.rt.context_negatives]
            same = [j for j in self.by_attribute[rec["key"][1]] if self.records[j]["key"] not in answers]
            while len(own) < self.negatives and same:
                own.append(self.records[same.pop(r.randrange(len(same)))]["evidence"])
            while len(own) < self.negatives:  # a pool too small for the attribute: any other record's evidence
                other = self.records[r.randrange(len(self.records))]
                if other["key"] not in answers:
                    own.append(other["evidence"])
            questions.append(rec["question"])
            evidence.append(rec["evidence"])
            negatives += own
        return questions, evidence + negatives


class HiddenCache:
    """text -> the frozen LM's last hidden states over its real tokens ([n, D] float32), computed once.

    `batch(texts)` gives the [N, max_len, D] right-padded features and mask that `encoder.lm_hidden` gives for
    the same texts tokenized by `train.tokenize` (the LM is causal: padding never changes a real token's state,
    and the encoder masks the padded positions)."""

    def __init__(self, model_args, lm_params, tokenizer, max_len: int):
        self.params, self.tokenizer, self.max_len = lm_params, tokenizer, max_len
        self.fn = enc.hidden_fn(model_args)
        self.d = model_args.d_model
        self.store: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.store)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.store.values())

    def fill(self, texts: list[str], progress=None) -> None:
        from mantis_jax.memory.train import tokenize  # noqa: PLC0415 (train imports this module)

        todo = [t for t in dict.fromkeys(texts) if t not in self.store]
        for i in range(0, len(todo), ENCODE_ROWS):
            chunk = todo[i:i + ENCODE_ROWS]
            tokens, mask = tokenize(self.tokenizer, chunk + [""] * (ENCODE_ROWS - len(chunk)), self.max_len)
            hidden = np.asarray(self.fn(self.params, tokens, mask))  # [64, max_len, D]
            for r, t in enumerate(chunk):
                self.store[t] = hidden[r, :int(mask[r].sum())].copy()
            if progress is not None:
                progress(len(chunk))

    def batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """([N, T, D] features, [N, T] mask), T the longest text rounded up to 8 (at most max_len): factworld's
        sentences are ~15 tokens, and the encoder's cost is linear in T (a few widths: a few compilations)."""
        self.fill(texts)
        width = min(self.max_len, -(-max(len(self.store[t]) for t in texts) // 8) * 8)
        hidden = np.zeros((len(texts), width, self.d), np.float32)
        mask = np.zeros((len(texts), width), bool)
        for r, t in enumerate(texts):
            h = self.store[t]
            hidden[r, :len(h)] = h
            mask[r, :len(h)] = True
        return hidden, mask
