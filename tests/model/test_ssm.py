"""The selective scan (three implementations vs a numpy loop) and the Mamba block (step vs full call)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.model.ssm import MambaBlock, MambaStack, SSMArgs, init_cache, init_caches, selective_scan

B, DI, N = 2, 6, 4
# Parameter init with "rbg" keys: threefry makes the init program compile ~3x slower on CPU.
init_key = lambda seed: jax.random.key(seed, impl="rbg")
IMPLS = ("sequential", "associative", "chunked")


def _inputs(t, seed=0):
    # numpy draws: eager jax.random would compile a kernel per shape.
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    x = normal(B, t, DI)
    delta = jax.nn.softplus(normal(B, t, DI))
    a = -jnp.exp(normal(DI, N))
    return x, delta, a, normal(B, t, N), normal(B, t, N), normal(B, DI, N)


def _numpy_scan(x, delta, a, b, c, h0):
    x, delta, a, b, c, h = (np.asarray(v, np.float64) for v in (x, delta, a, b, c, h0))
    ys = []
    for t in range(x.shape[1]):
        h = np.exp(delta[:, t, :, None] * a) * h + (delta[:, t] * x[:, t])[..., None] * b[:, t, None, :]
        ys.append(np.einsum("bdn,bn->bd", h, c[:, t]))
    return np.stack(ys, 1), h


def _loss(impl, chunk):
    def f(*args):
        y, h = selective_scan(*args, impl=impl, chunk_size=chunk)
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(h))
    return jax.jit(jax.value_and_grad(f, argnums=tuple(range(6))))


@pytest.mark.parametrize("impl,chunk", [("sequential", 4), ("associative", 4), ("chunked", 4), ("chunked", 16)])
def test_scan_matches_numpy_loop(impl, chunk):
    args = _inputs(11)
    y, h = jax.jit(lambda *a: selective_scan(*a, impl=impl, chunk_size=chunk))(*args)
    y_ref, h_ref = _numpy_scan(*args)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(h, h_ref, rtol=1e-4, atol=1e-4)


def test_scans_agree_outputs_and_gradients():
    t, chunk = 13, 4  # three chunks and a partial one
    args = _inputs(t, seed=t)
    ref_val, ref_grads = _loss("sequential", chunk)(*args)
    for impl in ("associative", "chunked"):
        val, grads = _loss(impl, chunk)(*args)
        np.testing.assert_allclose(val, ref_val, rtol=1e-5)
        chex.assert_trees_all_close(grads, ref_grads, rtol=2e-4, atol=2e-4)


def test_zero_delta_leaves_state_unchanged():
    x, delta, a, b, c, h0 = _inputs(6)
    _, h = selective_scan(x, jnp.zeros_like(delta), a, b, c, h0, impl="chunked", chunk_size=4)
    np.testing.assert_allclose(h, h0, rtol=1e-6)


def test_chunked_peak_memory_grows_with_chunk_not_sequence():
    """Compiled temp bytes of forward+backward: chunked keeps only chunk-boundary states."""
    def temp_bytes(impl, t):
        args = _inputs(t)
        return _loss(impl, 8).lower(*args).compile().memory_analysis().temp_size_in_bytes

    assoc, chunked = temp_bytes("associative", 96), temp_bytes("chunked", 96)
    assert chunked * 4 <= assoc, (chunked, assoc)


def test_bad_impl_and_shapes_raise():
    args = _inputs(4)
    with pytest.raises(ValueError, match="scan_impl"):
        selective_scan(*args, impl="parallel")
    with pytest.raises(ValueError, match="shapes disagree"):
        selective_scan(args[0], args[1][:, :3], *args[2:])


ARGS = SSMArgs(d_model=8, d_state=4, d_conv=3, expand=2, n_layers=2, dt_rank=2, chunk_size=4)


@pytest.fixture(scope="module")
def block():
    module = MambaBlock(ARGS)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((B, 11, ARGS.d_model)), jnp.float32)
    boxed = jax.jit(module.init)(init_key(0), x)
    return module, nn.meta.unbox(boxed), boxed, x


def test_block_params_have_logical_axes_and_standard_init(block):
    _, params, boxed, _ = block
    spec = nn.get_partition_spec(boxed)["params"]
    assert spec["in_proj"] == jax.sharding.PartitionSpec("embed", "ssm_inner")
    assert spec["A_log"] == jax.sharding.PartitionSpec("ssm_inner", "ssm_state")
    assert spec["conv_w"] == jax.sharding.PartitionSpec("ssm_conv", "ssm_inner")
    assert spec["dt_proj"] == jax.sharding.PartitionSpec("ssm_rank", "ssm_inner")
    p = params["params"]
    np.testing.assert_allclose(-jnp.exp(p["A_log"][0]), -jnp.arange(1, ARGS.d_state + 1), rtol=1e-6)
    dt = jax.nn.softplus(p["dt_bias"])
    assert jnp.all(dt >= ARGS.dt_min * 0.999) and jnp.all(dt <= ARGS.dt_max * 1.001)
    np.testing.assert_array_equal(p["D"], 1.0)


def test_block_impls_agree_with_param_gradients(block):
    module, params, _, x = block

    def loss(impl):
        m = MambaBlock(ARGS.replace(scan_impl=impl))
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(m.apply(p, x)[0] ** 2)))

    ref = loss("sequential")(params)
    for impl in ("associative", "chunked"):
        got = loss(impl)(params)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
        chex.assert_trees_all_close(got[1], ref[1], rtol=1e-4, atol=1e-5)


def test_recurrent_step_equals_full_call(block):
    module, params, _, x = block
    y_full, cache_full = jax.jit(module.apply)(params, x)
    step = jax.jit(lambda p, xt, c: module.apply(p, xt, c, method=MambaBlock.step))
    cache, ys = init_cache(ARGS, B), []
    for t in range(x.shape[1]):
        y_t, cache = step(params, x[:, t], cache)
        ys.append(y_t)
    np.testing.assert_allclose(jnp.stack(ys, 1), y_full, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(cache, cache_full, rtol=1e-4, atol=1e-5)


def test_pieces_with_cache_equal_whole_and_lengths_skip_padding(block):
    module, params, _, x = block
    apply = jax.jit(module.apply)
    y_full, cache_full = apply(params, x)
    y1, c1 = apply(params, x[:, :4])
    y2, c2 = apply(params, x[:, 4:], c1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y_full, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(c2, cache_full, rtol=1e-4, atol=1e-5)
    # Row 0 has 5 valid tokens, row 1 all 11: the cache must be what the truncated sequences give.
    _, c_len = apply(params, x, None, jnp.array([5, 11]))
    _, c_row0 = apply(params, x[:1, :5])
    chex.assert_trees_all_close(jax.tree.map(lambda v: v[:1], c_len), c_row0, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(jax.tree.map(lambda v: v[1:], c_len),
                                jax.tree.map(lambda v: v[1:], cache_full), rtol=1e-4, atol=1e-5)


def test_stack_step_equals_full_call():
    stack = MambaStack(ARGS)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((B, 6, ARGS.d_model)), jnp.float32)
    params = nn.meta.unbox(jax.jit(stack.init)(init_key(2), x))
    y_full, caches_full = jax.jit(stack.apply)(params, x)
    step = jax.jit(lambda p, xt, c: stack.apply(p, xt, c, method=MambaStack.step))
    caches, ys = init_caches(ARGS, B), []
    for t in range(x.shape[1]):
        y_t, caches = step(params, x[:, t], caches)
        ys.append(y_t)
    np.testing.assert_allclose(jnp.stack(ys, 1), y_full, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(caches, caches_full, rtol=1e-4, atol=1e-5)
