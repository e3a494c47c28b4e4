"""Preprocess CLIs: pretokenize (text and HF) into token files, reproducible split, factworld, errors."""

import json
import os
import subprocess
import sys

import pytest

from mantis_jax.data import factworld as fw
from mantis_jax.data import preprocess, sources
from mantis_jax.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = list(fw.World(0, 300).iter_documents("train", 0, 30))
    (d / "a.txt").write_text("\n\n".join(docs[:20]) + "\n")
    (d / "b.txt").write_text("\n\n".join(docs[20:]) + "\n")
    return d, docs


def test_pretokenize_text_into_shards(tmp_path, corpus):
    d, docs = corpus
    out = tmp_path / "tokens"
    argv = ["pretokenize", "--input", str(d), "--out", str(out), "--vocab", "300", "--shard_docs", "12"]
    paths = preprocess.pretokenize(preprocess.build_parser().parse_args(argv))
    assert [os.path.basename(p) for p in paths] == ["part-00000.tok", "part-00001.tok", "part-00002.tok"]
    tok = Tokenizer.load(str(out))
    assert tok.vocab_size <= 300
    src = sources.TokenFileSource(str(out), tok)
    assert [h["n_docs"] for h in src.headers] == [12, 12, 6]
    assert [tok.decode(src[i]) for i in range(len(src))] == docs
    assert all(h["dtype"] == "uint16" for h in src.headers)


def test_pretokenize_with_given_tokenizer_and_hf(tmp_path, corpus):
    d, docs = corpus
    tok = Tokenizer.train(docs, 320)
    tok_path = tok.save(str(tmp_path / "tok"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:5]))
    out = tmp_path / "hf_tokens"
    preprocess.main(["pretokenize", "--hf", "json", "--hf_data_files", str(rows), "--out", str(out),
                     "--tokenizer", tok_path])
    src = sources.TokenFileSource(str(out), tok)
    assert [src[i].tolist() for i in range(len(src))] == [tok.encode(t) for t in docs[:5]]


def test_split_is_reproducible(tmp_path, corpus):
    d, docs = corpus

    def run(seed, name):
        preprocess.main(["split", "--input", str(d), "--out", str(tmp_path / name), "--val_fraction", "0.3",
                         "--seed", str(seed)])
        return tuple(list(sources.iter_text_documents([str(tmp_path / name / f"{p}.txt")]))
                     for p in ("train", "val"))

    train, val = run(0, "s0")
    assert (train, val) == run(0, "s0b")
    assert (train, val) != run(1, "s1")
    assert sorted(train + val) == sorted(docs) and 0 < len(val) < len(train)
    assert [x for x in docs if x in train] == train  # order kept


def test_factworld_command_and_module_entry(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mantis_jax.data.preprocess", "factworld", "--out",
                        str(tmp_path / "fw"), "--entities", "100", "--train_docs", "4", "--val_docs", "2",
                        "--test_docs", "2", "--qa_per_kind", "1", "--distance", "20"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    world = fw.World(0, 100)
    text = (tmp_path / "fw" / "test.txt").read_text()
    assert text.rstrip("\n").split("\n\n") == list(world.iter_documents("test", 0, 2))
    assert (tmp_path / "fw" / "qa_test_unanswerable.jsonl").exists()


def test_missing_or_empty_input_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        preprocess.main(["pretokenize", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit):
        preprocess.main(["pretokenize", "--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")])
    assert "empty" in capsys.readouterr().err
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(SystemExit):
        preprocess.main(["split", "--input", str(tmp_path / "one.txt"), "--out", str(tmp_path / "p"),
                         "--val_fraction", "0.5", "--seed", "3"])
    assert "at least one in each part" in capsys.readouterr().err

