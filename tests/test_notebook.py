"""The checkpoint-inspection notebook runs, cell by cell, against a tiny real training run."""

import json
import os

import jax
import numpy as np
import pytest

from mantis_jax.config import default_config, set_shape
from mantis_jax.data.tokenizer import Tokenizer
from mantis_jax.train.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "inspect_checkpoint.ipynb")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb")
    rng = np.random.default_rng(0)
    words = ["Q:", "A:", "Where", "does", "Tavo", "live", "Brisk", "the", "river", "blue", "stone"]
    text = "\n\n".join(" ".join(rng.choice(words, 12)) for _ in range(80))
    (root / "train.txt").write_text(text)
    tok = Tokenizer.train(text.split("\n\n"), 300)
    tok.save(str(root / "tokenizer.json"))
    c = default_config()
    set_shape(c, d_model=32, n_layers=2, n_experts=2, top_k=1)
    c.model.n_heads, c.model.n_kv_heads, c.model.d_ff, c.model.max_seq_len = 4, 2, 64, 64
    c.data.source, c.data.path, c.data.tokenizer = "text", str(root / "train.txt"), str(root / "tokenizer.json")
    c.data.cache_dir, c.data.val_split, c.data.seq_len, c.data.batch_size = str(root / "cache"), 0.1, 32, 4
    c.train.total_steps, c.train.warmup_steps, c.train.log_every = 4, 1, 1
    c.train.eval_every, c.train.save_every, c.train.eval_steps, c.train.peak_flops = 2, 2, 1, 1e10
    c.mesh.data, c.logging.progress = 1, False
    train(c, str(root / "run"), devices=jax.devices()[:1])
    return str(root / "run")


def test_notebook_cells_run(workdir, monkeypatch, capsys):
    monkeypatch.setenv("MANTIS_WORKDIR", workdir)
    cells = [c for c in json.load(open(NOTEBOOK))["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 4
    scope: dict = {}
    for cell in cells:
        exec(compile("".join(cell["source"]), NOTEBOOK, "exec"), scope)  # noqa: S102 (our own notebook)
    out = capsys.readouterr().out
    assert "steps: [2, 4]" in out
    assert "embedding" in out and "expert load" in out
    assert scope["info"]["latest"] == 4
    assert len(scope["texts"]) == 2
