"""The decoding policy (TIDAL): the knob map, GAE and the PPO loss against hand computations, the Beta head against
jax.scipy, the per-row sampling filters against the scalar ones, the rollout against a plain forward pass (its
reward reads the unmodulated logits) and against greedy decoding, and the trainer CLI's exact resume."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.config import ConfigError, default_config, validate
from mantis_jax.control import decoding as dec
from mantis_jax.control import ppo, store, train_decoding
from mantis_jax.infer import decode as decode_lib
from mantis_jax.infer.sampling import filter_logits, filter_logits_rows, repetition_penalty
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import forward
from mantis_jax.train.checkpoint import params_equal

FLAGS = ["--config.decoding.chunk=4", "--config.decoding.chunks=2", "--config.decoding.window=8",
         "--config.decoding.prompt_len=8", "--config.decoding.episodes=4", "--config.decoding.minibatches=2",
         "--config.decoding.d_hidden=16", "--config.decoding.save_every=1", "--config.decoding.ppo_epochs=2"]


def small_spec(config) -> dec.DecodingSpec:
    config = config.copy_and_resolve_references()
    config.decoding.update(chunk=4, chunks=2, window=8, d_hidden=16)
    return dec.DecodingSpec.from_config(config)


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
    x = jnp.linspace(1e-5, 1 - 1e-5, 200001)  # entropy = −∫ p log p, by the trapezoid rule
    for ai, bi in zip(a, b):
        logp = jax.scipy.stats.beta.logpdf(x, ai, bi)
        direct = -jnp.trapezoid(jnp.exp(logp) * logp, x)
        assert float(dec.beta_entropy(ai, bi)) == pytest.approx(float(direct), abs=2e-3)


def test_row_filters_match_the_scalar_filters():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    t, k, p = jnp.array([0.5, 1.0, 1.3, 0.8]), jnp.array([0, 5, 12, 50]), jnp.array([0.9, 1.0, 0.7, 0.5])
    rows = filter_logits_rows(logits, t, k, p)
    for r in range(4):
        np.testing.assert_allclose(rows[r], filter_logits(logits[r:r + 1], t[r], k[r], p[r])[0], rtol=1e-6)
    seen = jnp.zeros((4, 50), bool).at[:, :3].set(True)
    pen = repetition_penalty(jnp.array([[2.0, -2.0, 0.0, 1.0] + [0.0] * 46] * 4), seen, jnp.array([2.0] * 4))
    np.testing.assert_allclose(pen[0, :4], [1.0, -4.0, 0.0, 1.0])


def test_distinct_and_text_metrics():
    toks = jnp.array([[1, 2, 1, 2, 3]])
    assert float(dec.distinct(toks, 1)[0]) == pytest.approx(3 / 5)
    assert float(dec.distinct(toks, 2)[0]) == pytest.approx(3 / 4)  # 12 21 12 23
    out = dec.text_metrics(toks, jnp.log(jnp.full((1, 5), 4.0)))
    assert out["repetition"] == pytest.approx(2 / 5) and out["perplexity"] == pytest.approx(4.0)


@pytest.fixture(scope="module")
def tiny(lm):
    config, _, params = lm
    args, spec = ModelArgs.from_config(config), small_spec(config)
    head = dec.init(spec, jax.random.key(1))
    prompt = jax.random.randint(jax.random.key(2), (2, 8), 3, config.model.vocab_size)
    forced = jax.random.randint(jax.random.key(3), (2, spec.new_tokens), 3, config.model.vocab_size)
    bigrams = jnp.sort(jnp.unique(prompt[:, :-1] * config.model.vocab_size + prompt[:, 1:]).astype(jnp.int32))
    return args, spec, params, head, prompt, forced, bigrams


def test_reward_reads_the_unmodulated_logits(tiny):
    args, spec, params, head, prompt, forced, bigrams = tiny
    narrow = dec.fixed_knobs(2, 0.3, top_k=2, top_p=0.5, penalty=2.0)
    wide = dec.fixed_knobs(2, 1.7)
    a = dec.rollout(args, spec, params, head, prompt, jax.random.key(0), bigrams, narrow, forced, mode="fixed")
    b = dec.rollout(args, spec, params, head, prompt, jax.random.key(0), bigrams, wide, forced, mode="fixed")
    np.testing.assert_array_equal(a.tokens, forced)
    np.testing.assert_allclose(a.reward, b.reward, rtol=1e-6)  # same tokens: the knobs change nothing
    # reference: one forward pass over prompt + tokens without a cache; its logits predict every new token
    full = jnp.concatenate([prompt, forced], axis=1)
    logits, _ = forward(args, params, full)
    raw = logits[:, 7:-1]  # [B, N, V]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(raw), forced[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(a.nll, nll, rtol=1e-4, atol=1e-4)
    C, W = spec.chunk, spec.window
    for k in range(spec.chunks):
        before = full[:, 8 + k * C - W:8 + k * C]
        ref, terms = dec.chunk_reward(spec, raw[:, k * C:(k + 1) * C], forced[:, k * C:(k + 1) * C], before, bigrams)
        np.testing.assert_allclose(a.reward[:, k], ref, rtol=1e-4, atol=1e-5)
        # the earlier form scored the modulated logits: that reward would depend on the knobs
        mod = [filter_logits_rows(raw[:, k * C:(k + 1) * C].reshape(-1, raw.shape[-1]), kn.temperature[0],
                                  kn.top_k[0], kn.top_p[0]).reshape(2, C, -1) for kn in (narrow, wide)]
        ra, rb = (dec.chunk_reward(spec, jnp.maximum(x, -1e4), forced[:, k * C:(k + 1) * C], before, bigrams)[0]
                  for x in mod)
        assert not np.allclose(ra, rb)


def test_near_greedy_rollout_matches_greedy_decoding(tiny, lm):
    config = lm[0]
    args, spec, params, head, prompt, _, bigrams = tiny
    roll = dec.rollout(args, spec, params, head, prompt, jax.random.key(5), bigrams, dec.fixed_knobs(2, 1e-6),
                       mode="fixed")
    N = spec.new_tokens
    gen = decode_lib.generate(args, params, decode_lib.new_cache(args, 2, 8, N), prompt, jnp.ones_like(prompt, bool),
                              jax.random.key(0), jnp.zeros((config.model.vocab_size,), bool), 0.0, 0, 1.0, 0, N,
                              max_new_tokens=N)
    np.testing.assert_array_equal(roll.tokens, gen.tokens_bn)
    assert roll.log_prob.shape == (2, spec.chunks) and bool(jnp.all(jnp.isfinite(roll.log_prob)))


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


def test_cli_rejects_other_flags(lm_workdir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_decoding.main([f"--checkpoint={lm_workdir}", f"--workdir={tmp_path}", "--config.model.d_model=8"])
    assert "only --config.decoding.*" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_decoding.main([f"--checkpoint={lm_workdir}", f"--workdir={tmp_path}",
                             "--config.decoding.gamma=2.0"])
    assert "config.decoding.gamma" in capsys.readouterr().err
