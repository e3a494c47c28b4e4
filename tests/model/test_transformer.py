"""MantisLM: causality, cached decoding, early exit, remat/scan variants, logical axis names, FLOPs."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.model import layers
from mantis_jax.model import transformer as tfm
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.summary import flops_per_token, param_counts

V, B, T = 256, 2, 12
BASE = ModelArgs(vocab_size=V, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                 attn_block_q=0)
VARIANTS = {  # gqa_scan: attention in causal query blocks of 5 rows (5, 5, 2) and a width-3 convolution on keys
    # and values; cached decoding (whose cache then carries the convolution's tails) and left padding must agree
    "gqa_scan": BASE.replace(attn_block_q=5, kv_conv=3),
    "gqa_unrolled": BASE.replace(scan_layers=False, tie_embeddings=False),
    "moe_scan": BASE.replace(n_experts=4, top_k=2),
    "moe_unrolled_capacity": BASE.replace(n_experts=4, top_k=2, scan_layers=False, moe_impl="capacity",
                                          capacity_factor=2.0),
}


@pytest.fixture(scope="module")
def models():
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    out = {}
    for name, args in VARIANTS.items():
        params = tfm.init_params(args, jax.random.key(0))
        # the convolution's weights start at 0 (plain attention): random ones make the comparisons below bite
        params = jax.tree_util.tree_map_with_path(
            lambda path, p: jax.random.normal(jax.random.key(2), p.shape) * 0.5
            if jax.tree_util.keystr(path).endswith("_conv']") else p, params)
        logits, aux = jax.jit(lambda p, t, a=args: tfm.forward(a, p, t))(params, tokens)
        out[name] = (args, params, logits, aux)
    return tokens, out


@pytest.mark.parametrize("name", ["gqa_scan", "gqa_unrolled", "moe_scan"])
def test_causality(models, name):
    tokens, out = models
    args, params, logits, _ = out[name]
    t = 7
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % V)
    logits2, _ = tfm.forward(args, params, changed)
    np.testing.assert_allclose(logits2[:, :t], logits[:, :t], atol=1e-5)
    assert np.max(np.abs(np.asarray(logits2[:, t:] - logits[:, t:]))) > 1e-4


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decoding_equals_full_forward(models, name):
    tokens, out = models
    args, params, logits, _ = out[name]
    if args.moe_impl == "capacity":  # capacity depends on the number of tokens in the call; use dropless here
        args = args.replace(moe_impl="ragged")
    step = jax.jit(lambda p, t, c: tfm.forward(args, p, t, cache=c))
    cache = tfm.init_cache(args, B, args.max_seq_len)
    prefill, aux = step(params, tokens[:, :5], cache)
    pieces, cache = [prefill], aux["cache"]
    for t in range(5, T):
        lt, aux = step(params, tokens[:, t:t + 1], cache)
        pieces.append(lt)
        cache = aux["cache"]
    assert int(cache["index"]) == T
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), logits, atol=2e-5, rtol=1e-5)


def test_left_padding_with_kv_mask(models):
    tokens, out = models
    args, params, logits, _ = out["gqa_scan"]
    pad = 3
    padded = jnp.concatenate([jnp.zeros((B, pad), jnp.int32), tokens], axis=1)
    positions = jnp.broadcast_to(jnp.maximum(jnp.arange(T + pad) - pad, 0), (B, T + pad))
    kv_mask = jnp.broadcast_to(jnp.arange(args.max_seq_len) >= pad, (B, args.max_seq_len))
    cache = tfm.init_cache(args, B, args.max_seq_len)
    lp, _ = tfm.forward(args, params, padded, cache=cache, positions_bt=positions, kv_mask_bs=kv_mask)
    np.testing.assert_allclose(lp[:, pad:], logits, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gqa_scan", "moe_unrolled_capacity"])
def test_exit_layer(models, name):
    tokens, out = models
    args, params, logits, aux = out[name]
    full, _ = tfm.forward(args, params, tokens, exit_layer=args.n_layers)
    np.testing.assert_allclose(full, logits, atol=1e-5, rtol=1e-5)
    early, early_aux = tfm.forward(args, params, tokens, exit_layer=1)
    chex.assert_shape(early, (B, T, V))
    chex.assert_shape(early_aux["expert_load"], (1, args.n_experts))
    assert np.max(np.abs(np.asarray(early - logits))) > 1e-3
    with pytest.raises(ValueError, match="exit_layer"):
        tfm.forward(args, params, tokens, exit_layer=args.n_layers + 1)


def test_causal_conv_matches_a_loop_and_carries_its_tail():
    x = jax.random.normal(jax.random.key(3), (2, 9, 2, 4))
    w = jax.random.normal(jax.random.key(4), (3, 2, 4))
    y, tail = layers.causal_conv(x, w)
    ref = np.array(x)
    for t in range(9):
        for j in range(1, 4):
            if t - j >= 0:
                ref[:, t] += np.asarray(w[j - 1] * x[:, t - j])
    np.testing.assert_allclose(y, ref, atol=1e-5)
    np.testing.assert_array_equal(tail, x[:, -3:])
    y1, tail1 = layers.causal_conv(x[:, :4], w)  # in two pieces, the tail carried: the same outputs
    y2, _ = layers.causal_conv(x[:, 4:], w, tail1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), y, atol=1e-5)


def test_exit_layer_matches_truncated_unrolled_model(models):
    tokens, out = models
    args, params, _, _ = out["gqa_unrolled"]
    early, _ = tfm.forward(args, params, tokens, exit_layer=2)
    kept = {k: v for k, v in params.items() if k not in ("layer_2",)}
    ref, _ = tfm.MantisLM(args.replace(n_layers=2)).apply({"params": kept}, tokens)
    np.testing.assert_array_equal(early, ref)


def test_query_blocks_cover_the_rows_and_cap_the_count():
    assert layers.query_blocks(12, 5) == [(0, 5), (5, 10), (10, 12)]
    assert layers.query_blocks(12, 0) == layers.query_blocks(12, 12) == [(0, 12)]
    many = layers.query_blocks(1000, 8)  # 125 blocks of 8 would be too many ops: grown to 63-row blocks
    assert len(many) == layers.MAX_ATTN_BLOCKS and many[0] == (0, 63) and many[-1] == (945, 1000)


def test_blocked_causal_attention_equals_dense_masked():
    """Values and gradients of attention in query blocks (4, 4, 2 rows) against the full masked T x T softmax."""
    Tq, G, R, Dh = 10, 2, 3, 4
    rng = np.random.default_rng(3)
    q, r = (jnp.asarray(rng.normal(size=(2, Tq, G, R, Dh)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(2, Tq, G, Dh)), jnp.float32) for _ in range(2))
    causal = np.arange(Tq)[None, :] <= np.arange(Tq)[:, None]

    def dense(q, k, v):
        s = jnp.einsum("btgqk,bsgk->bgqts", q, k) / np.sqrt(Dh)
        p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
        return jnp.einsum("bgqts,bsgk->btgqk", p, v)

    def blocked(q, k, v):
        return layers.causal_attention(q, k, v, causal[None], 4, jnp.float32)

    np.testing.assert_allclose(jax.jit(blocked)(q, k, v), dense(q, k, v), atol=1e-5)
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * r), argnums=(0, 1, 2)))(q, k, v)
             for f in (blocked, dense)]
    chex.assert_trees_all_close(grads[0], grads[1], atol=1e-5)
    with pytest.raises(ValueError, match="block_q=0 with a KV cache"):
        layers.causal_attention(q, jnp.concatenate([k, k], 1), v, causal[None], 4, jnp.float32)


def test_scan_equals_unrolled(models):
    tokens, out = models
    args, params, logits, _ = out["gqa_scan"]
    unrolled = {k: v for k, v in params.items() if k != "layers"}
    for i in range(args.n_layers):
        unrolled[f"layer_{i}"] = jax.tree.map(lambda p: p[i], params["layers"])
    ref, _ = tfm.forward(args.replace(scan_layers=False), unrolled, tokens)
    np.testing.assert_allclose(ref, logits, atol=1e-5)


class TestJit(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        args = VARIANTS["moe_scan"]
        tokens = jax.random.randint(jax.random.key(1), (B, T), 0, V)
        params = tfm.init_params(args, jax.random.key(0))
        ref, _ = jax.jit(lambda p: tfm.forward(args, p, tokens))(params)
        got, aux = self.variant(lambda p: tfm.forward(args, p, tokens))(params)
        chex.assert_trees_all_close(got, ref, atol=1e-5, rtol=1e-5)
        chex.assert_shape(aux["hidden"], (B, T, args.d_model))


@pytest.mark.parametrize("policy", ["full", "dots_no_batch"])
def test_remat_policies_give_same_gradients(models, policy):
    tokens, out = models
    args, params, _, _ = out["moe_scan"]

    def grads(a):
        def loss(p):
            logits, aux = tfm.forward(a, p, tokens)
            return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux["moe_loss"]

        return jax.jit(jax.value_and_grad(loss))(params)

    chex.assert_trees_all_close(grads(args.replace(remat=policy)), grads(args), atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_close_to_float32(models):
    tokens, out = models
    args, params, logits, _ = out["gqa_scan"]
    low, _ = tfm.forward(args.replace(dtype="bfloat16"), params, tokens)
    assert low.dtype == jnp.float32  # logits always come back in float32
    assert np.mean(np.abs(np.asarray(low - logits))) < 0.05 * np.mean(np.abs(np.asarray(logits)))


def test_every_parameter_has_logical_axes():
    for args in VARIANTS.values():
        boxed = tfm.abstract_params(args)
        specs = nn.get_partition_spec(boxed)
        shapes = nn.unbox(boxed)
        for (path, spec), shape in zip(jax.tree_util.tree_leaves_with_path(specs),
                                       jax.tree.leaves(shapes)):
            assert len(spec) == len(shape.shape), (path, spec)
            if args.scan_layers and "layers" in str(path):
                assert spec[0] == "layers", path
            if "router" not in str(path):
                assert all(name is not None for name in spec), (path, spec)


def test_flops_per_token_hand_count():
    a = BASE.replace(n_experts=4, top_k=2)
    D, H, G, Dh, F, L, S = 32, 4, 2, 8, 64, 3, 16
    proj = 2 * (D * H * Dh + 2 * D * G * Dh + H * Dh * D)
    attn = 2 * 2 * H * Dh * (S + 1) / 2
    per_layer = proj + attn + 2 * D * 4 + 2 * 3 * D * F * 2
    expected = L * per_layer + 2 * D * V
    got = flops_per_token(a, S, training=False)
    assert got["active"] == pytest.approx(expected)
    assert flops_per_token(a, S)["active"] == pytest.approx(3 * expected)
    assert got["dense"] - got["active"] == pytest.approx(L * 2 * 3 * D * F * 2)


def test_param_counts_match_allocated_params(models):
    _, out = models
    for args, params, _, _ in out.values():
        counts = param_counts(args)
        assert counts["total"] == sum(p.size for p in jax.tree.leaves(params))
        if args.n_experts > 1:
            expert = sum(v.size for k, v in jax.tree_util.tree_leaves_with_path(params)
                         if "moe" in str(k) and "router" not in str(k))
            assert counts["expert"] == expert
            assert counts["active"] == counts["total"] - expert * (args.n_experts - args.top_k) // args.n_experts
