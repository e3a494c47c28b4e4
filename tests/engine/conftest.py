"""A tiny Stage-1 run shared by the engine and Stage-2 tests: a real orbax checkpoint of a 2-layer LM."""

import os

import pytest

from mantis_jax.config import default_config, set_shape, validate
from mantis_jax.data import factworld
from mantis_jax.data.tokenizer import Tokenizer
from mantis_jax.train.trainer import train


def tiny_config(tokenizer_path: str):
    c = default_config()
    set_shape(c, d_model=32, n_layers=2, n_experts=1, top_k=1)
    c.model.n_heads, c.model.n_kv_heads, c.model.d_ff, c.model.max_seq_len = 2, 1, 64, 256
    c.model.scan_layers = False
    c.memory.episodic.d_state, c.memory.episodic.n_layers = 4, 1
    c.data.tokenizer = tokenizer_path
    c.data.seq_len, c.data.batch_size, c.data.factworld_val_docs = 64, 8, 8
    c.train.total_steps, c.train.warmup_steps = 2, 1
    c.train.eval_every, c.train.eval_steps, c.train.save_every, c.train.log_every = 2, 1, 2, 1
    c.train.peak_flops = 1e9  # skip the matmul probe
    c.checkpoint.async_save = False
    c.logging.tensorboard = c.logging.progress = False
    c.retrieval.batch_size, c.retrieval.steps, c.retrieval.eval_questions = 4, 4, 8
    c.retrieval.eval_every, c.retrieval.save_every, c.retrieval.log_every = 100, 2, 1
    c.retrieval.max_len = 24
    return validate(c)


@pytest.fixture(scope="session")
def stage1(tmp_path_factory):
    """(workdir, config): two training steps of the tiny LM, checkpointed."""
    root = tmp_path_factory.mktemp("stage1")
    tok = Tokenizer.train(factworld.World(0, 2000).tokenizer_sample(200), 300)
    config = tiny_config(tok.save(str(root)))
    workdir = os.path.join(str(root), "run")
    train(config, workdir)
    return workdir, config
