"""Orbax checkpoints of the control networks (the critic's head, the controller) and their command lines' config.

A control workdir holds `checkpoints/<step>/` with three items: `state` (the pytree: step, params, optimizer state),
`config` (the full config as JSON: the model it belongs to and the control keys) and `meta` (JSON: what else a
resume or a user needs, e.g. the critic's threshold and the Stage-1 checkpoint it reads). Saves are synchronous
(these states are small) and keep the last `keep` steps.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from mantis_jax import cli
from mantis_jax import config as config_lib

ITEMS = ("state", "config", "meta")
CRITIC_COMMAND = "python -m mantis_jax.control.train_critic --checkpoint=<stage-1 workdir> --workdir={}"
CONTROLLER_COMMAND = "python -m mantis_jax.control.train_rl --checkpoint=<stage-1 workdir> --workdir={}"


class ControlCheckpointError(ValueError):
    """A control workdir is missing or holds no weights; the message names the command that trains them."""


def _manager(workdir: str, keep: int = 2, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), item_names=ITEMS,
                                 options=options)


def steps(workdir: str) -> list[int]:
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return []
    manager = _manager(workdir, create=False)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def save(workdir: str, step: int, state: Any, *, config: ml_collections.ConfigDict, meta: dict) -> None:
    manager = _manager(workdir)
    try:
        manager.save(int(step), force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(json.loads(config_lib.to_json(config))),
            meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
    finally:
        manager.close()


def read_json(workdir: str, command: str, step: int | None = None) -> tuple[int, ml_collections.ConfigDict, dict]:
    """(step, config, meta) of the newest (or given) step; one error naming `command` when there is none."""
    saved = steps(workdir)
    if not saved:
        raise ControlCheckpointError(f"{workdir!r} holds no trained weights; train them with: "
                                     f"{command.format(workdir)}")
    step = saved[-1] if step is None else step
    manager = _manager(workdir, create=False)
    try:
        got = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                             meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    return step, config_lib.from_json(json.dumps(got.config)), dict(got.meta)


def restore_state(workdir: str, abstract: Any, step: int) -> Any:
    manager = _manager(workdir, create=False)
    try:
        got = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    finally:
        manager.close()
    return got.state


def abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def load_controller(workdir: str):
    """(ControllerSpec, params) of a Stage-3 workdir's newest step."""
    from mantis_jax.control import controller as ctl  # noqa: PLC0415
    from mantis_jax.control import ppo  # noqa: PLC0415

    step, config, _ = read_json(workdir, CONTROLLER_COMMAND)
    spec = ctl.ControllerSpec.from_config(config)
    shapes = jax.eval_shape(lambda k: ppo.init_state(spec, k, float(config.controller.lr)), jax.random.key(0))
    return spec, restore_state(workdir, shapes, step).params


def parse_args(prog: str, description: str, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """--checkpoint and --workdir (required), plus --config.controller.* / --config.critic.* overrides."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--checkpoint", required=True, help="Stage-1 (or Stage-2) training workdir: the frozen LM")
    p.add_argument("--workdir", required=True, help="where this run's checkpoints and metrics go (resumes there)")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith(("--config.controller.", "--config.critic.", "--config.engine."))]
    if bad:
        p.error(f"unexpected arguments {bad}; only --config.controller.*, --config.critic.* and "
                "--config.engine.* may be set here (the model comes from --checkpoint)")
    return args, rest


def control_config(saved: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """The Stage-1 checkpoint's config with today's control sections (defaults + overrides), validated."""
    from mantis_jax.memory.train import complete_config  # noqa: PLC0415 (keys added since the run was saved)

    flagged = cli.load_config(["prog", *overrides])
    config = complete_config(saved)
    for section in ("controller", "critic", "engine"):
        if section in flagged:
            config[section] = ml_collections.ConfigDict(flagged[section].to_dict())
    return config_lib.validate(config)


def print_summary(summary: dict) -> None:
    """A trainer's summary as JSON on stdout: everything but the state and history, plus the last history row."""
    printable = {k: v for k, v in summary.items() if k not in ("state", "history")}
    printable["last"] = summary["history"][-1] if summary["history"] else {}
    print(json.dumps(printable, indent=1, default=float))
