"""Memory tokens (memory/tokens.py) and their trainer (memory/train_tokens.py) on a tiny model."""

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.cli import load_preset
from mantis_jax.config import set_shape
from mantis_jax.data.factworld import World
from mantis_jax.data.tokenizer import Tokenizer
from mantis_jax.memory import tokens as mt
from mantis_jax.memory import train_tokens
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import init_params
from mantis_jax.train.checkpoint import params_equal

V, D, N, E, T, B, S, PAD = 128, 32, 2, 2, 3, 3, 12, 0
READ, WRITE = np.array([V - 4, V - 3]), np.array([V - 2, V - 1])
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model():
    args = ModelArgs(vocab_size=V, d_model=D, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=S,
                     scan_layers=False, attn_block_q=0)
    params = {"lm": init_params(args, jax.random.key(0)),
              "memory": mt.init_memory_params(jax.random.key(1), D, N, E, 0.02)}
    # Wider memory weights than the init's, so that what a write stores is visible in the read.
    params["memory"]["init"] = params["memory"]["init"] * 20
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, V - 4, (T, B, S)).astype(np.int32)
    tokens[:, :, :N], tokens[:, :, S - N:] = READ, WRITE
    tokens[0, 1, N:S - N] = PAD  # document 1 starts with an empty segment (a short document, right-aligned)
    tokens[1, 2, S - N - 3:S - N] = PAD  # document 2's middle segment is padded before its write tokens
    valid = np.ones((T, B), np.float32)
    valid[0, 1] = 0.0
    targets = np.concatenate([tokens[:, :, 1:], np.full((T, B, 1), PAD, np.int32)], axis=2)
    weights = (np.isin(targets, np.concatenate([READ, WRITE, [PAD]])) == 0).astype(np.float32)
    batch = {"tokens": tokens, "targets": targets, "weights": weights, "valid": valid}
    unroll = jax.jit(lambda p, b: mt.unroll(args, p, b, pad_id=PAD, bptt=2, keep_logits=True))
    segment = jax.jit(lambda p, s, x, v: mt.segment_forward(args, p, s, x, v, PAD)[:2])
    return {"args": args, "params": params, "batch": batch, "unroll": unroll, "segment": segment}


def test_read_tokens_carry_the_memory_into_the_logits(model):
    """The READ tokens' embeddings are the memory: another memory state gives other logits at every position."""
    p, b = model["params"], model["batch"]
    x = jnp.asarray(b["tokens"][0, :1])
    state = mt.initial_state(p["memory"], 1)
    other = dict(state, memory=state["memory"] + 1.0)
    _, logits = model["segment"](p, state, x, jnp.ones((1,)))
    _, logits_other = model["segment"](p, other, x, jnp.ones((1,)))
    assert np.all(np.abs(np.asarray(logits) - np.asarray(logits_other)).max(-1) > 1e-4)


def test_memory_carries_context_unless_the_gate_is_closed(model):
    """Open gate: changing segment 0's text changes the question segment's logits (only through the memory, as
    segments never attend to each other). Closed gate (g = 0): the memory never changes, the logits are equal."""
    p, b = model["params"], model["batch"]
    changed = dict(b, tokens=b["tokens"].copy())
    changed["tokens"][0, 0, N:S - N] = (changed["tokens"][0, 0, N:S - N] + 7) % (V - 10) + 5
    # Closed gate, and a router that cannot move (W_r = 0: uniform), so the read mixes the experts alike too.
    closed = {"lm": p["lm"], "memory": dict(p["memory"], b_gate=jnp.full((D,), -1e4),
                                            w_router=jnp.zeros_like(p["memory"]["w_router"]))}
    last = lambda params, batch: np.asarray(model["unroll"](params, batch)[1]["logits"][-1, 0])  # noqa: E731
    assert np.abs(last(p, b) - last(p, changed)).max() > 1e-4
    np.testing.assert_array_equal(last(closed, b), last(closed, changed))
    state, _ = model["unroll"](closed, b)
    np.testing.assert_array_equal(np.asarray(state["memory"]), np.asarray(mt.initial_state(p["memory"], B)["memory"]))


def test_time_major_batches_equal_a_per_document_loop(model):
    """Row t of the scan is segment t of every document: each document's logits and final memory equal a loop
    over that document alone; an empty segment (valid 0) leaves its document's state as it was."""
    p, b = model["params"], model["batch"]
    state_b, outs = model["unroll"](p, b)
    for d in range(B):
        state = mt.initial_state(p["memory"], 1)
        for t in range(T):
            before = state
            state, logits = model["segment"](p, state, jnp.asarray(b["tokens"][t, d:d + 1]),
                                             jnp.asarray(b["valid"][t, d:d + 1]))
            np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(outs["logits"][t, d]), atol=2e-5)
            if b["valid"][t, d] == 0:
                np.testing.assert_array_equal(np.asarray(state["memory"]), np.asarray(before["memory"]))
        np.testing.assert_allclose(np.asarray(state["memory"][0]), np.asarray(state_b["memory"][d]), atol=2e-5)
        np.testing.assert_allclose(np.asarray(state["route"][0]), np.asarray(state_b["route"][d]), atol=2e-6)


def test_time_major_layout_and_segment_document():
    context, question, answer = np.arange(10, 23), np.array([50, 51]), np.array([60, 61])
    doc = mt.segment_document(context, question, answer, segments=4, segment_len=9, read_ids=READ[:2],
                              write_ids=WRITE[:2], pad_id=PAD, lm_weight=0.5)
    # text_len 5: 13 context tokens -> 3 rows, right-aligned into rows 0..2; row 3 = question + answer
    np.testing.assert_array_equal(doc["tokens"][1], [V - 4, V - 3, 15, 16, 17, 18, 19, V - 2, V - 1])
    np.testing.assert_array_equal(doc["tokens"][3], [V - 4, V - 3, 50, 51, 60, 61, PAD, V - 2, V - 1])
    np.testing.assert_array_equal(doc["weights"][3], [0, 0, 0, 1, 1, 0, 0, 0, 0])  # predicts 60 and 61
    np.testing.assert_array_equal(doc["weights"][2], [0, 0, 0.5, 0.5, 0, 0, 0, 0, 0])  # 20 -> 21 -> 22
    assert mt.segment_document(np.arange(30), question, answer, segments=4, segment_len=9, read_ids=READ[:2],
                               write_ids=WRITE[:2], pad_id=PAD, lm_weight=0.5) is None  # needs 6 rows
    docs = [{"tokens": np.full((T, S), k), "valid": np.full((T,), k)} for k in range(B)]
    tm = mt.time_major(docs)
    assert tm["tokens"].shape == (T, B, S) and all((tm["tokens"][t, k] == k).all() for t in range(T) for k in range(B))


def test_gated_update_against_a_hand_computation():
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
    params = {"w_u": jnp.array([[2.0]]), "b_u": jnp.array([0.0]), "w_gate": jnp.array([[1.0], [2.0]]),
              "b_gate": jnp.array([0.0])}
    memory = jnp.array([[[[0.5]], [[-1.0]]]])  # [B=1, E=2, N=1, D=1]
    h, probs = jnp.array([[[0.5]]]), jnp.array([[0.25, 0.75]])
    out = np.asarray(mt.gated_update(params, memory, h, probs, jnp.ones((1,))))
    u = math.tanh(1.0)  # tanh(2 * 0.5)
    g0, g1 = sig(0.5 + 1.0), sig(-1.0 + 1.0)  # sigmoid(m W_m + h W_h) = sigmoid(m + 2h)
    expect = [0.25 * g0 * u + (1 - 0.25 * g0) * 0.5, 0.75 * g1 * u + (1 - 0.75 * g1) * -1.0]
    np.testing.assert_allclose(out.reshape(-1), expect, rtol=1e-6)
    one = np.asarray(mt.gated_update(params, memory[:, :1], h, jnp.ones((1, 1)), jnp.ones((1,))))
    np.testing.assert_allclose(one.reshape(-1), [g0 * u + (1 - g0) * 0.5], rtol=1e-6)  # E = 1: g*u + (1-g)*m
    np.testing.assert_array_equal(np.asarray(mt.gated_update(params, memory, h, probs, jnp.zeros((1,)))), memory)


def test_load_balance_loss_against_a_hand_computation():
    probs = jnp.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    # top experts 0, 0, 0, 1: f = (3/4, 1/4); mean probs P = (0.6, 0.4); 2 * (0.75 * 0.6 + 0.25 * 0.4) = 1.1
    assert float(mt.load_balance_loss(probs)) == pytest.approx(1.1, rel=1e-6)
    # rows 0 and 3 masked out: f = (1, 0), P = (0.65, 0.35) -> 2 * 0.65
    assert float(mt.load_balance_loss(probs, jnp.array([0.0, 1, 1, 0]))) == pytest.approx(1.3, rel=1e-6)
    np.testing.assert_allclose(np.asarray(mt.read(jnp.ones((1, 2, 1, 1)) * jnp.array([1.0, 3.0])[None, :, None, None],
                                                  jnp.array([[0.25, 0.75]]))), [[[2.5]]])


def test_truncated_backpropagation(model):
    """bptt = 2: segment 2's loss sends no gradient to the initial memory (cut at t = 2); segments 0 and 1 do."""
    p, b = model["params"], model["batch"]
    b = dict(b, valid=np.ones((T, B), np.float32))
    args = model["args"]
    jac = jax.jit(jax.jacrev(lambda init: mt.unroll(args, {"lm": p["lm"], "memory": dict(p["memory"], init=init)}, b,
                                                    pad_id=PAD, bptt=2)[1]["ce_sum"]))(p["memory"]["init"])
    norms = np.abs(np.asarray(jac)).reshape(T, -1).sum(1)
    assert norms[0] > 0 and norms[1] > 0 and norms[2] == 0


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    tok = Tokenizer.train(World(0, 2000).tokenizer_sample(300), 512)
    return tok.save(str(tmp_path_factory.mktemp("tok")))


def test_memory_tokens_are_added_without_colliding_with_text(small_tokenizer):
    base = Tokenizer.load(small_tokenizer)
    tok, read_ids, write_ids = mt.add_memory_tokens(base, 4)
    ids = np.concatenate([read_ids, write_ids])
    assert len(set(ids.tolist())) == 8 and ids.min() >= base.vocab_size and tok.padded_vocab_size % 128 == 0
    text = " ".join(World(0, 2000).iter_documents("train", 0, 20))
    encoded = np.asarray(tok.encode(text))
    assert not np.isin(encoded, ids).any() and encoded.tolist() == base.encode(text)
    assert tok.decode(np.concatenate([read_ids, encoded[:5], write_ids])) == base.decode(encoded[:5])
    again, r2, _ = mt.add_memory_tokens(tok, 4)  # a checkpoint's tokenizer already has them
    assert again.fingerprint() == tok.fingerprint() and (r2 == read_ids).all()


def _trainer_config(tokenizer_path):
    c = load_preset(os.path.join(ROOT, "configs", "memory_tokens.py"))
    c.data.tokenizer = tokenizer_path
    set_shape(c, d_model=D, n_layers=1, n_experts=1, top_k=1)
    c.model.kv_conv, c.model.attn_block_q = 0, 0  # fewer ops to compile
    c.model.n_heads, c.model.n_kv_heads, c.model.d_ff = 2, 1, 64
    c.data.batch_size = 2
    mtc = c.memory.tokens
    mtc.n_tokens, mtc.segment_len, mtc.segments, mtc.distance, mtc.eval_questions = 2, 32, 6, 12, 0
    c.train.total_steps, c.train.save_every, c.train.warmup_steps, c.train.log_every = 4, 2, 1, 2
    c.checkpoint.max_to_keep = 2
    c.logging.progress = False
    return c


def test_trainer_resumes_exactly(small_tokenizer, tmp_path):
    """4 steps straight equal 2 steps, a restart from that orbax checkpoint, and 2 more (params bitwise)."""
    config = _trainer_config(small_tokenizer)
    straight = train_tokens.train(config, str(tmp_path / "a"))
    assert straight["step"] == 4 and math.isfinite(straight["train"]["loss"])
    os.makedirs(tmp_path / "b" / "checkpoints")
    shutil.copytree(tmp_path / "a" / "checkpoints" / "2", tmp_path / "b" / "checkpoints" / "2")
    resumed = train_tokens.train(config, str(tmp_path / "b"))
    assert resumed["resumed_from"] == 2 and resumed["step"] == 4
    assert params_equal(straight["state"].params, resumed["state"].params)
    records = [line for line in open(tmp_path / "a" / "metrics.jsonl") if '"split": "train"' in line]
    assert len(records) >= 2 and os.listdir(tmp_path / "a" / "tensorboard")
    config.memory.tokens.n_experts = 3
    with pytest.raises(ValueError, match="memory.tokens.n_experts"):
        train_tokens.train(config, str(tmp_path / "b"))


def test_answer_loss_reaches_the_write_parameters_within_bptt(model):
    """The question segment's loss sends gradient to the proposal (W_u, b_u) and the gate (W_g, b_g) through the
    earlier segments' writes when bptt spans them, and none at bptt 1 (the memory is cut at every segment)."""
    p, b, args = model["params"], model["batch"], model["args"]

    def last_loss(mem, bptt):  # bptt traced: one compile for both
        return mt.unroll(args, {"lm": p["lm"], "memory": mem}, b, pad_id=PAD, bptt=bptt)[1]["ce_sum"][-1]

    grad = jax.jit(jax.grad(last_loss))
    full, cut = ({k: float(jnp.abs(g[k]).sum()) for k in ("w_u", "b_u", "w_gate", "b_gate")}
                 for g in (grad(p["memory"], jnp.int32(T)), grad(p["memory"], jnp.int32(1))))
    assert all(v > 0 for v in full.values()), full
    assert all(v == 0 for v in cut.values()), cut


def test_vocab_proposal_writes_the_predicted_token_embedding(model):
    """proposal "vocab" with W_u = 0 (the tanh term is 0), one expert and the gate held open: the memory after a
    write is softmax(the WRITE tokens' logits) @ embedding, computed densely from the segment's own logits."""
    p, args = model["params"], model["args"]
    mem = mt.init_memory_params(jax.random.key(3), D, N, 1, 0.02, gate_bias=1e4, update_scale=0.0)
    assert not np.asarray(mem["w_u"]).any()
    np.testing.assert_array_equal(mt.init_memory_params(jax.random.key(3), D, N, 1, 0.02, update_scale=0.5,
                                                        update_identity=True)["w_u"], 0.5 * np.eye(D))
    x = jnp.asarray(model["batch"]["tokens"][0, :1])
    seg = jax.jit(lambda params, state: mt.segment_forward(args, params, state, x, jnp.ones((1,)), PAD, "vocab"))
    new, logits, _ = seg({"lm": p["lm"], "memory": mem}, mt.initial_state(mem, 1))
    expect = jax.nn.softmax(logits[0, S - N:], axis=-1) @ p["lm"]["embedding"]
    np.testing.assert_allclose(np.asarray(new["memory"][0, 0]), np.asarray(expect), rtol=1e-5, atol=1e-7)


def test_question_in_context_layout():
    """MemXLNet-QA's layout: every context row ends with the question just before its WRITE tokens."""
    context, question, answer = np.arange(10, 17), np.array([50, 51]), np.array([60])
    doc = mt.segment_document(context, question, answer, segments=3, segment_len=10, read_ids=READ[:2],
                              write_ids=WRITE[:2], pad_id=PAD, lm_weight=0.5, question_in_context=True)
    # text per context row: 10 - 2N - 2 question tokens = 4: 7 context tokens -> rows 0 and 1
    np.testing.assert_array_equal(doc["tokens"][0], [V - 4, V - 3, 10, 11, 12, 13, 50, 51, V - 2, V - 1])
    np.testing.assert_array_equal(doc["tokens"][1], [V - 4, V - 3, 14, 15, 16, PAD, 50, 51, V - 2, V - 1])
    np.testing.assert_array_equal(doc["weights"][1], [0, 0, 0.5, 0.5, 0, 0, 0, 0, 0, 0])  # 14 -> 15 -> 16 only
    np.testing.assert_array_equal(doc["tokens"][2], [V - 4, V - 3, 50, 51, 60, PAD, PAD, PAD, V - 2, V - 1])
    np.testing.assert_array_equal(doc["weights"][2], [0, 0, 0, 1, 0, 0, 0, 0, 0, 0])
    assert mt.segment_document(np.arange(10, 19), question, answer, segments=3, segment_len=10, read_ids=READ[:2],
                               write_ids=WRITE[:2], pad_id=PAD, lm_weight=0.5, question_in_context=True) is None


def test_trainer_starts_from_a_stage1_lm(tmp_path):
    """init_from: the run takes the Stage-1 run's shape, tokenizer (+ memory tokens) and LM weights; the grown
    embedding keeps the learned rows and (answer_slot) starts the WRITE rows as the token ending "A:". One step at
    lr 0 (the warm-up's first) leaves the LM exactly the Stage-1 one."""
    from mantis_jax.config import default_config, validate  # noqa: PLC0415
    from mantis_jax.train.checkpoint import load_for_inference  # noqa: PLC0415
    from mantis_jax.train.trainer import train as train_stage1  # noqa: PLC0415

    s1 = default_config()
    set_shape(s1, d_model=D, n_layers=1, n_experts=1, top_k=1)
    s1.model.n_heads, s1.model.n_kv_heads, s1.model.d_ff, s1.model.max_seq_len = 2, 1, 64, 64
    s1.model.scan_layers, s1.model.attn_block_q = False, 0
    s1.data.tokenizer = Tokenizer.train(World(0, 2000).tokenizer_sample(200), 382).save(str(tmp_path))
    s1.data.seq_len, s1.data.batch_size, s1.data.factworld_val_docs = 32, 8, 8
    s1.data.factworld_entities = 3000  # the memory run must take this world, not its own preset's
    s1.train.total_steps, s1.train.warmup_steps, s1.train.save_every, s1.train.eval_every = 1, 1, 1, 100
    s1.train.eval_steps, s1.train.peak_flops = 1, 1e9
    s1.checkpoint.async_save = False
    s1.logging.tensorboard = s1.logging.progress = False
    train_stage1(validate(s1), str(tmp_path / "stage1"))

    c = _trainer_config("")
    c.memory.tokens.init_from = str(tmp_path / "stage1")
    c.memory.tokens.write_init = "answer_slot"
    c.memory.tokens.question_in_context = True
    c.memory.tokens.proposal = "vocab"
    c.memory.tokens.segment_len, c.memory.tokens.segments, c.memory.tokens.distance = 64, 4, 4
    c.train.total_steps, c.train.warmup_steps = 1, 1
    out = train_tokens.train(c, str(tmp_path / "mem"))
    _, tok1, lm1 = load_for_inference(str(tmp_path / "stage1"))
    lm = out["state"].params["lm"]
    v1 = lm1["embedding"].shape[0]
    _, read_ids, write_ids = mt.add_memory_tokens(tok1, 2)
    assert out["state"].params["memory"]["w_u"].shape == (D, D) and lm["embedding"].shape[0] >= v1
    learned = np.setdiff1d(np.arange(v1), np.concatenate([read_ids, write_ids]))  # (ids past the BPE: padding rows)
    np.testing.assert_array_equal(np.asarray(lm["embedding"][learned]), np.asarray(lm1["embedding"][learned]))
    colon = tok1.encode("\nA:")[-1]
    np.testing.assert_array_equal(np.asarray(lm["embedding"][write_ids]),
                                  np.broadcast_to(np.asarray(lm1["embedding"][colon]), (2, D)))
    assert params_equal({k: v for k, v in lm.items() if k != "embedding"},
                        {k: v for k, v in lm1.items() if k != "embedding"})
    with pytest.raises(Exception, match="init_from"):
        c.memory.tokens.init_from = str(tmp_path / "nothing")
        train_tokens.train(c, str(tmp_path / "mem2"))
