"""factworld: the bundled corpus of invented facts, and the questions that measure remembering them.

MANTIS exists to remember facts and not to invent them; factworld is the data that lets us measure exactly that.
A `World` is a seeded set of entities with invented names (built from syllables) and attributes from closed
vocabularies (home town, job, pet, favourite colour, age, a friend, an owned object). Some attributes are never
stated anywhere: a question about one has the answer `unknown`.

Data leaves in two forms:
- training documents (`World.document(split, i)`, `World.iter_documents`): short narratives mixing fact sentences,
  templated filler and QA lines in one fixed format (`Q: Where does Tavo live?` / `A: Brisk`); every question is
  about a fact stated earlier in the same document or about a never-stated attribute (answer `unknown`), so the
  skill rewarded is in-context recall, not memorising entities.
- QA records (`qa_records`, `eval_questions`): `context`, `question`, `answer`, `answerable`, the character span
  of the evidence in `context` and its distance in tokens from the question, for four kinds: near, far,
  cross_session, unanswerable. `prompt(record)` is the exact text a model should continue; `exact_match` scores it.

Everything is a pure function of (seed, split, index): document i is generated on demand, so the corpus streams at
any size without being held in RAM. Entities are split train / val / test by index (8:1:1) and a friend is always
from the same split, so test entities never appear in training text.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import random
import re
import string
from typing import Callable, Iterator

SPLITS = ("train", "val", "test")
KINDS = ("near", "far", "cross_session", "unanswerable")
UNKNOWN = "unknown"
SESSION_BREAK = "\n\n"

# Syllables chosen so that joined names read as names but are not English words or vocabulary items below.
SYLLABLES = (
    "ba", "bel", "bri", "cae", "dor", "du", "fae", "fen", "ga", "gor", "hal", "ix", "ja", "kel", "ko", "lo",
    "lu", "mae", "mir", "na", "nor", "ori", "pae", "pel", "qui", "ra", "ren", "sa", "sel", "ta", "tav", "ul",
    "va", "vo", "wen", "xa", "ye", "za", "zo", "zu", "thi", "dra", "ky", "ebb", "ost", "yl", "quo", "vex",
)
TOWNS = ("Brisk", "Corvel", "Dunholt", "Emberfall", "Farrowick", "Glimsby", "Hollinmere", "Ivyreach", "Jasperton",
         "Kestrelby", "Lumenford", "Mossgate", "Nettlecombe", "Oakhallow", "Pebbleton", "Quarrydale")
JOBS = ("baker", "carpenter", "doctor", "farmer", "fisher", "gardener", "jeweler", "librarian", "mason", "miller",
        "painter", "potter", "sailor", "tailor", "teacher", "weaver")
PETS = ("badger", "canary", "cat", "dog", "ferret", "frog", "goat", "hamster", "hedgehog", "lizard", "owl",
        "parrot", "rabbit", "snail", "tortoise", "turtle")
COLOURS = ("amber", "azure", "black", "blue", "brown", "crimson", "gold", "green", "grey", "indigo", "orange",
           "pink", "purple", "red", "silver", "teal")
OBJECTS = ("anchor", "banjo", "bicycle", "compass", "drum", "flute", "globe", "hammock", "kettle", "kite",
           "lantern", "mirror", "telescope", "typewriter", "umbrella", "violin")
AGES = tuple(str(a) for a in range(18, 90))

# attribute -> (fact templates, question). `{n}` is the entity's name, `{v}` the value.
ATTRIBUTES = {
    "town": (("{n} lives in {v}.", "{n} has a house in {v}."), "Where does {n} live?"),
    "job": (("{n} works as a {v}.", "{n} is a {v} by trade."), "What is {n}'s job?"),
    "pet": (("{n} has a pet {v}.", "{n} keeps a {v} as a pet."), "What pet does {n} have?"),
    "colour": (("{n}'s favourite colour is {v}.", "{n} likes the colour {v} best."),
               "What is {n}'s favourite colour?"),
    "age": (("{n} is {v} years old.", "{n} turned {v} this year."), "How old is {n}?"),
    "friend": (("{n} is friends with {v}.", "{n}'s best friend is {v}."), "Who is {n}'s friend?"),
    "object": (("{n} owns a {v}.", "{n} carries an old {v}."), "What does {n} own?"),
}
VOCABS = {"town": TOWNS, "job": JOBS, "pet": PETS, "colour": COLOURS, "age": AGES, "object": OBJECTS}

_FILLER_TEMPLATES = (
    "The {place} was {adj} that {time}.", "Nobody said much at the {place} in the {time}.",
    "A {adj} wind crossed the {place}.", "The {time} passed slowly near the {place}.",
    "Someone left a basket by the {place}.", "It was a {adj} {time} by the {place}.",
    "Bells rang somewhere beyond the {place}.", "The road to the {place} was {adj}.",
)
_PLACES = ("market", "river", "bridge", "square", "harbour", "orchard", "mill", "chapel", "meadow", "well")
_ADJS = ("quiet", "busy", "cold", "bright", "grey", "warm", "windy", "calm", "damp", "still")
_TIMES = ("morning", "evening", "afternoon", "night", "day", "week")
_WORD_RE = re.compile(r"\w+|[^\w\s]")


def approx_tokens(text: str) -> int:
    """Words and punctuation marks: a tokenizer-free stand-in for a token count (BPE gives slightly more)."""
    return len(_WORD_RE.findall(text))


def _rng(*parts) -> random.Random:
    """A generator seeded by a stable hash of `parts` (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


@dataclasses.dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str | None  # None: never stated anywhere in the world

    def sentence(self, rng: random.Random, paraphrase: float = 0.0) -> str:
        """The canonical fact sentence; with probability `paraphrase` an alternative wording."""
        templates = ATTRIBUTES[self.attribute][0]
        template = rng.choice(templates[1:]) if paraphrase and rng.random() < paraphrase else templates[0]
        return template.format(n=self.entity, v=self.value)

    def question(self) -> str:
        return ATTRIBUTES[self.attribute][1].format(n=self.entity)

    @property
    def answer(self) -> str:
        return UNKNOWN if self.value is None else self.value


@dataclasses.dataclass(frozen=True)
class Document:
    """One training document and the QA pairs it contains (answer spans are character offsets in `text`)."""
    text: str
    qa: tuple[tuple[str, str, tuple[int, int]], ...]  # (question, answer, answer span)


class World:
    """The seeded world. Entities, documents and QA records are pure functions of (seed, split, index)."""

    def __init__(self, seed: int = 0, n_entities: int = 2000, *, qa_share: float = 0.35,
                 unknown_share: float = 0.1, unstated_prob: float = 0.15, filler_ratio: float = 0.3,
                 paraphrase: float = 0.0, max_entities: int = 3, max_facts: int = 6, contrast: float = 0.0,
                 tail_questions: float = 0.0):
        if n_entities < 30:
            raise ValueError(f"factworld needs >= 30 entities (10 per split), got {n_entities}; "
                             "raise --config.data.factworld_entities")
        if not 0.0 < qa_share < 1.0:
            raise ValueError(f"factworld qa_share ({qa_share}) must be in (0, 1); "
                             "set --config.data.factworld_qa_share")
        if not (0.0 <= unknown_share <= 1.0 and 0.0 <= unstated_prob < 1.0 and filler_ratio >= 0.0
                and 0.0 <= paraphrase <= 1.0):
            raise ValueError("factworld unknown_share, paraphrase and unstated_prob must be in [0, 1], "
                             "filler_ratio >= 0")
        if not 1 <= max_entities <= 8:
            raise ValueError(f"factworld max_entities ({max_entities}) must be in [1, 8]; "
                             "set --config.data.factworld_max_entities")
        self.seed, self.n_entities, self.paraphrase = seed, n_entities, paraphrase
        if max_facts < 1:
            raise ValueError(f"factworld max_facts ({max_facts}) must be >= 1; set --config.data.factworld_max_facts")
        if not 0.0 <= contrast <= 1.0:
            raise ValueError(f"factworld contrast ({contrast}) must be in [0, 1]; set --config.data.factworld_contrast")
        self.contrast = contrast  # share of training documents whose entities all state the same attributes
        if not 0.0 <= tail_questions <= 1.0:
            raise ValueError(f"factworld tail_questions ({tail_questions}) must be in [0, 1]; "
                             "set --config.data.factworld_tail_questions")
        self.tail_questions = tail_questions  # share of training documents that ask every question at the end
        self.max_entities = max_entities  # per training document (1 = no distractor entities: easiest)
        self.max_facts = max_facts  # fact sentences per training document
        self.qa_share, self.unknown_share = qa_share, unknown_share
        self.unstated_prob, self.filler_ratio = unstated_prob, filler_ratio
        s = len(SYLLABLES)
        self._n_syll = 2
        while s ** self._n_syll < 4 * n_entities:  # sparse code space: names look unrelated to their index
            self._n_syll += 1
        self._space = s ** self._n_syll
        r = _rng(seed, "names")
        self._mul = r.randrange(1, self._space)
        while any(self._mul % p == 0 for p in (2, 3)):  # len(SYLLABLES) = 48 = 2^4*3: coprime => bijection
            self._mul = r.randrange(1, self._space)
        self._add = r.randrange(self._space)

    # ---- entities -------------------------------------------------------------------------------------------
    def split_size(self, split: str) -> int:
        k = SPLITS.index(split)  # raises for an unknown split
        n = self.n_entities
        if k == 0:
            return (n // 10) * 8 + min(n % 10, 8)
        return n // 10 + (1 if n % 10 > 7 + k else 0)

    def entity_index(self, split: str, j: int) -> int:
        """Global index of the j-th entity of a split: i % 10 in 0..7 is train, 8 val, 9 test."""
        if split == "train":
            return (j // 8) * 10 + j % 8
        return j * 10 + (8 if split == "val" else 9)

    def name(self, i: int) -> str:
        code = (self._mul * i + self._add) % self._space
        parts = []
        for _ in range(self._n_syll):
            code, d = divmod(code, len(SYLLABLES))
            parts.append(SYLLABLES[d])
        return "".join(parts).capitalize()

    def entity(self, split: str, j: int) -> dict[str, str | None]:
        """Attributes of entity j of `split` (None where never stated); key `name` holds the name."""
        i = self.entity_index(split, j)
        r = _rng(self.seed, "entity", i)
        attrs: dict[str, str | None] = {"name": self.name(i)}
        for attr in ATTRIBUTES:
            if attr == "friend":
                other = r.randrange(self.split_size(split) - 1)
                value = self.name(self.entity_index(split, other + (other >= j)))
            else:
                value = r.choice(VOCABS[attr])
            attrs[attr] = value
        # Never-stated attributes; at least 3 stay stated so every entity can be written about and asked about.
        unstated = [a for a in ATTRIBUTES if r.random() < self.unstated_prob][: len(ATTRIBUTES) - 3]
        for attr in unstated:
            attrs[attr] = None
        return attrs

    def facts(self, split: str, j: int) -> list[Fact]:
        e = self.entity(split, j)
        return [Fact(e["name"], a, e[a]) for a in ATTRIBUTES]

    def _random_entities(self, r: random.Random, split: str, k: int) -> list[list[Fact]]:
        js = r.sample(range(self.split_size(split)), k)
        return [self.facts(split, j) for j in js]

    def filler(self, r: random.Random) -> str:
        return r.choice(_FILLER_TEMPLATES).format(place=r.choice(_PLACES), adj=r.choice(_ADJS), time=r.choice(_TIMES))

    # ---- training documents ---------------------------------------------------------------------------------
    def document(self, split: str, index: int, hardness: float = 1.0) -> Document:
        """Document `index` of `split`: narrative lines with QA pairs placed after the facts they ask about.

        `hardness` in [0, 1] scales the shares of contrast and tail documents (a curriculum's ramp: 0 = none of
        either); the document is a pure function of (split, index, hardness)."""
        if not 0.0 <= hardness <= 1.0:
            raise ValueError(f"factworld document hardness ({hardness}) must be in [0, 1]")
        r = _rng(self.seed, "doc", split, index)
        contrast = self.contrast > 0 and self.max_entities >= 2 and r.random() < self.contrast * hardness
        n_entities = r.randint(2, self.max_entities) if contrast else r.randint(1, self.max_entities)
        entities = self._random_entities(r, split, n_entities)
        mentioned: list[Fact] = []
        unstated: list[Fact] = [f for facts in entities for f in facts if f.value is None]
        if contrast:
            # Every entity states the same attribute(s): the document holds several values of one type, so a
            # question is answered only by matching its entity, not by copying the one value of the asked type.
            n_stated = collections.Counter(f.attribute for facts in entities for f in facts if f.value is not None)
            shared = [a for a in ATTRIBUTES if n_stated[a] >= 2]
            attrs = r.sample(shared, min(len(shared), r.randint(1, 2)))
            mentioned = [f for facts in entities for f in facts if f.attribute in attrs and f.value is not None]
        if not mentioned:
            for facts in entities:
                stated = [f for f in facts if f.value is not None]
                mentioned += r.sample(stated, r.randint(min(2, len(stated)), min(5, len(stated))))
        r.shuffle(mentioned)
        mentioned = mentioned[: self.max_facts]  # bounds the document's length (it must fit a training window)
        narrative: list[tuple[str, Fact | None]] = [(f.sentence(r, self.paraphrase), f) for f in mentioned]
        for _ in range(round(len(mentioned) * self.filler_ratio * 2 * r.random())):
            narrative.insert(r.randrange(len(narrative) + 1), (self.filler(r), None))
        n_qa = max(1, round(len(narrative) * self.qa_share / (1.0 - self.qa_share)))
        # Each question goes after a randomly chosen sentence at or after its evidence (unknown: after the
        # entity's first mention), so questions sit at varied short distances from their evidence.
        first_pos = {}
        for pos, (_, f) in enumerate(narrative):
            if f is not None:
                first_pos.setdefault((f.entity, f.attribute), pos)
                first_pos.setdefault(f.entity, pos)
        slots: list[list[Fact]] = [[] for _ in narrative]
        # Tail documents ask after the whole narrative, as the QA records do: the nearest value of the asked type is
        # then often another entity's, so answering needs the asked entity's own fact.
        tail = self.tail_questions > 0 and r.random() < self.tail_questions * hardness
        asked = [f for f in unstated if f.entity in first_pos]
        for _ in range(n_qa):
            if asked and r.random() < self.unknown_share:
                f = r.choice(asked)
                start = first_pos[f.entity]
            else:
                f = r.choice(mentioned)
                start = first_pos[(f.entity, f.attribute)]
            slot = slots[len(narrative) - 1 if tail else r.randrange(start, len(narrative))]
            if f not in slot:  # the same question twice in a row teaches nothing
                slot.append(f)
        text, qa, line = [], [], []
        length = 0

        def flush_line():
            nonlocal length, line
            if line:
                # The leading space makes every mention of a name the same tokens: byte-level BPE gives "Tavo"
                # at a line start and " Tavo" after a space (as in the questions) different ids, and a small
                # model cannot match a question to its evidence across the two.
                text.append(" " + " ".join(line) + "\n")
                length += len(text[-1])
                line = []

        for (sentence, _), questions in zip(narrative, slots):
            line.append(sentence)
            for f in questions:
                flush_line()
                q_line = f"Q: {f.question()}\nA: "
                start = length + len(q_line)
                text.append(q_line + f.answer + "\n")
                length += len(text[-1])
                qa.append((f.question(), f.answer, (start, start + len(f.answer))))
        flush_line()
        return Document("".join(text).rstrip("\n"), tuple(qa))

    def iter_documents(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
        """Document texts start..stop-1 of a split (endless when stop is None); nothing is kept in memory."""
        i = start
        while stop is None or i < stop:
            yield self.document(split, i).text
            i += 1

    def tokenizer_sample(self, n_docs: int = 3000) -> Iterator[str]:
        """Documents for training a tokenizer: the same vocabularies but a crowd of entities whose names are all
        rare, so BPE learns syllable pieces rather than whole names. Test entities then tokenize like training
        ones (whole-name tokens would be train-only and their test counterparts unseen pieces)."""
        crowd = World(self.seed + 1, len(SYLLABLES) ** self._n_syll // 4, qa_share=self.qa_share,
                      unknown_share=self.unknown_share, unstated_prob=self.unstated_prob, paraphrase=0.5)
        return crowd.iter_documents("train", 0, n_docs)

    # ---- QA records -----------------------------------------------------------------------------------------
    def qa_record(self, split: str, kind: str, index: int, *, distance: int = 2048,
                  count_tokens: Callable[[str], int] = approx_tokens) -> dict:
        """QA record `index` of (split, kind); `distance` = filler tokens between evidence and question (far)."""
        if kind not in KINDS:
            raise ValueError(f"unknown factworld QA kind {kind!r}; use one of {', '.join(KINDS)}")
        r = _rng(self.seed, "qa", split, kind, index, distance)
        while True:  # draw until the entity has what the kind needs (a stated or a never-stated attribute)
            entities = self._random_entities(r, split, r.randint(1, 3))  # fixed: records are a benchmark
            target = entities[0]
            want_unknown = kind == "unanswerable"
            pool = [f for f in target if (f.value is None) == want_unknown]
            if pool:
                break
        fact = r.choice(pool)
        sentences: list[str] = []
        for facts in entities:
            stated = [f for f in facts if f.value is not None and f is not fact]
            picked = r.sample(stated, min(len(stated), r.randint(1, 3)))
            sentences += [f.sentence(r, self.paraphrase) for f in picked]
        r.shuffle(sentences)
        evidence = None if want_unknown else fact.sentence(r, self.paraphrase)
        if evidence is not None:
            sentences.insert(r.randrange(len(sentences) + 1), evidence)
        sessions: list[str] = []
        if kind == "near":
            body = " ".join(sentences)
        elif kind == "unanswerable":
            body = " ".join(sentences)
        else:  # far / cross_session: evidence first, then at least `distance` tokens of filler before the question
            sentences.remove(evidence)
            fill, n_tok = [], 0
            while n_tok < distance:  # sentences are joined by spaces: count each with its leading space
                fill.append(self.filler(r))
                n_tok += count_tokens(" " + fill[-1])
            while count_tokens(" ".join(fill)) < distance:  # a tokenizer may merge across sentence ends
                fill.append(self.filler(r))
            rest = " ".join(sentences + fill)
            if kind == "far":
                body = evidence + " " + rest
            else:
                later = self._random_entities(r, split, 1)[0]
                later_facts = [f.sentence(r, self.paraphrase) for f in later if f.value is not None][:2]
                sessions = [evidence + " " + " ".join(sentences), " ".join(fill + later_facts)]
                body = SESSION_BREAK.join(sessions)
        record = {
            "id": f"{split}-{kind}-{index}", "kind": kind, "split": split, "entity": fact.entity,
            "attribute": fact.attribute, "context": body, "question": fact.question(), "answer": fact.answer,
            "answerable": fact.value is not None, "evidence_span": None, "distance_tokens": -1,
            "sessions": sessions,
        }
        if evidence is not None:
            start = body.index(evidence)
            end = start + len(evidence)
            record["evidence_span"] = (start, end)
            record["distance_tokens"] = count_tokens(body[end:] + "\nQ: ")
        return record

    def qa_records(self, split: str, kind: str, n: int, *, start: int = 0, distance: int = 2048,
                   count_tokens: Callable[[str], int] = approx_tokens) -> Iterator[dict]:
        for i in range(start, start + n):
            yield self.qa_record(split, kind, i, distance=distance, count_tokens=count_tokens)


def prompt(record: dict) -> str:
    """The text a model continues to answer a record: context, then `Q: ...` and `A:` as in training text."""
    return f" {record['context']}\nQ: {record['question']}\nA:"  # leading space: see World.document


def eval_questions(split: str = "test", kind: str = "near", n: int = 50, seed: int = 0, *, config=None,
                   n_entities: int = 2000, start: int = 0, distance: int = 2048,
                   count_tokens: Callable[[str], int] = approx_tokens) -> list[dict]:
    """`n` QA records of one kind about `split` entities.

    The world must be the one the model trained on: pass `config` (its data.factworld_* keys are used and
    `seed`/`n_entities` are ignored), or `seed`/`n_entities` matching data.factworld_seed/_entities.
    """
    world = world_from_config(config) if config is not None else World(seed, n_entities)
    return list(world.qa_records(split, kind, n, start=start, distance=distance, count_tokens=count_tokens))


def normalize_answer(text: str) -> str:
    """First line, lower-cased, surrounding whitespace and punctuation stripped."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return first.strip().strip(string.punctuation + " ").lower()


def exact_match(pred: str, answer: str) -> bool:
    """True when the prediction's first line equals the answer (case- and edge-punctuation-insensitive)."""
    return normalize_answer(pred) == normalize_answer(answer)


def world_from_config(config) -> World:
    d = config.data
    return World(d.factworld_seed, d.factworld_entities, qa_share=d.factworld_qa_share,
                 unknown_share=d.factworld_unknown_share, unstated_prob=d.factworld_unstated_prob,
                 filler_ratio=d.factworld_filler_ratio, paraphrase=d.factworld_paraphrase,
                 max_entities=d.factworld_max_entities, max_facts=d.factworld_max_facts,
                 contrast=d.factworld_contrast, tail_questions=d.factworld_tail_questions)


def write_corpus(out_dir: str, world: World, *, docs: dict[str, int], qa_per_kind: int = 100,
                 distance: int = 2048) -> dict[str, str]:
    """Writes `{split}.txt` (documents separated by a blank line) and `qa_{split}_{kind}.jsonl`; returns paths."""
    import json
    import os

    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for split, n_docs in docs.items():
        path = os.path.join(out_dir, f"{split}.txt")
        with open(path, "w", encoding="utf-8") as f:
            for k, text in enumerate(world.iter_documents(split, 0, n_docs)):
                f.write(("\n\n" if k else "") + text)
            f.write("\n")
        written[split] = path
        for kind in KINDS if qa_per_kind else ():
            qa_path = os.path.join(out_dir, f"qa_{split}_{kind}.jsonl")
            with open(qa_path, "w", encoding="utf-8") as f:
                for rec in world.qa_records(split, kind, qa_per_kind, distance=distance):
                    f.write(json.dumps(rec) + "\n")
            written[f"qa_{split}_{kind}"] = qa_path
    return written


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mantis_jax.data.factworld",
                                description="Write a factworld corpus (text + QA jsonl) to a directory.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--entities", type=int, default=2000)
    p.add_argument("--train_docs", type=int, default=10000)
    p.add_argument("--val_docs", type=int, default=500)
    p.add_argument("--test_docs", type=int, default=500)
    p.add_argument("--qa_per_kind", type=int, default=100)
    p.add_argument("--distance", type=int, default=2048, help="filler tokens between evidence and question (far)")
    p.add_argument("--qa_share", type=float, default=0.35)
    a = p.parse_args(argv)
    world = World(a.seed, a.entities, qa_share=a.qa_share)
    paths = write_corpus(a.out, world, docs={"train": a.train_docs, "val": a.val_docs, "test": a.test_docs},
                         qa_per_kind=a.qa_per_kind, distance=a.distance)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
