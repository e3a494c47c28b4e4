"""Checkpoints: what is kept (last N + best), load_for_inference / inspect / list_steps, unreadable-step fallback,
config comparison. A tiny state built eagerly (no jitted step), saved with synthetic validation losses."""

import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from mantis_jax.config import default_config, set_shape
from mantis_jax.data.tokenizer import Tokenizer
from mantis_jax.model.args import ModelArgs
from mantis_jax.train import checkpoint as ck
from mantis_jax.train import state as st

VAL_LOSSES = {1: 5.0, 2: 2.0, 3: 4.0, 4: 3.0, 5: 6.0}


def _config():
    c = default_config()
    set_shape(c, d_model=16, n_layers=1, n_experts=1, top_k=1)
    c.model.n_heads, c.model.n_kv_heads, c.model.d_ff, c.model.vocab_size = 2, 1, 32, 128
    c.checkpoint.max_to_keep = 2
    return c


def _init_fn(config):
    init = st.init_state_fn(ModelArgs.from_config(config), st.make_optimizer(config))
    return jax.jit(lambda rng: nn.unbox(init(rng)))  # compiled once, called per seed


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1..5 saved with VAL_LOSSES (max_to_keep=2, keep_best): each step's params differ (seed = step)."""
    workdir = str(tmp_path_factory.mktemp("ckpt"))
    config = _config()
    tokenizer = Tokenizer.train(["the river sees the stone", "a blue stone"] * 20, 300)
    init = _init_fn(config)
    states = {s: init(jax.random.key(s)) for s in VAL_LOSSES}
    ckpt = ck.Checkpointer.from_config(workdir, config)
    for s, loss in VAL_LOSSES.items():
        ckpt.save(s, states[s], data_states=['{"pos": %d}' % s], config=config, tokenizer=tokenizer,
                  metrics={"val_loss": loss, "train_loss": loss + 1})
    ckpt.close()
    return {"workdir": workdir, "config": config, "tokenizer": tokenizer, "states": states}


def test_keeps_last_n_and_best(saved):
    assert ck.list_steps(saved["workdir"]) == [2, 4, 5]  # the last 2, plus step 2 (lowest val loss)
    info = ck.inspect(saved["workdir"])
    assert info["best"] == 2 and info["latest"] == 5
    assert {s: m["val_loss"] for s, m in info["steps"].items()} == {s: VAL_LOSSES[s] for s in (2, 4, 5)}
    assert info["tokenizer_fingerprint"] == saved["tokenizer"].fingerprint()
    assert info["config"].model.d_model == 16


def test_load_for_inference(saved):
    config, tokenizer, params = ck.load_for_inference(saved["workdir"])  # best step
    assert ck.params_equal(params, saved["states"][2].params)
    assert not ck.params_equal(params, saved["states"][5].params)
    assert tokenizer.fingerprint() == saved["tokenizer"].fingerprint()
    assert ck.config_differences(config, saved["config"]) == []
    assert all(p.dtype == np.float32 and p.sharding.device_set == {jax.devices()[0]}
               for p in jax.tree.leaves(params))
    _, _, params5 = ck.load_for_inference(saved["workdir"], step=5)
    assert ck.params_equal(params5, saved["states"][5].params)
    with pytest.raises(ck.CheckpointError, match=r"step 3 is not in .*saved steps: \[2, 4, 5\]"):
        ck.load_for_inference(saved["workdir"], step=3)


def test_missing_workdir(tmp_path):
    with pytest.raises(ck.CheckpointError, match="has no checkpoints"):
        ck.load_for_inference(str(tmp_path / "none"))
    assert ck.list_steps(str(tmp_path / "none")) == []


def test_restore_state_data_and_meta(saved):
    ckpt = ck.Checkpointer(saved["workdir"], create=False)
    step, state, data, meta = ckpt.restore(st.abstract_train_state(saved["config"]))
    ckpt.close()
    assert step == 5 and data == {"process_count": 1, "states": [{"pos": 5}]}
    assert meta["metrics"] == {"val_loss": 6.0, "train_loss": 7.0} and meta["step"] == 5
    ref = saved["states"][5]
    assert ck.params_equal(state.opt_state, ref.opt_state) and int(state.step) == 0


def test_unreadable_step_falls_back(saved, tmp_path, capsys):
    work = tmp_path / "w"
    shutil.copytree(saved["workdir"], work)
    state_dir = os.path.join(ck.checkpoint_dir(str(work)), "5", "state")
    for dirpath, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(dirpath, name), "wb") as f:
                f.write(b"\0not a checkpoint")
    ckpt = ck.Checkpointer(str(work), create=False)
    step, state, data, _ = ckpt.restore(st.abstract_train_state(saved["config"]))
    assert step == 4 and ck.params_equal(state.params, saved["states"][4].params) and data["states"] == [{"pos": 4}]
    assert "checkpoint step 5" in capsys.readouterr().out
    assert ckpt.steps() == [2, 4]  # the unreadable step was moved aside
    # Asked for one step by number, an unreadable step is an error (no silent fallback).
    os.remove(os.path.join(ck.checkpoint_dir(str(work)), "4", "state", "_METADATA"))
    with pytest.raises(ck.CheckpointError, match="checkpoint step 4 .* cannot be read"):
        ckpt.restore(st.abstract_train_state(saved["config"]), step=4)
    ckpt.close()


def test_config_differences():
    a, b = _config(), _config()
    assert ck.config_differences(a, b) == []
    b.train.lr, b.data.batch_size = 1.0, 3  # not part of the state's shape
    assert ck.config_differences(a, b) == []
    b.model.d_model, b.train.optimizer = 32, "adafactor"
    assert ck.config_differences(a, b) == ["config.model.d_model: checkpoint 16, this run 32",
                                           "config.train.optimizer: checkpoint 'adamw', this run 'adafactor'"]
    # A checkpoint made before a model key existed resumes while the key keeps its default, not once it is set.
    old = _config()
    del old.model["exit_loss_weight"]
    assert ck.config_differences(old, _config()) == []
    c = _config()
    c.model.exit_loss_weight = 0.5
    assert ck.config_differences(old, c) == ["config.model.exit_loss_weight: checkpoint 0.0, this run 0.5"]


def test_abstract_train_state_matches_a_real_init():
    """The one abstract-state builder: the shapes, dtypes and shardings of a real (sharded) init, Adafactor's
    factored moments included; without a mesh everything is on the first device; boxed, logical names stay."""
    from mantis_jax.parallel import mesh as pm

    config = _config()
    config.train.optimizer = "adafactor"
    init = st.init_state_fn(ModelArgs.from_config(config), st.make_optimizer(config))
    mesh, rules = pm.make_mesh(config, jax.devices()[:1]), pm.logical_rules(config)
    real, _ = pm.create_sharded(init, mesh, rules, jax.random.key(0))
    on_mesh, on_device = st.abstract_train_state(config, mesh), st.abstract_train_state(config)
    assert jax.tree.structure(on_mesh) == jax.tree.structure(real) == jax.tree.structure(on_device)
    for a, d, r in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(on_device), jax.tree.leaves(real)):
        assert (a.shape, a.dtype, a.sharding) == (d.shape, d.dtype, r.sharding) == (r.shape, r.dtype, r.sharding)
        assert d.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
    boxed = st.abstract_train_state(config, boxed=True)
    assert boxed.params["embedding"].names == ("vocab", "embed")
