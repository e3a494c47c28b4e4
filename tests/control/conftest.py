"""A tiny Stage-1 workdir (random weights, one orbax step) and critics trained on it, shared by the control tests."""

import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.config import default_config, set_shape, validate
from mantis_jax.control import train_critic
from mantis_jax.data import factworld as fw
from mantis_jax.data import tokenizer as tk
from mantis_jax.model.args import ModelArgs
from mantis_jax.train import checkpoint as ckpt_lib
from mantis_jax.train.checkpoint import load_for_inference
from mantis_jax.train import state as state_lib


@pytest.fixture(scope="session")
def lm_workdir(tmp_path_factory):
    """A training workdir with one checkpoint step of a ~30K-parameter model (random weights)."""
    tokenizer = tk.Tokenizer.train(fw.World(seed=0, n_entities=60).tokenizer_sample(40), 384)
    config = default_config()
    set_shape(config, d_model=32, n_layers=2, n_experts=1, top_k=1)
    config.model.update(vocab_size=tokenizer.padded_vocab_size, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=128,
                        tie_embeddings=False)
    config.data.update(seq_len=64, factworld_entities=60)
    config.logging.progress = False
    validate(config)
    args = ModelArgs.from_config(config)
    abstract = nn.unbox(jax.eval_shape(state_lib.init_state_fn(args, state_lib.make_optimizer(config)),
                                       jax.random.key(0)))
    rng = np.random.default_rng(0)

    def fill(path, s):  # random weights without an init compile; norm scales 1, the step counter 0
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", "")))
        if not jnp.issubdtype(s.dtype, jnp.floating):
            return jnp.zeros(s.shape, s.dtype)
        if name == "scale":
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rng.normal(0.0, 1.0 if name == "embedding" else 0.2, s.shape), s.dtype)

    state = jax.tree_util.tree_map_with_path(fill, abstract)
    path = str(tmp_path_factory.mktemp("lm"))
    ck = ckpt_lib.Checkpointer(path, async_save=False)
    ck.save(1, state, data_states=["{}"], config=config, tokenizer=tokenizer, metrics={})
    ck.close()
    return path


FLAGS = ["--config.critic.examples=32", "--config.critic.window=96", "--config.critic.batch_size=16",
         "--config.critic.save_every=10", "--config.critic.d_hidden=32", "--config.critic.engine_episodes=4",
         "--config.controller.distance=32"]


@pytest.fixture(scope="session")
def lm(lm_workdir):
    return load_for_inference(lm_workdir)


@pytest.fixture(scope="session")
def critic_runs(lm_workdir, tmp_path_factory):
    """20 steps in one workdir; 10 then (re-run) 20 in another."""
    a, b = str(tmp_path_factory.mktemp("critic_a")), str(tmp_path_factory.mktemp("critic_b"))
    full = train_critic.main([f"--checkpoint={lm_workdir}", f"--workdir={a}", "--config.critic.steps=20", *FLAGS])
    shutil.copy(os.path.join(a, "critic_data.npz"), b)  # same examples; spares a second feature pass
    first = train_critic.main([f"--checkpoint={lm_workdir}", f"--workdir={b}", "--config.critic.steps=10", *FLAGS])
    resumed = train_critic.main([f"--checkpoint={lm_workdir}", f"--workdir={b}", "--config.critic.steps=20",
                                 *FLAGS])
    return a, b, full, first, resumed
