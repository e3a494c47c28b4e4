"""Shared tiny pieces for the post-training tests: a small factworld tokenizer and model shape."""

import os

import jax
import pytest

from mantis_jax.data import factworld
from mantis_jax.data.tokenizer import Tokenizer
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import init_params


@pytest.fixture(scope="session")
def tokenizer():
    return Tokenizer.train(factworld.World(0, 2000).tokenizer_sample(300), 384)


@pytest.fixture(scope="session")
def tokenizer_path(tokenizer, tmp_path_factory):
    return tokenizer.save(os.fspath(tmp_path_factory.mktemp("tok")))


def tiny_args(**changes) -> ModelArgs:
    base = dict(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128,
                scan_layers=False, attn_block_q=0)
    base.update(changes)
    return ModelArgs(**base)


# One tiny model for every model-level test: the layer scan, blocked attention, the key/value convolution and an
# MoE feed-forward (the paths that segment ids and adapters touch); initialised once per session.
ARGS = tiny_args(scan_layers=True, attn_block_q=4, kv_conv=3, n_experts=2, top_k=1, moe_impl="dense")


@pytest.fixture(scope="session")
def params():
    return init_params(ARGS, jax.random.key(0))
