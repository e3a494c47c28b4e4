"""Grouped-matmul backends against a masked loop over experts: outputs and gradients, uneven and empty groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.model import gmm

M, D, F, E = 50, 32, 24, 4
GROUPS = {
    "uneven": [10, 0, 25, 15],  # an empty expert
    "one_expert": [50, 0, 0, 0],  # every row on one expert: the padded backend must still drop nothing
    "short": [3, 4, 5, 6],  # rows past the groups give zeros and no gradient
}


@pytest.fixture(scope="module")
def data():
    x = jax.random.normal(jax.random.key(0), (M, D))
    w = jax.random.normal(jax.random.key(1), (E, D, F))
    return x, w


def _value_and_grads(fn):
    """Jitted once per backend: the group sizes are a traced argument, so every grouping reuses the program."""
    def loss(x, w, gs):
        y = fn(x, w, gs)
        return jnp.sum(jnp.sin(y)), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _loop(x, w, gs):
    """y[i] = x[i] @ w[e] for the rows of group e; numpy, independent of every backend."""
    y, start = np.zeros((x.shape[0], w.shape[2]), np.float32), 0
    for e, size in enumerate(np.asarray(gs)):
        y[start:start + size] = np.asarray(x)[start:start + size] @ np.asarray(w)[e]
        start += size
    return y


@pytest.fixture(scope="module")
def reference(data):
    x, w = data
    f = _value_and_grads(gmm.grouped_matmul_reference)
    out = {}
    for name, sizes in GROUPS.items():
        gs = jnp.array(sizes, jnp.int32)
        out[name] = f(x, w, gs)
        np.testing.assert_allclose(out[name][0][1], _loop(x, w, gs), rtol=1e-5, atol=1e-4)
    return out


def _check_backend(data, reference, fn, groups=tuple(GROUPS), atol_grad=1e-4):
    x, w = data
    f = _value_and_grads(fn)
    for name in groups:
        (_, y), g = f(x, w, jnp.array(GROUPS[name], jnp.int32))
        (_, y_ref), g_ref = reference[name]
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4, err_msg=name)
        for a, b in zip(g, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol_grad, err_msg=name)
        if name == "short":
            np.testing.assert_array_equal(y[18:], 0.0)
            np.testing.assert_array_equal(g[0][18:], 0.0)


@pytest.mark.parametrize("impl,kwargs", [("ragged_dot", {}), ("padded", {}), ("padded", {"block_rows": 16}),
                                         ("padded", {"block_rows": 1}), ("block_loop", {}),
                                         ("block_loop", {"block_rows": 16})])
def test_backend_matches_loop(data, reference, impl, kwargs):
    _check_backend(data, reference, lambda x, w, gs: gmm.grouped_matmul(x, w, gs, impl=impl, **kwargs))


def test_auto_is_the_platform_choice():
    assert gmm.resolve_impl("auto") == gmm.AUTO_IMPL[jax.default_backend()]


@pytest.mark.slow
def test_megablox_interpreted_matches_loop(data, reference):
    _check_backend(data, reference,
                   lambda x, w, gs: gmm.grouped_matmul(x, w, gs, impl="megablox", interpret=True),
                   groups=("uneven", "short"), atol_grad=2e-4)


def test_padded_block_bound_is_dropless():
    """The static block count covers the worst case: every group one row past a block boundary."""
    b, sizes = 8, [9, 9, 9, 9]  # each group needs 2 blocks: 8 blocks = (36 + 4*7) // 8
    x = jnp.ones((36, 4))
    w = jnp.stack([jnp.eye(4) * (e + 1) for e in range(4)])
    for impl in ("padded", "block_loop"):
        y = jax.jit(lambda x, w, gs, impl=impl: gmm.grouped_matmul(x, w, gs, impl=impl, block_rows=b))(
            x, w, jnp.array(sizes, jnp.int32))
        np.testing.assert_array_equal(y[:, 0], np.repeat([1.0, 2.0, 3.0, 4.0], 9), err_msg=impl)


def test_errors_name_the_fix(data):
    x, w = data
    gs = jnp.array(GROUPS["uneven"], jnp.int32)
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match="gmm_impl=auto"):
            gmm.grouped_matmul(x, w, gs, impl="megablox")
    with pytest.raises(ValueError, match="config.moe.gmm_impl"):
        gmm.grouped_matmul(x, w, gs, impl="cutlass")
    with pytest.raises(ValueError, match="group_sizes"):
        gmm.grouped_matmul(x, w, gs[:3], impl="padded")
    with pytest.raises(ValueError, match="equal D"):
        gmm.grouped_matmul(x[:, :5], w, gs, impl="padded")
