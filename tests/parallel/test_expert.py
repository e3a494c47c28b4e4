"""Expert parallelism (shard_map + all_to_all over `expert`) equals the single-device MoE layer, and dropless
mode exchanges what is routed (K x T_local rows per device when the router is balanced), not E x T_local."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.model import moe
from mantis_jax.model.dispatch import capacity, exchange_capacities
from mantis_jax.model.expert_parallel import active_expert_mesh, ep_moe_ffn

T, D, F, E, K = 24, 16, 32, 8, 2
AXES = ("data", "fsdp", "expert", "tensor")


def _mesh(shape):
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


@pytest.fixture(scope="module")
def layer():
    ks = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(ks[0], (T, D))
    w_router = jax.random.normal(ks[1], (D, E))
    w = (jax.random.normal(ks[2], (E, D, F)) * 0.2, jax.random.normal(ks[3], (E, D, F)) * 0.2,
         jax.random.normal(ks[4], (E, F, D)) * 0.2)
    r = moe.route(x @ w_router, K)
    return x, r.ids_tk, r.weights_tk, w


def _reference(x, ids, weights, w):
    combine_te = jnp.sum(jax.nn.one_hot(ids, E) * weights[..., None], axis=1)
    return moe.expert_compute_dense(x, *w, combine_te)


@pytest.mark.parametrize("shape", [(2, 1, 4, 1), (1, 2, 2, 2)])
def test_outputs_and_gradients_equal_single_device(layer, shape):
    x, ids, weights, w = layer
    cot = jax.random.normal(jax.random.key(1), (T, D))

    def loss_ref(x, weights, w):
        return jnp.sum(_reference(x, ids, weights, w) * cot)

    def loss_ep(x, weights, w):
        y, info = ep_moe_ffn(x, ids, weights, *w)
        return jnp.sum(y * cot), (y, info)

    with jax.set_mesh(_mesh(shape)):  # one compile gives outputs and gradients
        (_, (y, info)), g_ep = jax.jit(jax.value_and_grad(loss_ep, argnums=(0, 1, 2), has_aux=True))(x, weights, w)
    np.testing.assert_allclose(y, _reference(x, ids, weights, w), atol=1e-5, rtol=1e-5)
    assert float(info.dropped_frac) == 0.0
    g_ref = jax.grad(loss_ref, argnums=(0, 1, 2))(x, weights, w)
    for a, b in zip(jax.tree.leaves(g_ep), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_token_count_not_divisible_by_devices(layer):
    x, ids, weights, w = layer
    n = 5  # fewer tokens than devices: padded, pads never dispatched
    with jax.set_mesh(_mesh((2, 1, 4, 1))):
        y, info = jax.jit(lambda *a: ep_moe_ffn(*a, capacity_factor=1.0))(x[:n], ids[:n], weights[:n], *w)
    np.testing.assert_allclose(y, _reference(x[:n], ids[:n], weights[:n], w), atol=1e-5, rtol=1e-5)
    assert float(info.dropped_frac) == 0.0  # 8 shards of 1 token: cap 1 row per expert always suffices


def _capacity_reference(x, ids, weights, w, n_shards, cap):
    """Loop reference: per token shard, slots k-major, an expert keeps its first `cap` slots."""
    ids, weights = np.asarray(ids), np.asarray(weights)
    kept = np.zeros(ids.shape, bool)
    per = T // n_shards
    for s in range(n_shards):
        counts = np.zeros(E, int)
        for k in range(K):
            for t in range(s * per, (s + 1) * per):
                e = ids[t, k]
                kept[t, k] = counts[e] < cap
                counts[e] += 1
    y = _reference(x, ids, jnp.asarray(weights * kept), w)
    return y, 1.0 - kept.mean()


def test_capacity_drops_match_loop_reference(layer):
    x, ids, weights, w = layer
    cf = 0.5
    cap = capacity(T // 8, K, E, cf)
    assert cap == 1 and exchange_capacities(T // 8, K, E, cf) == (cap,)
    with jax.set_mesh(_mesh((2, 1, 4, 1))):
        y, info = jax.jit(lambda *a: ep_moe_ffn(*a, capacity_factor=cf))(x, ids, weights, *w)
    y_ref, dropped_ref = _capacity_reference(x, ids, weights, w, 8, cap)
    assert dropped_ref > 0
    np.testing.assert_allclose(float(info.dropped_frac), dropped_ref, rtol=1e-6)
    assert int(info.rows_per_device) == E * cap
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)


def _a2a_rows(compiled_text):
    """Rows per device of each D-wide all-to-all in a compiled program (its result: f32[..., D] pieces)."""
    rows = set()
    for line in compiled_text.splitlines():
        if " all-to-all(" in line:
            result = line.split(" all-to-all(")[0]
            dims = [[int(v) for v in m.split(",")] for m in re.findall(r"f32\[([\d,]+)\]", result)]
            rows.add(sum(int(np.prod(d[:-1])) for d in dims if d[-1] == D))
    return sorted(rows)


def test_dropless_exchanges_what_is_routed(layer):
    """Dropless on data=2 x expert=4 (T_local = 4, K = 2): a balanced router sends K x T_local rows per device;
    a crowded one takes the smallest buffer that holds its largest per-(device, expert) count (a numpy count),
    and never more than E x T_local; both equal the single-device layer."""
    _, _, _, w = layer
    n, t_local = 32, 4
    x = jax.random.normal(jax.random.key(5), (n, D))
    weights = jax.nn.softmax(jax.random.normal(jax.random.key(6), (n, K)))
    ladder = exchange_capacities(t_local, K, E, None)
    assert ladder == (1, 2, 4)
    balanced = (np.arange(n * K) % E).reshape(n, K).astype(np.int32)  # each device: K x T_local slots, 1/expert
    skewed = balanced.copy()
    skewed[0, 0] = 7  # device 0: expert 7 gets 2 of its slots
    crowded = np.stack([np.zeros(n), 1 + np.arange(n) % (E - 1)], 1).astype(np.int32)  # expert 0: every token
    fn = jax.jit(lambda *a: ep_moe_ffn(*a))
    with jax.set_mesh(_mesh((2, 1, 4, 1))):
        text = fn.lower(x, balanced, weights, *w).compile().as_text()
        for ids, rows in ((balanced, K * t_local), (skewed, E * 2), (crowded, E * t_local)):
            y, info = fn(x, ids, weights, *w)
            np.testing.assert_allclose(y, _reference(x, ids, weights, w), atol=1e-5, rtol=1e-5)
            largest = max(np.bincount(ids[s * t_local:(s + 1) * t_local].ravel(), minlength=E).max()
                          for s in range(8))
            assert int(info.rows_per_device) == rows == E * min(c for c in ladder if c >= largest)
            assert float(info.dropped_frac) == 0.0
    # The compiled program holds one exchange buffer per size (each sent and returned), the smallest K x T_local.
    assert _a2a_rows(text) == [E * c for c in ladder]


def test_mesh_errors_and_detection(layer):
    x, ids, weights, w = layer
    assert active_expert_mesh() is None
    with jax.set_mesh(_mesh((8, 1, 1, 1))):
        assert active_expert_mesh() is None
    with jax.set_mesh(_mesh((1, 1, 8, 1))):
        assert active_expert_mesh() is not None
    with pytest.raises(ValueError, match="needs a mesh"):
        ep_moe_ffn(x, ids, weights, *w)
    w6 = tuple(a[:6] for a in w)
    with jax.set_mesh(_mesh((2, 1, 4, 1))), pytest.raises(ValueError, match="multiple of the 'expert'"):
        ep_moe_ffn(x, jnp.minimum(ids, 5), weights, *w6)


def test_model_with_expert_parallel_equals_single_device():
    """The whole model (moe.expert_parallel=True, fsdp_ep rules, data=2 x expert=4): loss and gradients equal the
    single-device model's; the config key reaches MoEFeedForward through ModelArgs. Capacity factor E/K makes the
    buffers hold every token (nothing drops) in one compiled size; the dropless ladder is tested above."""
    from mantis_jax.config import default_config, set_shape
    from mantis_jax.model.args import ModelArgs
    from mantis_jax.model.transformer import init_params
    from mantis_jax.parallel import mesh as pm
    from mantis_jax.train.step import loss_fn

    c = default_config()
    set_shape(c, d_model=32, n_layers=2, n_experts=8, top_k=2)
    c.model.vocab_size, c.model.n_heads, c.model.n_kv_heads, c.model.d_ff = 128, 4, 2, 32
    c.moe.impl, c.moe.capacity_factor, c.moe.expert_parallel = "capacity", 4.0, True
    c.mesh.rules_preset, c.mesh.data, c.mesh.expert = "fsdp_ep", 2, 4
    args = ModelArgs.from_config(c)
    assert args.expert_parallel
    params = init_params(args, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 128, (8, 9), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((8, 8), np.float32)}
    grad_fn = jax.jit(jax.value_and_grad(lambda p, b, a: loss_fn(p, b, a)[0]), static_argnums=2)
    ref_loss, ref_grads = grad_fn(params, batch, args.replace(expert_parallel=False))  # no mesh: plain layer

    mesh, rules = pm.make_mesh(c), pm.logical_rules(c)
    with pm.activate(mesh, rules):
        ep_jaxpr = str(jax.make_jaxpr(lambda p, b: loss_fn(p, b, args)[0])(params, batch))
        loss, grads = grad_fn(params, batch, args)
    assert "all_to_all" in ep_jaxpr and "shard_map" in ep_jaxpr  # the EP dispatch really ran
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
