"""memory_tokens_demo: memory tokens on the trained Stage-1 demo LM (its shape, tokenizer and weights).

    python -m mantis_jax.memory.train_tokens --config=configs/memory_tokens_demo.py --workdir=runs/memtok_demo \\
        --config.memory.tokens.init_from=runs/demo      # the workdir `make demo` trained
    python benchmarks/memory_tokens.py --preset=configs/memory_tokens_demo.py --init-from=runs/demo

The LM starts from `memory.tokens.init_from` (model shape, tokenizer and factworld world from that run; the 8
memory tokens get new embedding rows), so it already answers questions whose evidence is in its window; what it
has to learn is to write the evidence into the memory and read it at the question. A document is 3 segments of
128 tokens (the demo's window; 120 of text): 2 context segments and the question's. The evidence is 128+ tokens
before the question (two segments back); the first `curriculum_docs` training records put it in the segment just
before the question (distance 0). Back-propagation reaches all 3 segments; the write gate starts at
sigmoid(2) = 0.88 so the first writes are kept. What a short run reaches is in docs/memory_tokens.md.
"""

import os

from mantis_jax.cli import load_preset


def get_config():
    c = load_preset(os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_tokens.py"))
    c.name = "memory_tokens_demo"
    c.data.seq_len = 128
    c.data.batch_size = 16
    mt = c.memory.tokens
    mt.init_from = "runs/demo"
    mt.n_tokens = 4
    mt.n_experts = 2
    mt.segment_len = 128
    mt.segments = 3
    mt.bptt = 3
    mt.distance = 128
    mt.curriculum_docs = 2000  # ~120 steps of 16 fitting documents with the evidence one segment back
    mt.question_in_context = True  # MemXLNet-QA: each context segment ends "\nQ: <question>\nA:" [WRITE x N]
    mt.write_init = "answer_slot"  # WRITE rows start as the ":" ending "A:": WRITE 0's hidden state is the answer
    mt.proposal = "vocab"  # u = softmax(WRITE logits) @ embedding + tanh(h W_u + b_u): reads start as tokens
    mt.update_scale = 0.0  # W_u = 0: the tanh term starts at 0 and learns a correction
    mt.gate_bias = 1.0  # sigmoid(1) = 0.73 of a write is kept at first
    mt.eval_questions = 128
    c.train.lr = 1e-3
    c.train.warmup_steps = 20
    c.train.total_steps = 300
    c.train.save_every = 100
    c.train.max_minutes = 15.0
    return c
