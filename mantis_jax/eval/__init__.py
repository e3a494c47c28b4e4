"""Evaluation: the standard benchmarks from local files, factworld's evidence report, and plots.

cli.py (`python -m mantis_jax.eval`) · tasks.py (the task registry and where each reads its data) · formats.py
(the published file formats) · lm.py (log-likelihood and generation requests) · benchmarks.py (MMLU, TruthfulQA,
GSM8K, HaluEval) · humaneval.py + sandbox.py (executing completions, confined) · evidence.py (factworld per kind
and system) · qa.py (factworld QA with the LM alone) · perplexity.py (perplexity, the int8 report) · metrics.py
(accuracy, hallucination rate, ECE, pass@k) · plots.py (training curves, accuracy against compute, reliability) ·
engine_parts.py (the engine's policies and critic, when a checkpoint has them).
"""
