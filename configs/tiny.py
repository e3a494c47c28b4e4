"""tiny: ~100M parameters (at vocab 50304), 4 experts top-2. Single-host CPU/GPU experiments.

    python -m mantis_jax.train --config=configs/tiny.py --workdir=runs/tiny

On one GPU it trains factworld to near-range recall in minutes; on CPU use micro.
"""

from mantis_jax.config import default_config, set_shape


def get_config():
    c = default_config()
    c.name = "tiny"
    set_shape(c, d_model=512, n_layers=8, n_experts=4, top_k=2)
    c.model.n_heads = 8
    c.model.n_kv_heads = 4
    c.model.d_ff = 1408
    c.model.max_seq_len = 1024
    # 8 layers compile in seconds unrolled, and the step is faster than the layer scan's (no stacked residuals,
    # no per-layer weight slicing): 64% vs 51% MFU on 2 CPU cores (docs/perf/train_step.md, 2026-11-21).
    c.model.scan_layers = False
    c.data.seq_len = 512
    c.data.batch_size = 16
    c.train.lr = 1e-3
    c.train.total_steps = 20000
    return c
