"""demo: the micro model with the data, vocabulary and schedule chosen for learning factworld recall on 2 CPU cores.

    make demo                                          # = python -m mantis_jax.demo (this preset)
    python -m mantis_jax.demo --minutes=14 --workdir=runs/demo

Status: on an idle 2-core machine this preset trains 2600 steps (5.3M tokens) in ~12-14 minutes and answers
76-84% of near-range questions about unseen entities exactly (2026-11-22, research runs with seeds 0 / 1: 82.0% /
76.7% on 150 questions; the demo's 50: 84% / 76%). The convolution on keys and values (`model.kv_conv`, c5f91d4) is
what took it past the issue's 80% goal: before it, friend questions (a multi-token name to copy) scored 0/24 and
recall formed at a seed-dependent step (55-72%). docs/perf/demo.md: learning curves, what made the difference,
what did not.

What differs from configs/micro.py, and why (measurements in docs/perf/demo.md):
- a 1024-token BPE trained on factworld: names are ~3 tokens and most attribute values one token, and the
  embedding/head shrink from 9.7M to 0.2M parameters, so the model is ~1.5M parameters;
- seq_len 128 × batch 16: the same 2048 tokens per step as 256 × 8, but a factworld document (~145 tokens)
  needs no more, and attention over 128 positions is cheaper;
- 60% of each document's lines are Q/A pairs and answer tokens weigh 8× in the loss: the recall skill is the
  answer tokens, and at plain LM weighting they are a few percent of the loss;
- 27,000 entities (2,000 by default): each training entity then appears in only ~3 documents, so answers have
  to come from the context, not from memorised entity facts that do not transfer to unseen test entities;
- a high learning rate (5e-3) with a short warm-up for a ~1.5M-parameter model: at 3e-3 the model still
  answered "unknown" (the most frequent single answer) to everything after 150 steps; 8e-3 (the first presets) formed
  recall later and reached a higher validation loss than 5e-3;
- `total_steps` (2600) is what an idle 2-core machine reaches in ~11.5-13 minutes (190-225 steps/min, with the
  CLIs' huge-page malloc and micro's unrolled layers); `train.max_minutes` (14) caps a slower machine, which then
  stops before the cosine anneal and scores lower (lower `train.total_steps` there: the log prints steps/s);
- at most 3 facts per document (they fit the 128-token window) and 5% "unknown" questions;
- half the fact sentences in factworld's alternative wording (`factworld_paraphrase` 0.5: "X has a house in Y"
  beside "X lives in Y"): users state a fact in more than one way, and the demo reports near-range EM per wording
  of the evidence sentence (a model that recalls only the wording it trained on would show it there);
- half the documents ask all their questions after the whole narrative (as the test does) and half state one
  attribute for several entities: without them the model learns to copy *a* value of the asked type from the
  context, which is wrong whenever the context holds several, and plateaus at 50-59% (with them: up to 76%);
- those two kinds ramp in over the first 20,000 documents (~1150 steps, `factworld_curriculum_docs`): recall
  forms on the easier documents first (seed 0: 43% at step 1000 against 22-30% without the ramp);
- each layer's keys and values are mixed with the 7 before them (`model.kv_conv` 8, a depthwise causal
  convolution): the key of a value token then also says what precedes it ("<name> is friends with", "<name> lives
  in"), which attention alone has to assemble over layers. Width 8 reaches back past "is friends with" to the
  subject's last syllable; width 4 did not (friend questions 5/24 against 19/24 at width 8).
"""

import os

from mantis_jax.cli import load_preset


def _micro():
    return load_preset(os.path.join(os.path.dirname(os.path.abspath(__file__)), "micro.py"))


def get_config():
    c = _micro()
    c.name = "demo"
    c.data.source = "factworld"
    c.data.tokenizer_vocab = 1024
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.data.factworld_qa_share = 0.6
    c.data.factworld_max_facts = 3  # documents fit the 128-token window (6 facts: only ~24% fit, docs/data.md)
    c.data.factworld_unknown_share = 0.05  # "unknown" is the most frequent single answer: an easy attractor
    c.data.answer_loss_weight = 8.0
    c.data.factworld_val_docs = 128
    c.data.factworld_entities = 27000  # ~3 mentions per training entity: answers must come from the context
    c.data.factworld_tail_questions = 0.5  # half the documents ask after the whole narrative, as the test does
    c.data.factworld_contrast = 0.5  # half state one attribute for several entities: copying by type fails
    c.data.factworld_curriculum_docs = 20000  # ~1150 steps of ~17 documents: contrast/tail ramp in from 0
    c.data.factworld_paraphrase = 0.5  # half the fact sentences in the alternative wording: users say it both ways
    c.model.kv_conv = 8  # keys/values also carry the 7 tokens before them: "X is friends with Y" in one key
    c.train.lr = 5e-3
    c.train.warmup_steps = 100
    c.train.total_steps = 2600
    c.train.max_minutes = 14.0
    c.train.log_every = 10
    c.train.eval_every = 250
    c.train.eval_steps = 8
    c.train.save_every = 500
    # Stage 2 (the demo's 3 minutes): the frozen LM's hidden states of 2048 train records cached once, the encoder
    # trained on them with the sequential scan (7x the on-the-fly step, docs/engine.md); a 200-step schedule that
    # anneals inside the budget on an idle machine
    c.retrieval.pool = 2048
    c.retrieval.cache_features = True
    c.memory.episodic.scan_impl = "sequential"
    c.retrieval.steps = 200
    c.retrieval.lr = 2e-3
    c.retrieval.attribute_negatives = 2
    c.checkpoint.max_to_keep = 1
    c.checkpoint.keep_best = False
    return c
