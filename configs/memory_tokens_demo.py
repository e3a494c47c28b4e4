"""memory_tokens_demo: memory tokens on the trained Stage-1 demo LM (its shape, tokenizer and weights).

    python -m mantis_jax.memory.train_tokens --config=configs/memory_tokens_demo.py --workdir=runs/memtok_demo \\
        --config.memory.tokens.init_from=runs/demo      # the workdir `make demo` trained
    python benchmarks/memory_tokens.py --preset configs/memory_tokens_demo.py --init-from runs/demo \\
        --stage2 runs/demo_stage2 --steps 120           # + no memory at equal tokens, the ablation, the engine

The LM starts from `memory.tokens.init_from` (model shape, tokenizer and factworld world from that run; the 8
memory tokens get new embedding rows), so it already answers questions whose evidence is in its window; what it
has to learn is to write the evidence into the memory and read it at the question. A document is 3 segments of
128 tokens (the demo's window; 120 of text): 2 context segments and the question's. The evidence is 128+ tokens
before the question (two segments back); the first `curriculum_docs` training records put it in the segment just
before the question (distance 0). Back-propagation reaches all 3 segments. The question ends every context segment
too (MemXLNet-QA), the WRITE rows start as the ":" of "A:" (WRITE 0 sits in the answer's slot) and the proposal
adds the embedding the head predicts there, so the LM can read the memory from the first step. 120 steps of 8
documents (~5.5 minutes on the shared 2-core machine) reach 68.0% far EM against 2.3% without memory and 64.8%
for the engine's retrieval memory (2026-12-01, docs/memory_tokens.md).
"""

import os

from mantis_jax.cli import load_preset


def get_config():
    c = load_preset(os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_tokens.py"))
    c.name = "memory_tokens_demo"
    c.data.seq_len = 128
    c.data.batch_size = 8
    mt = c.memory.tokens
    mt.init_from = "runs/demo"
    mt.segment_len = 128
    mt.segments = 3
    mt.bptt = 3
    mt.distance = 128
    mt.curriculum_docs = 500  # ~60 steps of 8 documents with the evidence one segment back
    mt.question_in_context = True  # MemXLNet-QA: each context segment ends "\nQ: <question>\nA:" [WRITE x N]
    mt.write_init = "answer_slot"  # WRITE rows start as the ":" ending "A:": WRITE 0's hidden state is the answer
    mt.proposal = "vocab"  # u = softmax(WRITE logits) @ embedding + tanh(h W_u + b_u): reads start as tokens
    mt.update_scale = 0.0  # W_u = 0: the tanh term starts at 0 and learns a correction
    mt.gate_bias = 1.0  # sigmoid(1) = 0.73 of a write is kept at first
    c.train.lr = 1e-3
    c.train.warmup_steps = 20
    c.train.total_steps = 120
    c.train.save_every = 60
    c.train.max_minutes = 15.0
    return c
