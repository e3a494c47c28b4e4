"""Per-device memory estimate of a training config, from shapes only (parallel/memory.py does the counting):

    python -m mantis_jax.train.memory_estimate --config=configs/base.py --devices=8 [--device_gb=80] [--config.x=y]

Prints parameters, gradients, optimizer state and activations per device and whether they fit. It lives in
train/ because it builds the abstract train state (`train.state.abstract_train_state`), which parallel/ must not.
"""

from __future__ import annotations

from absl import flags

from mantis_jax import cli
from mantis_jax.parallel import memory
from mantis_jax.train.state import abstract_train_state


def main(argv: list[str]) -> None:
    del argv
    config = flags.FLAGS.config
    print(memory.table(config, flags.FLAGS.devices, flags.FLAGS.device_gb, abstract_train_state(config, boxed=True)))


if __name__ == "__main__":
    cli.define_config_flag()
    flags.DEFINE_integer("devices", 8, "Number of devices of the mesh (config.mesh sizes; -1 fills)")
    flags.DEFINE_float("device_gb", 80.0, "Memory of one device, in GB (1e9 bytes)")
    cli.run(main)
