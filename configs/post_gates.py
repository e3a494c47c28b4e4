"""post_gates: the promotion gates between post-training stages (mantis_jax/post/gates.py).

    python -m mantis_jax.post.gates --results=runs/sft/results.json --gate=sft_to_dpo

Each transition lists (metric, direction, threshold): "higher" means the metric must be >= threshold, "lower"
<= threshold; a missing metric fails. Metrics are dotted paths into a stage's results.json. The thresholds are
set from the measured runs in docs/post.md (the demo model as the base), a little below what those reached.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.gates = ml_collections.ConfigDict({
        # SFT must have learned the answer format without losing recall.
        "sft_to_dpo": (("sft.val_loss", "lower", 1.0), ("sft.answerable_accuracy", "higher", 0.5)),
        # DPO must prefer the chosen answer on held-out pairs.
        "dpo_to_grpo": (("dpo.preference_accuracy", "higher", 0.6), ("dpo.answerable_accuracy", "higher", 0.5)),
        # GRPO's release bar: fewer hallucinations, answerable questions still answered.
        "grpo_to_release": (("grpo.after_hallucination_rate", "lower", 0.5),
                            ("grpo.after_answerable_accuracy", "higher", 0.5)),
    })
    return c
