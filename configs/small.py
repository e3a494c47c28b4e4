"""small: ~1B parameters (at vocab 50304), 4 experts top-2, bf16 compute. One 8-GPU host.

    python -m mantis_jax.train --config=configs/small.py --workdir=runs/small --config.mesh.fsdp=8

Expect a clearly sub-1.5 factworld val loss within a few thousand steps on 8 × H100.
"""

from mantis_jax.config import default_config, set_shape


def get_config():
    c = default_config()
    c.name = "small"
    set_shape(c, d_model=1536, n_layers=16, n_experts=4, top_k=2)
    c.model.n_heads = 12
    c.model.n_kv_heads = 4
    c.model.d_ff = 2816
    c.model.tie_embeddings = False
    c.model.dtype = "bfloat16"
    c.model.remat = "dots_no_batch"
    c.model.max_seq_len = 2048
    c.data.seq_len = 2048
    c.data.batch_size = 64
    c.train.lr = 3e-4
    c.train.total_steps = 100000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.rules_preset = "fsdp"
    return c
