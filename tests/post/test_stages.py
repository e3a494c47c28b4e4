"""The stages end to end on a tiny model: the SFT CLI with LoRA (adapters-only checkpoint, merged export), then
DPO and GRPO from its workdir, each writing the results.json the gates read."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mantis_jax import config as config_lib
from mantis_jax.cli import load_preset
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import forward, init_params
from mantis_jax.post import common, dpo, grpo, lora, sft
from mantis_jax.train.checkpoint import Checkpointer, abstract_train_state, load_for_inference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {"model.d_model": 32, "memory.episodic.d_model": 32, "memory.semantic.dim": 32, "controller.d_model": 32,
        "critic.d_model": 32, "model.n_layers": 1, "controller.n_layers": 1, "model.n_heads": 4, "model.d_ff": 64,
        "model.max_seq_len": 128, "data.seq_len": 96, "data.batch_size": 8, "post.examples": 32,
        "post.eval_examples": 8, "train.total_steps": 2, "train.log_every": 1, "train.save_every": 2,
        "train.warmup_steps": 1, "logging.tensorboard": False, "checkpoint.async_save": False}


def _config(base_workdir="", preset="post_sft.py", **changes):
    c = load_preset(os.path.join(ROOT, "configs", preset))
    for key, value in dict(TINY, **changes).items():
        section, name = key.rsplit(".", 1)
        node = c
        for part in section.split("."):
            node = node[part]
        node[name] = value
    c.post.base = base_workdir
    return config_lib.validate(c)


@pytest.fixture(scope="module")
def sft_run(tokenizer_path, tmp_path_factory):
    """SFT with LoRA on the adapters of wq, wv and the FFN's up projection (the function the CLI runs)."""
    workdir = str(tmp_path_factory.mktemp("sft"))
    config = _config(**{"data.tokenizer": tokenizer_path, "post.lora_rank": 4, "post.lora_dropout": 0.1,
                        "post.lora_targets": "attn.wq,attn.wv,mlp.w_up"})
    return workdir, sft.run(config, workdir, devices=jax.devices()[:1])


def test_the_cli_reports_bad_lora_targets_in_one_line(tmp_path):
    env = dict(os.environ, MANTIS_NO_REEXEC="1", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, "-m", "mantis_jax.post.sft", f"--workdir={tmp_path}",
                          "--config.post.lora_rank=2", "--config.post.lora_targets=attn.wq,attn.wz"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: config.post.lora_targets names 'attn.wz'")


def test_sft_lora_writes_results_adapters_and_a_merged_model(sft_run):
    workdir, summary = sft_run
    results = json.load(open(os.path.join(workdir, "results.json")))["sft"]
    assert results["steps"] == 2 and 0.3 < results["packing_efficiency"] <= 1.0
    assert np.isfinite(results["val_loss"]) and 0.0 <= results["hallucination_rate"] <= 1.0
    assert results["optimizer_memory_ratio"] == pytest.approx(results["trainable_fraction"], rel=1e-2)  # + step counts
    assert summary["merged"] == os.path.join(workdir, common.MERGED_DIR)
    # the stage's checkpoint holds the adapters alone
    ckpt = Checkpointer(workdir, create=False, async_save=False)
    config = ckpt.config_at(2)
    base_abstract = abstract_train_state(config).params
    adapters_abstract = jax.eval_shape(lambda p: lora.init_adapters(p, lora.LoraSpec.from_config(config),
                                                                    jax.random.key(0)), base_abstract)
    restored = ckpt.manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    ckpt.close()
    saved = restored["state"]["params"]
    assert jax.tree.structure(saved) == jax.tree.structure(adapters_abstract)
    # merged export = base (fresh init of the same seed) + adapters, through the Stage-1 reader
    merged_config, _, merged = load_for_inference(summary["merged"])
    assert merged_config.post.lora_rank == 0
    args = ModelArgs.from_config(config)
    base = init_params(args, jax.random.key(config.seed))  # post.base "": the fresh init of config.seed
    spec = lora.LoraSpec.from_config(config)
    tokens = np.arange(1, 17, dtype=np.int32)[None]
    adapter_path = jax.jit(lambda p, a, t: forward(args, lora.apply(p, a, spec), t)[0])(base, saved, tokens)
    exported = jax.jit(lambda p, t: forward(args, p, t)[0])(merged, tokens)
    np.testing.assert_allclose(np.asarray(exported), np.asarray(adapter_path), atol=1e-5)


def test_dpo_from_the_sft_workdir(sft_run, tmp_path):
    base, _ = sft_run
    summary = dpo.run(_config(base, "post_dpo.py", **{"train.lr": 1e-3}), str(tmp_path), devices=jax.devices()[:2])
    results = json.load(open(tmp_path / "results.json"))["dpo"]
    assert summary["preference_accuracy_before"] == 0.0  # the policy is the reference: every margin is 0
    assert 0.0 <= results["preference_accuracy"] <= 1.0 and results["reference"] == "precomputed"
    assert results["reference_bytes"] == 2 * 4 * results["pairs"]  # two float32 log-probs per pair
    assert np.isfinite(results["train_loss"]) and results["trainable_fraction"] == 1.0


def test_grpo_samples_groups_and_reports_hallucination_before_and_after(sft_run, tmp_path):
    base, _ = sft_run
    changes = {"post.grpo_group": 4, "post.grpo_prompts": 2, "post.grpo_max_new_tokens": 4, "post.lora_rank": 2,
               "post.lora_targets": "attn.wq"}
    summary = grpo.run(_config(base, "post_grpo.py", **changes), str(tmp_path), devices=jax.devices()[:1])
    assert summary["rounds"] == 1 and summary["steps"] == 2  # grpo_updates = 2 updates per sampled round
    for when in ("before", "after"):
        assert 0.0 <= summary[f"{when}_hallucination_rate"] <= 1.0 and summary[f"{when}_qa_n"] == 8
    assert -1.0 <= summary["reward_first_round"] <= 1.0
    assert os.path.isdir(summary["merged"])
