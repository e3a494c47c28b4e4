"""post_sft: supervised fine-tuning on factworld QA chats, packed, loss on answers only (mantis_jax/post/sft.py).

    python -m mantis_jax.post.sft --config=configs/post_sft.py --workdir=runs/sft --config.post.base=runs/demo
    python -m mantis_jax.post.sft ... --config.post.lora_rank=8          # LoRA (adapters only; merged/ exported)

The model, tokenizer and factworld settings come from `post.base` (a Stage-1 or post-stage workdir); without one
the micro shape below starts from a fresh init. Results (held-out loss, packing efficiency, QA exact match,
hallucination rate) go to <workdir>/results.json; docs/post.md has the figures.
"""

from mantis_jax.config import default_config, set_shape


def get_config():
    c = default_config()
    c.name = "post_sft"
    set_shape(c, d_model=192, n_layers=4, n_experts=1, top_k=1)
    c.model.n_heads = 6
    c.model.n_kv_heads = 2
    c.model.d_ff = 384
    c.model.max_seq_len = 512
    c.model.scan_layers = False
    c.data.seq_len = 256
    c.data.batch_size = 8
    c.data.tokenizer_vocab = 1024
    c.train.lr = 3e-4
    c.train.warmup_steps = 10
    c.train.total_steps = 200
    c.train.min_lr_ratio = 0.1
    c.train.weight_decay = 0.0
    c.train.log_every = 10
    c.train.save_every = 100
    c.post.examples = 4000
    c.post.eval_examples = 128
    return c
