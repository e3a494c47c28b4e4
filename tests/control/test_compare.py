"""control/compare.py: a policy's figures over fixed episodes, against a hand count."""

import pytest

from mantis_jax.control import compare, reward
from mantis_jax.control.episodes import Episode
from mantis_jax.engine.policy import Decisions, StateSummary

# (kind, answer, correct, compute, latency, confidence, verify): an unknown answer is never a hallucination
ROWS = [("near", "Brisk", True, 0.5, 0.6, 0.9, True),
        ("near", "Corvel", False, 0.5, 0.6, 0.8, True),  # answered and wrong: a hallucination
        ("unanswerable", "unknown", True, 0.9, 1.0, 0.2, True),
        ("far", "unknown", False, 0.3, 0.4, None, False)]  # abstained on an answerable question: wrong, no claim


class FakeEnv:
    def run(self, index, policy):
        kind, answer, correct, compute, latency, confidence, verify = ROWS[index]
        decisions = Decisions(episodic=index != 3, semantic=False, verify=verify)
        outcome = reward.Outcome(correct=correct, candidate_correct=correct, confidence=confidence,
                                 latency=latency, compute=compute)
        return Episode(outcome, decisions, {"kind": kind, "answer": answer})


def test_evaluate_against_a_hand_count():
    w = reward.Weights()
    r = compare.evaluate(FakeEnv(), policy=None, indices=[0, 1, 2, 3], weights=w)
    assert r["accuracy"] == pytest.approx(2 / 4) and r["hallucinated"] == pytest.approx(1 / 4)
    assert r["compute"] == pytest.approx((0.5 + 0.5 + 0.9 + 0.3) / 4)
    assert r["latency"] == pytest.approx((0.6 + 0.6 + 1.0 + 0.4) / 4)
    assert r["retrieve"] == pytest.approx(3 / 4) and r["verify"] == pytest.approx(3 / 4)
    assert r["by_kind"] == {"near": 0.5, "far": 0.0, "unanswerable": 1.0}  # kinds absent from the run are left out
    # reward by hand: correct - 0.3 latency - 0.2 compute + 0.5 calibration, calibration = 1 - (confidence -
    # candidate right)^2 (0 when the critic did not run)
    by_hand = [1 - 0.18 - 0.10 + 0.5 * 0.99, 0 - 0.18 - 0.10 + 0.5 * 0.36, 1 - 0.30 - 0.18 + 0.5 * 0.36,
               0 - 0.12 - 0.06]
    assert r["reward"] == pytest.approx(sum(by_hand) / 4) == pytest.approx(0.40875)
    row = compare.format_row("policy", r, width=8)
    assert row.startswith("policy   acc 0.500  halluc 0.250  compute 0.550") and "unanswerable 1.00" in row


def test_entropy_policy_retrieves_and_verifies_when_unsure():
    policy = compare.EntropyPolicy(0.3)
    base = dict(pooled=None, context_fill=0.5, episodic_fill=0.0, semantic_fill=0.0, best_score=0.0,
                exit_confidence=0.9)
    sure, unsure = policy.decide(StateSummary(entropy=0.1, **base)), policy.decide(StateSummary(entropy=0.5, **base))
    assert (sure.episodic, sure.semantic, sure.verify) == (False, False, False)
    assert (unsure.episodic, unsure.semantic, unsure.verify) == (True, True, True)
