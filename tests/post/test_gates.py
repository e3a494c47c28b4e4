"""Promotion gates: each direction, the missing-metric failure and the exit codes of the CLI."""

import json
import os
import subprocess
import sys

import pytest

from mantis_jax.post import gates

GATES = '''
import ml_collections

def get_config():
    c = ml_collections.ConfigDict()
    c.gates = ml_collections.ConfigDict({
        "up": (("sft.accuracy", "higher", 0.5),),
        "down": (("sft.val_loss", "lower", 1.0),),
        "both": (("sft.accuracy", "higher", 0.5), ("dpo.preference_accuracy", "higher", 0.6)),
    })
    return c
'''


@pytest.fixture()
def files(tmp_path):
    g = tmp_path / "gates.py"
    g.write_text(GATES)

    def results(obj):
        path = tmp_path / "results.json"
        path.write_text(json.dumps(obj))
        return str(path)

    return str(g), results


@pytest.mark.parametrize("gate,value,status", [("up", 0.5, 0), ("up", 0.49, 1), ("down", 1.0, 0), ("down", 1.01, 1)])
def test_each_direction(files, gate, value, status, capsys):
    g, results = files
    key = "accuracy" if gate == "up" else "val_loss"
    assert gates.main([f"--results={results({'sft': {key: value}})}", f"--gate={gate}", f"--gates={g}"]) == status
    assert capsys.readouterr().out.splitlines()[-1] == f"gate {gate}: {'PASS' if status == 0 else 'FAIL'}"


@pytest.mark.parametrize("dpo", [{}, {"preference_accuracy": None}, {"preference_accuracy": float("nan")},
                                 {"preference_accuracy": "0.9"}, {"preference_accuracy": True}])
def test_a_missing_or_unreadable_metric_fails(files, dpo, capsys):
    g, results = files
    path = results({"sft": {"accuracy": 0.9}, "dpo": dpo})
    assert gates.main([f"--results={path}", "--gate=both", f"--gates={g}"]) == 1
    out = capsys.readouterr().out
    assert "PASS sft.accuracy" in out and "FAIL dpo.preference_accuracy: missing" in out


def test_missing_input_exits_2(files, tmp_path, capsys):
    g, results = files
    good = results({"sft": {"accuracy": 0.9}})
    assert gates.main([f"--results={tmp_path / 'none.json'}", "--gate=up", f"--gates={g}"]) == 2
    assert gates.main([f"--results={good}", "--gate=nope", f"--gates={g}"]) == 2
    (tmp_path / "bad.json").write_text("{not json")
    assert gates.main([f"--results={tmp_path / 'bad.json'}", "--gate=up", f"--gates={g}"]) == 2
    (tmp_path / "bad_gates.py").write_text(GATES.replace('"higher", 0.5),)', '"upward", 0.5),)', 1))
    assert gates.main([f"--results={good}", "--gate=up", f"--gates={tmp_path / 'bad_gates.py'}"]) == 2
    err = capsys.readouterr().err
    assert "no results file" in err and "unknown gate 'nope'" in err and "is not JSON" in err
    assert "direction in ('higher', 'lower')" in err


def test_cli_exit_codes_and_the_bundled_gates(tmp_path):
    """The command users run, with the shipped configs/post_gates.py."""
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"sft": {"val_loss": 0.5, "answerable_accuracy": 0.9}}))
    env = dict(os.environ, MANTIS_NO_REEXEC="1")
    run = lambda *a: subprocess.run([sys.executable, "-m", "mantis_jax.post.gates", *a], capture_output=True,  # noqa
                                    text=True, env=env, timeout=60)
    ok = run(f"--results={results}", "--gate=sft_to_dpo")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    missing = run(f"--results={results}", "--gate=dpo_to_grpo")
    assert missing.returncode == 1 and "missing" in missing.stdout
    assert run(f"--results={tmp_path / 'x.json'}", "--gate=sft_to_dpo").returncode == 2
