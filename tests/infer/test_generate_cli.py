"""The generate CLI on a real (tiny) orbax checkpoint: single prompt, prompts file to JSONL, interactive commands,
`python -m mantis_jax.generate --quantize=int8` as a process, and one-line errors for bad input."""

import io
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.config import default_config, set_shape, validate
from mantis_jax.data import factworld as fw
from mantis_jax.data import tokenizer as tk
from mantis_jax.infer import generate_cli, runner
from mantis_jax.infer.early_exit import EarlyExit
from mantis_jax.model.args import ModelArgs
from mantis_jax.train import checkpoint as ckpt_lib
from mantis_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir with one checkpoint step of a ~30K-parameter model (random weights)."""
    tokenizer = tk.Tokenizer.train(fw.World(seed=0, n_entities=60).tokenizer_sample(40), 384)
    config = default_config()
    set_shape(config, d_model=32, n_layers=2, n_experts=1, top_k=1)
    config.model.update(vocab_size=tokenizer.padded_vocab_size, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=96,
                        tie_embeddings=False)
    config.data.update(seq_len=32, factworld_entities=60)
    validate(config)
    args = ModelArgs.from_config(config)
    abstract = nn.unbox(jax.eval_shape(state_lib.init_state_fn(args, state_lib.make_optimizer(config)),
                                       jax.random.key(0)))
    rng = np.random.default_rng(0)

    def fill(path, s):  # random weights without an init compile; norm scales 1, the step counter 0
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", "")))
        if not jnp.issubdtype(s.dtype, jnp.floating):
            return jnp.zeros(s.shape, s.dtype)
        if name == "scale":
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rng.normal(0.0, 1.0 if name == "embedding" else 0.2, s.shape), s.dtype)

    state = jax.tree_util.tree_map_with_path(fill, abstract)
    path = str(tmp_path_factory.mktemp("run"))
    ck = ckpt_lib.Checkpointer(path, async_save=False)
    ck.save(1, state, data_states=["{}"], config=config, tokenizer=tokenizer, metrics={})
    ck.close()
    return path


@pytest.fixture(scope="module")
def reference(workdir):
    """A Generator on the same checkpoint, same batch shape as the CLI runs below (so compilations are shared)."""
    config, tokenizer, params = ckpt_lib.load_for_inference(workdir)
    return runner.Generator(ModelArgs.from_config(config), params, tokenizer, batch_size=2)


def cli(argv, stdin=""):
    out = io.StringIO()
    generate_cli.main(["generate", *argv], inp=io.StringIO(stdin), out=out)
    return out.getvalue()


def test_single_prompt(workdir, reference):
    out = cli([f"--checkpoint={workdir}", "--prompt=Q: Where does Bo live?", f"--max_new_tokens={N}",
               "--batch_size=2"]).splitlines()
    expect, _ = reference.generate(["Q: Where does Bo live?"], max_new_tokens=N)
    assert "\n".join(out[:-1]) == expect[0]
    assert "tokens/s" in out[-1] and "time to first token" in out[-1] and out[-1].startswith("1 prompts")


def test_early_exit_flags(workdir, reference):
    """--exit_threshold=0 exits every token after --min_exit_layer: the 1-layer model's tokens (the early-exit
    tests check that equality against the truncated model), and the stats line counts the layers run."""
    out = cli([f"--checkpoint={workdir}", "--prompt=The cat", f"--max_new_tokens={N}", "--batch_size=2",
               "--exit_threshold=0", "--min_exit_layer=1"]).splitlines()
    expect, stats = reference.generate(["The cat"], max_new_tokens=N, exit=EarlyExit(1), exit_threshold=0.0)
    assert "\n".join(out[:-1]) == expect[0]
    n = stats.new_tokens
    assert stats.layers == 2 + (n - 1) and f"{stats.mean_layers():.2f} layers/token" in out[-1]


def test_prompts_file_to_jsonl(workdir, reference, tmp_path):
    prompts = ["The cat", "A: Brisk\\nQ: Who", "Hello there"]
    (tmp_path / "p.txt").write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")
    out = cli([f"--checkpoint={workdir}", f"--prompts_file={tmp_path / 'p.txt'}", f"--output={tmp_path / 'o.jsonl'}",
               f"--max_new_tokens={N}", "--batch_size=2", "--temperature=0.7", "--top_k=5", "--seed=3"])
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    texts = [p.replace("\\n", "\n") for p in prompts]
    assert [r["prompt"] for r in rows] == texts
    expect, _ = reference.generate(texts, max_new_tokens=N, temperature=0.7, top_k=5, seed=3)
    assert [r["completion"] for r in rows] == expect
    assert "wrote 3 completions" in out and "3 prompts" in out


def test_interactive(workdir, reference):
    lines = ["help", "set temperature 0", "set top_k -1", "set bogus 1", "set max_new_tokens 6", "The cat",
             "stats", "quit", "never read"]
    out = cli([f"--checkpoint={workdir}", "--interactive", "--batch_size=2"], "\n".join(lines) + "\n")
    expect, _ = reference.generate(["The cat"], max_new_tokens=N)
    assert out.count("commands: set <param> <value>") == 2
    assert "temperature = 0.0" in out and "max_new_tokens = 6" in out
    assert "error: top_k (-1) must be an integer >= 0" in out
    assert "error: usage: set <param> <value>" in out
    assert expect[0] in out and "stats: 1 prompts" in out and "'max_new_tokens': 6" in out


@pytest.mark.slow
def test_module_entry_point_with_int8(workdir):
    proc = subprocess.run([sys.executable, "-m", "mantis_jax.generate", f"--checkpoint={workdir}", "--prompt=Hi",
                           "--max_new_tokens=3", "--quantize=int8", "--batch_size=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("int8: weights") and "MiB" in first and "perplexity" in first
    assert "tokens/s" in proc.stdout.splitlines()[-1]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_flags(flag, capsys):
    out = io.StringIO()
    with pytest.raises(SystemExit) as e:
        generate_cli.main(["generate", flag], out=out)
    assert e.value.code == 0
    text = out.getvalue()
    assert text.startswith("The generate CLI") and "--checkpoint" in text and "--quantize" in text
    assert "--max_new_tokens" in text and "weight-only quantization" in text


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint=/nonexistent/run", "--prompt=x"], "is not a directory"),
    (["--prompt=x"], "--checkpoint is required"),
    (["--checkpoint={tmp}", "--prompt=x", "--interactive"], "exactly one of"),
    (["--checkpoint={tmp}", "--prompt=x", "--temperature=-1"], "temperature (-1.0) must be >= 0"),
    (["--checkpoint={tmp}", "--prompt=x", "--top_p=2"], "top_p"),
    (["--checkpoint={tmp}", "--prompt=x", "--max_new_tokens=0"], "max_new_tokens"),
    (["--checkpoint={tmp}", "--prompts_file={tmp}/empty.txt"], "holds no prompts"),
    (["--checkpoint={tmp}", "--prompt=x", "--quantize=int4"], "quantize"),
    (["--checkpoint={tmp}", "--prompt=x", "--exit_threshold=1.5"], "--exit_threshold (1.5) must be in [0, 1]"),
    (["--checkpoint={tmp}", "--prompt=x"], "has no checkpoints"),
])
def test_bad_input_is_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SystemExit) as e:
        cli([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
