"""DPO and GRPO objectives against hand computations, and the verifiable factworld reward."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.post import dpo, grpo, losses


def test_dpo_loss_matches_a_hand_computation():
    # pair 1: margin = (-1 + 1.5) - (-3 + 2.5) = 1.0 -> beta·margin 0.1 -> log(1 + e^-0.1) = 0.6443966600735709
    # pair 2: margin = (-2 + 2) - (-1 + 1.5) = -0.5 -> -0.05 -> log(1 + e^0.05) = 0.7184596480132863
    loss, m = losses.dpo_loss(jnp.array([-1.0, -2.0]), jnp.array([-3.0, -1.0]), jnp.array([-1.5, -2.0]),
                              jnp.array([-2.5, -1.5]), beta=0.1)
    assert float(loss) == pytest.approx((0.6443966600735709 + 0.7184596480132863) / 2, rel=1e-6)
    assert float(m["reward_accuracy"]) == 0.5
    assert float(m["reward_margin"]) == pytest.approx((0.1 - 0.05) / 2, rel=1e-6)


def test_dpo_gradient_when_the_policy_equals_the_reference():
    """At policy == reference every margin is 0: the loss is log 2, the reference gets no gradient (it is frozen),
    and d loss / d log π = ∓beta·σ(0)/B = ∓beta/(2B): equal and opposite on chosen and rejected, so the
    gradient through the model is zero when the two responses are the same tokens."""
    logp_c, logp_r = jnp.array([-3.0, -7.0, -1.5]), jnp.array([-2.0, -9.0, -4.0])
    beta, B = 0.1, 3

    def loss(pc, pr, rc, rr):
        return losses.dpo_loss(pc, pr, rc, rr, beta)[0]

    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(logp_c, logp_r, logp_c, logp_r)
    assert float(value) == pytest.approx(math.log(2.0), rel=1e-6)
    np.testing.assert_allclose(grads[0], -beta / (2 * B), rtol=1e-6)
    np.testing.assert_allclose(grads[1], beta / (2 * B), rtol=1e-6)
    np.testing.assert_array_equal(grads[2], 0.0)
    np.testing.assert_array_equal(grads[3], 0.0)
    # the same response on both sides: the two log-probabilities are one function of the policy, so
    # d loss / d policy = (d/d pc + d/d pr) · d log π / d policy = 0
    same = jax.grad(lambda x: loss(x, x, logp_c, logp_c))(logp_c)
    np.testing.assert_allclose(same, 0.0, atol=1e-9)


def test_dpo_rows_score_the_response_only(tokenizer):
    """Pair rows: the masked targets are exactly the response tokens."""
    example = {"messages": [{"role": "system", "content": "Tavo lives in Brisk."},
                            {"role": "user", "content": "Where does Tavo live?"}],
               "chosen": "Brisk", "rejected": "Corvel"}
    rows = dpo.PairToRows(tokenizer, 48)(0, example)
    for side in dpo.SIDES:
        assert tokenizer.decode(rows[f"{side}_targets"][rows[f"{side}_mask"] > 0]) == f" {example[side]}\n"
    np.testing.assert_array_equal(rows["chosen_inputs"][1:], rows["chosen_targets"][:-1])


def test_group_advantages_sum_to_zero_within_each_group():
    rewards = jnp.asarray(np.random.default_rng(0).choice([-1.0, 1.0], (6, 8)))
    rewards = rewards.at[0].set(1.0)  # a group whose samples all agree
    adv = np.asarray(losses.group_advantages(rewards))
    np.testing.assert_allclose(adv.sum(axis=1), 0.0, atol=1e-5)
    np.testing.assert_array_equal(adv[0], 0.0)  # nothing to prefer: no signal
    mixed = [r for r in range(1, 6) if len(set(np.asarray(rewards[r]).tolist())) > 1]
    np.testing.assert_allclose(adv[mixed].std(axis=1), 1.0, rtol=1e-4)
    assert np.all((adv[mixed] > 0) == (np.asarray(rewards)[mixed] > 0))


def test_grpo_loss_clips_the_ratio_and_penalises_kl_by_hand():
    # one token per sample: ratio e^{log 1.5} = 1.5, clip 0.2
    logp = jnp.log(jnp.array([[1.5], [1.5], [1.0]]))
    old = jnp.zeros((3, 1))
    ref = jnp.array([[0.0], [0.0], [math.log(2.0)]])
    adv = jnp.array([1.0, -1.0, 0.0])
    loss, m = losses.grpo_loss(logp, old, ref, jnp.ones((3, 1)), adv, clip=0.2, kl_weight=0.5)
    # A=+1: -min(1.5, 1.2) = -1.2;  A=-1: -min(-1.5, -1.2) = 1.5;  A=0: 0
    # k3 with q = ref - logp: e^q - q - 1 for q = -log 1.5, -log 1.5, log 2
    k3 = [1 / 1.5 + math.log(1.5) - 1, 1 / 1.5 + math.log(1.5) - 1, 2.0 - math.log(2.0) - 1]
    expected = ((-1.2 + 0.5 * k3[0]) + (1.5 + 0.5 * k3[1]) + 0.5 * k3[2]) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(m["clip_fraction"]) == pytest.approx(2 / 3)
    assert float(m["kl"]) == pytest.approx(sum(k3) / 3, rel=1e-6)


def test_factworld_rewards():
    assert grpo.reward(" Brisk\n", "Brisk") == 1.0
    assert grpo.reward(" unknown", "unknown") == 1.0  # abstaining on an unanswerable question
    assert grpo.reward(" Corvel", "Brisk") == -1.0
    assert grpo.reward(" Brisk", "unknown") == -1.0  # a hallucinated answer
    assert grpo.reward(" unknown", "Brisk") == -1.0


def test_rollout_rows_mask_the_completion_targets():
    rows = grpo.rollout_rows([[1, 2, 3], [4, 5]], [[7, 8], [9]], seq_len=6, pad_id=0)
    np.testing.assert_array_equal(rows["inputs"], [[1, 2, 3, 7, 8, 0], [4, 5, 9, 0, 0, 0]])
    np.testing.assert_array_equal(rows["targets"][rows["mask"] > 0], [7, 8, 9])
