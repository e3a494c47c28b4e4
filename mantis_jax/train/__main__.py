"""Train CLI: `python -m mantis_jax.train --config=configs/micro.py --workdir=runs/micro [--config.x=y]`.

Re-running the same command resumes from the workdir's newest checkpoint; `--resume=<workdir>` resumes from
another run's. Bad input (data, tokenizer, checkpoint, a diverging loss) ends with one line on stderr and status
2; Ctrl-C or SIGTERM saves a checkpoint and exits cleanly. The run's summary is printed as JSON at the end.
"""

from __future__ import annotations

import json

from absl import app, flags

from mantis_jax import cli

if __name__ == "__main__":  # restart before the heavy imports below (jax, flax, orbax), not after them
    cli.reexec_with_malloc_tunables()

from mantis_jax.data.sources import DataError  # noqa: E402
from mantis_jax.data.tokenizer import TokenizerMismatchError  # noqa: E402
from mantis_jax.parallel import distributed  # noqa: E402
from mantis_jax.train.checkpoint import CheckpointError  # noqa: E402
from mantis_jax.train.trainer import TrainingError, train  # noqa: E402

_CONFIG = cli.define_config_flag()
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics.jsonl, tensorboard/, tokenizer.json")
flags.DEFINE_string("resume", None, "Resume from this workdir's newest checkpoint (default: --workdir's own)")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.<section>.<key>=<value>")
    try:  # multi-process jobs (launch/): a no-op without MANTIS_NUM_PROCESSES
        distributed.initialize_from_env()
    except ValueError as e:
        cli.fail(e)
    try:
        summary = train(_CONFIG.value, flags.FLAGS.workdir, resume=flags.FLAGS.resume)
    except (DataError, TokenizerMismatchError, CheckpointError, TrainingError) as e:
        cli.fail(e)
    summary.pop("state")
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    cli.run(main)
