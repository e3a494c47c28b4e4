"""Early-exit decoding: threshold 1 equals full depth token for token; a forced exit at layer l runs l layers, gives
the l-layer model's tokens and fills the skipped layers' cache from the exited state (hand-computed K/V);
prefill once and continue equals the one-call loop; the confidence measures against numpy."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.infer import decode, early_exit
from mantis_jax.infer.early_exit import EarlyExit, confidence
from mantis_jax.model import transformer as tfm
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.layers import apply_rope

N, PAD, L = 8, 0, 3


@pytest.fixture(scope="module")
def model():
    args = ModelArgs(vocab_size=256, d_model=32, n_layers=L, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64,
                     tie_embeddings=False, scan_layers=False)
    rng = np.random.default_rng(1)  # drawn from the abstract shapes: no init compile
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(0.0, 0.3, p.shape), p.dtype),
                          nn.unbox(tfm.abstract_params(args)))
    params["lm_head"] = params["lm_head"] * 6.0  # peaked next-token distributions: confidences spread over (0, 1)
    return args, params


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 256, size=n).tolist() for n in (6, 12, 2)]


def run(args, params, prompts, threshold=1.0, exit=None, length=12):
    tokens, mask = decode.left_pad(prompts, PAD, length)
    stop = jnp.zeros((args.vocab_size,), bool)
    cache = decode.new_cache(args, len(prompts), length, N)
    return decode.generate(args, params, cache, tokens, mask, jax.random.key(0), stop, 0.0, 0, 1.0, PAD, N,
                           threshold, max_new_tokens=N, exit=exit)


@pytest.fixture(scope="module")
def full(model, prompts):
    return run(*model, prompts)


EXIT = EarlyExit(1, "margin")  # one compilation for every test below (the threshold is traced)


def test_threshold_one_is_full_depth_token_for_token(model, prompts, full):
    out = run(*model, prompts, 1.0, EXIT)
    np.testing.assert_array_equal(out.tokens_bn, full.tokens_bn)
    np.testing.assert_array_equal(out.layers_bn, np.full((len(prompts), N), L))
    np.testing.assert_array_equal(full.layers_bn, np.full((len(prompts), N), L))
    np.testing.assert_allclose(out.cache["k"], full.cache["k"], atol=1e-5)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _truncated(args, params, buf_1s, layers):
    logits, aux = tfm.forward(args, params, buf_1s, exit_layer=layers)
    return logits[0], aux["hidden"][0]


def test_forced_exit_runs_l_layers_and_fills_the_skipped_layers(model, prompts, full):
    args, params = model
    layer = EXIT.min_layer
    out = run(args, params, prompts, 0.0, EXIT)  # margin >= 0 always: every token exits at min_layer
    prompt = prompts[1]  # 12 tokens: the unpadded row
    toks = np.asarray(out.tokens_bn[1]).tolist()
    np.testing.assert_array_equal(out.layers_bn, [[L] + [layer] * (N - 1)] * len(prompts))  # token 0: prefill
    # Layers <= l never read deeper layers, so exiting every token at l is greedy decoding of the l-layer model
    # (after token 0, which the full-depth prefill gives).
    seq = list(prompt) + [int(full.tokens_bn[1, 0])]
    for _ in range(N - 1):
        buf = np.zeros((1, args.max_seq_len), np.int32)
        buf[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(_truncated(args, params, jnp.asarray(buf), layer)[0][len(seq) - 1])))
    assert toks == seq[len(prompt):]
    # Each generated token's keys in the skipped layers come from its exited state h_l: rope(norm(h_l)·W_k).
    hidden = np.asarray(_truncated(args, params, jnp.asarray(buf), layer)[1])  # [S, D]: h_l at every position
    T = len(prompt)
    for j, s in itertools.product(range(layer, L), range(T, T + N - 1)):  # slots the steps wrote
        p = params[f"layer_{j}"]
        h = hidden[s].astype(np.float64)
        normed = h / np.sqrt(np.mean(h * h) + args.norm_eps) * np.asarray(p["attn_norm"]["scale"])
        k = np.einsum("d,dgk->gk", normed, np.asarray(p["attn"]["wk"]))
        k = np.asarray(apply_rope(jnp.asarray(k[None, None], jnp.float32), jnp.asarray([[s]]), args.rope_theta))
        np.testing.assert_allclose(np.asarray(out.cache["k"][j, 1, s]), k[0, 0], atol=2e-4)
        v = np.einsum("d,dgk->gk", normed, np.asarray(p["attn"]["wv"]))
        np.testing.assert_allclose(np.asarray(out.cache["v"][j, 1, s]), v, atol=2e-4)


def test_prefill_once_then_continue_equals_one_call(model, prompts, full):
    args, params = model
    tokens, mask = decode.left_pad(prompts, PAD, 12)
    state = decode.prefill(args, params, decode.new_cache(args, len(prompts), 12, N), tokens, mask)
    stop = jnp.zeros((args.vocab_size,), bool)
    for limit in (3, N):  # the state is not consumed: continue from it twice
        out = decode.decode(args, params, state, jax.random.key(0), stop, 0.0, 0, 1.0, PAD, limit, 1.0,
                            max_new_tokens=N, exit=EXIT)
        np.testing.assert_array_equal(out.tokens_bn[:, :limit], full.tokens_bn[:, :limit])
        np.testing.assert_array_equal(out.lengths_b, [limit] * len(prompts))
    np.testing.assert_array_equal(out.layers_bn, full.layers_bn)


def test_mid_threshold_exits_some_tokens_early(model, prompts):
    args, params = model
    out = run(args, params, prompts, 0.4, EXIT)
    layers = np.asarray(out.layers_bn)[:, 1:]
    assert layers.min() >= 1 and layers.max() <= L and layers.min() < L
    assert (np.asarray(out.lengths_b) == N).all()


def test_confidence_against_numpy():
    logits = np.random.default_rng(0).normal(0, 3, (4, 50))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.sort(probs, -1)
    np.testing.assert_allclose(confidence(jnp.asarray(logits), "softmax"), top[:, -1], rtol=1e-5)
    np.testing.assert_allclose(confidence(jnp.asarray(logits), "margin"), top[:, -1] - top[:, -2], rtol=1e-4,
                               atol=1e-6)
    with pytest.raises(ValueError, match="min_layer"):
        EarlyExit(0).check(L)
    with pytest.raises(ValueError, match="confidence"):
        EarlyExit(1, "entropy").check(L)


def test_exit_loss_is_the_truncated_models_cross_entropy(model):
    """The trainer's loss with model.exit_loss_weight w = the plain loss + w · mean over layers 1..L-1 of the
    l-layer model's weighted cross-entropy (forward(exit_layer=l): an independent path through the model)."""
    from mantis_jax.train.step import loss_fn  # noqa: PLC0415

    args, params = model
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, args.vocab_size, (2, 9))
    weights = rng.uniform(0.0, 2.0, (2, 8)).astype(np.float32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "loss_mask": jnp.asarray(weights)}
    loss = jax.jit(lambda p, b, a: loss_fn(p, b, a)[0], static_argnums=2)
    plain, with_exit = loss(params, batch, args), loss(params, batch, args.replace(exit_loss_weight=0.5))
    ces = []
    for layer in range(1, L):
        logits = np.asarray(jax.jit(lambda p, t, k=layer: tfm.forward(args, p, t, exit_layer=k)[0])(
            params, batch["inputs"]), np.float64)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        ce = lse - np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
        ces.append((ce * weights).sum() / weights.sum())
    np.testing.assert_allclose(float(with_exit) - float(plain), 0.5 * np.mean(ces), rtol=1e-4)


@pytest.fixture(scope="module")
def conv_step():
    """One early-exit step on a model with the key/value convolution (tails in the cache) and scanned (stacked)
    layer parameters, after a prefill (the tests above cover unrolled layers without the convolution)."""
    args = ModelArgs(vocab_size=128, d_model=32, n_layers=L, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=32,
                     tie_embeddings=True, scan_layers=True, kv_conv=3)
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(0.0, 0.3, p.shape), p.dtype),
                          nn.unbox(tfm.abstract_params(args)))
    tokens, mask = decode.left_pad([rng.integers(3, 128, size=5).tolist()], PAD, 7)
    state = decode.prefill(args, params, decode.new_cache(args, 1, 7, 4), tokens, mask)
    tok_b, pos_b1 = jnp.asarray([17]), state.next_pos_b[:, None]

    @jax.jit
    def ee_step(threshold, cache):  # the threshold is traced: one compilation for both tests
        return early_exit.step(args, params, tok_b, pos_b1, cache, state.kv_mask_bs, threshold, EarlyExit(1))

    return args, params, state, tok_b, pos_b1, ee_step


def test_step_writes_the_full_depth_cache_with_tails(conv_step):
    """Threshold 1: the rows written once after the chain equal the full forward's cache (keys, values, tails)."""
    args, params, state, tok_b, pos_b1, ee_step = conv_step
    logits, layers, cache = ee_step(1.0, state.cache)
    ref_logits, aux = jax.jit(lambda c: tfm.forward(args, params, tok_b[:, None], cache=c, positions_bt=pos_b1,
                                                    kv_mask_bs=state.kv_mask_bs))(state.cache)
    np.testing.assert_allclose(logits, ref_logits[:, 0], atol=1e-5)
    assert int(layers[0]) == L and int(cache["index"]) == int(aux["cache"]["index"])
    for name in ("k", "v", "k_tail", "v_tail"):
        np.testing.assert_allclose(cache[name], aux["cache"][name], atol=1e-5, err_msg=name)


def test_step_exit_fills_with_the_write_path(conv_step):
    """Threshold 0: the token exits after layer 1; layers 2..L get the rows the cache-writing path
    (`apply_block(kv_only=True)`, dynamic_update_slice into each layer's slice) computes from the exited state."""
    args, params, state, tok_b, pos_b1, ee_step = conv_step
    logits, layers, cache = ee_step(0.0, state.cache)
    ref_logits, aux = jax.jit(lambda c: tfm.forward(args, params, tok_b[:, None], cache=c, positions_bt=pos_b1,
                                                    kv_mask_bs=state.kv_mask_bs, exit_layer=1))(state.cache)
    np.testing.assert_allclose(logits, ref_logits[:, 0], atol=1e-5)
    assert int(layers[0]) == 1

    @jax.jit
    def filled(c, hidden):
        return [tfm.apply_block(args, tfm.layer_params(args, params, j), hidden, pos_b1,
                                {n: x[j] for n, x in c.items() if n != "index"}, c["index"], state.kv_mask_bs,
                                kv_only=True)[1] for j in range(1, L)]

    wants = [{n: c[0] for n, c in aux["cache"].items() if n != "index"}] + filled(state.cache, aux["hidden"])
    for j, want in enumerate(wants):
        for name in ("k", "v", "k_tail", "v_tail"):
            np.testing.assert_allclose(cache[name][j], want[name], atol=1e-5, err_msg=f"layer {j} {name}")
