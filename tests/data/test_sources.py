"""Sources: token files (memmap, dtypes, pickling), text caching, errors on missing/empty data, tfds and hf."""

import json
import os
import pickle

import numpy as np
import pytest

from mantis_jax import config as C
from mantis_jax.data import factworld as fw
from mantis_jax.data import pipeline, sources
from mantis_jax.data.sources import DataError
from mantis_jax.data.tokenizer import Tokenizer, TokenizerMismatchError

DOCS = ["Tavo lives in Brisk.\nQ: Where does Tavo live?\nA: Brisk", "second doc, one line",
        "third doc\nwith two lines", "ünïcode ✓ fourth"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(fw.World(0, 300).tokenizer_sample(300), 400)


def _config(tmp_path, **data):
    cfg = C.default_config()
    cfg.data.cache_dir = str(tmp_path / "cache")
    for k, v in data.items():
        cfg.data[k] = v
    return C.validate(cfg)


def test_token_file_round_trip_and_dtype(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 70000, size=n) for n in (5, 0, 17, 1)]
    for vocab, dtype in ((1000, np.uint16), (70000, np.uint32)):
        docs_v = [d % vocab for d in docs]
        path = str(tmp_path / f"v{vocab}.tok")
        header = sources.write_token_file(path, iter(docs_v), vocab_size=vocab, fingerprint="abc")
        assert header["dtype"] == np.dtype(dtype).name and header["n_docs"] == 4 and header["n_tokens"] == 23
        token_bytes = 23 * np.dtype(dtype).itemsize
        assert header["offsets_at"] == sources.HEADER_BYTES + token_bytes + (-token_bytes) % 8
        assert os.path.getsize(path) == header["offsets_at"] + 5 * 8  # header + tokens + offsets, nothing else
        src = sources.TokenFileSource(path)
        assert len(src) == 4 and src.n_tokens == 23
        for i, d in enumerate(docs_v):
            np.testing.assert_array_equal(src[i], d)
            assert src[i].dtype == np.int32
        assert isinstance(src._maps[0][0], np.memmap)  # read through a map, not loaded
        clone = pickle.loads(pickle.dumps(src))
        assert len(pickle.dumps(src)) < 2000 and clone._maps is None
        np.testing.assert_array_equal(clone[2], docs_v[2])
        with pytest.raises(IndexError):
            src[4]
    with pytest.raises(DataError, match="out of range for vocab"):
        sources.write_token_file(str(tmp_path / "x.tok"), [[5, 1000]], vocab_size=1000)


def test_directory_of_token_files_and_fingerprint_check(tmp_path, tok):
    d = tmp_path / "toks"
    sources.pretokenize(DOCS[:2], tok, str(d / "part-00000.tok"))
    sources.pretokenize(DOCS[2:], tok, str(d / "part-00001.tok"))
    src = sources.TokenFileSource(str(d), tok)
    assert [src[i].tolist() for i in range(len(src))] == [tok.encode(t) for t in DOCS]
    other = Tokenizer.train(fw.World(1, 300).tokenizer_sample(200), 450)
    with pytest.raises(TokenizerMismatchError, match="token file"):
        sources.TokenFileSource(str(d), other)
    with pytest.raises(DataError, match="no \\*.tok token files"):
        sources.TokenFileSource(str(tmp_path))
    (tmp_path / "plain.tok").write_text("hello")
    with pytest.raises(DataError, match="not a mantis token file"):
        sources.TokenFileSource(str(tmp_path / "plain.tok"))


@pytest.mark.parametrize("separator,expected", [
    ("blank_line", DOCS),
    ("line", [line for d in DOCS for line in d.split("\n")]),
    ("file", ["\n\n".join(DOCS)]),
])
def test_text_source_streams_into_cached_token_file(tmp_path, tok, separator, expected):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(DOCS) + "\n\n\n", encoding="utf-8")
    cfg = _config(tmp_path, source="text", path=str(path), doc_separator=separator)
    src = sources.open_source(cfg, tok)
    assert [tok.decode(src[i]) for i in range(len(src))] == expected
    cached = src.paths[0]
    assert cached.startswith(cfg.data.cache_dir)
    mtime = os.path.getmtime(cached)
    assert sources.open_source(cfg, tok).paths == [cached] and os.path.getmtime(cached) == mtime  # reused


def test_missing_and_empty_data_give_clear_errors(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist.*factworld"):
        sources.open_source(_config(tmp_path, source="text", path=str(tmp_path / "missing.txt")), tok)
    with pytest.raises(DataError, match="config.data.path is empty"):
        sources.open_source(_config(tmp_path, source="text", path=""), tok)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        sources.open_source(_config(tmp_path, source="text", path=str(tmp_path / "empty.txt")), tok)
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(DataError, match="no documents"):
        sources.open_source(_config(tmp_path, source="text", path=str(tmp_path / "blank.txt")), tok)
    with pytest.raises(DataError, match="does not exist.*pretokenize"):
        sources.open_source(_config(tmp_path, source="tokenized", path=str(tmp_path / "none")), tok)
    with pytest.raises(DataError, match="doc_separator"):
        list(sources.iter_text_documents([str(tmp_path / "blank.txt")], "sentence"))


def test_factworld_source_is_generated_on_demand(tmp_path, tok):
    cfg = _config(tmp_path, factworld_entities=300, factworld_docs=50)
    src = sources.open_source(cfg, tok)
    world = fw.world_from_config(cfg)
    assert len(src) == 50
    assert src[7].tolist() == tok.encode(world.document("train", 7).text)
    val = sources.open_source(cfg, tok, split="val")
    assert len(val) == cfg.data.factworld_val_docs
    assert val[0].tolist() == tok.encode(world.document("val", 0).text)
    assert len(pickle.dumps(src)) < 200_000  # the world is a recipe, not a table


def test_tfds_array_record_source(tmp_path, tok):
    import tensorflow_datasets as tfds

    class MantisTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self,
                                         features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(DOCS), "validation": self._generate_examples(DOCS[:1])}

        def _generate_examples(self, docs):
            for i, d in enumerate(docs):
                yield i, {"text": d}

    data_dir = tmp_path / "tfds"
    MantisTinyText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    by_dir = sources.TfdsSource(str(data_dir / "mantis_tiny_text" / "1.0.0"), split="train", tokenizer=tok)
    cfg = _config(tmp_path, source="tfds", path="mantis_tiny_text", data_dir=str(data_dir))
    by_name = sources.open_source(cfg, tok)
    for src in (by_dir, by_name):  # array_record keeps no order guarantee across shards: compare as sets
        assert sorted(tok.decode(src[i]) for i in range(len(src))) == sorted(DOCS)
    cfg.data.val_file, cfg.data.seq_len, cfg.data.batch_size = "validation", 8, 2
    val = pipeline.make_datasets(cfg, tok).val_batches()
    stream = np.concatenate([np.concatenate([v["inputs"][r], v["targets"][r, -1:]]) for v in val for r in range(2)])
    assert tok.decode(stream).startswith(DOCS[0])  # the validation split holds DOCS[:1]
    with pytest.raises(DataError, match="text_field"):
        sources.TfdsSource(str(data_dir / "mantis_tiny_text" / "1.0.0"), split="train", tokenizer=tok,
                           text_field="body")
    with pytest.raises(DataError, match="cannot open TFDS"):
        sources.TfdsSource("mantis_no_such_dataset", split="train", tokenizer=tok, data_dir=str(data_dir))


def test_hf_streaming_source_on_local_files(tmp_path, tok):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    cfg = _config(tmp_path, source="hf", path="json", hf_data_files=str(rows))
    src = sources.open_source(cfg, tok)
    assert [tok.decode(src[i]) for i in range(len(src))] == DOCS
    cfg.data.text_field = "body"
    with pytest.raises(DataError, match="no field 'body'"):
        sources.open_source(cfg, tok)
