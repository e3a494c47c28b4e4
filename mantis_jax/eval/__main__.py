"""`python -m mantis_jax.eval --checkpoint=WORKDIR --tasks=... --data_dir=DIR --output=report.json`: see cli.py."""

from mantis_jax.cli import reexec_with_malloc_tunables
from mantis_jax.eval.cli import main

if __name__ == "__main__":
    reexec_with_malloc_tunables()
    main()
