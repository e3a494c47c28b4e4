"""Sampling: top-k never leaves the top k, top-p keeps the smallest nucleus (numpy reference), temperature 0 is
argmax, sampled frequencies follow the filtered softmax, bad knobs are rejected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.infer import sampling

B, V = 4, 32


@pytest.fixture(scope="module")
def logits():
    return jnp.asarray(np.random.default_rng(0).normal(0.0, 2.0, (B, V)), jnp.float32)


@jax.jit
def draw(logits_bv, keys, temperature, top_k, top_p):
    """Many samples [S, B]: one per key, same logits."""
    return jax.vmap(lambda k: sampling.sample(logits_bv, k, temperature, top_k, top_p))(keys)


KEYS = jax.random.split(jax.random.key(0), 4000)


def nucleus_reference(logits_v: np.ndarray, p: float) -> set[int]:
    """Smallest prefix of the tokens sorted by probability (ties by index) whose mass reaches p."""
    probs = np.exp(logits_v - logits_v.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    m = int(np.searchsorted(cum, p - 1e-7)) + 1  # first prefix with mass >= p
    return set(order[:min(m, len(order))].tolist())


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_never_emits_outside_top_k(logits, k):
    toks = np.asarray(draw(logits, KEYS, 1.0, k, 1.0))  # [S, B]
    top = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
    for b in range(B):
        assert set(np.unique(toks[:, b])) <= set(top[b].tolist())
        assert len(np.unique(toks[:, b])) == k or k == 10  # 4000 draws reach every kept token of a small top-k
    mask = np.asarray(sampling.top_k_mask(logits, k))
    np.testing.assert_array_equal(mask.sum(-1), [k] * B)


def test_top_k_keeps_exactly_k_with_ties():
    tied = jnp.asarray([[1.0, 3.0, 3.0, 3.0, 0.0]])
    np.testing.assert_array_equal(sampling.top_k_mask(tied, 2), [[False, True, True, False, False]])
    np.testing.assert_array_equal(sampling.top_k_mask(tied, 0), [[True] * 5])


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 0.999, 1.0])
def test_top_p_is_the_smallest_nucleus(logits, p):
    mask = np.asarray(sampling.top_p_mask(logits, p))
    for b in range(B):
        assert set(np.flatnonzero(mask[b]).tolist()) == nucleus_reference(np.asarray(logits[b], np.float64), p)


def test_samples_follow_the_filtered_distribution(logits):
    toks = np.asarray(draw(logits, KEYS, 0.7, 6, 0.8))
    filtered = np.asarray(sampling.filter_logits(logits, 0.7, 6, 0.8), np.float64)
    probs = np.exp(filtered - filtered.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for b in range(B):
        freq = np.bincount(toks[:, b], minlength=V) / len(KEYS)
        np.testing.assert_allclose(freq, probs[b], atol=0.035)
        assert set(np.unique(toks[:, b])) <= set(np.flatnonzero(probs[b] > 0).tolist())


def test_temperature_zero_is_argmax(logits):
    toks = np.asarray(draw(logits, KEYS, 0.0, 0, 1.0))
    np.testing.assert_array_equal(toks, np.broadcast_to(np.argmax(logits, -1), toks.shape))


def test_low_temperature_concentrates_on_argmax(logits):
    toks = np.asarray(draw(logits, KEYS, 1e-3, 0, 1.0))
    np.testing.assert_array_equal(toks, np.broadcast_to(np.argmax(logits, -1), toks.shape))


@pytest.mark.parametrize("bad, match", [(dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"),
                                        (dict(top_k=1.5), "top_k"), (dict(top_p=0.0), "top_p"),
                                        (dict(top_p=1.5), "top_p")])
def test_bad_knobs_are_rejected(bad, match):
    knobs = dict(temperature=1.0, top_k=0, top_p=1.0) | bad
    with pytest.raises(ValueError, match=match):
        sampling.check_params(**knobs)
