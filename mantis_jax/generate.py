"""`python -m mantis_jax.generate --checkpoint=runs/micro --prompt="..."`: see mantis_jax/infer/generate_cli.py."""

from mantis_jax.cli import reexec_with_malloc_tunables
from mantis_jax.infer.generate_cli import main

if __name__ == "__main__":
    reexec_with_malloc_tunables()
    main()
