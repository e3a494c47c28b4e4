"""Memory estimator: its parameter and optimizer bytes equal the real sharded arrays; base fits 8 x 80 GB."""

import os

import jax
import numpy as np
import pytest

from mantis_jax import cli
from mantis_jax.config import default_config, set_shape
from mantis_jax.model.args import ModelArgs
from mantis_jax.parallel import memory
from mantis_jax.parallel import mesh as pm
from mantis_jax.train import state as st

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(preset, optimizer="adamw", **mesh):
    c = default_config()
    set_shape(c, d_model=32, n_layers=2, n_experts=4, top_k=2)
    c.model.vocab_size, c.model.n_heads, c.model.n_kv_heads, c.model.d_ff = 256, 4, 2, 48
    c.model.tie_embeddings = False
    c.train.optimizer = optimizer
    c.mesh.rules_preset = preset
    for axis in ("data", "fsdp", "expert", "tensor"):
        c.mesh[axis] = mesh.get(axis, 1)
    return c


@pytest.mark.parametrize("preset,optimizer,mesh", [
    ("fsdp_ep", "adamw", dict(fsdp=2, expert=4)),
    ("fsdp_tp", "adamw_bf16", dict(fsdp=4, tensor=2)),
    ("dp", "adafactor", dict(data=8)),
])
def test_parameter_and_optimizer_bytes_equal_real_arrays(preset, optimizer, mesh):
    config = _config(preset, optimizer, **mesh)
    est = memory.estimate(config, 8)
    args = ModelArgs.from_config(config)
    mesh, rules = pm.make_mesh(config), pm.logical_rules(config)
    with pm.activate(mesh, rules):
        boxed = jax.eval_shape(st.init_state_fn(args, st.make_optimizer(config)), jax.random.key(0))
        shardings = pm.shardings_of(boxed, mesh, rules)
    # Real arrays laid out as create_sharded lays them out (test_mesh checks that), without compiling an init.
    state = jax.tree.map(lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s), pm.unbox_values(boxed),
                         shardings)
    assert est.params == memory.real_bytes_per_device(state.params)
    assert est.opt_state + 4 == memory.real_bytes_per_device((state.step, state.opt_state)) + 4
    assert est.grads == est.params


def test_activations_follow_the_remat_policy():
    config = _config("fsdp", fsdp=8)
    config.data.batch_size, config.data.seq_len = 16, 64
    config.model.remat = "full"
    est = memory.estimate(config, 8)
    assert est.tokens_per_device == 2 * 64
    assert est.act_saved == 2 * 128 * 32 * 4  # layers x tokens x d_model x float32: only each layer's input
    config.model.remat = "none"
    assert memory.estimate(config, 8).act_saved > 10 * est.act_saved
    config.data.batch_size = 32
    assert memory.estimate(config, 8).act_logits == 2 * est.act_logits


def test_base_fits_eight_80gb_gpus_with_fsdp_and_expert_parallelism():
    base = cli.load_preset(os.path.join(ROOT, "configs", "base.py"))
    est = memory.estimate(base, 8)
    assert est.mesh == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
    assert 30e9 < est.total < 80e9
    text = memory.table(base, 8, 80.0)
    assert "fits on 80 GB devices: headroom" in text and "fsdp=2 x expert=4" in text
    base.mesh.rules_preset = "dp"  # every parameter replicated: 12B x 16 bytes cannot fit
    assert memory.estimate(base, 8).total > 80e9
