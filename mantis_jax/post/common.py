"""What every post-training stage shares: the base model, the trainable state, the jitted step, the loop.

A stage starts from `config.post.base`, the workdir of a Stage-1 run or of an earlier post stage (its model,
tokenizer and factworld settings are taken from the checkpoint; a LoRA stage's export in `<base>/merged` is used),
or from a fresh init when it is "". The trainable state is Stage 1's `TrainState` (step, params, opt_state):
    full fine-tuning   params = the whole model, sharded by the config's logical rules like Stage 1
    LoRA               params = the adapters alone (replicated); the base is a frozen argument of the step
so a full fine-tune's workdir is a Stage-1 workdir (`infer`, `load_for_inference` read it) and a LoRA run's
checkpoints hold the adapters only, with the merged model exported to `<workdir>/merged` at the end.
The step is `step(state, frozen, batch, rng) -> (state, metrics)`: one pure function, jitted once with the state
donated; `frozen` holds the arrays that never change (the LoRA base, a DPO/GRPO reference copy).
Each stage writes `<workdir>/results.json` ({stage: {metric: value}}), what the promotion gates read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mantis_jax import config as config_lib
from mantis_jax.data import factworld, pipeline
from mantis_jax.infer import qa
from mantis_jax.data.tokenizer import Tokenizer
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import abstract_params
from mantis_jax.parallel import mesh as mesh_lib
from mantis_jax.post import data as data_lib
from mantis_jax.post import lora as lora_lib
from mantis_jax.train import metrics as metrics_lib
from mantis_jax.train import state as state_lib
from mantis_jax.train.checkpoint import Checkpointer, CheckpointError, load_for_inference
from mantis_jax.train.state import TrainState

MERGED_DIR = "merged"
RESULTS = "results.json"
BASE_DATA_KEYS = ("factworld_", "tokenizer")  # data fields taken from the base run (its world and tokenizer)


class PostError(RuntimeError):
    """A post-training stage cannot go on (a non-finite loss); the message names the fix."""


@dataclasses.dataclass
class Run:
    config: ml_collections.ConfigDict
    workdir: str
    tokenizer: Tokenizer
    args: ModelArgs
    mesh: jax.sharding.Mesh
    rules: tuple
    lora: lora_lib.LoraSpec | None
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    base: Any  # the starting parameters, on the mesh
    param_sharding: Any
    batch_sharding: Any
    replicated: Any

    def put(self, batch: dict) -> dict:
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            sharding = mesh_lib.batch_sharding(self.mesh, self.rules, v.ndim)  # rows split like the batch
            out[k] = jax.make_array_from_process_local_data(sharding, v)
        return out

    def policy(self, trainable, frozen, rng=None):
        """The parameters the policy runs with: the trainable tree, or the base with the adapters applied."""
        if self.lora is None:
            return trainable
        return lora_lib.apply(frozen["base"], trainable, self.lora, rng)


def load_base(path: str) -> tuple[ml_collections.ConfigDict, Tokenizer, Any]:
    """(config, tokenizer, float32 params) of a workdir's latest model; a LoRA stage's merged export."""
    ckpt = Checkpointer(path, create=False, async_save=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise CheckpointError(f"config.post.base ({path!r}) holds no checkpoint steps; train it first")
        saved = ckpt.config_at(steps[-1])
    finally:
        ckpt.close()
    if "post" in saved and saved.post.lora_rank > 0:
        path = os.path.join(path, MERGED_DIR)
    return load_for_inference(path, step=None)


def prepare(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> Run:
    """Validates the config, loads (or initialises) the base model and builds the mesh and optimizer."""
    config = ml_collections.ConfigDict(config.to_dict())
    config_lib.validate(config)
    spec = lora_lib.LoraSpec.from_config(config)  # bad target names fail before any work
    os.makedirs(workdir, exist_ok=True)
    if config.post.base:
        base_config, tokenizer, params = load_base(config.post.base)
        config.model, config.moe = base_config.model, base_config.moe
        config_lib.set_shape(config, d_model=config.model.d_model, n_layers=config.model.n_layers,
                             n_experts=config.moe.n_experts, top_k=config.moe.top_k)  # the fields that follow it
        for key in base_config.data.keys():
            if key.startswith(BASE_DATA_KEYS):
                config.data[key] = base_config.data[key]
    else:
        tokenizer, params = pipeline.build_tokenizer(config), None
    config.model.vocab_size = tokenizer.padded_vocab_size
    config_lib.validate(config)
    args = ModelArgs.from_config(config)
    mesh = mesh_lib.make_mesh(config, devices)
    rules = mesh_lib.logical_rules(config)
    with mesh_lib.activate(mesh, rules):
        param_sh = mesh_lib.shardings_of(abstract_params(args), mesh, rules)
    if params is None:
        params, _ = mesh_lib.create_sharded(lambda k: _init_boxed(args, k), mesh, rules, jax.random.key(config.seed))
    else:
        params = jax.device_put(params, param_sh)
    with open(os.path.join(workdir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tokenizer.to_json())
    if spec is not None:
        lora_lib.targeted(params, spec)  # raises when the targets match no weight of this model
    return Run(config, workdir, tokenizer, args, mesh, rules, spec,
               state_lib.make_optimizer(config), state_lib.lr_schedule(config), params, param_sh,
               mesh_lib.batch_sharding(mesh, rules), mesh_lib.replicated(mesh))


def check_rows(run: Run, rows: int, what: str) -> None:
    """Batches are split over the mesh's batch axes: `rows` must divide evenly (else one error naming `what`)."""
    spec = run.batch_sharding.spec[0]
    axes = [a for a in (spec if isinstance(spec, tuple) else (spec,)) if a]
    shards = math.prod(run.mesh.shape[a] for a in axes)
    if rows % shards:
        raise config_lib.ConfigError(f"{what} ({rows} rows) must be divisible by the {shards} batch shards of the "
                                     f"mesh {dict(run.mesh.shape)}; change it or --config.mesh.data")


def _init_boxed(args: ModelArgs, rng):
    from mantis_jax.model.transformer import MantisLM  # noqa: PLC0415

    return MantisLM(args).init(rng, jnp.zeros((1, 8), jnp.int32))["params"]


def copy_tree(tree: Any) -> Any:
    """A copy in fresh buffers (a reference that must survive the donated trainable state)."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t))(tree)


def state_sharding(run: Run, abstract_params_tree: Any) -> Any:
    """Shardings of a TrainState over `abstract_params_tree`: full fine-tuning follows the parameters' logical
    rules (moments like their parameters), LoRA adapters and their moments are replicated."""
    if run.lora is None:
        with mesh_lib.activate(run.mesh, run.rules):
            boxed = jax.eval_shape(state_lib.init_state_fn(run.args, run.tx), jax.random.key(0))
            return mesh_lib.shardings_of(boxed, run.mesh, run.rules)
    abstract = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, run.tx.init(p)), abstract_params_tree)
    return jax.tree.map(lambda _: run.replicated, abstract)


def init_state(run: Run) -> tuple[TrainState, Any]:
    """(the fresh trainable state, its shardings)."""
    trainable = (copy_tree(run.base) if run.lora is None
                 else lora_lib.init_adapters(run.base, run.lora, jax.random.key(run.config.seed + 1)))
    sharding = state_sharding(run, jax.eval_shape(lambda t: t, trainable))
    make = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, run.tx.init(p)), out_shardings=sharding)
    return make(trainable), sharding


def make_step(run: Run, loss_fn: Callable, state_sh, frozen_example) -> Callable:
    """Jitted `step(state, frozen, batch, rng)`; loss_fn(params, frozen, batch, rng) -> (loss, metrics)."""

    def step(state: TrainState, frozen, batch: dict, rng):
        rng = jax.random.fold_in(rng, state.step)

        def objective(trainable):
            return loss_fn(run.policy(trainable, frozen, rng), frozen, batch, rng)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = run.tx.update(grads, state.opt_state, state.params)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), lr=run.schedule(state.step))
        return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), metrics

    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen_example)
    return jax.jit(step, in_shardings=(state_sh, frozen_sh, None, run.replicated),
                   out_shardings=(state_sh, run.replicated), donate_argnums=0)


def frozen_trees(run: Run, *, reference: bool) -> dict:
    """The step's frozen arguments: the LoRA base, and a reference model when the stage needs one (a LoRA
    policy's reference is its base: no copy)."""
    frozen = {}
    if run.lora is not None:
        frozen["base"] = run.base
    if reference:
        frozen["reference"] = run.base if run.lora is not None else copy_tree(run.base)
    return frozen


def restore_or_init(run: Run, ckpt: Checkpointer, iterator=None) -> tuple[int, TrainState, Any]:
    """(start step, state, its shardings): the workdir's newest checkpoint, else a fresh state."""
    state, sharding = init_state(run)
    if not ckpt.steps():
        return 0, state, sharding
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, sharding)
    start, state, data, _ = ckpt.restore(abstract)
    if iterator is not None and data.get("states"):
        pipeline.restore_iterator_state(iterator, data["states"][0])
    print(f"resumed from step {start} in {ckpt.directory}", flush=True)
    return start, state, sharding


def save(run: Run, ckpt: Checkpointer, step: int, state: TrainState, iterator, metrics: dict) -> None:
    data = [pipeline.iterator_state_to_json(iterator)] if iterator is not None else [json.dumps({})]
    ckpt.save(step, state, data_states=data, config=run.config, tokenizer=run.tokenizer,
              metrics={k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)})


def check_finite(metrics: dict, step: int, run: Run) -> None:
    if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
        raise PostError(f"the loss is {metrics['loss']} at step {step}: the stage diverged; lower "
                        f"--config.train.lr (now {run.config.train.lr})")


def train_loop(run: Run, ckpt: Checkpointer, writer, step_fn, state, frozen, next_batch, start: int, total: int,
               iterator, rng, *, on_batch: Callable[[dict], None] | None = None) -> tuple[TrainState, dict]:
    """Steps start..total-1 with logging (train.log_every), saving (train.save_every) and a finiteness check;
    `next_batch(state)` gives each step's host batch."""
    t = run.config.train
    last: dict = {}
    pending: list = []
    t0 = time.perf_counter()
    for step in range(start, total):
        host_batch = next_batch(state)
        if on_batch is not None:
            on_batch(host_batch)
        state, m = step_fn(state, frozen, run.put(host_batch), rng)
        pending.append(m)
        done = step + 1
        if done % t.log_every == 0 or done == total:
            host = [metrics_lib.to_host(x) for x in pending]
            for i, h in enumerate(host):
                check_finite(h, done - len(host) + i + 1, run)
            last = metrics_lib.mean_metrics(host)
            last["step_time_s"] = (time.perf_counter() - t0) / len(host)
            writer.write(done, last, prefix="train")
            print(f"step {done}/{total}: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                                                        if isinstance(v, float)), flush=True)
            pending, t0 = [], time.perf_counter()
        if done % t.save_every == 0 or done == total:
            save(run, ckpt, done, state, iterator, last)
    ckpt.wait()
    return state, last


def export_merged(run: Run, state: TrainState, frozen: dict) -> str | None:
    """LoRA: writes the merged model as a Stage-1 workdir `<workdir>/merged` (fresh optimizer moments), so every
    Stage-1 reader (infer, eval, the next stage's post.base) takes it. Returns its path (None without LoRA)."""
    if run.lora is None:
        return None
    path = os.path.join(run.workdir, MERGED_DIR)
    merged = jax.jit(lambda b, a: lora_lib.merge(b, a, run.lora))(frozen["base"], state.params)
    config = ml_collections.ConfigDict(run.config.to_dict())
    config.post.lora_rank = 0
    full = TrainState(state.step, merged, run.tx.init(merged))
    ckpt = Checkpointer(path, keep_best=False, async_save=False)
    try:
        ckpt.save(int(state.step), full, data_states=[json.dumps({})], config=config, tokenizer=run.tokenizer,
                  metrics={})
    finally:
        ckpt.close()
    return path


def trainable_report(run: Run, state: TrainState) -> dict:
    """Trainable parameters and optimizer-state bytes of this run, and what full fine-tuning would hold."""
    n_base = sum(int(x.size) for x in jax.tree.leaves(run.base))
    n_train = sum(int(x.size) for x in jax.tree.leaves(state.params))
    opt_bytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
    full_opt = jax.eval_shape(run.tx.init, run.base)
    full_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(full_opt))
    return {"trainable_params": n_train, "base_params": n_base, "trainable_fraction": n_train / n_base,
            "optimizer_bytes": opt_bytes, "full_ft_optimizer_bytes": full_bytes,
            "optimizer_memory_ratio": opt_bytes / full_bytes}


def write_results(workdir: str, stage: str, metrics: dict) -> str:
    """Adds {stage: metrics} to `<workdir>/results.json` (what `post.gates --results` reads)."""
    path = os.path.join(workdir, RESULTS)
    results = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    results[stage] = metrics
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    return path


def writer_for(run: Run):
    lg = run.config.logging
    return metrics_lib.MetricsWriter(run.workdir, jsonl=lg.jsonl, tensorboard=lg.tensorboard,
                                      enabled=jax.process_index() == 0)


def policy_params(run: Run, state, frozen) -> dict:
    """The policy's plain parameters on one device (merged when LoRA), for evaluation and decoding."""
    params = jax.jit(lambda t, f: run.policy(t, f))(state.params, frozen)
    return jax.device_put(params, jax.devices()[0])


def qa_metrics(run: Run, params, n: int, *, prefix: str = "", unanswerable: float = 0.25) -> dict:
    """Greedy factworld QA on `n` test questions (`unanswerable` of them unanswerable): accuracy, answerable
    accuracy and the hallucination rate (a non-"unknown" answer to an unanswerable question)."""
    records = list(data_lib.qa_records(factworld.world_from_config(run.config), "test", n, unanswerable))
    _, m = qa.answer_questions(run.config, run.tokenizer, params, records, max_new_tokens=8, batch_size=16)
    return {f"{prefix}qa_accuracy": m["accuracy"], f"{prefix}answerable_accuracy": m["answerable_accuracy"],
            f"{prefix}hallucination_rate": 1.0 - m["unanswerable_accuracy"], f"{prefix}qa_n": m["n"]}
