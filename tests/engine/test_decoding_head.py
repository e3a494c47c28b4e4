"""The engine decoding with a TIDAL head (engine/decoding.py): a head forced to a known m sets the knobs of the
documented map (hand values), a state-dependent head's m per chunk and the sampled tokens equal a cache-free
reference loop, the CLI loads a saved policy and records m and the knobs in the trace, and a missing policy is
one error naming the training command. Greedy decoding is untouched (no modulation in its trace)."""

import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.control import store, train_decoding
from mantis_jax.engine import __main__ as engine_cli
from mantis_jax.engine import decoding
from mantis_jax.engine.core import Engine
from mantis_jax.infer.runner import newline_ids
from mantis_jax.memory.encoder import forward_flops
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import forward
from mantis_jax.train.checkpoint import load_for_inference

QUESTION = "Where does Tavo live?"
FLAGS = ["--config.decoding.chunk=4", "--config.decoding.chunks=4", "--config.decoding.window=8",
         "--config.decoding.prompt_len=8", "--config.decoding.d_hidden=8", "--config.decoding.episodes=2",
         "--config.decoding.minibatches=2"]


def _softplus_inv(y: float) -> float:
    return math.log(math.expm1(y))


@pytest.fixture(scope="module")
def setup(stage1):
    """(workdir, config, tokenizer, LM params, spec, a state-dependent head, a head forced to m = 2/3)."""
    workdir, _ = stage1
    config, tok, params = load_for_inference(workdir)
    config = train_decoding.decoding_config(config, FLAGS)
    spec = decoding.DecodingSpec.from_config(config)
    head = jax.tree.map(lambda x: x * 4.0, decoding.init(spec, jax.random.key(3)))  # m varies with the state
    forced = jax.tree.map(lambda x: x, head)
    forced["beta_params"] = {"kernel": jnp.zeros_like(head["beta_params"]["kernel"]),
                             "bias": jnp.array([_softplus_inv(2.0), _softplus_inv(0.5)])}  # Beta(3, 1.5): mean 2/3
    return workdir, config, tok, params, spec, head, forced


def _reference(config, params, tok, spec, head, ids, length, n_new):
    """Host loop, no cache: the full sequence through `forward` every token; the head acts every C tokens on the
    observation built from that pass (its last C hidden states and next-token entropies, the last W tokens of
    the left-padded history); tokens drawn with categorical(fold_in(key(seed), i)) from the modulated logits."""
    args = ModelArgs.from_config(config)
    C, W, pad = spec.chunk, spec.window, tok.pad_id
    hist = [pad] * max(W - length, 0) + [pad] * (length - len(ids)) + list(ids)
    stop = {tok.eos_id, *newline_ids(tok)}
    L = len(ids) + n_new

    @jax.jit
    def observe(seq, t, window, progress):  # right padding: causal, positions < t are exact
        logits, aux = forward(args, params, seq)
        last = jax.lax.dynamic_slice_in_dim(logits, t - 1, 1, axis=1)[:, 0]
        hidden = jax.lax.dynamic_slice_in_dim(aux["hidden"], t - C, C, axis=1)
        ent = decoding.normalised_entropy(jax.lax.dynamic_slice_in_dim(logits, t - C, C, axis=1))
        out = decoding.apply(spec, head, decoding.features(spec, last, window, hidden, ent, progress))
        return last, decoding.beta_mean(out["alpha"], out["beta"])

    @jax.jit
    def draw(last, window, m, i):
        mod = decoding.modulate(last, window, decoding.knobs(spec, m))
        return jax.random.categorical(jax.random.fold_in(jax.random.key(config.seed), i), mod[0])

    gen, ms = [], []
    for i in range(n_new):
        seq = np.full((1, L), pad, np.int32)
        seq[0, :len(ids) + i] = list(ids) + gen
        window = jnp.asarray([(hist + gen)[-W:]])
        last, m_now = observe(jnp.asarray(seq), len(ids) + i, window, (i // C) / spec.chunks)
        if i % C == 0:
            m = m_now
            ms.append(float(m[0]))
        gen.append(int(draw(last, window, m, i)))
        if gen[-1] in stop:
            break
    return gen, ms


def test_forced_m_sets_the_documented_knobs_and_a_stateful_head_matches_the_reference(setup):
    workdir, config, tok, params, spec, head, forced = setup
    engine = Engine(config, params, tok, decoder=decoding.DecodingHead(spec, forced))
    got = engine.answer(QUESTION)
    V = config.model.vocab_size
    hand = {"m": 2 / 3, "temperature": 0.6 + 0.8 * 2 / 3, "top_k": round(8 * (V / 8) ** (2 / 3)),
            "top_p": 0.8 + 0.2 * 2 / 3, "penalty": 1.0 + 0.3 * 2 / 3}  # the map's defaults, by hand
    assert got.trace.modulation, "the trace records the head's chunks"
    for chunk in got.trace.modulation:
        assert chunk == pytest.approx(hand, rel=1e-5)
    assert got.trace.layers_per_token == [config.model.n_layers] * len(got.trace.layers_per_token)

    engine.decoder = decoding.DecodingHead(spec, head)  # same shapes: the compiled decode is reused
    got = engine.answer(QUESTION)
    ids = tok.encode(got.trace.prompt, add_bos=True)[-engine.budget:]
    length = min(-(-len(ids) // 16) * 16, engine.budget)
    ref, ms = _reference(config, params, tok, spec, head, ids, length, config.engine.max_new_tokens)
    assert len(ref) == len(got.trace.layers_per_token)
    args, slots = ModelArgs.from_config(config), length + config.engine.max_new_tokens
    assert got.trace.flops["decode"] == pytest.approx(  # every layer, no exit head read
        (len(ref) - 1) * forward_flops(args, 1, args.n_layers, slots))
    assert tok.decode(ref).split("\n", 1)[0].strip() == got.text
    np.testing.assert_allclose([c["m"] for c in got.trace.modulation], ms, rtol=1e-4)
    assert len(ms) >= 2 and max(ms) - min(ms) > 1e-3  # the head's m follows the state
    for chunk in got.trace.modulation:
        kn = decoding.knobs(spec, jnp.array([chunk["m"]]))
        assert chunk["top_k"] == int(kn.top_k[0]) and chunk["penalty"] == pytest.approx(float(kn.penalty[0]))

    engine.decoder = None  # greedy: the default path, no modulation in the trace
    assert config.engine.decoding == "greedy" and engine.answer(QUESTION).trace.modulation == []
    engine.close()


def test_cli_decodes_with_a_saved_policy_and_a_missing_one_names_the_command(setup, tmp_path, capsys):
    workdir, config, tok, params, spec, head, _ = setup
    policy = str(tmp_path / "policy")
    state = train_decoding.init_state(spec, jax.random.key(3), 1e-3).replace(params=head)
    store.save(policy, 1, state, config=config, meta={})
    out = io.StringIO()
    engine_cli.main(["--checkpoint", workdir, "--question", QUESTION, "--json", f"--decoding_policy={policy}"],
                    out=out)
    trace = json.loads(out.getvalue())["trace"]
    assert trace["modulation"] and all(0 < c["m"] < 1 for c in trace["modulation"])
    loaded = decoding.load(policy)
    assert loaded.spec == spec and jax.tree.all(jax.tree.map(jnp.array_equal, loaded.params, head))
    with pytest.raises(SystemExit) as exit_info:
        engine_cli.main(["--checkpoint", workdir, "--question", QUESTION,
                         f"--decoding_policy={tmp_path / 'none'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert "python -m mantis_jax.control.train_decoding" in err[0] and "engine.decoding_policy" in err[0]
