"""Checkpoints: orbax `CheckpointManager` steps that describe themselves, and how to read them back.

A run's checkpoints live in `<workdir>/checkpoints/<step>/`, each with five items:
    state      the TrainState (params + optimizer state), sharded arrays (orbax StandardSave)
    data       the grain iterator state of every process (JSON), so training resumes at the same batch
    config     the config the run used (JSON)
    tokenizer  the tokenizer (its tokenizer.json, as JSON)
    meta       {"step", "metrics", "tokenizer_fingerprint", "time"} (JSON)
Saves are asynchronous (`config.checkpoint.async_save`); the manager keeps the last `checkpoint.max_to_keep` steps
plus, with `checkpoint.keep_best`, the step with the lowest validation loss.

Readers: `Checkpointer.restore` (the trainer: newest readable step, falling back past unreadable ones),
`load_for_inference(path, step)` -> (config, tokenizer, params), and `list_steps` / `inspect` for notebooks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tokenizers
from orbax.checkpoint import checkpoint_managers as ocm

from mantis_jax import config as config_lib
from mantis_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_unreadable"
ITEMS = ("state", "data", "config", "tokenizer", "meta")
# Config fields that change the shapes or meaning of the saved state: resuming across a change is refused.
STATE_KEYS = ("model", "moe.n_experts", "moe.top_k", "train.optimizer")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the run that wants it; the message names the fix."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))


def _flatten(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, (dict, ml_collections.ConfigDict)):
        out = {}
        for k in node.keys():
            out.update(_flatten(node[k], f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: tuple(node) if isinstance(node, list) else node}


def config_differences(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict) -> list[str]:
    """The state-shaping fields (STATE_KEYS) whose values differ, as "config.k: checkpoint a, this run b".

    A key the saved config lacks (it was added to the project after the checkpoint was made) counts as its
    default, so checkpoints made before a new option existed resume while the option stays at its default."""
    a, b = _flatten(saved.to_dict(), ""), _flatten(current.to_dict(), "")
    defaults = _flatten(config_lib.default_config().to_dict(), "")
    for k in set(b) - set(a):
        if k in defaults:
            a[k] = defaults[k]
    keys = sorted(k for k in set(a) | set(b) if any(k == s or k.startswith(s + ".") for s in STATE_KEYS))
    return [f"config.{k}: checkpoint {a.get(k)!r}, this run {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def tokenizer_from_json(data: dict | str) -> Tokenizer:
    text = data if isinstance(data, str) else json.dumps(data)
    return Tokenizer(tokenizers.Tokenizer.from_str(text))


class Checkpointer:
    """The run's CheckpointManager: `save(...)`, `restore(abstract_state)`, `steps()`, `best_step()`."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, keep_best: bool = True, async_save: bool = True,
                 create: bool = True):
        self.workdir = workdir
        self.directory = checkpoint_dir(workdir)
        if not create and not os.path.isdir(self.directory):
            raise CheckpointError(f"{workdir!r} has no checkpoints (no {CHECKPOINT_DIR}/ folder); pass the workdir "
                                  "of a training run (python -m mantis_jax.train --workdir=...)")
        policies = [ocm.LatestN(n=max_to_keep)]
        if keep_best:
            policies.append(ocm.BestN(get_metric_fn=_val_loss, reverse=True, n=1,
                                      keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            best_fn=_val_loss if keep_best else None, best_mode="min", create=create,
            preservation_policy=ocm.AnyPreservationPolicy(policies), enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    @classmethod
    def from_config(cls, workdir: str, config: ml_collections.ConfigDict, **kwargs) -> "Checkpointer":
        ck = config.checkpoint
        return cls(workdir, max_to_keep=ck.max_to_keep, keep_best=ck.keep_best, async_save=ck.async_save, **kwargs)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        """The step with the lowest saved val_loss (the latest step when none has one)."""
        best = self.manager.best_step() if self.steps() else None
        return best if best is not None else self.manager.latest_step()

    def save(self, step: int, state: Any, *, data_states: list[str], config: ml_collections.ConfigDict,
             tokenizer: Tokenizer, metrics: dict[str, Any]) -> None:
        """Starts an (async) save of everything a resume needs; `wait()` or the next save finishes it."""
        meta = {"step": int(step), "metrics": metrics, "tokenizer_fingerprint": tokenizer.fingerprint(),
                "time": time.time()}
        data = {"process_count": len(data_states), "states": [json.loads(s) for s in data_states]}
        best = {"val_loss": float(metrics["val_loss"])} if "val_loss" in metrics else None
        self.manager.save(int(step), metrics=best, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(json.loads(config_lib.to_json(config))),
            tokenizer=ocp.args.JsonSave(json.loads(tokenizer.to_json())),
            meta=ocp.args.JsonSave(meta)))

    def read_json(self, step: int, *names: str) -> dict[str, Any]:
        """Only the JSON items `names` of a step (cheap: no arrays are read)."""
        out = self.manager.restore(step, args=ocp.args.Composite(**{n: ocp.args.JsonRestore() for n in names}))
        return {n: out[n] for n in names}

    def config_at(self, step: int) -> ml_collections.ConfigDict:
        return config_lib.from_json(json.dumps(self.read_json(step, "config")["config"]))

    def tokenizer_at(self, step: int) -> Tokenizer:
        return tokenizer_from_json(self.read_json(step, "tokenizer")["tokenizer"])

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data, meta) of `step`, or of the newest step that reads back whole.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings (where each array goes). A step that
        fails to read is moved to `<workdir>/checkpoints_unreadable/` with a warning and the previous one is
        tried. Returns None when there are no steps."""
        candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
        for i, s in enumerate(candidates):
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
                return s, out["state"], out["data"], out["meta"]
            except Exception as e:  # noqa: BLE001 (any failure to read a step means the step is unusable)
                if step is not None:
                    raise CheckpointError(f"checkpoint step {s} in {self.directory} cannot be read "
                                          f"({type(e).__name__}: {e})") from e
                rest = candidates[i + 1:]
                moved = self._set_aside(s)
                warn = (f"checkpoint step {s} in {self.directory} is unreadable ({type(e).__name__}: "
                        f"{str(e)[:200]}); moved it to {moved}; "
                        + (f"falling back to step {rest[0]}" if rest else "no earlier step: starting afresh"))
                log.warning(warn)
                print(f"warning: {warn}", flush=True)
        return None

    def _set_aside(self, step: int) -> str:
        """Moves an unreadable step out of the manager's folder (so the step can be saved again)."""
        target = os.path.join(self.workdir, CORRUPT_DIR, f"{step}-{int(time.time())}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _val_loss(metrics: dict) -> float:
    return float(metrics["val_loss"])


def load_for_inference(path: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, Tokenizer, Any]:
    """(config, tokenizer, params) of a run's checkpoint: `step`, else the best-val-loss step, else the latest.

    `path` is a training workdir. Params are unboxed float32 arrays on the default device."""
    ckpt = Checkpointer(path, create=False, async_save=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise CheckpointError(f"{path!r} holds no checkpoint steps; train first or pass another workdir")
        if step is not None and step not in steps:
            raise CheckpointError(f"step {step} is not in {ckpt.directory}; saved steps: {steps}")
        step = ckpt.best_step() if step is None else step
        config = ckpt.config_at(step)
        tokenizer = ckpt.tokenizer_at(step)
        from mantis_jax.train.state import abstract_train_state  # noqa: PLC0415 (keeps `inspect` free of the model)

        _, state, _, _ = ckpt.restore(abstract_train_state(config), step=step)
    finally:
        ckpt.close()
    params = jax.tree.map(lambda p: p.astype(jnp.float32), state.params)
    return config, tokenizer, params


def list_steps(workdir: str) -> list[int]:
    """The saved steps of a workdir, oldest first ([] when there are none)."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return []
    ckpt = Checkpointer(workdir, create=False, async_save=False)
    try:
        return ckpt.steps()
    finally:
        ckpt.close()


def inspect(workdir: str) -> dict[str, Any]:
    """For notebooks: {"config", "steps": {step: metrics}, "latest", "best", "tokenizer_fingerprint"}."""
    ckpt = Checkpointer(workdir, create=False, async_save=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise CheckpointError(f"{workdir!r} holds no checkpoint steps")
        metas = {s: ckpt.read_json(s, "meta")["meta"] for s in steps}
        return {"config": ckpt.config_at(steps[-1]), "steps": {s: m["metrics"] for s, m in metas.items()},
                "latest": steps[-1], "best": ckpt.best_step(),
                "tokenizer_fingerprint": metas[steps[-1]]["tokenizer_fingerprint"]}
    finally:
        ckpt.close()


def params_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two parameter trees (tests and resume checks)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
