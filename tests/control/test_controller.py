"""The meta-controller's distributions against direct computations, the PPO loss against hand-computed values,
and the reward's terms (PPO learning a reward is in test_rl.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.config import default_config, set_shape, validate
from mantis_jax.control import controller as ctl
from mantis_jax.control import ppo, reward
from mantis_jax.engine.policy import Decisions, StateSummary

SPEC = ctl.ControllerSpec(d_model=8, n_layers=2, n_experts=3, thresholds=(0.5, 0.9, 1.0), d_hidden=16, depth=1,
                          bias_scale=1.0, bias_std=0.3)
_apply = jax.jit(ctl.apply, static_argnums=0)  # eager Flax applies dispatch op by op: compile once per shape


@pytest.fixture(scope="module")
def params():
    p = ctl.init(SPEC, jax.random.key(0))
    # larger head weights than the near-uniform init, so the probabilities differ from row to row
    p = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 50.0 if any(getattr(k, "key", "") in ("exit", "gates", "bias") for k in path) else x, p)
    return p


@pytest.fixture(scope="module")
def features():
    return jax.random.normal(jax.random.key(1), (6, SPEC.n_features))


def _direct_log_prob(out, actions):
    """log π from numpy formulas: softmax, Bernoulli p^a (1-p)^(1-a), the Gaussian density."""
    out = jax.tree.map(np.asarray, out)
    rows = []
    for b in range(out["value"].shape[0]):
        z = out["exit_logits"][b].astype(np.float64)
        p_exit = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        lp = math.log(p_exit[int(actions["exit"][b])])
        for g, zg in zip(np.asarray(actions["gates"][b]), out["gate_logits"][b]):
            p = 1.0 / (1.0 + math.exp(-float(zg)))
            lp += math.log(p if g else 1.0 - p)
        sigma = np.exp(out["bias_log_std"].astype(np.float64))
        x, mu = np.asarray(actions["bias"][b], np.float64), out["bias_mean"][b]
        lp += float(np.sum(np.log(np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi)))))
        rows.append(lp)
    return np.array(rows)


def test_sampled_actions_have_their_distributions_log_prob(params, features):
    out = _apply(SPEC, params, features)
    actions = ctl.sample(SPEC, out, jax.random.key(2))
    np.testing.assert_allclose(ctl.log_prob(SPEC, out, actions), _direct_log_prob(out, actions), rtol=1e-4,
                               atol=1e-4)
    res = ctl.act(SPEC, params, features, False, jax.random.key(2))  # the jitted acting path draws the same
    np.testing.assert_array_equal(res["actions"]["gates"], actions["gates"])
    np.testing.assert_allclose(res["log_prob"], _direct_log_prob(out, actions), rtol=1e-4, atol=1e-4)


def test_samples_follow_the_probabilities_and_mode_is_deterministic(params, features):
    x = jnp.repeat(features[:1], 4000, axis=0)
    out = _apply(SPEC, params, x)
    actions = jax.jit(ctl.sample, static_argnums=0)(SPEC, out, jax.random.key(3))
    p_gates = np.asarray(jax.nn.sigmoid(out["gate_logits"][0]))
    np.testing.assert_allclose(np.asarray(actions["gates"]).mean(0), p_gates, atol=0.03)
    p_exit = np.asarray(jax.nn.softmax(out["exit_logits"][0]))
    np.testing.assert_allclose(np.bincount(np.asarray(actions["exit"]), minlength=3) / 4000, p_exit, atol=0.03)
    np.testing.assert_allclose(np.asarray(actions["bias"]).std(0), np.exp(np.asarray(out["bias_log_std"])), rtol=0.1)
    m = ctl.mode(SPEC, _apply(SPEC, params, features))
    np.testing.assert_array_equal(m["gates"], (np.asarray(_apply(SPEC, params, features)["gate_logits"]) > 0))


def test_entropy_matches_direct_computation(params, features):
    out = jax.tree.map(np.asarray, _apply(SPEC, params, features))
    p = np.exp(out["exit_logits"]) / np.exp(out["exit_logits"]).sum(-1, keepdims=True)
    q = 1 / (1 + np.exp(-out["gate_logits"].astype(np.float64)))
    direct = (-(p * np.log(p)).sum(-1) - (q * np.log(q) + (1 - q) * np.log(1 - q)).sum(-1)
              + np.sum(out["bias_log_std"] + 0.5 * np.log(2 * np.pi * np.e)))
    np.testing.assert_allclose(ctl.entropy(SPEC, out), direct, rtol=1e-4)


def test_controller_policy_decides_deterministically(params):
    summary = StateSummary(pooled=jnp.ones((8,)), entropy=jnp.float32(0.3), context_fill=jnp.float32(0.5),
                           episodic_fill=jnp.float32(0.0), semantic_fill=jnp.float32(0.1),
                           best_score=jnp.float32(0.7), exit_confidence=jnp.float32(0.9))
    policy = ctl.Controller(SPEC, params)
    a, b = policy.decide(summary), policy.decide(summary)
    assert isinstance(a, Decisions) and a.to_dict() == b.to_dict()
    out = _apply(SPEC, params, summary.features()[None])
    assert a.semantic == bool(out["gate_logits"][0, 1] > 0) and a.expert_bias.shape == (2, 3)
    assert a.exit_threshold == SPEC.thresholds[int(jnp.argmax(out["exit_logits"][0]))]
    assert a.probs["verify"] == pytest.approx(float(jax.nn.sigmoid(out["gate_logits"][0, 2])), rel=1e-5)
    sampler = ctl.Controller(SPEC, params, sampling=True, seed=1)
    draws = {sampler.decide(summary).semantic for _ in range(20)}
    assert 0.0 < a.probs["semantic"] < 1.0 and (len(draws) == 2 or min(a.probs["semantic"],
                                                                          1 - a.probs["semantic"]) < 0.05)
    assert set(sampler.last) == {"features", "actions", "log_prob", "value"}
    with pytest.raises(ValueError, match=r"state summary has 10 features but the controller was trained on 14"):
        policy.decide(summary.replace(pooled=jnp.ones((4,))))


def test_ppo_loss_equals_hand_computation():
    old = jnp.zeros(3)
    new = jnp.log(jnp.array([1.5, 0.5, 1.1]))
    loss, m = ppo.clipped_loss(new, old, jnp.array([1.0, 1.0, -1.0]), jnp.array([0.5, 0.0, 1.0]),
                               jnp.array([1.0, 0.0, 0.0]), jnp.array([1.0, 2.0, 3.0]), clip=0.2, value_coef=0.5,
                               entropy_coef=0.01)
    # ratios 1.5, 0.5, 1.1: min(1.5, 1.2)·1 = 1.2; min(0.5, 0.8)·1 = 0.5; min(-1.1, -1.1) = -1.1 -> mean 0.2
    assert float(m["policy_loss"]) == pytest.approx(-0.2, abs=1e-6)
    assert float(m["value_loss"]) == pytest.approx((0.25 + 0 + 1) / 3, abs=1e-6)
    assert float(loss) == pytest.approx(-0.2 + 0.5 * 1.25 / 3 - 0.01 * 2.0, abs=1e-6)
    assert float(m["clip_frac"]) == pytest.approx(2 / 3)
    np.testing.assert_allclose(ppo.normalize(jnp.array([1.0, 2.0, 3.0])), [-1.224744, 0.0, 1.224744], rtol=1e-5)


def test_ppo_loss_of_the_network_uses_its_log_probs(params, features):
    out = _apply(SPEC, params, features)
    actions = ctl.sample(SPEC, out, jax.random.key(4))
    old = jnp.asarray(_direct_log_prob(out, actions)) - 0.1  # the acting policy was a little different
    batch = ppo.Batch(features=features, actions=actions, log_prob=old, value=jnp.zeros(6),
                      reward=jnp.arange(6.0))
    adv = ppo.normalize(batch.reward - batch.value)
    args = ppo.PPOArgs(clip=0.2, value_coef=0.5, entropy_coef=0.01)
    loss, _ = ppo.ppo_loss(SPEC, args, params, batch, adv)
    ratio = np.exp(0.1)  # every row: new / old = e^0.1 > 1.2? no: 1.105, inside the clip range
    expect_pg = -np.mean(ratio * np.asarray(adv))
    expect_v = np.mean((np.asarray(out["value"]) - np.arange(6.0)) ** 2)
    expect = expect_pg + 0.5 * expect_v - 0.01 * np.mean(np.asarray(ctl.entropy(SPEC, out)))
    assert float(loss) == pytest.approx(expect, rel=1e-4, abs=1e-5)


def test_reward_terms():
    lat = reward.latency_fraction([2, 2, 4], n_layers=4, passes=1, full_passes=3)
    assert lat == pytest.approx((8 + 4) / (12 + 4 * 3))
    w = reward.Weights.from_config(default_config())
    total, terms = reward.reward(reward.Outcome(correct=True, candidate_correct=True, confidence=0.8,
                                                latency=0.5, compute=0.25), w)
    assert terms["calibration"] == pytest.approx(1 - 0.04)
    assert total == pytest.approx(1.0 - 0.3 * 0.5 - 0.2 * 0.25 + 0.5 * 0.96)
    total, terms = reward.reward(reward.Outcome(False, False, None, 1.0, 1.0), w)
    assert terms["calibration"] == 0.0 and total == pytest.approx(-0.5)


def test_spec_is_derived_from_the_model():
    c = default_config()
    set_shape(c, d_model=32, n_layers=3, n_experts=4, top_k=2)
    spec = ctl.ControllerSpec.from_config(validate(c))
    assert (spec.d_model, spec.n_layers, spec.n_experts, spec.n_features) == (32, 3, 4, 38)
