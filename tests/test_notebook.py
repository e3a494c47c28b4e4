"""The checkpoint-inspection notebook, executed in a real Jupyter kernel (nbclient + ipykernel) against a tiny real
training run: every cell runs, prints what it should, and the figures cell renders a PNG."""

import base64
import os

import jax
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

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


def test_notebook_runs_in_a_kernel(workdir, monkeypatch, tmp_path):
    monkeypatch.setenv("MANTIS_WORKDIR", workdir)  # the kernel inherits this process's environment
    monkeypatch.setenv("MANTIS_NO_REEXEC", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 5 and all(not c.outputs for c in code), "commit the notebook without outputs"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert "steps: [2, 4]  latest: 4" in text
    assert "embedding" in text and "expert load" in text and "tokens/s" in text
    figures = [o for c in code for o in c.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(figures) == 1 and base64.b64decode(figures[0].data["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    gen_cell = next(c for c in code if "Generator" in c.source)
    completions = [line for o in gen_cell.outputs if o.output_type == "stream" for line in o.text.splitlines()
                   if line.startswith(("'", '"'))]
    assert len(completions) == 2  # repr() of the two greedy completions
