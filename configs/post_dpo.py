"""post_dpo: direct preference optimisation on factworld answer pairs (mantis_jax/post/dpo.py).

    python -m mantis_jax.post.dpo --config=configs/post_dpo.py --workdir=runs/dpo --config.post.base=runs/sft
    python -m mantis_jax.post.dpo ... --config.post.dpo_reference=frozen    # a frozen reference copy instead

Sigmoid loss, beta 0.1, reference log-probabilities precomputed before training (or a frozen copy). Chosen: the
right answer ("unknown" for an unanswerable question); rejected: a wrong value of the asked attribute (or
"unknown" for a quarter of the answerable ones). Held-out preference accuracy goes to <workdir>/results.json.
"""

import os

from mantis_jax.cli import load_preset


def get_config():
    c = load_preset(os.path.join(os.path.dirname(os.path.abspath(__file__)), "post_sft.py"))
    c.name = "post_dpo"
    c.train.lr = 5e-5
    c.train.warmup_steps = 5
    c.train.total_steps = 100
    c.train.save_every = 50
    c.data.seq_len = 128  # one prompt + answer per row (pairs are not packed)
    c.post.examples = 1024
    c.post.eval_examples = 128
    return c
