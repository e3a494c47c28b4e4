"""`python -m mantis_jax.memory.server`: runs the semantic memory service (its code and flags:
mantis_jax/memory/semantic/service.py; docs/semantic_memory.md). `launch` starts one as a child process."""

from mantis_jax.memory.semantic.service import launch, main, read_token  # noqa: F401

if __name__ == "__main__":
    main()
