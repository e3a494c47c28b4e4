"""MoE layer: router properties, aux losses against known values, backends against the dense reference."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.model import dispatch, moe

E, K, D, F = 4, 2, 16, 32


def _layer(impl, capacity_factor=float(E) / K):
    return moe.MoEFeedForward(E, K, F, init_std=0.2, impl=impl, capacity_factor=capacity_factor)


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.key(0), (2, 12, D))
    params = _layer("dense").init(jax.random.key(1), x)["params"]
    params = jax.tree.map(lambda p: p.unbox() if hasattr(p, "unbox") else p, params,
                          is_leaf=lambda p: hasattr(p, "unbox"))
    return x, params


def test_route_weights_ids_and_bias():
    logits = jax.random.normal(jax.random.key(2), (64, 8))
    r = moe.route(logits, 3)
    np.testing.assert_allclose(jnp.sum(r.weights_tk, -1), 1.0, rtol=1e-6)
    ids = np.asarray(r.ids_tk)
    assert ids.min() >= 0 and ids.max() < 8
    assert all(len(set(row)) == 3 for row in ids)
    # The chosen experts are the 3 largest logits, in order.
    np.testing.assert_array_equal(ids, np.argsort(-np.asarray(logits), axis=-1, kind="stable")[:, :3])
    # A positive bias on expert 5 raises its share of assignments; a huge one makes every token pick it first.
    before = np.sum(ids == 5)
    bias = jnp.zeros(8).at[5].set(1.0)
    after = np.sum(np.asarray(moe.route(logits, 3, bias).ids_tk) == 5)
    assert after > before
    forced = moe.route(logits, 3, jnp.zeros(8).at[5].set(100.0))
    np.testing.assert_array_equal(forced.ids_tk[:, 0], 5)
    # The bias shifts the selection but the z-loss sees the raw logits.
    np.testing.assert_allclose(forced.logits_te, logits)


def test_load_balancing_loss_known_values():
    T = 32
    uniform = jnp.full((T, E), 1.0 / E)
    balanced_ids = (jnp.arange(T * K) % E).reshape(T, K)
    loss, load = moe.load_balancing_loss(uniform, balanced_ids)
    np.testing.assert_allclose(loss, 1.0, rtol=1e-6)
    np.testing.assert_allclose(load, 1.0 / E)
    # Everything on expert 0 with all probability there: E * 1 * 1 = E.
    collapsed = jnp.zeros((T, E)).at[:, 0].set(1.0)
    loss, _ = moe.load_balancing_loss(collapsed, jnp.zeros((T, 1), jnp.int32))
    np.testing.assert_allclose(loss, E, rtol=1e-6)


def test_uniform_router_gives_weight_times_one(setup):
    x, params = setup
    params = dict(params, router=jnp.zeros_like(params["router"]))
    _, aux = _layer("ragged").apply({"params": params}, x)
    np.testing.assert_allclose(aux["lb_loss"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(aux["z_loss"], math.log(E) ** 2, rtol=1e-5)


@pytest.mark.parametrize("impl", ["dense", "ragged", "capacity"])
def test_unused_expert_gets_zero_gradient(setup, impl):
    x, params = setup
    bias = jnp.zeros(E).at[3].set(-1e4)  # nobody routes to expert 3

    def loss(p):
        y, _ = _layer(impl).apply({"params": p}, x, bias)
        return jnp.sum(y ** 2)

    grads = jax.grad(loss)(params)
    for name in ("w_gate", "w_up", "w_down"):
        np.testing.assert_array_equal(grads[name][3], 0.0)
        assert np.all(np.abs(np.asarray(grads[name][:3])).sum(axis=(1, 2)) > 0)


class TestBackendsAgree(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @pytest.mark.slow
    def test_outputs_and_gradients(self):
        x = jax.random.normal(jax.random.key(0), (2, 12, D))
        params = jax.tree.map(lambda p: p.unbox(), _layer("dense").init(jax.random.key(1), x)["params"],
                              is_leaf=lambda p: hasattr(p, "unbox"))
        bias = jax.random.normal(jax.random.key(3), (E,))

        def run(impl):
            @self.variant
            def f(p, x):
                def loss(p, x):
                    y, aux = _layer(impl).apply({"params": p}, x, bias)
                    return jnp.sum(jnp.sin(y)) + aux["lb_loss"] + aux["z_loss"], (y, aux)

                return jax.grad(loss, argnums=(0, 1), has_aux=True)(p, x)

            return f(params, x)

        (g_ref, gx_ref), (y_ref, aux_ref) = run("dense")
        for impl in ("ragged", "capacity"):
            (g, gx), (y, aux) = run(impl)
            chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)
            chex.assert_trees_all_close(g, g_ref, atol=1e-5, rtol=1e-5)
            chex.assert_trees_all_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(aux["expert_load"], aux_ref["expert_load"])
            assert float(aux["dropped_frac"]) == 0.0


def _reference_dropped(ids, cap):
    """Loop reference: slot k of every token is placed before slot k+1; an expert holds at most `cap` slots."""
    counts, kept = np.zeros(E, int), 0
    for k in range(ids.shape[1]):
        for t in range(ids.shape[0]):
            e = ids[t, k]
            if counts[e] < cap:
                counts[e] += 1
                kept += 1
    return 1.0 - kept / ids.size


def test_capacity_reports_dropped_tokens(setup):
    x, params = setup
    cf = 0.5
    bias = jnp.zeros(E).at[0].set(3.0)  # crowd expert 0 so that it overflows
    y, aux = _layer("capacity", capacity_factor=cf).apply({"params": params}, x, bias)
    x_td = x.reshape(-1, D)
    r = moe.route(x_td @ params["router"], K, bias)
    cap = dispatch.capacity(x_td.shape[0], K, E, cf)
    ids = np.asarray(r.ids_tk)
    expected = _reference_dropped(ids, cap)
    assert expected > 0
    np.testing.assert_allclose(aux["dropped_frac"], expected, rtol=1e-6)
    # Dropped slots contribute nothing: equal to the dense reference with the dropped slots' weights zeroed
    # (kept slots from the same loop: slot k of every token before k+1, an expert keeps its first `cap`).
    counts, kept = np.zeros(E, int), np.zeros(ids.shape, bool)
    for k in range(K):
        for t in range(ids.shape[0]):
            kept[t, k] = counts[ids[t, k]] < cap
            counts[ids[t, k]] += 1
    combine_te = jnp.sum(jax.nn.one_hot(ids, E) * (np.asarray(r.weights_tk) * kept)[..., None], axis=1)
    y_ref = moe.expert_compute_dense(x_td, params["w_gate"], params["w_up"], params["w_down"], combine_te)
    np.testing.assert_allclose(y.reshape(-1, D), y_ref, atol=1e-5)


def test_top1_router_learns_from_the_task_loss(setup):
    """K = 1: the gate is the chosen expert's probability p_j (not a renormalised 1.0), so the task loss alone
    reaches the router; its gradient equals a hand computation y_t = p_tj · f_j(x_t)."""
    x, params = setup
    cot = jax.random.normal(jax.random.key(7), x.shape)

    def task_loss(p, impl):
        y, _ = moe.MoEFeedForward(E, 1, F, init_std=0.2, impl=impl, capacity_factor=E).apply({"params": p}, x)
        return jnp.sum(y * cot)  # no aux loss

    x_td, cot_td = np.asarray(x.reshape(-1, D), np.float64), np.asarray(cot.reshape(-1, D), np.float64)
    p64 = {n: np.asarray(v, np.float64) for n, v in params.items()}
    logits = x_td @ p64["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    j = probs.argmax(-1)
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    f_td = np.stack([(silu(xt @ p64["w_gate"][e]) * (xt @ p64["w_up"][e])) @ p64["w_down"][e]
                     for xt, e in zip(x_td, j)])
    g_t = np.sum(cot_td * f_td, -1) * probs[np.arange(len(j)), j]  # d loss / d p_j times p_j
    d_logits = g_t[:, None] * (np.eye(E)[j] - probs)  # softmax: d p_j / d z_i = p_j (1[i = j] - p_i)
    expected = x_td.T @ d_logits
    g = jax.jit(jax.grad(task_loss), static_argnums=1)(params, "dense")["router"]  # the gate is the router's
    np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-6)
    assert np.abs(expected).max() > 1e-2  # the router really learns (it got ~0 with renormalised gates)


def test_route_grouping_and_gates():
    logits = jax.random.normal(jax.random.key(5), (10, E))
    r = moe.route(logits, K)
    ids = np.asarray(r.ids_tk)
    np.testing.assert_array_equal(r.grouping.counts_e, np.bincount(ids.ravel(), minlength=E))
    sorted_ids = ids.ravel()[np.asarray(r.grouping.order_m)]
    assert np.all(np.diff(sorted_ids) >= 0)
    one = moe.route(logits, 1)
    np.testing.assert_allclose(one.weights_tk[:, 0], jnp.max(jax.nn.softmax(logits), -1), rtol=1e-6)
