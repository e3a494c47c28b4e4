"""The Stage-1 training loop: `train(config, workdir, *, resume=None) -> summary dict`.

Data enters from the grain pipeline (`data.pipeline.make_datasets`) as per-process numpy batches, which become
global arrays on the mesh (`jax.make_array_from_process_local_data` with the batch sharding). The state is created
sharded (`parallel.mesh.create_sharded` semantics: `jax.eval_shape` then a jitted init with out_shardings) and
updated by one jitted, donated `train_step(state, batch, rng)` with explicit shardings. Each optimizer step
consumes `train.grad_accum` batches of `data.batch_size` rows. What leaves: metrics (JSONL + TensorBoard +
progress bar), orbax checkpoints in `<workdir>/checkpoints`, and the summary dict the function returns.

Re-running with the same workdir resumes from its newest readable checkpoint (`resume=` names another workdir),
exactly: the state, the data iterator position and the early-stopping counters are all restored, and the step rng
is `fold_in(rng, step)`. Stops: total steps reached, early stop (`train.patience` evals without a val loss below
best - `train.min_delta`), the time budget (`train.max_minutes`), Ctrl-C (saves, then exits cleanly) or a
non-finite loss (raises TrainingError; the last good checkpoint stays the newest).
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from mantis_jax import config as config_lib
from mantis_jax.data import pipeline
from mantis_jax.data.tokenizer import FILENAME as TOKENIZER_FILENAME, Tokenizer, check_compatible
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.summary import flops_per_token, param_counts
from mantis_jax.parallel import mesh as mesh_lib
from mantis_jax.parallel import throughput
from mantis_jax.train import metrics as metrics_lib
from mantis_jax.train import state as state_lib
from mantis_jax.train.checkpoint import Checkpointer, CheckpointError, config_differences
from mantis_jax.train.step import make_eval_step, make_train_step

OnLog = Callable[[int, str, dict], None]
# The train fields the compiled step depends on (the optimizer and its schedule); the others (log/eval/save
# cadence, patience, budgets) change nothing inside jit, so changing them reuses the compiled step.
STEP_KEYS = ("optimizer", "lr", "min_lr_ratio", "warmup_steps", "total_steps", "steps_per_epoch", "epochs",
             "weight_decay", "b1", "b2", "eps", "grad_clip", "grad_accum")


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says where the last good checkpoint is."""


@functools.lru_cache(maxsize=4)
def compiled_steps(args: ModelArgs, train_json: str, mesh: jax.sharding.Mesh, rules: tuple) -> dict[str, Any]:
    """The optimizer, shardings and jitted init / train / eval functions of one (model, optimizer, mesh).

    Cached so that calling `train()` again in one process (notebooks, the demo, tests) reuses the compiled step."""
    config = ml_collections.ConfigDict({"train": json.loads(train_json)})
    tx, schedule = state_lib.make_optimizer(config), state_lib.lr_schedule(config)
    init_boxed = state_lib.init_state_fn(args, tx)
    abstract = state_lib.abstract_state_of(args, tx, mesh, rules)
    state_sh = jax.tree.map(lambda x: x.sharding, abstract)
    batch_sh = mesh_lib.batch_sharding(mesh, rules)
    repl = mesh_lib.replicated(mesh)
    step = make_train_step(args, tx, schedule, config.train.grad_accum)
    return {
        "tx": tx, "abstract_state": abstract, "state_sharding": state_sh, "batch_sharding": batch_sh,
        "init": jax.jit(lambda rng: mesh_lib.unbox_values(init_boxed(rng)), out_shardings=state_sh),
        "train_step": jax.jit(step, in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl),
                              donate_argnums=0),
        "eval_step": jax.jit(make_eval_step(args), in_shardings=(state_sh.params, batch_sh), out_shardings=repl),
        "all_finite": jax.jit(lambda tree: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                                              for x in jax.tree.leaves(tree)])),
                              in_shardings=(state_sh.params,), out_shardings=repl),
    }


def _gather_strings(text: str) -> list[str]:
    """Every process's string, in process order (the data iterator states a checkpoint holds)."""
    if jax.process_count() == 1:
        return [text]
    from jax.experimental import multihost_utils  # noqa: PLC0415

    raw = np.frombuffer(text.encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [bytes(row[:n]).decode() for row, n in zip(rows, sizes)]


def _check_batch_fits(config, mesh: jax.sharding.Mesh, sharding) -> None:
    spec = sharding.spec[0]
    axes = [a for a in (spec if isinstance(spec, tuple) else (spec,)) if a]
    shards = math.prod(mesh.shape[a] for a in axes)
    rows = config.data.batch_size
    if rows % shards:
        raise config_lib.ConfigError(
            f"config.data.batch_size ({rows}) must be divisible by the {shards} batch shards of the mesh "
            f"(mesh axes {axes} of {dict(mesh.shape)}); use a multiple of {shards} or shrink --config.mesh.data")


class _Interrupt:
    """Ctrl-C (SIGINT) sets a flag the loop checks between steps, so the state is saved whole; a second Ctrl-C
    interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _prepare_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy (the CLI's is locked)
    return config_lib.validate(config)


def _tokenizer_and_start(config, source: Checkpointer) -> tuple[Tokenizer, int | None]:
    """The tokenizer (the checkpoint's when resuming) and the newest saved step of `source` (None: fresh)."""
    steps = source.steps()
    if not steps:
        return pipeline.build_tokenizer(config), None
    saved = source.tokenizer_at(steps[-1])
    if config.data.tokenizer:
        given = pipeline.build_tokenizer(config)
        check_compatible(given, saved.fingerprint(), what=f"checkpoint in {source.directory}")
    return saved, steps[-1]


def train(config: ml_collections.ConfigDict, workdir: str, *, resume: str | None = None,
          on_log: OnLog | None = None, devices=None) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming from it, or from the workdir `resume`); returns the run's summary.

    `on_log(step, split, metrics)` is called at every train log ("train") and evaluation ("val"). `devices`
    defaults to all devices (the mesh is `config.mesh`, `data=-1` filling them). The summary holds "step",
    "stopped" (done | early_stop | time_budget | interrupted), the last "train" and "val" metrics, "best_val_loss",
    "best_step", "tokens_per_s", "mfu", "peak_flops", "bytes_per_param" (optimizer state), "params",
    "resumed_from" and the final "state" (the TrainState, on the mesh)."""
    config = _prepare_config(config)
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer.from_config(workdir, config)
    source = ckpt
    if resume:
        source = Checkpointer(resume, create=False, async_save=False)
        if not source.steps():
            raise CheckpointError(f"--resume={resume!r} holds no checkpoint steps; pass the workdir of a run that "
                                  "saved at least one (train.save_every)")
    try:
        return _train(config, workdir, ckpt, source, on_log, devices)
    finally:
        ckpt.close()
        if source is not ckpt:
            source.close()


def _train(config, workdir, ckpt: Checkpointer, source: Checkpointer, on_log, devices) -> dict[str, Any]:
    t = config.train
    tokenizer, saved_step = _tokenizer_and_start(config, source)
    config.model.vocab_size = tokenizer.padded_vocab_size
    config_lib.validate(config)
    if saved_step is not None:
        diffs = config_differences(source.config_at(saved_step), config)
        if diffs:
            raise CheckpointError(f"the checkpoint in {source.directory} was made with another config: "
                                  f"{'; '.join(diffs)}. Resume with the same settings, or start a new --workdir")
    primary = jax.process_index() == 0
    if primary:
        with open(os.path.join(workdir, TOKENIZER_FILENAME), "w", encoding="utf-8") as f:
            f.write(tokenizer.to_json())
    datasets = pipeline.make_datasets(config, tokenizer, process_index=jax.process_index(),
                                      process_count=jax.process_count())
    iterator = iter(datasets.train)
    val_batches = datasets.val_batches(t.eval_steps) if t.eval_every > 0 else []

    args = ModelArgs.from_config(config)
    mesh = mesh_lib.make_mesh(config, devices)
    rules = mesh_lib.logical_rules(config)
    fns = compiled_steps(args, json.dumps({k: t[k] for k in STEP_KEYS}, sort_keys=True), mesh, rules)
    _check_batch_fits(config, mesh, fns["batch_sharding"])
    n_params = param_counts(args)["total"]  # outside the mesh context: it traces the model abstractly
    total = state_lib.total_steps(config)
    flops = flops_per_token(args, config.data.seq_len)["active"]
    rng_init, rng_steps = jax.random.split(jax.random.key(config.seed))

    def put(batch: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(fns["batch_sharding"], np.asarray(v))
                for k, v in batch.items()}

    def next_batch() -> dict:
        parts = [next(iterator) for _ in range(t.grad_accum)]
        return put({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})

    with mesh_lib.activate(mesh, rules):
        abstract = fns["abstract_state"]
        early = {"best_val_loss": math.inf, "best_step": 0, "evals_without_improvement": 0}
        restored = source.restore(abstract) if saved_step is not None else None
        if restored is not None:
            start, state, data, meta = restored
            saved = meta["metrics"]
            early.update({k: math.inf if saved.get(k) is None else saved[k] for k in early if k in saved})
            if data["process_count"] == jax.process_count():
                pipeline.restore_iterator_state(iterator, data["states"][jax.process_index()])
            else:
                print(f"warning: the checkpoint's data position is for {data['process_count']} processes, this "
                      f"run has {jax.process_count()}: the data iterator restarts from the beginning", flush=True)
        else:
            start, state = 0, fns["init"](rng_init)
        peak = t.peak_flops or metrics_lib.measure_peak_flops()
        writer = metrics_lib.MetricsWriter(workdir, jsonl=config.logging.jsonl,
                                           tensorboard=config.logging.tensorboard, enabled=primary)
        writer.write(start, {"params": n_params, "flops_per_token": flops, "peak_flops": peak,
                             "optimizer_bytes_per_param": state_lib.bytes_per_param(abstract),
                             "devices": mesh.size}, prefix="setup")
        loop = _Loop(config, ckpt, fns, tokenizer, writer, on_log, peak, flops, iterator, val_batches, put, early)
        try:
            summary = loop.run(state, start, total, next_batch, rng_steps)
        finally:
            writer.close()
    summary.update(resumed_from=start if restored is not None else None, workdir=workdir,
                   params=n_params, bytes_per_param=state_lib.bytes_per_param(abstract),
                   tokenizer_fingerprint=tokenizer.fingerprint())
    return summary


class _Loop:
    """The step loop and its bookkeeping (logging, evaluation, early stopping, saving)."""

    def __init__(self, config, ckpt, fns, tokenizer, writer, on_log, peak, flops, iterator, val_batches, put,
                 early):
        self.config, self.t, self.ckpt, self.fns, self.tokenizer = config, config.train, ckpt, fns, tokenizer
        self.writer, self.on_log, self.peak, self.flops = writer, on_log, peak, flops
        self.iterator, self.val_batches, self.put, self.early = iterator, val_batches, put, early
        self.tokens_per_step = config.data.batch_size * config.data.seq_len * config.train.grad_accum
        self.last_train: dict = {}
        self.last_val: dict = {}
        self.last_saved = None

    def run(self, state, start: int, total: int, next_batch, rng) -> dict[str, Any]:
        t = self.t
        deadline = time.monotonic() + 60 * t.max_minutes if t.max_minutes > 0 else None
        progress = tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                             disable=not (self.config.logging.progress and sys.stderr.isatty()
                                          and jax.process_index() == 0))
        self.last_saved = start if start > 0 else None
        pending: list = []
        stopped, done = "done", start
        clock = [time.perf_counter(), 0]  # start of the timed window, steps in it
        with _Interrupt() as interrupt:
            for step in range(start, total):
                if interrupt.requested:
                    stopped = "interrupted"
                    break
                state, m = self.fns["train_step"](state, next_batch(), jax.random.fold_in(rng, step))
                done = step + 1
                pending.append(m)
                clock[1] += 1
                if step == start:  # the first call compiles: logged at once, kept out of tokens/s
                    self._log(pending, done, [0.0, 0], progress)
                    pending, clock = [], [time.perf_counter(), 0]
                progress.update(1)
                evaluate = t.eval_every > 0 and self.val_batches and done % t.eval_every == 0
                save = done % t.save_every == 0 or done == total
                over_time = deadline is not None and time.monotonic() > deadline and done < total
                if pending and (done % t.log_every == 0 or evaluate or save or over_time):
                    self._log(pending, done, clock, progress)
                    pending, clock = [], [time.perf_counter(), 0]
                if evaluate and self._evaluate(state, done):
                    stopped = "early_stop"
                elif over_time:
                    stopped = "time_budget"
                if save or stopped != "done":
                    self._save(state, done)
                if stopped != "done":
                    break
        progress.close()
        if pending:
            self._log(pending, done, clock, progress)
        if done != self.last_saved and done > 0:
            self._save(state, done)
        self.ckpt.wait()
        if stopped == "interrupted":
            print(f"interrupted at step {done}: saved a checkpoint in {self.ckpt.directory}; re-run the same "
                  "command to resume", flush=True)
        return {"step": done, "stopped": stopped, "train": self.last_train, "val": self.last_val,
                "best_val_loss": self.early["best_val_loss"] if self.early["best_step"] else None,
                "best_step": self.early["best_step"] or None, "peak_flops": self.peak,
                "tokens_per_s": self.last_train.get("tokens_per_s"), "mfu": self.last_train.get("mfu"),
                "state": state}

    def _check_finite(self, to_check: list, step: int) -> list[dict]:
        host = [metrics_lib.to_host(m) for m in to_check]
        for i, h in enumerate(host):
            if not math.isfinite(h["loss"]) or not math.isfinite(h["grad_norm"]):
                bad = step - len(host) + 1 + i
                self.ckpt.wait()
                steps = self.ckpt.steps()
                where = (f"the last good checkpoint is step {steps[-1]} in {self.ckpt.directory} (re-running "
                         "resumes there)" if steps else "no checkpoint was saved")
                raise TrainingError(f"the loss is {h['loss']} (grad norm {h['grad_norm']}) at step {bad}: training "
                                    f"diverged and stopped without saving the diverged state; {where}. Lower "
                                    f"--config.train.lr (now {self.t.lr}) or raise --config.train.warmup_steps")
        return host

    def _log(self, pending: list, done: int, clock: list, progress) -> None:
        host = self._check_finite(pending, done)
        elapsed = time.perf_counter() - clock[0]
        m = metrics_lib.mean_metrics(host)
        m["lr"] = host[-1]["lr"]
        m["perplexity"] = math.exp(min(m["ce"], 50.0))
        if clock[1] > 0 and elapsed > 0:
            m["tokens_per_s"] = clock[1] * self.tokens_per_step / elapsed
            m["step_time_s"] = elapsed / clock[1]
            # Per device: the probe measured one device; fake CPU devices share the host's cores, so there
            # each device's share of the probed peak is peak / n.
            n = len(self.fns["batch_sharding"].mesh.devices.flat)
            peak_per_device = self.peak / n if jax.default_backend() == "cpu" else self.peak
            m.update(throughput.per_device_metrics(clock[1] * self.tokens_per_step, elapsed, n, self.flops,
                                                   peak_per_device))
        self.last_train = m
        self.writer.write(done, m, prefix="train")
        progress.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}", refresh=False)
        if self.on_log is not None:
            self.on_log(done, "train", m)

    def _evaluate(self, state, done: int) -> bool:
        """Validation loss over the fixed val batches; returns True when early stopping should stop the run."""
        outs = [self.fns["eval_step"](state.params, self.put(b)) for b in self.val_batches]
        outs = [metrics_lib.to_host(o) for o in outs]
        tokens = sum(o["tokens"] for o in outs)
        val_loss = sum(o["ce"] * o["tokens"] for o in outs) / max(tokens, 1.0)
        m = {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0)),
             "val_accuracy": sum(o["accuracy"] * o["tokens"] for o in outs) / max(tokens, 1.0), "val_tokens": tokens}
        e = self.early
        if val_loss < e["best_val_loss"] - self.t.min_delta:
            e.update(best_val_loss=val_loss, best_step=done, evals_without_improvement=0)
        else:
            e["evals_without_improvement"] += 1
        self.last_val = dict(m, step=done)
        self.writer.write(done, m, prefix="val")
        if self.on_log is not None:
            self.on_log(done, "val", m)
        return self.t.patience > 0 and e["evals_without_improvement"] >= self.t.patience

    def _save(self, state, done: int) -> None:
        if not bool(self.fns["all_finite"](state.params)):
            raise TrainingError(f"parameters are not finite after step {done}: training diverged; the last good "
                                f"checkpoint is step {self.last_saved} in {self.ckpt.directory}. Lower "
                                f"--config.train.lr (now {self.t.lr})")
        data_states = _gather_strings(pipeline.iterator_state_to_json(self.iterator))
        metrics = dict(self.early)
        if self.last_val.get("step") == done:
            metrics["val_loss"] = self.last_val["val_loss"]
        if self.last_train:
            metrics["train_loss"] = self.last_train["loss"]
        self.ckpt.save(done, state, data_states=data_states, config=self.config, tokenizer=self.tokenizer,
                       metrics={k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in metrics.items()})
        self.last_saved = done
