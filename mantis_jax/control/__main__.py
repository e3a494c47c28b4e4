"""The engine with its deciders: the critic verifies, the meta-controller sets the gates per query.

    python -m mantis_jax.control --checkpoint=runs/demo --stage2=runs/demo_stage2 --critic=runs/demo_critic \
        --controller=runs/demo_rl --context_file=story.txt --question="Where does Tavo live?"
    ... --interactive        (read <file> | read: <text> | ask <question> | trace | quit)

Every flag of `python -m mantis_jax.engine` works here (`--stage2`, `--json`, `--config.engine.*`, ...), plus
`--critic` (a `train_critic` workdir: the engine may verify; `--config.engine.verify=True` makes the fixed policy
verify every answer) and `--controller` (a `train_rl` workdir: its deterministic decisions replace the fixed
policy; the trace shows each gate's decision and probability). A critic or controller trained for another LM
(other width, depth, experts or vocabulary) is one error naming the command that trains one for this LM.
"""

from __future__ import annotations

import argparse
import os
import sys

from mantis_jax import cli

if __name__ == "__main__":  # restart before the heavy imports below (jax, flax, orbax), not after them
    cli.reexec_with_malloc_tunables()

from mantis_jax.control import store  # noqa: E402
from mantis_jax.engine import __main__ as engine_cli  # noqa: E402
from mantis_jax.engine.core import Engine  # noqa: E402

PROG = "python -m mantis_jax.control"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--critic", default=None, help=f"critic workdir ({store.CRITIC_COMMAND.format('DIR')})")
    p.add_argument("--controller", default=None,
                   help=f"meta-controller workdir ({store.CONTROLLER_COMMAND.format('DIR')})")


def check_same_lm(kind: str, workdir: str, trained_for, lm_config, command: str) -> None:
    """One error when a critic or controller was trained for an LM of another shape than `lm_config`'s."""
    keys = (("model", "d_model"), ("model", "n_layers"), ("model", "vocab_size"), ("moe", "n_experts"))
    diff = [f"{a}.{b} {trained_for[a][b]} vs {lm_config[a][b]}" for a, b in keys
            if trained_for[a][b] != lm_config[a][b]]
    if diff:
        raise store.ControlCheckpointError(
            f"the {kind} in {workdir!r} was trained for another LM ({', '.join(diff)} in --checkpoint); train one "
            f"for this LM with `{command}`")


def build(a: argparse.Namespace, overrides: dict) -> Engine:
    from mantis_jax.control.controller import Controller  # noqa: PLC0415
    from mantis_jax.control.critic import Critic  # noqa: PLC0415
    from mantis_jax.memory.train import complete_config  # noqa: PLC0415
    from mantis_jax.train.checkpoint import load_for_inference  # noqa: PLC0415

    lm = load_for_inference(a.checkpoint)
    lm_config = complete_config(lm[0])
    critic = policy = None
    for_this_lm = lambda command: command.replace("<stage-1 workdir>", a.checkpoint).format("NEW_DIR")  # noqa: E731
    if a.critic:
        _, trained_for, _ = store.read_json(a.critic, store.CRITIC_COMMAND)
        check_same_lm("critic", a.critic, trained_for, lm_config, for_this_lm(store.CRITIC_COMMAND))
        critic = Critic.from_workdir(a.critic, lm=lm)
    if a.controller:
        _, trained_for, _ = store.read_json(a.controller, store.CONTROLLER_COMMAND)
        check_same_lm("controller", a.controller, trained_for, lm_config,
                      for_this_lm(store.CONTROLLER_COMMAND) + " --critic=CRITIC")
        policy = Controller.from_workdir(a.controller)
    return Engine.from_workdir(a.checkpoint, stage2=a.stage2, overrides=overrides, critic=critic, policy=policy,
                               lm=lm)


def main(argv: list[str] | None = None, inp=None, out=None) -> None:
    engine_cli.main(sys.argv[1:] if argv is None else argv, inp, out, prog=PROG,
                    description=__doc__.split("\n\n")[0], add_arguments=_add_arguments, build=build,
                    errors=(store.ControlCheckpointError,))


if __name__ == "__main__":
    main()
