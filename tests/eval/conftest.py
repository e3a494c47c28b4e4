"""A tiny real checkpoint for the evaluation tests: random weights saved by the project's Checkpointer (no training
loop to compile), a factworld tokenizer, and a metrics.jsonl for the training plots. Its window is 64 tokens, so
every log-likelihood batch has one shape [8, 64] and every generation one prompt bucket: few compilations."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.config import default_config, set_shape, validate
from mantis_jax.data import factworld as fw
from mantis_jax.data import tokenizer as tk
from mantis_jax.train.checkpoint import Checkpointer
from mantis_jax.train.state import abstract_train_state


def tiny_config(tokenizer):
    c = default_config()
    set_shape(c, d_model=32, n_layers=2, n_experts=2, top_k=1)
    c.model.n_heads, c.model.n_kv_heads, c.model.d_ff, c.model.max_seq_len = 4, 2, 64, 64
    c.model.vocab_size = tokenizer.padded_vocab_size
    c.data.seq_len, c.data.factworld_entities = 16, 60  # perplexity windows [8, 17] in every test: one compile
    c.engine.window_tokens = 64  # the window QA and benchmarks read (else data.seq_len)
    return validate(c)


def random_state(config, seed=0):
    """The TrainState a config builds, filled with numpy draws: weights N(0, 0.2) (embedding 1, norm scales 1)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", "")))
        if "params" not in str(path[0]) or not jnp.issubdtype(s.dtype, jnp.floating):
            return jnp.zeros(s.shape, s.dtype)
        if name == "scale":
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rng.normal(0.0, 1.0 if name == "embedding" else 0.2, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_train_state(config))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(workdir, config, tokenizer, params) of a saved checkpoint at step 3."""
    root = tmp_path_factory.mktemp("eval_run")
    tokenizer = tk.Tokenizer.train(fw.World(seed=0, n_entities=60).tokenizer_sample(40), 384)
    config = tiny_config(tokenizer)
    state = random_state(config)
    ckpt = Checkpointer(str(root), async_save=False)
    ckpt.save(3, state, data_states=[], config=config, tokenizer=tokenizer, metrics={"val_loss": 5.0})
    ckpt.close()
    with open(root / "metrics.jsonl", "w") as f:
        for step in (1, 2, 3):
            f.write(json.dumps({"step": step, "split": "train", "loss": 6.0 - step / 10, "lr": 1e-3 * step,
                                "expert_load": [[0.6, 0.4], [0.3, 0.7]]}) + "\n")
        f.write(json.dumps({"step": 3, "split": "val", "val_loss": 5.0, "val_accuracy": 0.1}) + "\n")
    return str(root), config, tokenizer, jax.tree.map(jnp.asarray, state.params)
