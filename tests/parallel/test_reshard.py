"""Resharding restore: a trainer checkpoint saved on one mesh (data=8) restored on another (fsdp=4 × expert=2,
one device) with identical values."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mantis_jax.config import default_config, set_shape
from mantis_jax.data.tokenizer import Tokenizer
from mantis_jax.model.args import ModelArgs
from mantis_jax.parallel import mesh as pm
from mantis_jax.parallel import reshard
from mantis_jax.train import state as st
from mantis_jax.train.checkpoint import Checkpointer


def _config(preset, **mesh):
    c = default_config()
    set_shape(c, d_model=32, n_layers=2, n_experts=4, top_k=2)
    c.model.vocab_size, c.model.n_heads, c.model.n_kv_heads, c.model.d_ff = 128, 4, 2, 64
    c.mesh.rules_preset = preset
    for axis in ("data", "fsdp", "expert", "tensor"):
        c.mesh[axis] = mesh.get(axis, 1)
    return c


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A state trained one step away from init (so moments are non-zero), saved from a data=8 mesh."""
    config = _config("dp", data=8)
    mesh, rules = pm.make_mesh(config), pm.logical_rules(config)
    args = ModelArgs.from_config(config)
    state, _ = pm.create_sharded(st.init_state_fn(args, st.make_optimizer(config)), mesh, rules, jax.random.key(3))
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 0.5 if x.dtype == np.float32 else x, state.opt_state))
    path = str(tmp_path_factory.mktemp("ckpt"))
    ckpt = Checkpointer(path, async_save=False)  # the trainer's own checkpoint layout
    tokenizer = Tokenizer.train(["the river sees the stone", "a blue stone"] * 20, 300)
    ckpt.save(7, state, data_states=['{"position": 0}'], config=config, tokenizer=tokenizer, metrics={})
    ckpt.close()
    assert state.params["layers"]["moe"]["w_gate"].sharding.is_fully_replicated  # dp replicates parameters
    return path, jax.tree.map(np.asarray, state)


def test_restore_onto_fsdp_expert_mesh(saved):
    path, ref = saved
    config = _config("fsdp_ep", fsdp=4, expert=2)
    mesh = pm.make_mesh(config)
    step, state = reshard.restore_state(path, st.abstract_train_state(config, mesh))
    assert step == 7
    w_gate = state.params["layers"]["moe"]["w_gate"]  # [L, E, D, F]
    assert w_gate.sharding.spec == P(None, "expert", "fsdp", None)
    assert {s.data.shape for s in w_gate.addressable_shards} == {(2, 2, 8, 64)}
    mu = state.opt_state[1][0].mu["layers"]["moe"]["w_gate"]
    assert mu.sharding.spec == w_gate.sharding.spec
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_restore_params_on_one_device(saved):
    path, ref = saved
    config = _config("fsdp_ep", fsdp=4, expert=2)
    mesh = reshard.single_device_mesh(config)
    assert mesh.devices.size == 1
    step, params = reshard.restore_params(path, st.abstract_train_state(config, mesh).params)
    assert step == 7
    leaves = jax.tree.leaves(params)
    assert all(len(x.sharding.device_set) == 1 for x in leaves)
    for a, b in zip(leaves, jax.tree.leaves(ref.params)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_missing_step_is_a_clear_error(saved, tmp_path):
    path, _ = saved
    config = _config("dp", data=8)
    target = st.abstract_train_state(config, pm.make_mesh(config))
    with pytest.raises(FileNotFoundError, match=r"step 3 is not in .*saved steps: \[7\]"):
        reshard.restore_state(path, target, step=3)
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        reshard.restore_state(str(tmp_path / "nope"), target)
    with pytest.raises(TypeError, match="abstract_train_state"):
        reshard.restore_state(path, config)
