"""The policy's expert bias reaches the router: the engine's prefill and decode (early-exit loop included) route
with `Decisions.expert_bias` [L, E], a traced argument. Checked on a tiny MoE model (4 experts, top-1) against
a plain forward with the same bias, against the unbiased program (zeros change nothing, bit for bit), and from a
sampling controller's draw to the router's load in the trace."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.config import default_config, set_shape, validate
from mantis_jax.control import controller as ctl
from mantis_jax.data import factworld as fw
from mantis_jax.data import tokenizer as tk
from mantis_jax.engine import runtime
from mantis_jax.engine.core import Engine
from mantis_jax.engine.policy import Decisions
from mantis_jax.infer.decode import left_pad
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import abstract_params, forward, init_cache

L, E = 2, 4
CONTEXT = "Mira Okafor lives in Lisbon. Mira Okafor works as a baker. Tomas Reyes lives in Oslo."
QUESTION = "Where does Mira Okafor live?"


class Biased:
    """A fixed policy with an expert bias (None = no bias); memory off (the window holds the context)."""

    def __init__(self, bias):
        self.bias = bias

    def decide(self, summary):
        del summary
        return Decisions(exit_threshold=1.0, episodic=False, semantic=False, expert_bias=self.bias)


@pytest.fixture(scope="module")
def moe():
    """(config, params, tokenizer) of a random 2-layer MoE LM; weights large enough that routing matters."""
    tokenizer = tk.Tokenizer.train(fw.World(seed=0, n_entities=60).tokenizer_sample(40), 384)
    config = default_config()
    set_shape(config, d_model=32, n_layers=L, n_experts=E, top_k=1)
    config.model.update(vocab_size=tokenizer.padded_vocab_size, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=128)
    config.moe.impl = "dense"
    config.data.seq_len = 64
    validate(config)
    rng = np.random.default_rng(1)

    def fill(path, s):  # random weights without an init compile; norm scales 1
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", "")))
        return jnp.ones(s.shape, s.dtype) if name == "scale" else jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype)

    params = jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract_params(ModelArgs.from_config(config))))
    return config, params, tokenizer


@pytest.fixture(scope="module")
def answers(moe):
    """The same question answered with no bias, a zero bias and a bias that makes expert 0 every token's first
    choice, by one engine (one compile per program)."""
    config, params, tokenizer = moe
    engine = Engine(config, params, tokenizer)
    strong = np.zeros((L, E), np.float32)
    strong[:, 0] = 30.0
    out = {}
    for name, bias in (("none", None), ("zeros", np.zeros((L, E), np.float32)), ("strong", strong)):
        engine.reset()
        engine.read(CONTEXT)
        engine.policy = Biased(bias)
        out[name] = engine.answer(QUESTION)
    yield engine, out, strong
    engine.close()


@functools.partial(jax.jit, static_argnums=0)
def _logits(args, params, tokens_bt, bias):
    return forward(args, params, tokens_bt, expert_bias_le=bias)[0]


def _reference_greedy(args, params, prompt_ids, n_new, stop, bias):
    """A full forward (no cache) per new token, routed with `bias`; one buffer shape (64) for every call."""
    buf = np.zeros((1, 64), np.int32)
    buf[0, :len(prompt_ids)] = prompt_ids
    out = []
    for i in range(n_new):
        nxt = int(jnp.argmax(_logits(args, params, jnp.asarray(buf), bias)[0, len(prompt_ids) + i - 1]))
        out.append(nxt)
        if nxt in stop:
            break
        buf[0, len(prompt_ids) + i] = nxt
    return out


def test_biased_generation_equals_a_biased_forward_and_differs_from_unbiased(moe, answers):
    _, _, tokenizer = moe
    engine, out, strong = answers
    args, params = engine.args, engine.params
    stop = set(np.flatnonzero(np.asarray(engine.stop_v)).tolist())
    tr = out["strong"].trace
    assert tr.decisions["expert_bias"] == strong.tolist() and tr.prefills == 2  # re-prefilled with the bias
    ids = tokenizer.encode(tr.prompt, add_bos=True)[-engine.budget:]
    ref = _reference_greedy(args, params, ids, len(tr.layers_per_token), stop, jnp.asarray(strong))
    assert len(ref) == len(tr.layers_per_token) >= 2
    assert tokenizer.decode(ref).split("\n", 1)[0].strip() == tr.candidate
    unbiased = _reference_greedy(args, params, ids, len(out["none"].trace.layers_per_token), stop, None)
    assert tokenizer.decode(unbiased).split("\n", 1)[0].strip() == out["none"].trace.candidate
    assert tr.candidate != out["none"].trace.candidate
    # the router saw the bias: expert 0 is every token's choice (top-1)
    np.testing.assert_allclose(np.asarray(tr.expert_load), [[1.0, 0.0, 0.0, 0.0]] * L)
    assert np.asarray(out["none"].trace.expert_load)[:, 0].max() < 1.0


def test_prefill_and_decode_with_bias_equal_the_model(moe, answers):
    """runtime.prefill's logits and the early-exit decode's tokens (the engine's compiled programs, on its prompt)
    against forward(expert_bias_le=...) for a random bias; a zero bias against no bias, bit for bit."""
    config, _, tokenizer = moe
    engine, out, _ = answers
    args, params = engine.args, engine.params  # the engine's compiled programs serve these calls
    ids = tokenizer.encode(out["none"].trace.prompt, add_bos=True)[-engine.budget:]
    length = -(-len(ids) // 16) * 16
    tokens, mask = left_pad([ids], tokenizer.pad_id, length)
    n_new = config.engine.max_new_tokens

    def run(b, exit_layer):
        pre = runtime.prefill(args, params, init_cache(args, 1, length + n_new), jnp.asarray(tokens),
                              jnp.asarray(mask), b, exit_layer=exit_layer)
        first = np.asarray(pre.first_logits_v)
        dec = runtime.decode(args, params, pre.cache, pre.first_logits_v, pre.kv_mask_bs, jnp.int32(len(ids)),
                             engine.stop_v, tokenizer.pad_id, jnp.float32(1.0), b,
                             max_new_tokens=n_new, exit=engine.early_exit)
        return first, np.asarray(dec.tokens_n)

    bias = jnp.asarray(np.random.default_rng(0).normal(0.0, 3.0, (L, E)), jnp.float32)
    first, toks = run(bias, 0)
    buf = np.pad(np.asarray(ids, np.int32), (0, 64 - len(ids)))[None]
    ref_logits = _logits(args, params, jnp.asarray(buf), bias)[0, len(ids) - 1]
    np.testing.assert_allclose(first, np.asarray(ref_logits), rtol=1e-4, atol=1e-4)
    ref = _reference_greedy(args, params, ids, n_new, set(np.flatnonzero(np.asarray(engine.stop_v)).tolist()), bias)
    assert toks[:len(ref)].tolist() == ref
    first0, toks0 = run(None, engine.exit_layer)  # the engine's unbiased summary pass
    first_z, toks_z = run(jnp.zeros((L, E), jnp.float32), 0)
    np.testing.assert_array_equal(first_z, first0)
    np.testing.assert_array_equal(toks_z, toks0)
    assert not np.allclose(first, first0, atol=1e-3)


def test_zero_bias_reproduces_the_unbiased_answer(answers):
    _, out, _ = answers
    a, z = out["none"].trace, out["zeros"].trace
    assert (out["zeros"].text, z.candidate, z.layers_per_token) == (out["none"].text, a.candidate, a.layers_per_token)
    assert z.expert_load == a.expert_load and a.prefills == 1  # no bias: generation continues from the summary pass
    assert z.flops_full == a.flops_full


def test_sampled_controller_bias_reaches_the_router(moe, answers):
    """A sampling controller whose bias head says +20 for experts 0 and 1 and -20 for 2 and 3 (noise std 0.1):
    the trace records the drawn bias, and the router gives experts 0 and 1 all the assignments (top-1)."""
    config, params, tokenizer = moe
    engine, _, _ = answers
    spec = ctl.ControllerSpec(d_model=32, n_layers=L, n_experts=E, thresholds=(1.0,), d_hidden=8, depth=1,
                              bias_scale=20.0)
    cp = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(ctl.init, spec, jax.random.key(0)))
    head = dict(cp["bias"], kernel=jnp.zeros_like(cp["bias"]["kernel"]),
                bias=jnp.tile(jnp.array([50.0, 50.0, -50.0, -50.0]), L))  # tanh saturates: means ±20
    gates = dict(cp["gates"], kernel=jnp.zeros_like(cp["gates"]["kernel"]), bias=jnp.full((3,), -50.0))  # all off
    policy = ctl.Controller(spec, dict(cp, bias=head, gates=gates), sampling=True, seed=3)
    engine.reset()
    engine.read(CONTEXT)
    engine.policy = policy
    tr = engine.answer(QUESTION).trace
    drawn = np.asarray(policy.last["actions"]["bias"])
    np.testing.assert_allclose(np.asarray(tr.decisions["expert_bias"]), drawn, rtol=1e-6)
    assert not np.allclose(drawn, np.round(drawn))  # a draw, not the mean
    load = np.asarray(tr.expert_load)
    np.testing.assert_allclose(load[:, :2].sum(-1), 1.0)
    np.testing.assert_array_equal(load[:, 2:], 0.0)


def test_bias_of_the_wrong_shape_or_for_a_dense_model_is_one_error(moe, answers):
    engine, _, _ = answers
    engine.reset()
    engine.read(CONTEXT)
    engine.policy = Biased(np.zeros((L, E + 1), np.float32))
    with pytest.raises(ValueError, match=r"\[n_layers, n_experts\] = \[2, 4\]"):
        engine.answer(QUESTION)
    dense = Engine.__new__(Engine)  # only the model's shape is read
    dense.args = engine.args.replace(n_experts=1, top_k=1)
    with pytest.raises(ValueError, match="model is dense"):
        dense._expert_bias(np.zeros((L, 1)))  # noqa: SLF001
