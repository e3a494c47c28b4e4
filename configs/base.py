"""base: ~12B total parameters (at vocab 50304), 8 experts top-2, bf16 compute, FSDP + expert parallel.

    sbatch --nodes=1 launch/slurm/train.sbatch --config=configs/base.py --workdir=runs/base
    sbatch --nodes=8 launch/slurm/train.sbatch --config=configs/base.py --workdir=runs/base \
        --config.data.batch_size=64 --config.train.grad_accum=4

Active parameters per token are ~4.1B: with top-2 of 8 experts every token uses at least a quarter of the
expert weights plus all non-expert weights, so active >= total * K / E = 3B at 12B total (a 2B-active 12B model
would need K/E < 1/6). Sized for 8 × 80 GB GPUs per replica with FSDP + expert parallelism (rules preset
fsdp_ep, mesh fsdp=2 × expert=4 on 8 GPUs): `python -m mantis_jax.train.memory_estimate --config=configs/base.py
--devices=8` estimates ~50 GB per device (docs/perf/memory.md). A step is 256 sequences: 32 micro-batches of 8
(one sequence per GPU per micro-batch).
"""

from mantis_jax.config import default_config, set_shape


def get_config():
    c = default_config()
    c.name = "base"
    set_shape(c, d_model=4096, n_layers=24, n_experts=8, top_k=2)
    c.model.n_heads = 32
    c.model.n_kv_heads = 8
    c.model.d_ff = 4608
    c.model.tie_embeddings = False
    c.model.dtype = "bfloat16"
    c.model.remat = "dots_no_batch"
    c.model.max_seq_len = 4096
    c.data.seq_len = 4096
    c.data.batch_size = 8  # per micro-batch; × grad_accum = 256 sequences per optimizer step
    c.train.grad_accum = 32
    c.train.lr = 2e-4
    c.train.total_steps = 200000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.expert = 4
    c.mesh.rules_preset = "fsdp_ep"
    c.moe.expert_parallel = True
    return c
