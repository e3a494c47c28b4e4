"""micro: ~10M parameters (at vocab 50304), dense (1 expert). The `make demo` model: trains on 2 CPU cores.

    python -m mantis_jax.train --config=configs/micro.py --workdir=runs/micro

Reaches in-context recall on factworld near-range questions within the demo's budget (see docs/PERFORMANCE.md).
"""

from mantis_jax.config import default_config, set_shape


def get_config():
    c = default_config()
    c.name = "micro"
    set_shape(c, d_model=128, n_layers=8, n_experts=1, top_k=1)
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.d_ff = 768
    c.model.max_seq_len = 512
    c.data.seq_len = 256
    c.data.batch_size = 8
    c.memory.episodic.d_state = 16
    c.train.lr = 2e-3
    c.train.warmup_steps = 100
    c.train.total_steps = 2000
    return c
