"""Hybrid retrieval (engine/memory.py `rerank`, `engine.search_candidates` / `lexical_weight` / `lexical_min`): the
lexical score against a hand computation, a distractor with the higher cosine but no name in common with the
question going below the evidence (and out, with the filter), and the config keys' validation."""

import math

import pytest

from mantis_jax.config import ConfigError, default_config, validate
from mantis_jax.engine.memory import Hit, key_words, lexical_scores, rerank, words

QUESTION = "Where does Tavo live?"
EVIDENCE = "Tavo lives in Brisk."
DISTRACTOR = "Mira lives in Oakford."  # the same template about another entity: the higher cosine


def _hits():
    return [Hit(DISTRACTOR, 0.90, "semantic", "d"), Hit("Olen lives in Brisk.", 0.85, "semantic", "d"),
            Hit(EVIDENCE, 0.80, "semantic", "s0"), Hit("Tavo works as a baker.", 0.30, "semantic", "s0"),
            Hit("The market was quiet.", 0.20, "semantic", "s0")]


def test_words():
    assert words("What is Tavo's job?") == {"what", "is", "tavo", "s", "job"}
    assert key_words("What is Tavo's job?") == {"tavo"}  # the names: capitalised after the first word
    assert key_words("Who is friends with Mira Vel?") == {"mira", "vel"}
    assert key_words("what is the job?") == {"what", "is", "the", "job"}  # no name: every word


def test_lexical_scores_by_hand():
    # key words {tavo} (the name): it occurs in 2 of the 5 candidates (idf log(5/2)) and carries all the weight:
    # the two Tavo sentences score 1, the others 0
    assert lexical_scores(QUESTION, [h.text for h in _hits()]) == [0.0, 0.0, 1.0, 1.0, 0.0]
    # two names over 3 candidates: df(tavo) = 2, df(mira) = 1
    texts = ["Tavo's dog is old.", "Mira is friends with Tavo.", "A mill was busy."]
    idf_tavo, idf_mira = math.log(3 / 2), math.log(3 / 1)
    got = lexical_scores("Is Tavo a friend of Mira?", texts)
    assert got == pytest.approx([idf_tavo / (idf_tavo + idf_mira), 1.0, 0.0])
    # no name: every word is a key word; "is" in 2 of 3 (log 3/2), "old" in 1 (log 3); what, the, one: in none
    idf_is, idf_old = math.log(3 / 2), math.log(3 / 1)
    got = lexical_scores("what is the old one?", texts)
    assert got == pytest.approx([1.0, idf_is / (idf_is + idf_old), 0.0])
    assert lexical_scores("Who is Olen?", texts) == [0.0, 0.0, 0.0]  # the name is in no candidate: no signal
    # a word every candidate contains separates nothing: idf log(3/3) = 0
    assert lexical_scores("Is Tavo here?", ["Tavo is.", "Tavo is not.", "Is Tavo?"]) == [0.0, 0.0, 0.0]


def test_rerank_puts_the_evidence_above_a_higher_scoring_distractor():
    hits = _hits()
    # totals with weight 0.5: 0.90, 0.85, 0.80 + 0.5 = 1.30, 0.30 + 0.5 = 0.80, 0.20
    top = rerank(QUESTION, hits, 3, 0.5)
    assert [h.text for h in top] == [EVIDENCE, DISTRACTOR, "Olen lives in Brisk."]
    assert top[0].score == 0.80  # the dense score is kept (min_score and the policy read it)
    # weight 0.12: the evidence's 0.92 passes the distractor's 0.90; the baker line's 0.42 stays below 0.85
    assert [h.text for h in rerank(QUESTION, hits, 2, 0.12)] == [EVIDENCE, DISTRACTOR]
    # weight 0.04: the evidence's 0.84 stays below both other "lives in" lines (0.90, 0.85)
    assert [h.text for h in rerank(QUESTION, hits, 3, 0.04)] == [DISTRACTOR, "Olen lives in Brisk.", EVIDENCE]
    assert rerank(QUESTION, hits, 3, 0.0) == hits[:3]  # weight 0: the dense top-k
    # min_share 0.5: spans below half the best lexical score (0 < 0.5 x 1) are dropped: only the Tavo sentences
    assert [h.text for h in rerank(QUESTION, hits, 3, 0.5, 0.5)] == [EVIDENCE, "Tavo works as a baker."]
    # min_share without weight: the filter alone, the survivors in dense order
    assert [h.text for h in rerank(QUESTION, hits, 3, 0.0, 1.0)] == [EVIDENCE, "Tavo works as a baker."]
    # no lexical signal: the filter keeps everything (every score equals the best, 0)
    assert rerank("Who is Brenna?", hits, 3, 0.5, 0.5) == hits[:3]


@pytest.mark.parametrize("changes, message", [
    (dict(search_candidates=2), r"config.engine.search_candidates \(2\) must be 0 \(no rerank\) or >= "
                                r"config.engine.top_k \(3\)"),
    (dict(search_candidates=-1), r"config.engine.search_candidates \(-1\) must be 0"),
    (dict(lexical_weight=-0.5), r"config.engine.lexical_weight \(-0.5\) must be a finite number >= 0"),
    (dict(lexical_weight=float("inf")), r"config.engine.lexical_weight \(inf\) must be a finite number >= 0"),
    (dict(lexical_min=1.5), r"config.engine.lexical_min \(1.5\) must be in \[0, 1\]"),
])
def test_config_validation_names_the_key(changes, message):
    c = default_config()
    for key, value in changes.items():
        setattr(c.engine, key, value)
    with pytest.raises(ConfigError, match=message):
        validate(c)
    ok = default_config()
    ok.engine.search_candidates, ok.engine.lexical_weight, ok.engine.lexical_min = 3, 0.0, 1.0
    validate(ok)
