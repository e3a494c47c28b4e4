"""LoRA: zero B is the base exactly, merged weights equal the adapter path, and only adapters train."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mantis_jax import config as config_lib
from mantis_jax.model.transformer import abstract_params, forward
from mantis_jax.post import lora
from tests.post.conftest import ARGS, tiny_args

SPEC = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.0, targets=lora.TARGETS)
DROPPED = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.5, targets=lora.TARGETS)


@pytest.fixture(scope="module")
def setup(params):
    adapters = jax.jit(lambda p, k: lora.init_adapters(p, SPEC, k))(params, jax.random.key(1))
    tokens = np.random.default_rng(0).integers(1, ARGS.vocab_size, (2, 12)).astype(np.int32)
    logits = jax.jit(lambda p, a, t: forward(ARGS, lora.apply(p, a, SPEC), t)[0])
    plain = jax.jit(lambda p, t: forward(ARGS, p, t)[0])
    return params, adapters, tokens, logits, plain


@jax.jit
def _nonzero_b(adapters):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (0.05 * jax.random.normal(jax.random.key(len(path)), x.shape)
                         if path[-1].key == "b" else x), adapters)


def test_zero_b_equals_the_base_exactly(setup):
    params, adapters, tokens, logits, plain = setup
    np.testing.assert_array_equal(np.asarray(logits(params, adapters, tokens)), np.asarray(plain(params, tokens)))


def test_merged_equals_adapter_path(setup):
    params, adapters, tokens, logits, plain = setup
    adapters = _nonzero_b(adapters)
    adapted = np.asarray(logits(params, adapters, tokens))
    merged = jax.jit(lambda p, a: lora.merge(p, a, SPEC))(params, adapters)
    np.testing.assert_allclose(np.asarray(plain(merged, tokens)), adapted, atol=1e-5)
    assert np.abs(adapted - np.asarray(plain(params, tokens))).max() > 1e-3  # the adapters do something
    # the merged weight is the low-rank update: x·W' = x·W + (alpha/r)·(x·A)·B, here for wq and an expert's w_up
    x = np.random.default_rng(1).normal(size=(3, ARGS.d_model)).astype(np.float32)
    params, adapters, merged = jax.device_get((params, adapters, merged))
    a, b = adapters["layers"]["attn"]["wq"]["a"][0], adapters["layers"]["attn"]["wq"]["b"][0]
    w, w2 = params["layers"]["attn"]["wq"][0], merged["layers"]["attn"]["wq"][0]
    ref = np.einsum("td,dhk->thk", x, w) + SPEC.scale * np.einsum("tr,rhk->thk", x @ np.asarray(a), b)
    np.testing.assert_allclose(np.einsum("td,dhk->thk", x, w2), ref, atol=1e-5)
    a, b = adapters["layers"]["moe"]["w_up"]["a"][1, 1], adapters["layers"]["moe"]["w_up"]["b"][1, 1]
    w, w2 = params["layers"]["moe"]["w_up"][1, 1], merged["layers"]["moe"]["w_up"][1, 1]
    np.testing.assert_allclose(x @ np.asarray(w2), x @ np.asarray(w) + SPEC.scale * (x @ np.asarray(a)) @ b, atol=1e-5)


def test_adapter_gradients_start_on_b_and_dropout_is_stochastic(setup):
    params, adapters, _, _, _ = setup
    rng = np.random.default_rng(0)
    probe = jax.tree.map(lambda w: rng.normal(size=w.shape).astype(np.float32), params)

    def loss(a, p, rng=None):  # a linear read-out of the adapted weights
        adapted = lora.apply(p, a, SPEC if rng is None else DROPPED, rng)
        return sum(jnp.sum(w * g) for w, g in zip(jax.tree.leaves(adapted), jax.tree.leaves(probe)))

    g_adapters = jax.jit(jax.grad(loss))(adapters, params)
    flat = traverse_util.flatten_dict(g_adapters)
    # with B = 0 only B gets a gradient (dL/dA = dL/dW' · Bᵀ = 0): the standard LoRA start
    assert all(float(jnp.abs(g).max()) == 0.0 for p, g in flat.items() if p[-1] == "a")
    assert all(float(jnp.abs(g).max()) > 0.0 for p, g in flat.items() if p[-1] == "b")
    assert len(flat) == 2 * 7  # every attention projection and expert weight of the stacked layers
    b_on = _nonzero_b(adapters)
    run = jax.jit(lambda a, k: loss(a, params, k))
    assert abs(float(run(b_on, jax.random.key(0))) - float(run(b_on, jax.random.key(1)))) > 1e-3


def _shapes(args):
    return nn.unbox(abstract_params(args))


def test_trainable_fraction_counts_rank_times_in_plus_out():
    params = _shapes(ARGS)
    spec = lora.LoraSpec(4, 8.0, 0.0, ("attn.wq", "moe.w_down"))
    counts = lora.count(params, jax.eval_shape(lambda p: lora.init_adapters(p, spec, jax.random.key(1)), params))
    L, D, H, Dh, E, F = ARGS.n_layers, ARGS.d_model, ARGS.n_heads, ARGS.head_dim, ARGS.n_experts, ARGS.d_ff
    assert counts["lora_params"] == L * 4 * (D + H * Dh) + L * E * 4 * (F + D)
    assert counts["trainable_fraction"] == counts["lora_params"] / counts["base_params"]


def test_bad_targets_name_the_key():
    c = config_lib.default_config()
    c.post.lora_rank = 4
    c.post.lora_targets = "attn.wq,mlp.wrong"
    with pytest.raises(config_lib.ConfigError, match="config.post.lora_targets names 'mlp.wrong'"):
        lora.LoraSpec.from_config(c)
    params = _shapes(tiny_args())  # dense: no moe weights
    with pytest.raises(config_lib.ConfigError, match="matches no weight of this model"):
        lora.targeted(params, lora.LoraSpec(4, targets=("moe.w_up",)))
