"""Decode loop: cached greedy == argmax of the full forward each step (per prompt alone, and batched with left
padding); deterministic; one trace for many calls; stops at a stop token; the host Generator and the QA helper."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.config import default_config
from mantis_jax.data import factworld as fw
from mantis_jax.data import tokenizer as tk
from mantis_jax.infer import decode, qa, runner
from mantis_jax.model import transformer as tfm
from mantis_jax.model.args import ModelArgs

N = 10
PAD = 0


def random_params(args, seed=0, head_scale=3.0):
    """Params drawn with numpy from the model's abstract shapes (no init compile); norm scales are 1 and the
    untied head is scaled so next-token distributions are neither flat nor a copy of the input."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(tfm.abstract_params(args))

    def draw(path, s):
        name = str(path[-1].key)
        if name == "scale":
            return jnp.ones(s.shape, s.dtype)
        std = head_scale / np.sqrt(args.d_model) if name == "lm_head" else (1.0 if name == "embedding" else 0.2)
        return jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def model():
    args = ModelArgs(vocab_size=384, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=96,
                     tie_embeddings=False)
    return args, random_params(args)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 384, size=n).tolist() for n in (5, 12, 1)]


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(args, params, buf_1s):
    return tfm.forward(args, params, buf_1s)[0][0]


def reference_greedy(args, params, prompt, n):
    """Argmax of the full (uncached, unpadded) forward each step: the sequence sits at the start of a fixed
    buffer (causal attention: what follows a position never changes its logits), read at its last position."""
    seq = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, args.max_seq_len), np.int32)
        buf[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(_full_logits(args, params, jnp.asarray(buf))[len(seq) - 1])))
    return seq[len(prompt):]


def run(args, params, prompts, *, stop_ids=(), temperature=0.0, top_k=0, top_p=1.0, seed=0, limit=N, length=16,
        recompute=False):
    tokens, mask = decode.left_pad(prompts, PAD, length)
    stop = jnp.asarray(decode.stop_mask(args.vocab_size, stop_ids))
    knobs = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), PAD, limit)
    if recompute:
        return decode.generate_recompute(args, params, tokens, mask, jax.random.key(seed), stop, *knobs,
                                         max_new_tokens=N)
    cache = decode.new_cache(args, len(prompts), length, N)
    return decode.generate(args, params, cache, tokens, mask, jax.random.key(seed), stop, *knobs, max_new_tokens=N)


@pytest.fixture(scope="module")
def greedy(model, prompts):
    args, params = model
    return run(args, params, prompts)


def test_batched_left_padded_cached_equals_full_recompute_per_prompt(model, prompts, greedy):
    args, params = model
    for r, p in enumerate(prompts):
        np.testing.assert_array_equal(np.asarray(greedy.tokens_bn[r]), reference_greedy(args, params, p, N))
    np.testing.assert_array_equal(greedy.lengths_b, [N] * len(prompts))


def test_recompute_loop_matches_cached_loop(model, prompts, greedy):
    args, params = model
    out = run(args, params, prompts, recompute=True)
    np.testing.assert_array_equal(out.tokens_bn, greedy.tokens_bn)


def test_greedy_is_deterministic_and_ignores_seed(model, prompts, greedy):
    args, params = model
    again = run(args, params, prompts, seed=123)
    np.testing.assert_array_equal(again.tokens_bn, greedy.tokens_bn)
    top1 = run(args, params, prompts, temperature=1.0, top_k=1, seed=7)  # sampling from one token == greedy
    np.testing.assert_array_equal(top1.tokens_bn, greedy.tokens_bn)


def test_sampling_is_seeded(model, prompts):
    args, params = model
    a = run(args, params, prompts, temperature=1.5, seed=1)
    b = run(args, params, prompts, temperature=1.5, seed=1)
    c = run(args, params, prompts, temperature=1.5, seed=2)
    np.testing.assert_array_equal(a.tokens_bn, b.tokens_bn)
    assert not np.array_equal(a.tokens_bn, c.tokens_bn)


def test_decode_loop_traces_once(model, prompts, greedy):
    args, params = model
    traced = decode.TRACES["generate"]  # the `greedy` fixture compiled this shape
    outs = [run(args, params, prompts, temperature=t, top_k=k, top_p=p, seed=s, limit=lim, stop_ids=stops)
            for t, k, p, s, lim, stops in [(0.0, 0, 1.0, 0, N, ()), (0.8, 5, 0.9, 1, 3, (7,)),
                                           (1.0, 0, 0.5, 2, N, (5, 9))]]
    assert traced >= 1 and decode.TRACES["generate"] == traced  # new knobs, seeds, limits, stop sets: no trace
    np.testing.assert_array_equal(outs[1].lengths_b, [3] * len(prompts))  # the traced step limit
    assert np.all(np.asarray(outs[1].tokens_bn)[:, 3:] == PAD)


def test_stops_each_row_at_its_stop_token(model, prompts, greedy):
    args, params = model
    toks = np.asarray(greedy.tokens_bn)
    stop_id = int(toks[0, 3])  # row 0 first emits it at step <= 3
    out = run(args, params, prompts, stop_ids=(stop_id,))
    got, lengths = np.asarray(out.tokens_bn), np.asarray(out.lengths_b)
    for r in range(len(prompts)):
        hits = np.flatnonzero(toks[r] == stop_id)
        expect = int(hits[0]) + 1 if hits.size else N
        assert lengths[r] == expect
        np.testing.assert_array_equal(got[r, :expect], toks[r, :expect])
        assert np.all(got[r, expect:] == PAD)
    assert lengths[0] <= 4


def test_cache_too_small_is_an_error(model, prompts):
    args, params = model
    tokens, mask = decode.left_pad(prompts, PAD, 16)
    small = decode.new_cache(args, len(prompts), 16, N - 1)
    stop = jnp.zeros((args.vocab_size,), bool)
    with pytest.raises(ValueError, match="new_cache"):
        decode.generate(args, params, small, tokens, mask, jax.random.key(0), stop, 0.0, 0, 1.0, PAD, N,
                        max_new_tokens=N)


@pytest.fixture(scope="module")
def tokenizer():
    return tk.Tokenizer.train(fw.World(seed=0, n_entities=60).tokenizer_sample(40), 384)


def test_generator_batches_match_single_prompts(model, tokenizer):
    args, params = model
    gen = runner.Generator(args, params, tokenizer, batch_size=2, bucket=32)
    texts = ["Q: Where does Bo live?\nA:", "The cat", "Hello there, how are"]
    ids, stats = gen.generate_ids([tokenizer.encode(t, add_bos=True) for t in texts], max_new_tokens=6)
    for t, got in zip(texts, ids):
        assert got == reference_greedy(args, params, tokenizer.encode(t, add_bos=True), len(got))
        assert len(got) == 6 or got[-1] == tokenizer.eos_id
    assert stats.prompts == 3 and stats.new_tokens == sum(map(len, ids))
    assert stats.latency_s > 0 and stats.ttft_s > 0 and stats.tokens_per_s > 0
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate_ids([[1] * 95], max_new_tokens=6)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate_ids([[1]], top_p=0.0)


def test_answer_questions_scores_with_exact_match(model, tokenizer):
    args, params = model
    config = default_config()
    config.model.vocab_size, config.model.d_model, config.model.n_layers = 384, 32, 2
    config.model.n_heads, config.model.n_kv_heads, config.model.d_ff, config.model.max_seq_len = 2, 1, 64, 96
    config.model.tie_embeddings = False
    assert ModelArgs.from_config(config) == args
    records = fw.World(seed=0, n_entities=60).qa_records("test", "near", 3)
    records = list(records) + list(fw.World(seed=0, n_entities=60).qa_records("test", "unanswerable", 2))
    preds, metrics = qa.answer_questions(config, tokenizer, params, records, max_new_tokens=4, batch_size=4)
    assert len(preds) == 5 and all("\n" not in p for p in preds)
    hits = [fw.exact_match(p, r["answer"]) for p, r in zip(preds, records)]
    assert metrics["n_answerable"] == 3 and metrics["n_unanswerable"] == 2
    assert metrics["accuracy"] == pytest.approx(sum(hits) / 5)
    assert metrics["answerable_accuracy"] == pytest.approx(sum(hits[:3]) / 3)
    # Greedy continuation of each (window-truncated) prompt, cut at its first line: what the helper must return.
    for p, r in zip(preds, records):
        ids = tokenizer.encode(fw.prompt(r), add_bos=True)[-(args.max_seq_len - 4):]
        ref = tokenizer.decode(reference_greedy(args, params, ids, 4)).split("\n", 1)[0].strip()
        assert p == ref or ref.startswith(p)


def test_moe_decode_step_computes_only_the_chosen_experts_and_matches_dispatch():
    """One token, top-2 of 4 experts: the lax.switch path (decode) equals the grouped dispatch of a longer input."""
    from mantis_jax.model.moe import MoEFeedForward  # noqa: PLC0415

    layer = MoEFeedForward(n_experts=4, top_k=2, d_ff=16, init_std=0.3)
    x = jnp.asarray(np.random.default_rng(0).normal(0, 1, (1, 3, 8)), jnp.float32)  # T·K = 6 >= E: dispatch
    variables = layer.init(jax.random.key(0), x)
    apply = jax.jit(lambda v, x: layer.apply(v, x)[0])
    text = str(jax.make_jaxpr(lambda v, x: layer.apply(v, x)[0])(variables, x[:, :1]))
    assert "cond[" in text or "switch" in text  # one token: the switch path
    full = apply(variables, x)
    for t in range(3):
        np.testing.assert_allclose(apply(variables, x[:, t:t + 1])[0, 0], full[0, t], atol=1e-5)
