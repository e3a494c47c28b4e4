"""The engine end to end on a tiny checkpointed LM: memory beyond the window, the cache generation continues
from, the FLOP accounting, the CLI, and bad input (empty memory, unreachable service, missing Stage-2 weights,
empty / non-UTF-8 context files)."""

import io
import json
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.data import factworld
from mantis_jax.engine import __main__ as engine_cli
from mantis_jax.engine.core import Engine
from mantis_jax.engine.memory import MemoryUnavailable
from mantis_jax.engine.policy import FixedPolicy
from mantis_jax.memory.encoder import forward_flops
from mantis_jax.memory.train import Stage2Error
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import forward
from mantis_jax.train.checkpoint import load_for_inference

DISTANCE = 400  # filler tokens between the evidence and the question: far beyond the 64-token window


def _bag_of_tokens(params):
    """Known encoder weights: every block's output projections zeroed, so the last hidden state of a token is
    its embedding and the mean-pooled encoder is a bag of token embeddings (shared name pieces → high cosine)."""
    out = jax.tree.map(lambda x: x, params)
    for name, layer in out.items():
        if name.startswith("layer_"):
            layer["attn"]["wo"] = jnp.zeros_like(layer["attn"]["wo"])
            layer["mlp"]["w_down"] = jnp.zeros_like(layer["mlp"]["w_down"])
    return out


@pytest.fixture(scope="module")
def loaded(stage1):
    workdir, _ = stage1
    config, tok, params = load_for_inference(workdir)
    config.memory.episodic.store_capacity = 8  # the evidence is evicted and consolidated into semantic memory
    config.engine.top_k = 3
    return workdir, config, tok, params


@pytest.fixture(scope="module")
def far_record():
    return factworld.World(0, 2000).qa_record("test", "far", 3, distance=DISTANCE)


def _evidence(rec):
    return rec["context"][rec["evidence_span"][0]:rec["evidence_span"][1]]


@pytest.fixture(scope="module")
def answered(loaded, far_record):
    """One engine (known encoder weights) that read a far record; its answers with and without memory."""
    _, config, tok, params = loaded
    engine = Engine(config, _bag_of_tokens(params), tok)
    engine.read(far_record["context"])
    with_memory = engine.answer(far_record["question"])
    engine.policy = FixedPolicy(retrieve="never")
    attention_only = engine.answer(far_record["question"])
    yield engine, with_memory, attention_only
    engine.close()


def test_a_fact_beyond_the_window_is_found_and_placed_in_the_prompt(answered, far_record):
    engine, mem, att = answered
    ev = _evidence(far_record)
    assert far_record["distance_tokens"] > engine.window
    assert engine.memory.counts()["semantic"] > 0 and engine.memory.counts()["episodic"] == 8
    texts = [h["text"] for h in mem.trace.retrieved]
    assert ev in texts, (ev, mem.trace.retrieved)
    hit = mem.trace.retrieved[texts.index(ev)]
    assert hit["tier"] == "semantic"  # evicted from the 8-entry episodic ring, consolidated, found again
    assert mem.trace.prompt.index(ev) < mem.trace.prompt.index("\nQ: ")  # real text before the question
    scores = [h["score"] for h in mem.trace.retrieved]
    assert scores == sorted(scores, reverse=True)
    assert ev not in att.trace.prompt and att.trace.retrieved == []  # attention only: out of reach


def test_memory_after_the_window_puts_the_best_span_nearest_the_question(loaded, far_record):
    """engine.memory_position=after: the same spans and window, the window first and the best span last."""
    _, config, tok, params = loaded
    config = config.copy_and_resolve_references()
    config.engine.window_tokens, config.engine.top_k = 160, 2  # room for the window beside the spans
    engine = Engine(config, _bag_of_tokens(params), tok)
    engine.read(far_record["context"])
    traces = {}
    for position in ("before", "after"):
        engine.config.engine.memory_position = position
        traces[position] = engine.answer(far_record["question"]).trace
    engine.close()
    before, after = traces["before"], traces["after"]
    spans = [h["text"] for h in after.retrieved]
    assert spans and spans == [h["text"] for h in before.retrieved]
    window = before.prompt.rsplit("\nQ:", 1)[0].strip()
    for t in spans:
        assert window.startswith(t)
        window = window[len(t):].strip()
    assert window  # the window's text is in both prompts
    tail = before.prompt[before.prompt.index("\nQ:"):]
    assert after.prompt == " " + " ".join([window] + spans[::-1]) + tail


def _reference_greedy(config, params, tok, prompt_ids, n_new):
    """A plain loop: a full forward (no cache) per new token."""
    args = ModelArgs.from_config(config)
    step = jax.jit(lambda p, b: forward(args, p, b)[0])  # one shape: a buffer with room for every new token
    buf = np.full((1, len(prompt_ids) + n_new), tok.pad_id, np.int32)
    buf[0, :len(prompt_ids)] = prompt_ids
    out = []
    for i in range(n_new):
        pos = len(prompt_ids) + i
        nxt = int(jnp.argmax(step(params, jnp.asarray(buf))[0, pos - 1]))
        out.append(nxt)
        if nxt == tok.eos_id or "\n" in tok.decode([nxt], skip_special=False):
            break
        buf[0, pos] = nxt
    return out


def test_generation_continues_from_the_prefilled_prompt(loaded, answered):
    _, config, tok, params = loaded
    engine, mem, _ = answered
    ids = tok.encode(mem.trace.prompt, add_bos=True)[-engine.budget:]
    assert len(ids) == mem.trace.prompt_tokens
    ref = _reference_greedy(config, _bag_of_tokens(params), tok, ids, len(mem.trace.layers_per_token))
    assert tok.decode(ref).split("\n", 1)[0].strip() == mem.trace.candidate == mem.text
    assert mem.trace.layers_per_token == [config.model.n_layers] * len(ref)


def test_trace_flops_are_the_sum_over_what_ran(loaded, answered):
    _, config, tok, _ = loaded
    engine, mem, att = answered
    args = engine.args
    for ans, retrieved in ((mem, True), (att, False)):
        tr = ans.trace
        assert tr.flops_total == pytest.approx(sum(tr.flops.values()))
        length = -(-tr.prompt_tokens // 16) * 16
        slots = length + config.engine.max_new_tokens
        assert tr.flops["prefill"] == pytest.approx(forward_flops(args, length, args.n_layers, length * slots))
        head = 2 * args.d_model * args.vocab_size  # every step also read the exit head after layer 1 (of 2)
        decode = sum(forward_flops(args, 1, n, slots) + head for n in tr.layers_per_token[1:])
        assert tr.flops["decode"] == pytest.approx(decode)
        q_len = -(-len(tok.encode(tr.question, add_bos=True)) // 16) * 16
        assert tr.flops["retrieval_encoder"] == pytest.approx(forward_flops(args, q_len, args.n_layers, q_len ** 2))
        assert tr.flops["critic"] == 0.0
    # the full path by hand: the question's encoding, the summary passes over the window prompt (the exit layer,
    # then every layer), the prompt with the retrieved spans, max_new_tokens - 1 steps at full depth (each also
    # reads the exit head after layer 1), no critic (the engine has none): the same for both policies
    q_len = -(-len(tok.encode(mem.trace.question, add_bos=True)) // 16) * 16
    base = -(-att.trace.prompt_tokens // 16) * 16  # never-retrieve prompts the window alone
    full = -(-mem.trace.prompt_tokens // 16) * 16
    n_new = config.engine.max_new_tokens
    hand = (forward_flops(args, q_len, 2, q_len ** 2) + forward_flops(args, base, 1, base * base)
            + forward_flops(args, base, 2, base * (base + n_new)) + forward_flops(args, full, 2, full * (full + n_new))
            + (n_new - 1) * (forward_flops(args, 1, 2, full + n_new) + 2 * args.d_model * args.vocab_size))
    assert mem.trace.flops_full == pytest.approx(hand) and att.trace.flops_full == pytest.approx(hand)
    assert mem.trace.full_prefills == att.trace.full_prefills == 2 and att.trace.prefills == 1
    assert mem.trace.compute == pytest.approx(mem.trace.flops_total / hand) and att.trace.compute < mem.trace.compute


def test_forward_flops_match_xla_cost_analysis(loaded):
    """The hand count against XLA's own count of a cache-less forward (matmuls dominate; norms etc. are not
    counted by hand)."""
    _, config, _, params = loaded
    args = ModelArgs.from_config(config)
    tokens = jnp.zeros((1, 64), jnp.int32)
    cost = jax.jit(lambda p, t: forward(args, p, t)[0]).lower(params, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ours = forward_flops(args, 64, args.n_layers, 64 * 64)
    assert 0.7 < ours / cost["flops"] < 1.3, (ours, cost["flops"])


def test_empty_memory_answers_from_the_window(loaded):
    _, config, tok, params = loaded
    engine = Engine(config, params, tok)
    try:
        ans = engine.answer("Where does Tavo live?")
        assert "memory is empty: answered from the window" in ans.trace.notes
        assert ans.trace.retrieved == [] and ans.trace.memory == {"episodic": 0, "semantic": 0}
    finally:
        engine.close()


def test_memory_switches_are_honoured(loaded, far_record):
    _, config, tok, params = loaded
    off = config.copy_and_resolve_references()
    off.memory.semantic.enabled = False  # evicted spans are forgotten
    engine = Engine(off, params, tok)
    engine.read(far_record["context"])
    assert engine.memory.counts() == {"episodic": 8, "semantic": 0}
    engine.close()
    direct = config.copy_and_resolve_references()
    direct.memory.episodic.enabled = False  # every span goes to semantic memory at once
    engine = Engine(direct, params, tok)
    info = engine.read(far_record["context"])
    assert engine.memory.counts() == {"episodic": 0, "semantic": info["spans"]}
    engine.close()


class _Critic:
    threshold = 0.5

    def __init__(self, score):
        self._score, self.calls = score, []

    def score(self, question, answer, evidence):
        self.calls.append((question, answer, evidence))
        return self._score

    def flops(self, question, answer, evidence):
        return 1234.0


def test_critic_abstains_below_its_threshold_and_verify_needs_a_critic(loaded):
    _, config, tok, params = loaded
    cfg = config.copy_and_resolve_references()
    cfg.engine.verify = True
    with pytest.raises(ValueError, match="mantis_jax.control.train_critic"):
        Engine(cfg, params, tok)
    for score, abstained in ((0.1, True), (0.9, False)):
        critic = _Critic(score)
        engine = Engine(cfg, params, tok, critic=critic)
        engine.read("Tavo lives in Brisk. The road to the mill was quiet.")
        ans = engine.answer("Where does Tavo live?")
        engine.close()
        assert ans.trace.abstained is abstained and ans.trace.critic_score == score
        assert ans.text == ("unknown" if abstained else ans.trace.candidate)
        assert critic.calls[0][1] == ans.trace.candidate and ans.trace.flops["critic"] == 1234.0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_service_is_one_clear_error_or_a_logged_fallback(loaded, caplog):
    _, config, tok, params = loaded
    cfg = config.copy_and_resolve_references()
    cfg.memory.semantic.address = f"127.0.0.1:{_free_port()}"
    cfg.memory.semantic.timeout_s = 2.0
    with pytest.raises(MemoryUnavailable, match="memory.semantic.address"):
        Engine(cfg, params, tok)
    cfg.engine.semantic_fallback = True
    engine = Engine(cfg, params, tok)
    assert "falling back to the in-process backend" in caplog.text
    assert engine.memory.semantic.addresses == []
    engine.close()


def test_the_real_service_holds_the_consolidated_spans(loaded, far_record, tmp_path, monkeypatch):
    _, config, tok, params = loaded
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # the consolidation spool
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "mantis_jax.memory.server", "--data-dir", str(tmp_path / "db"),
                             "--dim", str(config.model.d_model), "--port-file", str(port_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (port_file.exists() and port_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.2)
        cfg = config.copy_and_resolve_references()
        cfg.memory.semantic.address = f"127.0.0.1:{port_file.read_text().strip()}"
        engine = Engine(cfg, _bag_of_tokens(params), tok)
        engine.read(far_record["context"])
        ans = engine.answer(far_record["question"])
        engine.close()
        assert engine.memory.semantic.addresses == [cfg.memory.semantic.address]
        semantic = [h["text"] for h in ans.trace.retrieved if h["tier"] == "semantic"]
        assert _evidence(far_record) in semantic
    finally:
        proc.terminate()
        proc.wait(30)


def test_missing_stage2_weights_name_the_command(stage1, tmp_path):
    workdir, _ = stage1
    with pytest.raises(Stage2Error, match="python -m mantis_jax.memory.train"):
        Engine.from_workdir(workdir, stage2=str(tmp_path))
    with pytest.raises(Stage2Error, match="not a Stage-2 run"):
        Engine.from_workdir(workdir, stage2=workdir)


def _cli(argv, stdin=""):
    out = io.StringIO()
    engine_cli.main(argv, inp=io.StringIO(stdin), out=out)
    return out.getvalue()


def test_cli_one_shot_interactive_and_overrides(stage1, far_record, tmp_path):
    workdir, _ = stage1
    ctx = tmp_path / "context.txt"
    ctx.write_text(far_record["context"], encoding="utf-8")
    got = json.loads(_cli(["--checkpoint", workdir, "--context_file", str(ctx), "--question",
                           far_record["question"], "--json", "--config.engine.top_k=2",
                           "--config.engine.retrieve=always"]))
    assert 1 <= len(got["trace"]["retrieved"]) <= 2 and got["trace"]["decisions"]["semantic"] is True
    assert got["text"] == got["trace"]["candidate"]
    text = _cli(["--checkpoint", workdir, "--interactive"],
                f"read {ctx}\nask {far_record['question']}\ntrace\nask \nbogus\nquit\nask never reached\n")
    assert "read " in text and "spans" in text and "answer: " in text
    assert '"flops"' in text  # the trace command prints the JSON trace
    assert "error: the question is empty" in text and "unknown command 'bogus'" in text
    assert "never reached" not in text


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b"  \n\n", "is empty"), (b"Tavo lives in \xff\xfeBrisk.", "is not UTF-8"),
])
def test_cli_refuses_bad_context_files(stage1, tmp_path, capsys, content, message):
    workdir, _ = stage1
    ctx = tmp_path / "context.txt"
    ctx.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        _cli(["--checkpoint", workdir, "--context_file", str(ctx), "--question", "Where?"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "--context_file" in err[0]


def test_cli_refuses_unknown_keys_and_a_missing_question(stage1, capsys):
    workdir, _ = stage1
    for argv, message in ((["--question", "q", "--config.engine.nope=1"], "config.engine.nope"),
                          (["--config.engine.retrieve=sometimes", "--question", "q"], "engine.retrieve"),
                          ([], "--question")):
        with pytest.raises(SystemExit):
            _cli(["--checkpoint", workdir] + argv)
        assert message in capsys.readouterr().err


def test_exit_threshold_skips_layers_and_the_trace_counts_them(loaded, far_record):
    """A threshold every token passes at the first exit layer: each decode step runs 1 of the 2 layers (the
    skipped layer only fills its cache entry), and the trace's FLOPs and compute say so."""
    _, config, tok, params = loaded
    cfg = config.copy_and_resolve_references()
    cfg.engine.exit_threshold = 1e-6
    engine = Engine(cfg, params, tok)
    engine.read(far_record["context"])
    tr = engine.answer(far_record["question"]).trace
    engine.close()
    assert tr.decisions["exit_threshold"] == pytest.approx(1e-6)
    assert tr.layers_per_token[0] == 2 and set(tr.layers_per_token[1:]) <= {1}
    args = engine.args
    length = -(-tr.prompt_tokens // 16) * 16
    slots = length + cfg.engine.max_new_tokens
    kv = 2 * 2 * args.d_model * args.n_kv_heads * args.head_dim
    assert tr.flops["decode"] == pytest.approx((len(tr.layers_per_token) - 1) * (forward_flops(args, 1, 1, slots)
                                                                                  + kv))
    assert len(tr.layers_per_token) == 1 or tr.compute < 1.0
