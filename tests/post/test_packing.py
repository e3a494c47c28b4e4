"""SFT packing: packed rows give each example the logits it gets alone; the loss covers response tokens only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mantis_jax.data import factworld
from mantis_jax.model.transformer import forward
from mantis_jax.post import data, losses
from tests.post.conftest import ARGS


def _randomise_conv(params, seed):
    """kv_conv weights start at 0; random ones make the convolution's segment handling matter."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(params)
    for path in sorted(flat):
        if path[-1] in ("k_conv", "v_conv"):
            flat[path] = (0.3 * rng.normal(size=flat[path].shape)).astype(np.float32)
    return traverse_util.unflatten_dict(flat)


def test_packed_attention_equals_per_example_attention(params):
    args = ARGS  # layer scan, blocked attention, the key/value convolution, MoE: every path segment ids touch
    params = _randomise_conv(params, 1)
    rng = np.random.default_rng(0)
    lengths, T = (5, 7, 3), 16
    examples = [rng.integers(1, args.vocab_size, n).astype(np.int32) for n in lengths]
    # row 0: the three examples packed; rows 1-3: each example alone (the zeros after it cannot reach it through
    # causal attention). One call, one compilation.
    tokens, seg, pos = (np.zeros((1 + len(examples), T), np.int32) for _ in range(3))
    at = 0
    for k, ex in enumerate(examples, 1):
        n = len(ex)
        tokens[0, at:at + n], seg[0, at:at + n], pos[0, at:at + n] = ex, k, np.arange(n)
        tokens[k, :n], seg[k, :], pos[k, :] = ex, 1, np.arange(T)
        at += n
    run = jax.jit(lambda p, t, s, q: forward(args, p, t, segment_ids_bt=s, positions_bt=q)[0])
    out = np.asarray(run(params, tokens, seg, pos))
    at = 0
    for k, ex in enumerate(examples, 1):
        np.testing.assert_allclose(out[0, at:at + len(ex)], out[k, :len(ex)], atol=2e-5, rtol=1e-5)
        at += len(ex)
    # the reference can fail: without segment ids (one segment, positions 0..T-1) the second example sees the first
    unsegmented = np.asarray(run(params, tokens, np.ones_like(seg), np.broadcast_to(np.arange(T), seg.shape)))
    second = slice(lengths[0], sum(lengths[:2]))
    assert np.abs(unsegmented[0, second] - out[0, second]).max() > 1e-3
    # and the alone rows equal the model without segment ids at all (the plain forward path)
    plain = np.asarray(jax.jit(lambda p, t: forward(args, p, t)[0])(params, tokens[1:]))
    np.testing.assert_allclose(out[1:], plain, atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def chats():
    return list(data.generate("sft", factworld.World(0, 2000), "train", 12))


def test_packed_rows_hold_whole_examples_with_restarting_positions(tokenizer, chats):
    rows = next(iter(data.sft_dataset(chats, tokenizer, seq_len=192, batch_size=4, seed=0, repeat=False)))
    seen = []
    for b in range(rows["inputs"].shape[0]):
        for s in range(1, rows["segment_ids"][b].max() + 1):
            at = np.flatnonzero(rows["segment_ids"][b] == s)
            np.testing.assert_array_equal(rows["positions"][b, at], np.arange(len(at)))
            seen.append(tokenizer.decode(rows["inputs"][b, at]))
    expected = {"".join(data.render_piece(m["role"], m["content"]) for m in c["messages"]) for c in chats}
    # inputs drop each example's last token (the final newline is only a target)
    assert seen and all(s + "\n" in expected for s in seen)
    assert 0.3 < data.packing_efficiency([rows]) <= 1.0


def test_sft_loss_covers_response_tokens_only(tokenizer, chats, params):
    args = ARGS
    assert args.vocab_size == tokenizer.padded_vocab_size
    batch = next(iter(data.sft_dataset(chats, tokenizer, seq_len=192, batch_size=4, seed=0, repeat=False)))
    loss_fn = jax.jit(lambda p, b: losses.sft_loss(args, p, b)[1]["ce"])
    loss = float(loss_fn(params, batch))
    # hand reference: each chat alone, -log p of its assistant tokens only
    nll, count = 0.0, 0
    alone = jax.jit(lambda p, t: jax.nn.log_softmax(forward(args, p, t)[0], axis=-1))
    for b in range(batch["inputs"].shape[0]):
        for s in range(1, batch["segment_ids"][b].max() + 1):
            at = np.flatnonzero(batch["segment_ids"][b] == s)
            inputs, targets = batch["inputs"][b, at], batch["targets"][b, at]
            row = np.zeros((1, 192), np.int32)
            row[0, :len(at)] = inputs
            lp_t = np.asarray(alone(params, row))[0, np.arange(len(at)), targets]
            answer = batch["loss_mask"][b, at] > 0
            assert tokenizer.decode(targets[answer]).strip() in {c["messages"][-1]["content"] for c in chats}
            nll -= lp_t[answer].sum()
            count += answer.sum()
    np.testing.assert_allclose(loss, nll / count, rtol=1e-5)
    # changing every prompt target leaves the loss unchanged; changing a response target does not
    prompt = (batch["loss_mask"] == 0)
    scrambled = dict(batch, targets=np.where(prompt, (batch["targets"] + 7) % args.vocab_size, batch["targets"]))
    assert float(loss_fn(params, scrambled)) == pytest.approx(loss, rel=1e-6)
    one = np.argwhere(~prompt)[0]
    changed = dict(batch, targets=batch["targets"].copy())
    changed["targets"][tuple(one)] = (changed["targets"][tuple(one)] + 7) % args.vocab_size
    assert abs(float(loss_fn(params, changed)) - loss) > 1e-4


def test_bad_examples_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(data.PostDataError, match="bad.jsonl:1: an SFT example needs at least one assistant"):
        data.read_jsonl(str(path), "sft")
    path.write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n')
    with pytest.raises(data.PostDataError, match=r"messages\[0\] must be"):
        data.read_jsonl(str(path), "sft")
