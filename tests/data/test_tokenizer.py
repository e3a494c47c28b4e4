"""Tokenizer: round trip, special tokens, save/load fingerprint, mismatch error, answer mask vs char spans."""

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mantis_jax.data import factworld as fw
from mantis_jax.data import tokenizer as tk

TEXTS = ["Hello wörld — ünïcode ✓ and emoji 🦗!", "  leading spaces\n\nand\ttabs  ", "Q: Where?\nA: Brisk\n", ""]


@pytest.fixture(scope="module")
def world():
    return fw.World(seed=0, n_entities=300)


@pytest.fixture(scope="module")
def tok(world):
    return tk.Tokenizer.train(world.tokenizer_sample(400), 512)


def test_round_trip_and_special_ids(tok, world):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 512 and tok.padded_vocab_size == 512
    for text in TEXTS + [world.document("test", i).text for i in range(5)]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert max(ids, default=0) < tok.vocab_size
    ids = tok.encode("Brisk", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "Brisk" and tok.decode(ids, skip_special=False) == "<|bos|>Brisk<|eos|>"
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    for name in tk.SPECIAL_TOKENS:  # every special token is one id, never split
        assert tok.encode(name) == [tok.special_ids[name]]


def test_padded_vocab_is_multiple_of_128(world):
    small = tk.Tokenizer.train(world.tokenizer_sample(100), 300)
    assert small.vocab_size <= 300 and small.padded_vocab_size % 128 == 0
    assert small.padded_vocab_size - 128 < small.vocab_size <= small.padded_vocab_size
    with pytest.raises(ValueError, match="tokenizer_vocab"):
        tk.Tokenizer.train(["abc"], 100)


def test_save_load_and_mismatch(tok, world, tmp_path):
    path = tok.save(str(tmp_path / "ckpt"))
    assert path.endswith("tokenizer.json")
    loaded = tk.Tokenizer.load(str(tmp_path / "ckpt"))
    assert loaded.fingerprint() == tok.fingerprint()
    tk.check_compatible(loaded, tok.fingerprint())
    text = world.document("val", 0).text
    assert loaded.encode(text) == tok.encode(text)
    other = tk.Tokenizer.train(world.tokenizer_sample(400), 600)
    assert other.fingerprint() != tok.fingerprint()
    with pytest.raises(tk.TokenizerMismatchError, match="tokenizer.json saved beside the checkpoint"):
        tk.check_compatible(other, tok.fingerprint())
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tk.Tokenizer.load(str(tmp_path / "nowhere"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid HF tokenizer.json"):
        tk.Tokenizer.load(str(bad))


def test_foreign_tokenizer_json_gets_special_tokens(tmp_path):
    # A GPT-2-style tokenizer.json: byte-level BPE whose only special token is <|endoftext|>.
    raw = tokenizers.Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["some text to learn from"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    raw.save(str(tmp_path / "gpt2ish.json"))
    n_raw = raw.get_vocab_size()
    tok = tk.Tokenizer.load(str(tmp_path / "gpt2ish.json"))
    eot = raw.token_to_id("<|endoftext|>")
    assert tok.eos_id == eot and tok.bos_id == eot  # GPT-2 uses one token for both
    assert tok.pad_id >= n_raw  # added
    assert tok.vocab_size == n_raw + len(tk.SPECIAL_TOKENS) - 2
    assert tok.decode(tok.encode("learn from text")) == "learn from text"
    tok.save(str(tmp_path / "out"))
    assert tk.Tokenizer.load(str(tmp_path / "out")).fingerprint() == tok.fingerprint()


def _reference_answer_mask(tok, text, spans):
    """Marks tokens overlapping an answer span (with its leading space and line end), from decoded offsets."""
    ids = tok.encode(text, add_eos=True)
    pieces = [tok.decode([i], skip_special=False) for i in ids]
    ends = np.cumsum([len(p) for p in pieces[:-1]] + [1])
    starts = ends - np.array([len(p) for p in pieces[:-1]] + [1])
    mask = np.zeros(len(ids), np.float32)
    for a, b in spans:
        # The space after "A:" (a token of its own before some numbers) and the line end (newline, or end of
        # document) belong to the answer.
        mask[(starts < b + 1) & (ends > a - 1)] = 1.0
    return np.asarray(ids), mask


def test_answer_mask_matches_character_spans(tok, world):
    for i in range(30):
        doc = world.document("train", i)
        ids, ref = _reference_answer_mask(tok, doc.text, [s for _, _, s in doc.qa])
        np.testing.assert_array_equal(tok.answer_mask(ids), ref)
    # "A:" not at a line start is not an answer; an answer on the first line is.
    ids = np.asarray(tok.encode("PLAN A: go\nA: yes\nno"))
    assert tok.decode(ids[tok.answer_mask(ids) > 0]) == " yes\n"
    ids = np.asarray(tok.encode("A: first\nrest"))
    assert tok.decode(ids[tok.answer_mask(ids) > 0]) == " first\n"
