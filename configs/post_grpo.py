"""post_grpo: group-relative policy optimisation with factworld's verifiable rewards (mantis_jax/post/grpo.py).

    python -m mantis_jax.post.grpo --config=configs/post_grpo.py --workdir=runs/grpo --config.post.base=runs/dpo

Each step samples G = post.grpo_group answers to post.grpo_prompts questions with the jitted decode loop, scores
them (+1 correct, +1 "unknown" on an unanswerable question, -1 otherwise), normalises the rewards within each
group and takes post.grpo_updates clipped-ratio updates with a KL penalty to the starting model. The hallucination
rate on unanswerable test questions before and after goes to <workdir>/results.json.
"""

import os

from mantis_jax.cli import load_preset


def get_config():
    c = load_preset(os.path.join(os.path.dirname(os.path.abspath(__file__)), "post_sft.py"))
    c.name = "post_grpo"
    c.train.lr = 2e-5
    c.train.warmup_steps = 2
    c.train.total_steps = 60  # optimizer updates (post.grpo_updates per sampled batch)
    c.train.log_every = 2
    c.train.save_every = 20
    c.data.seq_len = 128
    c.post.grpo_group = 8
    c.post.grpo_prompts = 4
    c.post.eval_examples = 128
    return c
