"""demo_long: the demo's model and data trained for about an hour on 2 CPU cores (the longer CPU recipe).

    python -m mantis_jax.demo --config=configs/demo_long.py --workdir=runs/demo_long

Same shape, tokenizer, data mix and peak learning rate as configs/demo.py (without its curriculum and its
convolution on keys and values: this recipe was measured before them); the cosine schedule spans 12,000 steps
(~24.6M tokens), what an idle 2-core machine runs in about an hour (~200-220 steps/min), with
`train.max_minutes` 75 as the cap. The accuracy it
reaches and its learning curve: docs/perf/demo.md ("Longer CPU recipe").
"""

import os

from mantis_jax.cli import load_preset


def get_config():
    c = load_preset(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
    c.name = "demo_long"
    c.data.factworld_curriculum_docs = 0  # measured without the demo's curriculum (docs/perf/demo.md)
    c.model.kv_conv = 0  # and without the convolution on keys and values
    c.train.total_steps = 12000
    c.train.max_minutes = 75.0
    c.train.eval_every = 1000
    c.train.save_every = 1000
    return c
