"""memory_tokens: MemXLNet-style memory tokens on factworld far questions, sized for 2 CPU cores.

    python -m mantis_jax.memory.train_tokens --config=configs/memory_tokens.py --workdir=runs/memtok
    python -m mantis_jax.memory.train_tokens --config=configs/memory_tokens.py --workdir=runs/nomem \\
        --config.memory.tokens.enabled=False          # no memory: the same tokens per step, one window each
    python benchmarks/memory_tokens.py                # both, then exact match and the memory's cost per segment

A 4-layer d_model-128 MantisLM (~0.5M parameters at the 1024-token factworld BPE) with 4 read + 4 write tokens and
2 expert memories. A record's context (evidence first, then >= 64 tokens before the question) spans up to 3
segments of 64 tokens (56 of text); the question is the 4th. Back-propagation reaches 2 segments back.
What a short run reaches is in docs/memory_tokens.md.
"""

from mantis_jax.config import default_config, set_shape


def get_config():
    c = default_config()
    c.name = "memory_tokens"
    set_shape(c, d_model=128, n_layers=4, n_experts=1, top_k=1)
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.d_ff = 256
    c.model.max_seq_len = 128
    c.model.scan_layers = False
    c.model.kv_conv = 8  # a key also carries the 7 tokens before it: quick copy circuits (docs/perf/demo.md)
    c.data.tokenizer_vocab = 1024
    c.data.seq_len = 64
    c.data.batch_size = 16
    c.data.factworld_entities = 27000
    mt = c.memory.tokens
    mt.n_tokens = 4
    mt.n_experts = 2
    mt.segment_len = 64
    mt.segments = 4
    mt.bptt = 2
    mt.distance = 64
    mt.eval_questions = 128
    c.train.lr = 3e-3
    c.train.warmup_steps = 50
    c.train.total_steps = 600
    c.train.log_every = 10
    c.train.save_every = 200
    c.train.max_minutes = 10.0
    c.checkpoint.max_to_keep = 1
    c.checkpoint.keep_best = False
    return c
