"""The stages end to end on a tiny model: the SFT CLI with LoRA (adapters-only checkpoint, merged export), then
DPO and GRPO from its workdir, each writing the results.json the gates read."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mantis_jax import config as config_lib
from mantis_jax.cli import load_preset
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import forward
from mantis_jax.post import common, dpo, grpo, lora
from mantis_jax.train.checkpoint import Checkpointer, abstract_train_state, load_for_inference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {"model.d_model": 32, "memory.episodic.d_model": 32, "memory.semantic.dim": 32, "controller.d_model": 32,
        "critic.d_model": 32, "model.n_layers": 2, "controller.n_layers": 2, "model.n_heads": 4, "model.d_ff": 64,
        "model.max_seq_len": 128, "data.seq_len": 96, "data.batch_size": 8, "post.examples": 32,
        "post.eval_examples": 8, "train.total_steps": 2, "train.log_every": 1, "train.save_every": 2,
        "train.warmup_steps": 1, "logging.tensorboard": False, "checkpoint.async_save": False}


@pytest.fixture(scope="module")
def sft_run(tokenizer_path, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sft"))
    overrides = dict(TINY, **{"data.tokenizer": tokenizer_path, "post.lora_rank": 4, "post.lora_dropout": 0.1,
                              "post.lora_targets": "attn.wq,attn.wv,mlp.w_up"})
    env = dict(os.environ, MANTIS_NO_REEXEC="1", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-m", "mantis_jax.post.sft", f"--workdir={workdir}",
                          *(f"--config.{k}={v}" for k, v in overrides.items())], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, json.loads(out.stdout[out.stdout.index("{"):])


def test_sft_lora_writes_results_adapters_and_a_merged_model(sft_run):
    workdir, summary = sft_run
    results = json.load(open(os.path.join(workdir, "results.json")))["sft"]
    assert results["steps"] == 2 and 0.3 < results["packing_efficiency"] <= 1.0
    assert np.isfinite(results["val_loss"]) and 0.0 <= results["hallucination_rate"] <= 1.0
    assert results["optimizer_memory_ratio"] == pytest.approx(results["trainable_fraction"], rel=1e-3)
    assert summary["merged"] == os.path.join(workdir, common.MERGED_DIR)
    # the stage's checkpoint holds the adapters alone
    ckpt = Checkpointer(workdir, create=False, async_save=False)
    config = ckpt.config_at(2)
    base_abstract = abstract_train_state(config).params
    adapters_abstract = jax.eval_shape(lambda p: lora.init_adapters(p, lora.LoraSpec.from_config(config),
                                                                    jax.random.key(0)), base_abstract)
    restored = ckpt.manager.restore(2, args=__import__("orbax.checkpoint", fromlist=["args"]).args.Composite(
        state=__import__("orbax.checkpoint", fromlist=["args"]).args.StandardRestore()))
    ckpt.close()
    saved = restored["state"]["params"]
    assert jax.tree.structure(saved) == jax.tree.structure(adapters_abstract)
    # merged export = base (fresh init of the same seed) + adapters, through the Stage-1 reader
    merged_config, _, merged = load_for_inference(summary["merged"])
    assert merged_config.post.lora_rank == 0
    args = ModelArgs.from_config(config)
    base = common._init_boxed(args, jax.random.key(config.seed))
    base = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, base,
                        is_leaf=lambda x: hasattr(x, "names"))
    spec = lora.LoraSpec.from_config(config)
    tokens = np.arange(1, 17, dtype=np.int32)[None]
    adapter_path = forward(args, lora.apply(base, saved, spec), tokens)[0]
    np.testing.assert_allclose(np.asarray(forward(args, merged, tokens)[0]), np.asarray(adapter_path), atol=1e-5)


def _config(base_workdir, **changes):
    c = load_preset(os.path.join(ROOT, "configs", "post_dpo.py"))
    for key, value in dict(TINY, **changes).items():
        section, name = key.rsplit(".", 1)
        node = c
        for part in section.split("."):
            node = node[part]
        node[name] = value
    c.post.base = base_workdir
    return config_lib.validate(c)


def test_dpo_from_the_sft_workdir(sft_run, tmp_path):
    base, _ = sft_run
    summary = dpo.run(_config(base, **{"post.dpo_reference": "frozen", "train.lr": 1e-3}), str(tmp_path),
                      devices=jax.devices()[:2])
    results = json.load(open(tmp_path / "results.json"))["dpo"]
    assert summary["preference_accuracy_before"] == 0.0  # the policy is the reference: every margin is 0
    assert 0.0 <= results["preference_accuracy"] <= 1.0 and results["reference_bytes"] > 0
    assert np.isfinite(results["train_loss"]) and results["trainable_fraction"] == 1.0


def test_grpo_samples_groups_and_reports_hallucination_before_and_after(sft_run, tmp_path):
    base, _ = sft_run
    summary = grpo.run(_config(base, **{"post.grpo_group": 4, "post.grpo_prompts": 2, "post.grpo_max_new_tokens": 4,
                                        "post.lora_rank": 2, "post.lora_targets": "attn.wq"}),
                       str(tmp_path), devices=jax.devices()[:2])
    assert summary["rounds"] == 1 and summary["steps"] == 2  # grpo_updates = 2 updates per sampled round
    for when in ("before", "after"):
        assert 0.0 <= summary[f"{when}_hallucination_rate"] <= 1.0 and summary[f"{when}_qa_n"] == 8
    assert -1.0 <= summary["reward_first_round"] <= 1.0
    assert os.path.isdir(summary["merged"])
