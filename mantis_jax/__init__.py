"""MANTIS in JAX/Flax."""
