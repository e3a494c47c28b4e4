"""Inference: sampling.py (next-token sampling), decode.py (jitted prefill + cached decode loop, or prefill once
and continue), early_exit.py (the decode step in which a confident token stops running layers), quantize.py (int8
weight-only), runner.py (host-side batching and timing), qa.py (factworld QA answering), generate_cli.py
(`python -m mantis_jax.generate`)."""
