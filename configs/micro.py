"""micro: ~11M parameters (at vocab 50304), dense (1 expert). The `make demo` model: trains on 2 CPU cores.

    python -m mantis_jax.train --config=configs/micro.py --workdir=runs/micro
    python -m mantis_jax.demo                      # configs/demo.py: this shape + the demo's data/schedule

Four wide layers rather than eight narrow ones: at the demo's 1024-token vocabulary the model is ~1.5M
parameters and half the FLOPs per token of d_model 128 × 8 layers, so twice the steps fit in the demo's budget,
and 4 layers are plenty for the copy circuit near-range recall needs (induction needs >= 2). With the demo's data,
schedule and convolution on keys and values (configs/demo.py) it answers ~77-84% of near-range questions about
unseen entities after 13 minutes (docs/perf/demo.md).
"""

from mantis_jax.config import default_config, set_shape


def get_config():
    c = default_config()
    c.name = "micro"
    set_shape(c, d_model=192, n_layers=4, n_experts=1, top_k=1)
    c.model.n_heads = 6
    c.model.n_kv_heads = 2
    c.model.d_ff = 384
    c.model.max_seq_len = 512
    c.model.scan_layers = False  # 4 layers: quick to compile unrolled, ~15% faster step (docs/perf/train_step.md)
    c.data.seq_len = 256
    c.data.batch_size = 8
    c.memory.episodic.d_state = 16
    c.train.lr = 2e-3
    c.train.warmup_steps = 100
    c.train.total_steps = 2000
    return c
