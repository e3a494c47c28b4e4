"""Pallas router kernel (interpreted on CPU) against the jnp reference, and the reference against a numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import router


def _numpy_route(logits, bias, k):
    """Loop reference: per token, experts by descending probability (ties: lower id first), then a stable
    grouping of the (token, slot) pairs by expert."""
    x = logits + (0.0 if bias is None else bias)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    experts = np.stack([sorted(range(len(row)), key=lambda e, row=row: (-row[e], e))[:k] for row in p])
    top = np.take_along_axis(p, experts, -1)
    flat = experts.ravel()
    order = np.array([s for e in range(logits.shape[1]) for s in range(flat.size) if flat[s] == e])
    gates = top if k == 1 else top / top.sum(-1, keepdims=True)  # K = 1: the probability itself (Switch)
    return gates, experts, np.bincount(flat, minlength=logits.shape[1]), order


def _loss(routing):  # touches every weight with a different factor so the gradient is informative
    return jnp.sum(routing.weights_tk * jnp.arange(1.0, routing.weights_tk.shape[1] + 1.0) ** 2)


def _run(fn, logits, bias):
    """Outputs and d loss / d (logits, bias), jitted once."""
    def f(x, b):
        r = fn(x, b)
        return _loss(r), r

    (_, r), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(logits, bias)
    return r, grads


# (T, E, K, block_t, ties): T not a multiple of the block, E=1, K=1 of E (un-renormalised gate), K=E, ties,
# several blocks, wide E.
CASES = [
    (37, 8, 2, 16, False),
    (16, 1, 1, None, False),
    (20, 6, 1, 16, False),
    (21, 5, 5, 16, False),
    (40, 6, 3, 16, True),
    (150, 64, 4, None, False),
]


@pytest.mark.parametrize("n_tokens,n_experts,k,block_t,ties", CASES)
def test_kernel_matches_reference(n_tokens, n_experts, k, block_t, ties):
    key_x, key_b = jax.random.split(jax.random.key(n_tokens * 1000 + n_experts))
    if ties:  # integer logits and no bias: many equal probabilities; both must pick the lowest expert id
        logits = jax.random.randint(key_x, (n_tokens, n_experts), 0, 2).astype(jnp.float32)
        bias = jnp.zeros((n_experts,))
    else:
        logits = jax.random.normal(key_x, (n_tokens, n_experts)) * 2.0
        bias = jax.random.normal(key_b, (n_experts,)) * 0.3
    ref, ref_grads = _run(lambda x, b: router.route_reference(x, b, k=k), logits, bias)
    out, grads = _run(lambda x, b: router.route(x, b, k=k, interpret=True, block_t=block_t), logits, bias)
    np.testing.assert_allclose(out.weights_tk, ref.weights_tk, rtol=1e-6, atol=1e-7)
    for name in ("experts_tk", "counts_e", "order_m", "position_tk"):
        np.testing.assert_array_equal(getattr(out, name), getattr(ref, name), err_msg=name)
    for g, g_ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
    if ties:
        assert np.any(np.asarray(logits)[:, :, None] == np.asarray(logits)[:, None, :], axis=(1, 2)).all()


def test_reference_matches_numpy_loop():
    logits = np.array(jax.random.normal(jax.random.key(7), (19, 6)))
    logits[3] = logits[3, 0]  # one token with all experts tied
    bias = np.linspace(-0.2, 0.2, 6).astype(np.float32)
    r = router.route_reference(jnp.asarray(logits), jnp.asarray(bias), k=3)
    w, experts, counts, order = _numpy_route(logits, bias, 3)
    np.testing.assert_allclose(r.weights_tk, w, rtol=1e-5)
    np.testing.assert_allclose(router.route_reference(jnp.asarray(logits), jnp.asarray(bias), k=1).weights_tk,
                               _numpy_route(logits, bias, 1)[0], rtol=1e-5)
    np.testing.assert_array_equal(r.experts_tk, experts)
    np.testing.assert_array_equal(r.counts_e, counts)
    np.testing.assert_array_equal(r.order_m, order)
    np.testing.assert_array_equal(np.asarray(r.order_m)[np.asarray(r.position_tk).ravel()], np.arange(19 * 3))
    np.testing.assert_array_equal(r.experts_tk[3], [5, 4, 3])  # tied logits: the increasing bias decides
    tied = router.route_reference(jnp.zeros((2, 6)), k=4)  # exact ties: lowest ids first, like lax.top_k
    np.testing.assert_array_equal(tied.experts_tk, [[0, 1, 2, 3]] * 2)


def test_unused_logits_get_zero_gradient_and_bias_gradient_is_column_sum():
    logits = jax.random.normal(jax.random.key(3), (20, 8))
    bias = jnp.zeros((8,))
    def loss_and_sum(x, b):  # one compiled kernel gives both gradients
        r = router.route(x, b, k=2, interpret=True)
        return _loss(r) + 1e3 * jnp.sum(r.weights_tk[:10]), r

    (_, r), (g_x, g_b) = jax.jit(jax.value_and_grad(loss_and_sum, argnums=(0, 1), has_aux=True))(logits, bias)
    chosen = np.zeros((20, 8), bool)
    np.put_along_axis(chosen, np.asarray(r.experts_tk), True, axis=1)
    np.testing.assert_array_equal(np.asarray(g_x)[~chosen], 0.0)
    np.testing.assert_allclose(g_b, np.asarray(g_x).sum(0), rtol=1e-5, atol=1e-7)
    # Each token's renormalised weights sum to 1 whatever its logits: the big sum term leaves no gradient, so
    # tokens 0..9 get exactly the gradient of the small loss alone.
    g_small = jax.grad(lambda x: _loss(router.route_reference(x, bias, k=2)))(logits)
    np.testing.assert_allclose(g_x, g_small, atol=2e-4)


def test_cpu_without_interpret_uses_the_reference():
    logits = jax.random.normal(jax.random.key(5), (10, 4))
    jaxpr = str(jax.make_jaxpr(lambda x: router.route(x, k=2))(logits))
    assert "pallas_call" not in jaxpr
    assert "pallas_call" in str(jax.make_jaxpr(lambda x: router.route(x, k=2, interpret=True))(logits))


def test_gpu_lowering_traces():
    """The Triton lowering of the kernel body runs on a CPU-only host (cross-platform lowering)."""
    logits, bias = jnp.zeros((100, 12)), jnp.zeros((12,))
    lowered = jax.jit(lambda x, b: router._route_kernel(x, b, 3, "triton", None)).trace(logits, bias).lower(
        lowering_platforms=("cuda",))
    assert "triton" in lowered.as_text()


@pytest.mark.parametrize("kwargs,match", [
    (dict(shape=(4, 300), k=2), "1..256"),
    (dict(shape=(4, 4), k=5), "k=5"),
    (dict(shape=(4, 4), k=2, impl="fast"), "router_impl"),
    (dict(shape=(4, 4), k=2, block_t=24), "power of two"),
])
def test_bad_input_names_the_fix(kwargs, match):
    shape = kwargs.pop("shape")
    with pytest.raises(ValueError, match=match):
        router.route(jnp.zeros(shape), interpret=True, **kwargs)
