"""`python -m mantis_jax.infer`: the generate CLI (same as `python -m mantis_jax.generate`)."""

from mantis_jax.infer.generate_cli import main

if __name__ == "__main__":
    main()
