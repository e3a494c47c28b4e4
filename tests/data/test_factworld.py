"""factworld: determinism, disjoint splits, QA answers checked against the world's own attribute table."""

import json
import re
import subprocess
import sys

import pytest

from mantis_jax.data import factworld as fw

N_ENT = 300


@pytest.fixture(scope="module")
def world():
    return fw.World(seed=7, n_entities=N_ENT)


def _names(world, split):
    return {world.entity(split, j)["name"] for j in range(world.split_size(split))}


def test_deterministic_from_seed(world):
    again = fw.World(seed=7, n_entities=N_ENT)
    other = fw.World(seed=8, n_entities=N_ENT)
    docs = [world.document("train", i) for i in range(20)]
    assert docs == [again.document("train", i) for i in range(20)]
    assert [d.text for d in docs] != [other.document("train", i).text for i in range(20)]
    for kind in fw.KINDS:
        assert world.qa_record("test", kind, 3, distance=64) == again.qa_record("test", kind, 3, distance=64)
    # Python salts hash() per process; the corpus must not depend on it.
    code = "from mantis_jax.data import factworld as f; print(f.World(7, 300).document('train', 5).text)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    assert out.rstrip("\n") == docs[5].text


def test_splits_are_disjoint(world):
    sizes = {s: world.split_size(s) for s in fw.SPLITS}
    assert sum(sizes.values()) == N_ENT and sizes == {"train": 240, "val": 30, "test": 30}
    names = {s: _names(world, s) for s in fw.SPLITS}
    assert len(set.union(*names.values())) == N_ENT  # unique names
    vocab = {w.lower() for v in fw.VOCABS.values() for w in v}
    assert not {n.lower() for n in set.union(*names.values())} & vocab
    for split in fw.SPLITS:  # friends come from the same split
        for j in range(sizes[split]):
            friend = world.entity(split, j)["friend"]
            assert friend is None or friend in names[split]
    train_text = "\n".join(world.iter_documents("train", 0, 400))
    seen = set(re.findall(r"[A-Z][a-z]+", train_text))
    assert seen & names["train"]
    assert not seen & (names["val"] | names["test"])
    test_text = "\n".join(world.iter_documents("test", 0, 100))
    assert not set(re.findall(r"[A-Z][a-z]+", test_text)) & names["train"]


def test_document_answers_match_the_world(world):
    by_name = {}
    for j in range(world.split_size("train")):
        e = world.entity("train", j)
        by_name[e["name"]] = e
    questions = {a: re.compile("^" + re.escape(q).replace(re.escape("{n}"), r"(\w+)") + "$")
                 for a, (_, q) in fw.ATTRIBUTES.items()}
    n_qa = n_unknown = 0
    for i in range(200):
        doc = world.document("train", i)
        assert doc.qa
        for question, answer, (a, b) in doc.qa:
            assert doc.text[a:b] == answer
            line_start = doc.text.rfind("\n", 0, a) + 1
            assert doc.text[line_start:a] == "A: "
            attr, name = next((attr, m.group(1)) for attr, r in questions.items() if (m := r.match(question)))
            truth = by_name[name][attr]
            assert answer == (fw.UNKNOWN if truth is None else truth)
            before = doc.text[:doc.text.rfind("Q: ", 0, a)]  # text before this question's line
            if truth is None:  # never stated anywhere: no fact sentence about it, but the entity is present
                n_unknown += 1
                assert name in before
            else:  # the evidence sentence precedes the question
                assert any(t.format(n=name, v=truth) in before for t in fw.ATTRIBUTES[attr][0])
            n_qa += 1
    assert 0.02 < n_unknown / n_qa < 0.25


def test_qa_share_controls_question_lines():
    def share(qa_share):
        w = fw.World(1, N_ENT, qa_share=qa_share)
        lines = [ln for t in w.iter_documents("train", 0, 300) for ln in t.split("\n")]
        qa = sum(ln.startswith("Q: ") for ln in lines)
        sentences = sum(ln.count(".") for ln in lines if not ln.startswith(("Q: ", "A: ")))
        return qa / (qa + sentences)  # share of QA pairs among all lines, a sentence counting as one line

    for qa_share in (0.2, 0.5):  # duplicates of a question in one place are dropped: slightly below target
        assert qa_share - 0.08 < share(qa_share) <= qa_share + 0.02


@pytest.mark.parametrize("kind", fw.KINDS)
def test_qa_records(world, kind):
    for rec in world.qa_records("test", kind, 12, distance=300):
        name = rec["entity"]
        assert name in _names(world, "test")
        truth = world.entity("test", next(j for j in range(world.split_size("test"))
                                           if world.entity("test", j)["name"] == name))[rec["attribute"]]
        assert rec["answerable"] == (kind != "unanswerable") == (truth is not None)
        assert rec["answer"] == (truth if truth is not None else fw.UNKNOWN)
        assert name in rec["context"] and rec["question"] in fw.prompt(rec)
        assert fw.prompt(rec).endswith(f"Q: {rec['question']}\nA:")
        if kind == "unanswerable":
            assert rec["evidence_span"] is None
            continue
        a, b = rec["evidence_span"]
        evidence = rec["context"][a:b]
        assert name in evidence and rec["answer"] in evidence
        assert rec["distance_tokens"] == fw.approx_tokens(rec["context"][b:] + "\nQ: ")
        if kind == "near":
            assert rec["distance_tokens"] < 80
        else:
            assert rec["distance_tokens"] >= 300
        if kind == "cross_session":
            assert len(rec["sessions"]) == 2 and evidence in rec["sessions"][0]
            assert rec["context"] == fw.SESSION_BREAK.join(rec["sessions"])
    json.dumps(rec)  # records are JSON-serializable


def test_eval_questions_and_exact_match():
    recs = fw.eval_questions("test", "near", n=10, seed=3, n_entities=N_ENT)
    assert len(recs) == 10 and all(r["split"] == "test" and r["answerable"] for r in recs)
    assert recs == fw.eval_questions("test", "near", n=10, seed=3, n_entities=N_ENT)
    assert fw.exact_match(" Brisk\nQ: next", "Brisk")
    assert fw.exact_match("brisk.", "Brisk")
    assert not fw.exact_match("Brisky", "Brisk")
    assert not fw.exact_match("", "Brisk")
    assert fw.exact_match(" unknown", fw.UNKNOWN)


def test_paraphrase_controls_fact_wording():
    canonical, alternative = " has a pet ", " keeps a "  # the two wordings of the `pet` fact
    text0 = "\n".join(fw.World(2, N_ENT).iter_documents("train", 0, 100))
    text1 = "\n".join(fw.World(2, N_ENT, paraphrase=1.0).iter_documents("train", 0, 100))
    assert canonical in text0 and alternative not in text0
    assert alternative in text1 and canonical not in text1


def test_max_entities_per_document():
    def counts(max_entities):
        w = fw.World(4, N_ENT, max_entities=max_entities)
        names = _names(w, "train")
        subjects = re.compile(r"(?:^|\. |\n ?)([A-Z][a-z]+)[ ']")  # sentence subjects; friends are objects
        return {len(set(subjects.findall(t)) & names) for t in w.iter_documents("train", 0, 200)}

    assert max(counts(1)) == 1
    assert max(counts(3)) == 3 and min(counts(3)) == 1
    facts = re.compile("|".join(re.escape(t[0]).replace(re.escape("{n}"), r"\w+").replace(re.escape("{v}"), r"\w+")
                                for t, _ in fw.ATTRIBUTES.values()))
    for max_facts, top in ((2, 2), (6, 6), (40, 15)):  # 3 entities x 5 facts at most without a cap
        w = fw.World(4, N_ENT, max_facts=max_facts)
        n = [len(facts.findall(t)) for t in w.iter_documents("train", 0, 200)]
        assert max(n) <= top and (max_facts > 15 or max(n) == max_facts)


def _stated(text):
    """(entity, attribute) of every canonical fact sentence in a document."""
    found = set()
    for attr, (templates, _) in fw.ATTRIBUTES.items():
        pattern = re.escape(templates[0]).replace(re.escape("{n}"), r"([A-Z][a-z]+)").replace(re.escape("{v}"), r"\w+")
        found |= {(name, attr) for name in re.findall(pattern, text)}
    return found


def test_contrast_documents_state_one_attribute_for_several_entities():
    base = fw.World(5, N_ENT)
    assert [base.document("train", i) for i in range(30)] == \
        [fw.World(5, N_ENT, contrast=0.0).document("train", i) for i in range(30)]
    w = fw.World(5, N_ENT, max_facts=40, contrast=1.0)
    for i in range(200):
        stated = _stated(w.document("train", i).text)
        attrs = {a for _, a in stated}
        assert 1 <= len(attrs) <= 2, stated
        for a in attrs:  # every stated attribute is stated for two or more entities
            assert len({n for n, b in stated if b == a}) >= 2, (i, stated)
    half = fw.World(5, N_ENT, max_facts=40, contrast=0.5)
    shared = [len({a for _, a in _stated(t)}) <= 2 and len({n for n, _ in _stated(t)}) >= 2
              for t in half.iter_documents("train", 0, 400)]
    assert 0.4 < sum(shared) / len(shared) < 0.8  # half are contrast documents, a few ordinary ones look alike
    with pytest.raises(ValueError, match="factworld_contrast"):
        fw.World(0, N_ENT, contrast=1.5)


def test_tail_questions_follow_the_whole_narrative():
    base = fw.World(6, N_ENT)
    assert [base.document("train", i) for i in range(30)] == \
        [fw.World(6, N_ENT, tail_questions=0.0).document("train", i) for i in range(30)]
    tail = fw.World(6, N_ENT, tail_questions=1.0)
    for i in range(100):
        doc = tail.document("train", i)
        head, _, questions = doc.text.partition("\nQ: ")
        assert "Q: " not in head and _stated(questions) == set(), doc.text  # no fact after the first question
        stated = _stated(head)
        for question, answer, (a, b) in doc.qa:  # every answer is stated in the narrative above (or unknown)
            assert doc.text[a:b] == answer
            assert answer == fw.UNKNOWN or any(n in question for n, _ in stated)
    mixed = [fw.World(6, N_ENT, tail_questions=0.5).document("train", i).text for i in range(200)]
    assert 0.35 < sum(_stated(t.partition("\nQ: ")[2]) == set() for t in mixed) / 200 < 0.85
    with pytest.raises(ValueError, match="factworld_tail_questions"):
        fw.World(0, N_ENT, tail_questions=-0.1)


def test_hardness_scales_the_contrast_and_tail_shares():
    hard = fw.World(7, N_ENT, max_facts=40, contrast=1.0, tail_questions=1.0)
    # Hardness 0: neither kind (the documents of a world whose shares are ~0: the same random draws, none below
    # the share); 1: the world's own shares.
    plain = fw.World(7, N_ENT, max_facts=40, contrast=1e-12, tail_questions=1e-12)
    assert [hard.document("train", i, 0.0) for i in range(40)] == [plain.document("train", i) for i in range(40)]
    assert [hard.document("train", i, 1.0) for i in range(40)] == [hard.document("train", i) for i in range(40)]
    half = [hard.document("train", i, 0.5).text for i in range(300)]
    tail = sum(_stated(t.partition("\nQ: ")[2]) == set() for t in half) / len(half)
    assert 0.35 < tail < 0.85  # ~half are tail documents (a few ordinary ones ask only after the last fact)
    with pytest.raises(ValueError, match="hardness"):
        hard.document("train", 0, 1.5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="factworld_entities"):
        fw.World(0, 10)
    with pytest.raises(ValueError, match="unknown factworld QA kind"):
        fw.World(0, 100).qa_record("test", "medium", 0)


def test_write_corpus(tmp_path, world):
    paths = fw.write_corpus(str(tmp_path), world, docs={"train": 5, "test": 3}, qa_per_kind=2, distance=50)
    text = open(paths["train"]).read()
    assert text.rstrip("\n").split("\n\n") == list(world.iter_documents("train", 0, 5))
    recs = [json.loads(line) for line in open(paths["qa_test_far"])]
    assert [r["id"] for r in recs] == ["test-far-0", "test-far-1"]
