"""int8 weight-only quantization: per-channel error bound, which leaves are quantized, bytes, logits of the int8
model close to float, and decoding with dequantization inside the jit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.infer import decode, quantize
from mantis_jax.model import transformer as tfm
from mantis_jax.model.args import ModelArgs

VARIANTS = {
    "dense_untied_scan": ModelArgs(vocab_size=384, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                                   max_seq_len=64, tie_embeddings=False),
    "moe_tied_unrolled": ModelArgs(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32,
                                   max_seq_len=64, scan_layers=False, n_experts=4, top_k=2, moe_impl="dense"),
}
QUANTIZED = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "embedding", "lm_head"}


def random_params(args, seed=0):
    """Params drawn with numpy from the abstract shapes (no init compile), std 0.2 (embedding 1, norms 1)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = str(path[-1].key)
        if name == "scale":
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rng.normal(0.0, 1.0 if name == "embedding" else 0.2, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(tfm.abstract_params(args)))


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request):
    args = VARIANTS[request.param]
    params = random_params(args)
    return args, params, quantize.quantize_params(params)


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, quantize.QTensor))[0]


def test_quantized_leaves_and_error_bound(model):
    args, params, qparams = model
    flat = dict((jax.tree_util.keystr(p), v) for p, v in _leaves(params))
    seen = set()
    for path, leaf in _leaves(qparams):
        name = str(path[-1].key)
        w = np.asarray(flat[jax.tree_util.keystr(path)])
        if name not in QUANTIZED:
            assert not isinstance(leaf, quantize.QTensor) and leaf.dtype == jnp.float32
            continue
        seen.add(name)
        assert isinstance(leaf, quantize.QTensor) and leaf.q.dtype == jnp.int8 and leaf.q.shape == w.shape
        axes = tuple(a % w.ndim for a in quantize.INPUT_AXES[name])
        expect_scale_shape = tuple(1 if i in axes else n for i, n in enumerate(w.shape))
        assert leaf.scale.shape == expect_scale_shape  # one scale per output channel
        scale = np.asarray(leaf.scale)
        np.testing.assert_allclose(scale, np.max(np.abs(w), axis=axes, keepdims=True) / 127, rtol=1e-6)
        err = np.abs(w - np.asarray(leaf.dequantize()))
        assert np.all(err <= scale / 2 * (1 + 1e-5) + 1e-9)
        assert np.all(np.max(np.abs(np.asarray(leaf.q)), axis=axes) == 127)  # each channel uses its full range
    expected = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"} | (
        {"embedding"} if args.tie_embeddings else {"embedding", "lm_head"})
    assert seen == expected


def test_bytes_before_and_after(model):
    _, params, qparams = model
    expect = 0
    for _, leaf in _leaves(qparams):
        if isinstance(leaf, quantize.QTensor):
            expect += leaf.q.size + 4 * leaf.scale.size
        else:
            expect += 4 * leaf.size
    assert quantize.param_bytes(qparams) == expect
    assert quantize.param_bytes(params) == 4 * sum(x.size for x in jax.tree.leaves(params))
    assert quantize.param_bytes(qparams) < 0.35 * quantize.param_bytes(params)


@pytest.fixture(scope="module")
def jitted_forward():
    return jax.jit(lambda args, p, t: tfm.forward(args, quantize.dequantize_params(p), t)[0], static_argnums=0)


def test_int8_logits_close_to_float(model, jitted_forward):
    args, params, qparams = model
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, args.vocab_size, (2, 16)), jnp.int32)
    ref = np.asarray(jitted_forward(args, params, tokens))
    got = np.asarray(jitted_forward(args, qparams, tokens))
    # int8 rounding noise is ~max|w|/127/sqrt(12) per weight (about 0.5% of a channel's spread) per layer
    assert np.mean(np.abs(got - ref)) < 0.02 * np.std(ref)
    # not the max: in a MoE a token whose top-k routing flips under the rounding moves discontinuously
    assert np.quantile(np.abs(got - ref), 0.95) < 0.1 * np.std(ref)
    assert np.mean(np.argmax(got, -1) == np.argmax(ref, -1)) >= 0.9
    assert np.max(np.abs(got - ref)) > 0  # the weights really changed


def test_decode_with_int8_params_equals_greedy_argmax_of_the_int8_forward(jitted_forward):
    """Dequantization happens inside the jitted decode loop: its tokens are the argmax of the int8 model's full
    forward each step (buffer and jitted forward shared with test_int8_logits_close_to_float)."""
    args = VARIANTS["moe_tied_unrolled"]
    qparams = quantize.quantize_params(random_params(args))
    prompts, n = [[3, 4, 5], [7]], 6
    tokens, mask = decode.left_pad(prompts, 0, 8)
    out = decode.generate(args, qparams, decode.new_cache(args, 2, 8, n), tokens, mask, jax.random.key(0),
                          jnp.zeros((args.vocab_size,), bool), 0.0, 0, 1.0, 0, n, max_new_tokens=n)
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        buf = np.zeros((2, 16), np.int32)
        for r, s in enumerate(seqs):
            buf[r, :len(s)] = s
        logits = np.asarray(jitted_forward(args, qparams, jnp.asarray(buf)))
        for r, s in enumerate(seqs):
            s.append(int(np.argmax(logits[r, len(s) - 1])))
    np.testing.assert_array_equal(out.tokens_bn, [s[len(p):] for s, p in zip(seqs, prompts)])


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="int8"):
        quantize.quantize_params({"w": jnp.ones((2, 2))}, "int4")
    assert quantize.quantize_params({"wq": jnp.ones((2, 2, 2))}, "none")["wq"].dtype == jnp.float32


def test_layer_weights_reach_the_model_as_int8(model):
    """for_apply dequantizes only the embedding/head; the layers' QTensors are cast inside each layer."""
    args, params, qparams = model
    applied = quantize.for_apply(qparams)
    layer_keys = [k for k in applied if k == "layers" or k.startswith("layer_")]
    assert layer_keys and all(quantize.is_quantized(applied[k]) for k in layer_keys)
    assert not quantize.is_quantized({k: v for k, v in applied.items() if k not in layer_keys})
    assert quantize.for_apply(params) is params
    leaf = jax.tree.leaves(applied[layer_keys[0]], is_leaf=lambda x: isinstance(x, quantize.QTensor))
    q = next(x for x in leaf if isinstance(x, quantize.QTensor))
    np.testing.assert_array_equal(q.astype(jnp.float32), q.dequantize())
