"""Mesh from config, and parameters created already sharded (8 fake CPU devices)."""

import jax
import numpy as np
import pytest

from mantis_jax.config import ConfigError, default_config, set_shape
from mantis_jax.model.args import ModelArgs
from mantis_jax.parallel import mesh as pm
from mantis_jax.train import state as st


def _config(**mesh):
    c = default_config()
    set_shape(c, d_model=32, n_layers=2, n_experts=4, top_k=2)
    c.model.vocab_size, c.model.n_heads, c.model.n_kv_heads, c.model.d_ff = 128, 4, 2, 64
    for k, v in mesh.items():
        c.mesh[k] = v
    return c


def test_mesh_shape_fills_and_fails_clearly():
    assert pm.mesh_shape(_config(data=-1, fsdp=2, expert=2), 8) == (2, 2, 2, 1)
    with pytest.raises(ConfigError, match="need 6 devices but 8"):
        pm.mesh_shape(_config(data=3, fsdp=2), 8)
    with pytest.raises(ConfigError, match="indivisible"):
        pm.mesh_shape(_config(data=-1, fsdp=3), 8)


def test_sharded_init_builds_no_replica():
    assert jax.device_count() == 8
    config = _config(data=1, fsdp=4, expert=2)
    mesh = pm.make_mesh(config)
    rules = pm.logical_rules(config)
    args = ModelArgs.from_config(config)
    tx = st.make_optimizer(config)
    state, shardings = pm.create_sharded(st.init_state_fn(args, tx), mesh, rules, jax.random.key(0))
    w_gate = state.params["layers"]["moe"]["w_gate"]  # [L, E, D, F]: layers, exp→expert, embed→fsdp, mlp→tensor
    assert w_gate.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
    shard_shapes = {s.data.shape for s in w_gate.addressable_shards}
    assert shard_shapes == {(2, 2, 8, 64)}
    mu = state.opt_state[1][0].mu["layers"]["moe"]["w_gate"]
    assert mu.sharding.spec == w_gate.sharding.spec
    # The values equal an unsharded init with the same key.
    import flax.linen as nn

    ref = nn.unbox(st.init_state_fn(args, tx)(jax.random.key(0)))
    np.testing.assert_array_equal(np.asarray(w_gate), np.asarray(ref.params["layers"]["moe"]["w_gate"]))
    emb = state.params["embedding"]
    assert {s.data.shape for s in emb.addressable_shards} == {(128, 8)}
