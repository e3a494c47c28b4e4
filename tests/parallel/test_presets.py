"""Each logical-rule preset places a tiny model on 8 fake devices and trains it a few steps: the losses fall, and
every step's loss and the parameters after the updates equal a single-device run's; `mesh.rules_preset` resolves
through `parallel.mesh.logical_rules`."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mantis_jax.config import RULE_PRESETS, ConfigError, default_config, set_shape, validate
from mantis_jax.model.args import ModelArgs
from mantis_jax.parallel import mesh as pm
from mantis_jax.parallel import rules
from mantis_jax.train import state as st
from mantis_jax.train.step import make_train_step

STEPS = 2

# preset -> (mesh sizes, expected spec of the expert weight w_gate [L, E, D, F], of wq [L, D, H, Dh])
CASES = {
    "dp": (dict(data=8), P(None, None, None, None), P(None, None, None, None)),
    "fsdp": (dict(fsdp=8), P(None, None, "fsdp", None), P(None, "fsdp", None, None)),
    "fsdp_ep": (dict(fsdp=2, expert=4), P(None, "expert", "fsdp", None), P(None, "fsdp", None, None)),
    "fsdp_tp": (dict(fsdp=4, tensor=2), P(None, None, "fsdp", "tensor"), P(None, "fsdp", "tensor", None)),
}


def _config(preset):
    c = default_config()
    set_shape(c, d_model=32, n_layers=2, n_experts=4, top_k=2)
    c.model.vocab_size, c.model.n_heads, c.model.n_kv_heads, c.model.d_ff = 128, 4, 2, 32
    c.moe.impl = "dense"  # compiles fastest; the presets only change where the expert weights live
    # A few steps move the loss well beyond rounding; Adam's eps well above rounding-sized gradients keeps their
    # updates small (with eps 1e-8 a gradient of 1e-9 moves its weight by ~lr, in either direction).
    c.train.lr, c.train.warmup_steps, c.train.eps = 1e-2, 0, 1e-4
    c.mesh.rules_preset = preset
    for axis in ("data", "fsdp", "expert", "tensor"):
        c.mesh[axis] = CASES[preset][0].get(axis, 1)
    return validate(c)


def _train(step, state, batches):
    losses = []
    for i, batch in enumerate(batches):
        state, metrics = step(state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def reference():
    """One single-device initial state, batches, and the losses and parameters of STEPS updates from it."""
    config = _config("dp")
    args, tx = ModelArgs.from_config(config), st.make_optimizer(config)
    state = jax.jit(lambda k: pm.unbox_values(st.init_state_fn(args, tx)(k)))(jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 128, (STEPS, 8, 17), dtype=np.int32)
    batches = [{"inputs": t[:, :-1], "targets": t[:, 1:], "loss_mask": np.ones((8, 16), np.float32)}
               for t in tokens[:1].repeat(STEPS, 0)]  # one batch again and again: its loss must fall
    step = jax.jit(make_train_step(args, tx, st.lr_schedule(config)))
    final, losses = _train(step, state, batches)
    assert losses[-1] < losses[0] - 0.05, losses  # the update lowered the loss
    return state, batches, losses, jax.tree.map(np.asarray, final.params)


def _spec(sharding, ndim):
    return P(*(tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))))


@pytest.mark.parametrize("preset", sorted(CASES))
def test_preset_trains_like_one_device(preset, reference):
    ref_state, batches, ref_losses, ref_params = reference
    config = _config(preset)
    mesh, rule_set = pm.make_mesh(config), pm.logical_rules(config)
    assert rule_set == rules.PRESETS[preset]
    args, tx = ModelArgs.from_config(config), st.make_optimizer(config)
    shardings = jax.tree.map(lambda a: a.sharding, st.abstract_train_state(config, mesh))
    state = jax.device_put(ref_state, shardings)
    w_gate, wq = state.params["layers"]["moe"]["w_gate"], state.params["layers"]["attn"]["wq"]
    assert _spec(w_gate.sharding, 4) == CASES[preset][1]
    assert _spec(wq.sharding, 4) == CASES[preset][2]
    batch_sh, repl = pm.batch_sharding(mesh, rule_set), pm.replicated(mesh)
    step = jax.jit(make_train_step(args, tx, st.lr_schedule(config)), in_shardings=(shardings, batch_sh, repl),
                   out_shardings=(shardings, repl))
    with pm.activate(mesh, rule_set):
        new_state, losses = _train(step, state, [jax.device_put(b, batch_sh) for b in batches])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # A wrong reduction or layout would be off by ~lr = 1e-2.
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-3, atol=1e-4)
    assert jax.tree.map(lambda x: x.sharding, new_state) == shardings  # the steps keep every layout


def test_preset_names_and_errors():
    assert set(RULE_PRESETS) == {""} | set(rules.PRESETS)
    c = default_config()
    c.mesh.rules_preset = "zero3"
    with pytest.raises(ConfigError, match="config.mesh.rules_preset .'zero3'. must be one of"):
        validate(c)
    with pytest.raises(ValueError, match="must be one of dp, fsdp, fsdp_ep, fsdp_tp"):
        rules.preset("zero3")
    c.mesh.rules_preset = ""
    assert pm.logical_rules(c) == tuple(c.mesh.rules)  # "" keeps config.mesh.rules
    assert rules.mesh_axes_of(rules.PRESETS["fsdp_ep"], "batch") == ("data", "fsdp", "expert")
    assert rules.mesh_axes_of(rules.PRESETS["dp"], "embed") == ()
    c.moe.n_experts, c.moe.top_k = 6, 2
    c.moe.expert_parallel, c.mesh.expert = True, 4
    with pytest.raises(ConfigError, match=r"config.moe.n_experts \(6\) must be a multiple of config.mesh.expert"):
        validate(c)
