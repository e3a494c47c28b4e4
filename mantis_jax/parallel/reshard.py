"""Resharding restore: a checkpoint saved on one mesh read back onto another, values unchanged.

Orbax stores each array with its global shape, independent of the mesh that wrote it. Restoring is driven by an
abstract target: a pytree of `jax.ShapeDtypeStruct`s whose shardings come from *this* run's mesh and rules
(the caller builds it: `train.state.abstract_train_state(config, mesh)`), so each process reads only the slices
its devices own. That is how a run saved with data=8
resumes with fsdp=4 × expert=2, on another number of processes, or on one device in a notebook.

Layout read: `<workdir>/checkpoints/<step>/state` (train/checkpoint.py), or any orbax CheckpointManager folder
whose steps hold a "state" item. Data leaves as a TrainState (or its params) of arrays laid out on the mesh.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from mantis_jax.parallel import mesh as mesh_lib

STATE_ITEM = "state"


def _check_target(target: Any, what: str) -> None:
    if isinstance(target, ml_collections.ConfigDict) or not jax.tree.leaves(target):
        raise TypeError(f"{what} takes the abstract target, not a config: pass "
                        "mantis_jax.train.state.abstract_train_state(config, mesh) (or its .params)")


def _manager_dir(path: str) -> str:
    inner = os.path.join(path, "checkpoints")
    directory = inner if os.path.isdir(inner) else path
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{path!r} is not a checkpoint folder; pass a training workdir (holding "
                                "checkpoints/) or an orbax CheckpointManager directory")
    return os.path.abspath(directory)


def _manager(path: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    return ocp.CheckpointManager(_manager_dir(path), item_names=(STATE_ITEM,), options=options)


def _pick_step(manager: ocp.CheckpointManager, path: str, step: int | None) -> int:
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"{path!r} holds no checkpoint steps")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"step {step} is not in {path!r}; saved steps: {steps}")
    return step


def restore_state(path: str, target: Any, *, step: int | None = None) -> tuple[int, Any]:
    """(step, TrainState) of `path`'s `step` (default: newest), laid out as `target` says: an abstract TrainState
    of ShapeDtypeStructs with shardings (`train.state.abstract_train_state(config, mesh)`)."""
    _check_target(target, "restore_state")
    manager = _manager(path)
    try:
        step = _pick_step(manager, path, step)
        out = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)}))
    finally:
        manager.close()
    return step, out[STATE_ITEM]


def restore_params(path: str, target_params: Any, *, step: int | None = None) -> tuple[int, Any]:
    """(step, params) only, laid out as `target_params` (an abstract TrainState's `.params`) says: the optimizer
    state is never read (a notebook on one device needs ~1/3 the memory)."""
    _check_target(target_params, "restore_params")
    target = {"params": target_params}
    manager = _manager(path)
    try:
        step = _pick_step(manager, path, step)
        restore = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                         partial_restore=True)
        out = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: restore}))
    finally:
        manager.close()
    return step, out[STATE_ITEM]["params"]


def single_device_mesh(config: ml_collections.ConfigDict, device=None) -> jax.sharding.Mesh:
    """A 1-device mesh (every axis size 1) for notebooks: the same rules then place everything on `device`."""
    one = ml_collections.ConfigDict(config.to_dict())
    for axis in mesh_lib.MESH_AXES:
        one.mesh[axis] = 1
    return mesh_lib.make_mesh(one, [device or jax.devices()[0]])
