"""Config: every invariant raises a message naming its key; command-line overrides; preset sizes."""

import subprocess
import sys

import pytest

from mantis_jax import cli
from mantis_jax.config import ConfigError, default_config, from_json, set_d_model, to_json, validate
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.summary import param_counts


def _broken(**changes):
    c = default_config()
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.mark.parametrize("changes, message", [
    (dict(model__n_heads=3), r"config.model.n_heads \(3\) must divide config.model.d_model \(256\)"),
    (dict(model__n_kv_heads=3), r"config.model.n_kv_heads \(3\) must divide config.model.n_heads \(4\)"),
    (dict(moe__n_experts=2, moe__top_k=3), r"config.moe.top_k \(3\) must be <="),
    (dict(memory__semantic__dim=512), r"config.memory.semantic.dim \(512\) must equal config.model.d_model \(256\)"),
    (dict(memory__episodic__d_model=128), r"config.memory.episodic.d_model \(128\) must equal"),
    (dict(controller__reward_latency=-0.3), r"config.controller.reward_latency \(-0.3\) must be in \[0, 10\]"),
    (dict(controller__ppo_clip=1.5), r"config.controller.ppo_clip \(1.5\) must be in \(0, 1\)"),
    (dict(controller__exit_thresholds=(0.9, 0.5)), r"config.controller.exit_thresholds \(\(0.9, 0.5\)\) must be"),
    (dict(critic__abstain_threshold=1.5), r"config.critic.abstain_threshold \(1.5\) is a probability"),
    (dict(model__vocab_size=50257), r"config.model.vocab_size \(50257\) must be a multiple of 128; use 50304"),
    (dict(model__d_model=0), r"config.model.d_model \(0\) must be > 0"),
    (dict(data__batch_size=-1), r"config.data.batch_size \(-1\) must be > 0"),
    (dict(moe__impl="loop"), r"config.moe.impl \('loop'\) must be one of"),
    (dict(model__remat="some"), r"config.model.remat"),
    (dict(data__seq_len=4096), r"config.data.seq_len \(4096\) must be <= config.model.max_seq_len"),
    (dict(data__val_split=0.1, data__val_file="val.txt"), r"config.data.val_split and config.data.val_file"),
    (dict(mesh__data=-1, mesh__fsdp=-1), r"at most one -1"),
    (dict(mesh__rules=(("embed", "model"),)), r"unknown mesh axis 'model'"),
])
def test_each_invariant_names_its_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        validate(_broken(**changes))


def test_default_and_json_round_trip():
    c = validate(default_config())
    back = from_json(to_json(c))
    assert back.mesh.rules == c.mesh.rules
    assert to_json(back) == to_json(c)
    set_d_model(c, 512)
    validate(c)  # every aligned field followed


def test_overrides_from_command_line():
    c = cli.load_config(["prog", "--config=configs/tiny.py", "--config.moe.n_experts=8",
                         "--config.model.dtype=bfloat16"])
    assert c.moe.n_experts == 8 and c.model.dtype == "bfloat16" and c.name == "tiny"


@pytest.mark.parametrize("argv, message", [
    (["--config.moe.n_expert=8"], r"unknown config key config.moe.n_expert; did you mean config.moe.n_experts"),
    (["--config.moe.top_k=9"], r"config.moe.top_k \(9\) must be <= config.moe.n_experts \(4\)"),
    (["--config.moe.n_experts=eight"], r"n_experts"),
    (["--config.model.n_heads=5"], r"config.model.n_heads \(5\) must divide"),
])
def test_bad_overrides_fail_clearly(argv, message):
    with pytest.raises(ConfigError, match=message):
        cli.load_config(["prog", "--config=configs/tiny.py"] + argv)


def test_missing_preset_file():
    with pytest.raises(ConfigError, match="does not exist"):
        cli.load_config(["prog", "--config=configs/nope.py"])


def test_summary_cli_one_clear_error():
    ok = subprocess.run([sys.executable, "-m", "mantis_jax.model.summary", "--config=configs/tiny.py",
                         "--config.moe.n_experts=8"],
                        capture_output=True, text=True, check=True)
    assert "| tiny | 512 | 8 | 8 (4) | 1408 | 8 (top-2) |" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "mantis_jax.model.summary", "--config=configs/tiny.py",
                          "--config.moe.nope=1"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: unknown config key config.moe.nope (see mantis_jax/config.py for all keys)"]


def test_summary_cli_help_and_unknown_argument(capsys):
    from mantis_jax.model import summary

    summary.main(["summary", "--help"])
    assert capsys.readouterr().out.startswith("Parameter counts")
    with pytest.raises(SystemExit) as e:
        summary.main(["summary", "--confg=configs/tiny.py"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown arguments ['--confg=configs/tiny.py']: pass --config=<preset.py> [--config.x=y], "
        "or nothing for every preset")


# Targets at vocab 50304 (issue: foundation). base's active target of ~2B is below what top-2 of 8 experts allows
# (active >= total * K / E = 3B at 12B total), so its active count is checked against the exact formula instead.
TARGETS = {"micro": (10e6, 10e6), "tiny": (100e6, None), "small": (1e9, None), "base": (12e9, None)}


@pytest.mark.parametrize("preset", list(TARGETS))
def test_preset_parameter_counts(preset):
    config = validate(cli.load_preset(f"configs/{preset}.py"))
    assert config.model.vocab_size == 50304
    args = ModelArgs.from_config(config)
    counts = param_counts(args)
    total, active = TARGETS[preset]
    assert abs(counts["total"] / total - 1) <= 0.15, counts
    if active is not None:
        assert abs(counts["active"] / active - 1) <= 0.15, counts
    if preset == "base":
        assert args.n_experts == 8 and args.top_k == 2
        assert counts["active"] >= counts["total"] * args.top_k / args.n_experts > 2e9 * 1.15
    if preset in ("tiny", "small"):
        assert (args.n_experts, args.top_k) == (4, 2)
    if preset == "micro":
        assert args.n_experts == 1
