"""The shared command line of the post-training stages: `python -m mantis_jax.post.<stage> --config=<preset>
--workdir=<dir> [--config.post.base=<workdir>] [--config.x=y]`.

Re-running the same command resumes from the workdir's newest checkpoint. Bad input (config, data, checkpoint, a
diverging loss) ends with one line on stderr and status 2. The stage's summary is printed as JSON at the end and
its metrics are in `<workdir>/results.json`.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from absl import flags

from mantis_jax import cli

PRESETS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def main_for(stage: str, run_stage: Callable[..., dict]) -> None:
    """Defines the flags and runs `run_stage(config, workdir)` as an absl app (call from a `__main__` block)."""
    from mantis_jax.data.sources import DataError  # noqa: PLC0415
    from mantis_jax.post.common import PostError  # noqa: PLC0415
    from mantis_jax.post.data import PostDataError  # noqa: PLC0415
    from mantis_jax.train.checkpoint import CheckpointError  # noqa: PLC0415

    config_flag = cli.define_config_flag(default=os.path.normpath(os.path.join(PRESETS, f"post_{stage}.py")))
    flags.DEFINE_string("workdir", None, "Stage folder: checkpoints, metrics.jsonl, results.json (LoRA: merged/)")
    flags.mark_flag_as_required("workdir")

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise ValueError(f"unexpected arguments {argv[1:]}; settings go in --config.<section>.<key>=<value>")
        try:
            summary = run_stage(config_flag.value, flags.FLAGS.workdir)
        except (DataError, PostDataError, CheckpointError, PostError, FileNotFoundError) as e:
            cli.fail(e)
        print(json.dumps(summary, indent=1, default=str))

    cli.run(main)
