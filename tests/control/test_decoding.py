"""The decoding policy (TIDAL): the knob map, GAE and the PPO loss against hand computations, the Beta head against
jax.scipy, the per-row sampling filters against the scalar ones, the rollout against a plain forward pass (its
reward reads the unmodulated logits) and against greedy decoding, and the trainer CLI's exact resume."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.config import ConfigError, default_config, validate
from mantis_jax.control import decoding as dec
from mantis_jax.control import ppo, store, train_decoding
from mantis_jax.infer.sampling import filter_logits, filter_logits_rows, repetition_penalty
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import forward
from mantis_jax.train.checkpoint import params_equal

FLAGS = ["--config.decoding.chunk=4", "--config.decoding.chunks=2", "--config.decoding.window=8",
         "--config.decoding.prompt_len=8", "--config.decoding.episodes=2", "--config.decoding.minibatches=2",
         "--config.decoding.d_hidden=16", "--config.decoding.save_every=1", "--config.decoding.ppo_epochs=2",
         "--config.decoding.corpus_docs=20"]  # episodes 2, prompts 8: the shapes of `tiny` (one rollout compile)


def test_knob_map_end_points_and_monotone():
    spec = dec.DecodingSpec.from_config(default_config())
    V = spec.vocab_size
    lo, hi = dec.knobs(spec, jnp.array([0.0])), dec.knobs(spec, jnp.array([1.0]))
    assert (float(lo.temperature[0]), int(lo.top_k[0]), float(lo.top_p[0]), float(lo.penalty[0])) == \
        pytest.approx((0.6, 8, 0.8, 1.0))
    assert (float(hi.temperature[0]), int(hi.top_k[0]), float(hi.top_p[0]), float(hi.penalty[0])) == \
        pytest.approx((1.4, V, 1.0, 1.3))  # top_k_high 0 = the whole vocabulary
    mid = dec.knobs(spec, jnp.array([0.5]))
    assert int(mid.top_k[0]) == round(8 * math.sqrt(V / 8))  # geometric
    grid = dec.knobs(spec, jnp.linspace(0.0, 1.0, 41))
    for knob in grid:
        assert bool(jnp.all(jnp.diff(knob) >= 0))


def test_config_errors_name_the_key():
    config = default_config()
    config.decoding.temperature_low = 2.0
    with pytest.raises(ConfigError, match="config.decoding.temperature_low"):
        validate(config)
    config = default_config()
    config.decoding.minibatches = 5
    with pytest.raises(ConfigError, match="config.decoding.minibatches"):
        validate(config)


def test_gae_against_hand_computation():
    # gamma 0.9, lam 0.8: deltas 1 + .9·.2 − .5 = .68, 0 + .9·.1 − .2 = −.11, 2 + 0 − .1 = 1.9 (terminal)
    adv, ret = ppo.gae(jnp.array([[1.0, 0.0, 2.0]]), jnp.array([[0.5, 0.2, 0.1]]), jnp.zeros(1), gamma=0.9,
                       lam=0.8)
    a2 = 1.9
    a1 = -0.11 + 0.72 * a2
    a0 = 0.68 + 0.72 * a1
    np.testing.assert_allclose(adv[0], [a0, a1, a2], rtol=1e-6)
    np.testing.assert_allclose(ret[0], [a0 + 0.5, a1 + 0.2, a2 + 0.1], rtol=1e-6)
    # a bootstrap value enters the last delta; lam = 1, gamma = 1 gives the Monte-Carlo return − value
    adv, _ = ppo.gae(jnp.array([[1.0, 1.0]]), jnp.array([[0.0, 0.0]]), jnp.array([3.0]), gamma=1.0, lam=1.0)
    np.testing.assert_allclose(adv[0], [5.0, 4.0])


def test_clipped_loss_against_hand_computation():
    loss, m = ppo.clipped_loss(jnp.log(jnp.array([1.5, 0.5])), jnp.zeros(2), jnp.array([1.0, -1.0]),
                               jnp.array([1.0, 2.0]), jnp.zeros(2), jnp.array([0.3, 0.5]), clip=0.2,
                               value_coef=0.5, entropy_coef=0.01)
    # min(1.5·1, 1.2·1) = 1.2; min(0.5·−1, 0.8·−1) = −0.8 -> policy −0.2; value (1 + 4)/2; entropy 0.4
    assert float(m["policy_loss"]) == pytest.approx(-0.2)
    assert float(m["value_loss"]) == pytest.approx(2.5)
    assert float(loss) == pytest.approx(-0.2 + 0.5 * 2.5 - 0.01 * 0.4)
    assert float(m["clip_frac"]) == 1.0


def test_beta_log_prob_and_entropy_against_direct_computation():
    a, b = jnp.array([1.3, 2.0, 5.0]), jnp.array([1.1, 4.0, 1.5])
    m = jnp.array([0.2, 0.5, 0.9])
    np.testing.assert_allclose(dec.beta_log_prob(a, b, m), jax.scipy.stats.beta.logpdf(m, a, b), rtol=1e-5)
    x = jnp.linspace(1e-5, 1 - 1e-5, 20001)  # entropy = −∫ p log p, by the trapezoid rule
    logp = jax.jit(jax.scipy.stats.beta.logpdf)(x[None, :], a[:, None], b[:, None])
    direct = -jnp.trapezoid(jnp.exp(logp) * logp, x, axis=-1)
    np.testing.assert_allclose(dec.beta_entropy(a, b), direct, atol=2e-3)


def test_row_filters_match_the_scalar_filters():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    t, k, p = jnp.array([0.5, 1.0, 1.3, 0.8]), jnp.array([0, 5, 12, 50]), jnp.array([0.9, 1.0, 0.7, 0.5])
    rows = jax.jit(filter_logits_rows)(logits, t, k, p)
    scalar = jax.jit(filter_logits)
    for r in range(4):
        np.testing.assert_allclose(rows[r], scalar(logits[r:r + 1], t[r], k[r], p[r])[0], rtol=1e-6)
    seen = jnp.zeros((4, 50), bool).at[:, :3].set(True)
    pen = repetition_penalty(jnp.array([[2.0, -2.0, 0.0, 1.0] + [0.0] * 46] * 4), seen, jnp.array([2.0] * 4))
    np.testing.assert_allclose(pen[0, :4], [1.0, -4.0, 0.0, 1.0])


def test_distinct_and_text_metrics():
    toks = jnp.array([[1, 2, 1, 2, 3]])
    assert float(dec.distinct(toks, 1)[0]) == pytest.approx(3 / 5)
    assert float(dec.distinct(toks, 2)[0]) == pytest.approx(3 / 4)  # 12 21 12 23
    out = dec.text_metrics(toks, jnp.log(jnp.full((1, 5), 4.0)))
    assert out["repetition"] == pytest.approx(2 / 5) and out["perplexity"] == pytest.approx(4.0)


def test_observation_scalars_and_group_baseline_by_hand():
    window = jnp.array([[5, 6, 5, 7, 6, 8]])  # last 2 tokens: 6 (seen at 1), 8 (new) -> chunk_repeat 1/2
    assert float(dec.tail_repeat(window, 2)[0]) == pytest.approx(0.5)
    assert float(dec.tail_repeat(jnp.array([[1, 1, 1]]), 3)[0]) == pytest.approx(2 / 3)  # the first 1 is new
    spec = dec.DecodingSpec(d_model=3, vocab_size=4, chunk=2, window=6, observe_pooled=False)
    logits = jnp.zeros((1, 4))  # uniform: entropy 1
    hidden = jnp.array([[[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]])  # std per dimension (1, 0, 1): mean 2/3
    x = dec.features(spec, logits, window, hidden, jnp.array([[0.2, 0.4]]), 0.25)
    assert x.shape == (1, spec.n_features) == (1, len(dec.SCALARS))
    np.testing.assert_allclose(x[0], [1.0, 0.3, 0.5, 4 / 6, 1.0, math.log1p(2 / 3), 0.25],
                               rtol=1e-5)  # 5 bigrams, all new
    pooled = dec.features(dataclasses.replace(spec, observe_pooled=True), logits, window, hidden,
                          jnp.array([[0.2, 0.4]]), 0.25)
    np.testing.assert_allclose(pooled[0, :3], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(pooled[0, 3:], x[0])
    adv = jnp.array([[1.0, 2.0], [3.0, 6.0], [0.0, 0.0], [4.0, -2.0]])  # two prompts x two rollouts
    np.testing.assert_allclose(train_decoding.group_baseline(adv, 2), [[-1, -2], [1, 2], [-2, 1], [2, -1]])
    np.testing.assert_array_equal(train_decoding.group_baseline(adv, 1), adv)


@pytest.fixture(scope="module")
def tiny(lm):
    """The trainer's shapes (config, prompts, bigram table, head state): its rollout compile serves these tests."""
    config, tokenizer, params = lm
    config = train_decoding.decoding_config(config, FLAGS)
    args, spec = ModelArgs.from_config(config), dec.DecodingSpec.from_config(config)
    head = train_decoding.init_state(spec, jax.random.key(1), 1e-3).params
    corpus = train_decoding.Corpus(config, tokenizer, "train")
    prompt = jnp.asarray(corpus.prompts(0, 99, 2, 8))
    return args, spec, params, head, prompt, jnp.asarray(corpus.bigrams)


def test_rollout_against_a_plain_forward_pass(tiny):
    """Near-greedy fixed knobs give the argmax tokens of a cache-free forward pass over prompt + tokens; fed those
    tokens (forced), two very different knobs give the same rewards, equal to the reward of that pass's logits:
    the reward reads the unmodulated logits (scoring the modulated ones would depend on the knobs)."""
    args, spec, params, head, prompt, bigrams = tiny
    greedy = dec.rollout(args, spec, params, head, prompt, jax.random.key(5), bigrams, dec.fixed_knobs(2, 1e-6),
                         mode="fixed")
    tokens = greedy.tokens
    full = jnp.concatenate([prompt, tokens], axis=1)
    logits, _ = forward(args, params, full)
    raw = logits[:, 7:-1]  # [B, N, V]: the logits that predicted each new token
    np.testing.assert_array_equal(tokens, jnp.argmax(raw, axis=-1))
    narrow = dec.fixed_knobs(2, 0.3, top_k=2, top_p=0.5, penalty=2.0)
    wide = dec.fixed_knobs(2, 1.7)
    a = dec.rollout(args, spec, params, head, prompt, jax.random.key(0), bigrams, narrow, tokens, mode="fixed")
    b = dec.rollout(args, spec, params, head, prompt, jax.random.key(0), bigrams, wide, tokens, mode="fixed")
    np.testing.assert_array_equal(a.tokens, tokens)
    np.testing.assert_allclose(a.reward, b.reward, rtol=1e-6)  # same tokens: the knobs change nothing
    nll = -jnp.take_along_axis(jax.nn.log_softmax(raw), tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(a.nll, nll, rtol=1e-4, atol=1e-4)
    C, W = spec.chunk, spec.window
    reward = jax.jit(dec.chunk_reward, static_argnums=0)
    for k in range(spec.chunks):
        before, chunk = full[:, 8 + k * C - W:8 + k * C], tokens[:, k * C:(k + 1) * C]
        ref, _ = reward(spec, raw[:, k * C:(k + 1) * C], chunk, before, bigrams)
        np.testing.assert_allclose(a.reward[:, k], ref, rtol=1e-4, atol=1e-5)
        modulated = [filter_logits_rows(raw[:, k * C:(k + 1) * C].reshape(2 * C, -1), kn.temperature[0],
                                        kn.top_k[0], kn.top_p[0]).reshape(2, C, -1) for kn in (narrow, wide)]
        ra, rb = (reward(spec, jnp.maximum(x, -1e4), chunk, before, bigrams)[0] for x in modulated)
        assert not np.allclose(ra, rb)
    assert bool(jnp.all(jnp.isfinite(greedy.log_prob))) and greedy.features.shape == (2, 2, spec.n_features)


@pytest.fixture(scope="module")
def runs(lm_workdir, tmp_path_factory):
    """2 updates in one workdir; 1 then (re-run) 2 in another."""
    a, b = str(tmp_path_factory.mktemp("tidal_a")), str(tmp_path_factory.mktemp("tidal_b"))
    full = train_decoding.main([f"--checkpoint={lm_workdir}", f"--workdir={a}", "--config.decoding.updates=2", *FLAGS])
    first = train_decoding.main([f"--checkpoint={lm_workdir}", f"--workdir={b}", "--config.decoding.updates=1",
                                 *FLAGS])
    resumed = train_decoding.main([f"--checkpoint={lm_workdir}", f"--workdir={b}", "--config.decoding.updates=2",
                                   *FLAGS])
    return a, b, full, first, resumed


def test_trainer_resumes_exactly(runs):
    a, b, full, first, resumed = runs
    assert full["updates"] == 2 and first["updates"] == 1 and resumed["updates"] == 2
    assert len(resumed["history"]) == 1  # the re-run did only the missing update
    assert params_equal(full["state"].params, resumed["state"].params)
    assert not params_equal(first["state"].params, resumed["state"].params)  # the update changed the head
    assert resumed["history"][0]["reward"] == pytest.approx(full["history"][1]["reward"], rel=1e-6)
    assert store.steps(a) == [1, 2]
    spec, params, _ = train_decoding.load_policy(a)
    assert params_equal(params, full["state"].params) and spec.chunk == 4
    lines = open(f"{a}/metrics.jsonl").read().strip().splitlines()
    assert len(lines) == 2 and {"reward", "r_nll", "r_repeat", "distinct_2", "perplexity", "policy_loss"} <= \
        set(__import__("json").loads(lines[0]))


def test_resume_with_other_shapes_is_one_error(runs, lm_workdir, capsys):
    with pytest.raises(SystemExit):
        train_decoding.main([f"--checkpoint={lm_workdir}", f"--workdir={runs[0]}", "--config.decoding.updates=3",
                             *FLAGS, "--config.decoding.d_hidden=8"])
    assert "d_hidden 16 -> 8" in capsys.readouterr().err


def test_cli_rejects_other_flags(lm_workdir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_decoding.main([f"--checkpoint={lm_workdir}", f"--workdir={tmp_path}", "--config.model.d_model=8"])
    assert "--config.decoding.* may be set here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_decoding.main([f"--checkpoint={lm_workdir}", f"--workdir={tmp_path}",
                             "--config.decoding.gamma=2.0"])
    assert "config.decoding.gamma" in capsys.readouterr().err
