"""DPO and GRPO objectives against hand computations, and the verifiable factworld reward."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.model.transformer import init_params
from mantis_jax.post import dpo, grpo, losses
from tests.post.conftest import tiny_args


def test_dpo_loss_matches_a_hand_computation():
    # pair 1: margin = (-1 + 1.5) - (-3 + 2.5) = 1.0 -> beta·margin 0.1 -> log(1 + e^-0.1) = 0.6443966600735709
    # pair 2: margin = (-2 + 2) - (-1 + 1.5) = -0.5 -> -0.05 -> log(1 + e^0.05) = 0.7184596480132863
    loss, m = losses.dpo_loss(jnp.array([-1.0, -2.0]), jnp.array([-3.0, -1.0]), jnp.array([-1.5, -2.0]),
                              jnp.array([-2.5, -1.5]), beta=0.1)
    assert float(loss) == pytest.approx((0.6443966600735709 + 0.7184596480132863) / 2, rel=1e-6)
    assert float(m["reward_accuracy"]) == 0.5
    assert float(m["reward_margin"]) == pytest.approx((0.1 - 0.05) / 2, rel=1e-6)


def test_dpo_gradient_when_the_policy_equals_the_reference():
    """At policy == reference: loss log 2 on any pairs; no gradient reaches the reference; the policy's gradient
    is the closed form -beta/2 · mean(∇log π(chosen) - ∇log π(rejected)), hence zero when the two responses are
    the same tokens."""
    args = tiny_args(n_layers=1)
    params = init_params(args, jax.random.key(0))
    rng = np.random.default_rng(0)
    T = 10
    batch = {}
    for side in dpo.SIDES:
        row = rng.integers(1, args.vocab_size, (2, T + 1)).astype(np.int32)
        batch[f"{side}_inputs"], batch[f"{side}_targets"] = row[:, :-1], row[:, 1:]
        batch[f"{side}_mask"] = (np.arange(T) >= 6).astype(np.float32)[None].repeat(2, 0)
    beta = 0.1

    def loss(policy, reference, b):
        pc, pr, _ = dpo.pair_logprobs(args, policy, b)
        rc, rr, _ = dpo.pair_logprobs(args, reference, b)
        return losses.dpo_loss(pc, pr, rc, rr, beta)[0]

    grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    value, (g_policy, g_ref) = grads(params, params, batch)
    assert float(value) == pytest.approx(math.log(2.0), rel=1e-6)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_ref))

    def side_logp(p, b):
        pc, pr, _ = dpo.pair_logprobs(args, p, b)
        return jnp.mean(pc - pr)

    closed = jax.tree.map(lambda g: -beta / 2 * g, jax.jit(jax.grad(side_logp))(params, batch))
    for a, b in zip(jax.tree.leaves(g_policy), jax.tree.leaves(closed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)
    same = dict(batch, **{f"rejected_{k}": batch[f"chosen_{k}"] for k in ("inputs", "targets", "mask")})
    _, (g_same, _) = grads(params, params, same)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_same)) < 1e-7  # zero up to summation order
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_policy)) > 1e-4


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
