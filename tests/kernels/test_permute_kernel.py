"""Permute / unpermute kernels (interpreted on CPU) against the jnp reference and a per-token loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import permute, router


def _pipeline(impl, interpret=True):
    """x -> permute -> a row-dependent nonlinearity -> unpermute; value, output and grads w.r.t. x and weights.
    impl="pallas" with interpret=False on CPU is the gather-only custom_vjp on XLA gathers."""
    def f(x_td, weights_tk, order_m, position_tk):
        xs_md = permute.permute(x_td, order_m, position_tk, impl=impl, interpret=interpret)
        ys_md = jnp.tanh(xs_md) * (1.0 + jnp.arange(xs_md.shape[0], dtype=jnp.float32))[:, None]
        out_td = permute.unpermute(ys_md, weights_tk, order_m, position_tk, impl=impl, interpret=interpret)
        return jnp.sum(jnp.sin(out_td)), (xs_md, out_td)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


# (T, E, K, D): rows not a multiple of the 64-row block (and more than one block), D not a power of two, K=E.
@pytest.mark.parametrize("n_tokens,n_experts,k,d", [(37, 8, 2, 48), (5, 3, 3, 24)])
def test_kernels_match_reference(n_tokens, n_experts, k, d):
    kx, kl = jax.random.split(jax.random.key(n_tokens))
    x_td = jax.random.normal(kx, (n_tokens, d))
    r = router.route_reference(jax.random.normal(kl, (n_tokens, n_experts)), k=k)
    args = (x_td, r.weights_tk, r.order_m, r.position_tk)
    (_, (xs_ref, out_ref)), g_ref = _pipeline("reference")(*args)
    for interpret in (True, False):
        (_, (xs, out)), g = _pipeline("pallas", interpret)(*args)
        np.testing.assert_array_equal(xs, xs_ref)
        np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(g, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    # Against a plain loop: row i of xs is token order[i] // K, and rows of one expert are contiguous.
    xs_np, x_np, order = np.asarray(xs), np.asarray(x_td), np.asarray(r.order_m)
    for i in range(order.size):
        np.testing.assert_array_equal(xs_np[i], x_np[order[i] // k])
    experts_sorted = np.asarray(r.experts_tk).ravel()[order]
    assert np.all(np.diff(experts_sorted) >= 0)


def test_unpermute_of_permute_is_weighted_identity():
    x_td = jax.random.normal(jax.random.key(1), (33, 16))
    r = router.route_reference(jax.random.normal(jax.random.key(2), (33, 5)), k=2)
    @jax.jit
    def roundtrip(x_td):
        xs = permute.permute(x_td, r.order_m, r.position_tk, interpret=True)
        return permute.unpermute(xs, r.weights_tk, r.order_m, r.position_tk, interpret=True)

    back = roundtrip(x_td)
    np.testing.assert_allclose(back, x_td, rtol=1e-5, atol=1e-6)  # weights sum to 1 per token


def test_gpu_lowering_traces():
    r = router.route_reference(jnp.zeros((40, 4)).at[:, 1].set(1.0), k=2)
    x_td = jnp.zeros((40, 64))
    for fn, args in ((permute._gather_rows, (x_td, r.order_m // 2, jnp.ones((80,)), "triton")),
                     (permute._combine, (jnp.zeros((80, 64)), r.weights_tk, r.position_tk, "triton"))):
        lowered = jax.jit(fn, static_argnums=3).trace(*args).lower(lowering_platforms=("cuda",))
        assert "triton" in lowered.as_text()


def test_bad_input_names_the_fix():
    r = router.route_reference(jnp.zeros((6, 4)), k=2)
    with pytest.raises(ValueError, match="same kernels.router.Routing"):
        permute.permute(jnp.zeros((6, 8)), r.order_m[:5], r.position_tk)
    with pytest.raises(ValueError, match="must match position_tk"):
        permute.unpermute(jnp.zeros((12, 8)), jnp.ones((6, 3)), r.order_m, r.position_tk)
    with pytest.raises(ValueError, match="router_impl"):
        permute.permute(jnp.zeros((6, 8)), r.order_m, r.position_tk, impl="triton")
