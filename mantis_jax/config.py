"""Configuration for every part of MANTIS: `default_config()` and `validate(config)`.

A config is an ml_collections `ConfigDict`. Presets in `configs/` start from `default_config()` and change
fields; the command line overrides fields (`--config.moe.n_experts=8`); `validate()` runs last and raises one
`ConfigError` naming the offending key and the fix. Nothing here imports jax.
"""

from __future__ import annotations

import json
import math
from typing import Any

import ml_collections

VOCAB_MULTIPLE = 128
MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated). The model only speaks logical
# names; these rules are the only place that knows the mesh. `mantis_jax.parallel.mesh` has presets.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("kv_conv", None),
    ("mlp", "tensor"),
    ("exp", "expert"),
    ("layers", None),
    ("ssm_inner", "tensor"),
    ("ssm_state", None),
    ("ssm_rank", None),
    ("ssm_conv", None),
)


# Names of the rule presets in `mantis_jax.parallel.rules.PRESETS` ("" = use mesh.rules as given).
RULE_PRESETS = ("", "dp", "fsdp", "fsdp_ep", "fsdp_tp")


class ConfigError(ValueError):
    """A config field breaks an invariant; the message names the key and the fix."""


def default_config() -> ml_collections.ConfigDict:
    """All fields with defaults. Presets change these; they never add keys."""
    c = ml_collections.ConfigDict()
    c.name = "default"
    c.seed = 0

    m = c.model = ml_collections.ConfigDict()
    m.vocab_size = 50304  # padded to a multiple of 128; the trainer sets it from the tokenizer
    m.d_model = 256
    m.n_layers = 4
    m.n_heads = 4
    m.n_kv_heads = 2
    m.d_ff = 1024  # hidden size of each expert's SwiGLU (of the dense FFN when n_experts == 1)
    m.max_seq_len = 1024
    m.rope_theta = 10000.0
    m.norm_eps = 1e-6
    m.tie_embeddings = True
    m.dtype = "auto"  # compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 | bfloat16
    m.param_dtype = "float32"
    m.scan_layers = True
    m.remat = "none"  # none | full | dots | dots_no_batch
    # Causal attention in query blocks of this many rows (at most MAX_ATTN_BLOCKS blocks, larger when the sequence
    # needs it); block i attends only to the keys up to its end, so ~half of the T x T scores are never computed.
    # 0 = one block (the full masked T x T). Training and cache-less forward passes only (model/layers.py).
    m.attn_block_q = 32
    # Width of a causal depthwise convolution on each layer's keys and values (0 = none): a key also carries the
    # tokens just before it, which makes copy (induction) circuits quick to learn (model/layers.py, docs/perf/demo.md).
    m.kv_conv = 0
    m.init_std = 0.02
    # Early exit (infer/early_exit.py, model/early_exit.py): with exit_loss_weight > 0 the layers from
    # min_exit_layer to L-1 also predict the next token through the shared final norm and LM head, and that mean
    # cross-entropy times the weight is added to the loss, so decoding can stop at a confident layer.
    m.exit_loss_weight = 0.0
    m.min_exit_layer = 1

    moe = c.moe = ml_collections.ConfigDict()
    moe.n_experts = 1  # 1 = dense SwiGLU feed-forward
    moe.top_k = 1
    moe.impl = "ragged"  # dense | ragged | capacity (see model/moe.py)
    moe.capacity_factor = 1.25
    moe.lb_loss_weight = 0.01
    moe.z_loss_weight = 1e-3
    moe.router_impl = "reference"  # reference | pallas | pallas_interpret (the kernels in the Pallas interpreter)
    # Grouped matmul of impl=ragged: auto | ragged_dot | megablox | padded | block_loop (model/gmm.py). auto is the
    # fastest measured per platform (docs/perf/moe.md): block_loop on CPU, ragged_dot on GPU, megablox on TPU.
    moe.gmm_impl = "auto"
    # Expert parallelism (model/expert_parallel.py): under a mesh whose `expert` axis is > 1, the dispatch exchanges
    # tokens with all_to_all and each device computes only its own experts; impl=capacity bounds the exchange
    # buffers (and drops overflow), other impls exchange dropless.
    moe.expert_parallel = False

    mem = c.memory = ml_collections.ConfigDict()
    ep = mem.episodic = ml_collections.ConfigDict()
    ep.enabled = True
    ep.d_model = 256  # must equal model.d_model
    ep.d_state = 16
    ep.d_conv = 4
    ep.expand = 2
    ep.n_layers = 2
    ep.dt_rank = 0  # 0 = ceil(d_model / 16)
    ep.dt_min = 0.001
    ep.dt_max = 0.1
    ep.window = 8192  # tokens of hidden states compressed into the state
    ep.scan_impl = "chunked"  # sequential | associative | chunked
    ep.chunk_size = 8  # chunked scan: tokens per associative-scan chunk (8 is fastest on CPU, docs/perf/ssm.md)
    ep.store_capacity = 4096  # entries in the host-side EpisodicStore ring

    sem = mem.semantic = ml_collections.ConfigDict()
    sem.enabled = True
    sem.dim = 256  # must equal model.d_model
    sem.index = "flat"  # flat | ivfpq | hnsw
    sem.metric = "ip"  # ip | l2
    sem.nlist = 1024
    sem.pq_m = 32
    sem.nprobe = 32
    sem.hnsw_m = 32
    sem.ef_search = 128
    sem.k = 5
    sem.address = ""  # host:port of a running service; "h1:p1,h2:p2" = shards by id; "" = in-process backend
    sem.data_dir = ""
    sem.normalize = True  # L2-normalise vectors and queries (ip scores are then cosines)
    sem.pq_nbits = 8
    sem.refine_factor = 8  # ivfpq re-ranks k * refine_factor PQ candidates exactly against the raw vectors
    sem.train_min = 0  # live vectors before ivfpq trains; 0 = 39 * max(nlist, 2**pq_nbits)
    sem.train_sample = 131072  # vectors sampled to train ivfpq
    sem.ondisk = False  # ivfpq: IVF inverted lists in a memory-mapped file, not RAM (needs data_dir or a service)
    sem.ondisk_merge_rows = 262144  # ondisk: rows added in RAM before a merge into the lists file (or n/8 if more)
    sem.ef_construction = 80
    sem.compact_ratio = 0.2  # rebuild index + raw rows when more than this fraction is deleted/stale
    sem.max_k = 1024
    sem.max_batch = 65536  # rows per request
    sem.max_request_mb = 64
    sem.snapshot_interval_s = 300.0  # service snapshots (and truncates its log) this often; 0 = never
    sem.token_env = "MANTIS_SEMANTIC_TOKEN"  # env var holding the service token (required off loopback)
    sem.timeout_s = 30.0  # client deadline per call
    # TLS. Service (defaults of --tls-cert / --tls-key): PEM certificate and key; required, with the token, off
    # loopback. Client: tls_ca = the CA's PEM file (the service's self-signed certificate works); tls = True uses the
    # system's roots; tls_server_name overrides the host name checked against the certificate.
    sem.tls_cert = ""
    sem.tls_key = ""
    sem.tls = False
    sem.tls_ca = ""
    sem.tls_server_name = ""

    con = mem.consolidation = ml_collections.ConfigDict()
    con.dedup_threshold = 0.95  # cosine above which a new entry merges into a stored one
    con.recency_weight = 0.4
    con.novelty_weight = 0.4
    con.uncertainty_weight = 0.2
    con.decay_half_life = 10000.0  # in store ticks
    con.min_importance = 0.1
    con.queue_size = 1024
    con.batch_size = 64  # evicted entries consolidated per service round trip
    con.namespace = "episodic"
    # Fsynced spool of accepted evictions, replayed after a crash. "auto": under the in-process memory's data_dir,
    # or ~/.local/state/mantis_jax/consolidation/ for a service, none for a non-durable in-process memory;
    # "" = in memory only (not crash-safe); else a directory.
    con.spool_dir = "auto"

    # ---- memory tokens (mantis_jax/memory/tokens.py, docs/memory_tokens.md): MemXLNet-style read/write tokens ----
    mt = mem.tokens = ml_collections.ConfigDict()
    mt.enabled = True  # False: the no-memory baseline (one window: the segment_len tokens before the answer)
    mt.n_tokens = 4  # N read and N write tokens per segment
    mt.n_experts = 2  # k expert memories [N, D], written with routed gates and read as the routed mixture
    mt.segment_len = 64  # tokens per segment, its 2N memory tokens included
    mt.segments = 5  # segments per document: its context's segments (right-aligned), then the question segment
    mt.bptt = 2  # segments back-propagated through: the memory passes stop_gradient every bptt segments
    mt.distance = 64  # factworld far questions: tokens (of this tokenizer) between the evidence and the question
    mt.lb_loss_weight = 0.01  # weight of the memory router's load-balancing loss
    mt.lm_loss_weight = 0.1  # weight of the context tokens' next-token loss (answer tokens weigh 1)
    mt.max_answer_tokens = 8  # greedy tokens generated per question when scoring exact match
    mt.eval_questions = 100  # test-split far questions scored (exact match) at each evaluation (0 = none)
    mt.eval_every = 0  # steps between evaluations (0 = only at the end)
    # A Stage-1 workdir to start from (the step inference loads: best val loss, else newest): its model shape,
    # factworld world, tokenizer (+ the memory tokens: new embedding rows) and LM weights; "" = a fresh LM.
    mt.init_from = ""
    mt.gate_bias = 0.0  # initial b_g of the write gate: sigmoid(gate_bias) is the share of a first write kept
    mt.update_init = "random"  # W_u at start: random (N(0, 1/d_model)) | identity (u starts as the hidden state)
    mt.update_scale = 1.0  # x W_u's initial value: below 1 the proposal's tanh starts less saturated
    mt.curriculum_docs = 0  # training records below this index put the evidence in the segment before the question
    mt.question_in_context = False  # MemXLNet-QA's layout: every context segment also ends with the question
    mt.proposal = "tanh"  # u = tanh(h W_u + b_u) | vocab: + softmax(WRITE logits) @ embedding (the predicted token)
    mt.write_init = "random"  # with init_from: WRITE rows random | answer_slot (a copy of the token ending "A:")

    # The meta-controller (mantis_jax/control, docs/control.md): an MLP over the engine's state summary; its input
    # width and the expert-bias shape [model.n_layers, moe.n_experts] come from the model, never from these keys.
    ctl = c.controller = ml_collections.ConfigDict()
    ctl.d_hidden = 128
    ctl.depth = 2  # hidden layers of the MLP
    ctl.exit_thresholds = (0.8, 0.9, 1.0)  # the exit-threshold head picks one of these (1.0 = full depth)
    ctl.expert_bias_scale = 1.0  # expert-bias means are scale * tanh(.); the sampled bias is Gaussian around them
    ctl.expert_bias_std = 0.1  # initial std of the expert-bias Gaussian (its log is learned)
    # Stage-3 reward: correct·1.0 − latency·0.3 − compute·0.2 + calibration·0.5 (each term in [0, 1]).
    ctl.reward_correct = 1.0
    ctl.reward_latency = 0.3
    ctl.reward_compute = 0.2
    ctl.reward_calibration = 0.5
    ctl.ppo_clip = 0.2
    ctl.value_coef = 0.5
    ctl.entropy_coef = 0.01
    ctl.lr = 3e-3
    ctl.episodes = 32  # episodes (questions) per PPO update
    ctl.ppo_epochs = 4  # passes over each update's episodes
    ctl.minibatches = 2
    ctl.updates = 20
    ctl.save_every = 5  # updates between checkpoints
    ctl.distance = 256  # filler tokens between evidence and question in far / cross_session episodes

    # The critic: a head on the frozen LM's hidden states over "evidence, Q: question, A: answer" (control/critic.py).
    cr = c.critic = ml_collections.ConfigDict()
    cr.d_hidden = 64
    cr.window = 256  # tokens the critic reads (at most data.seq_len); longer inputs keep their last tokens
    cr.lr = 3e-3
    cr.weight_decay = 0.05
    cr.steps = 200
    cr.batch_size = 64
    cr.examples = 2000  # training examples (half supported); val and test get a quarter each
    cr.save_every = 100
    cr.abstain_threshold = 0.5
    cr.engine_episodes = 400  # train-split engine answers (always retrieve) among the examples; val and test get half
    cr.grounding = True  # the head also reads text features: does an evidence sentence state the answer beside the
    # question's names (control/critic.py `grounding`); False = the LM's features alone (the ablation)
    cr.max_accuracy_loss = 0.1  # the val threshold: least hallucination at <= this relative accuracy loss

    # The decoding policy (TIDAL; engine/decoding.py + control/decoding.py, docs/tidal.md, preset configs/tidal.py):
    # every `chunk` tokens a Beta-distributed modulation m in [0, 1] sets temperature, top-k, top-p and repetition
    # penalty, each moving monotonically from its *_low end (m = 0) to its *_high end (m = 1); trained with PPO +
    # GAE on a reward computed from the base model's unmodulated logits.
    # `python -m mantis_jax.control.train_decoding --checkpoint=DIR --workdir=W [--config=configs/tidal.py]`.
    dec = c.decoding = ml_collections.ConfigDict()
    dec.chunk = 8  # tokens between two actions (C)
    dec.chunks = 6  # actions per episode: an episode generates chunk * chunks tokens
    dec.prompt_len = 32  # tokens of factworld text each episode continues
    dec.corpus_docs = 400  # factworld documents (per split) tokenized for prompts and the corpus bigram table
    dec.window = 32  # recent tokens the observation's n-gram statistics and the repetition terms look at
    dec.temperature_low, dec.temperature_high = 0.6, 1.4
    dec.top_k_low, dec.top_k_high = 8, 0  # geometric in m; 0 = the whole vocabulary (top-k off)
    dec.top_p_low, dec.top_p_high = 0.8, 1.0  # 1.0 = top-p off
    dec.penalty_low, dec.penalty_high = 1.0, 1.3  # repetition penalty (1.0 = off)
    dec.d_hidden = 64
    dec.observe_pooled = True  # the observation holds the last chunk's mean hidden state [D] besides the scalars
    dec.group = 1  # rollouts per prompt in an update; > 1 subtracts the prompt's mean advantage (a group baseline)
    dec.gamma = 0.95  # GAE discount over chunks
    dec.lam = 0.9  # GAE lambda
    dec.entropy_coef = 0.01  # bonus on the Beta policy's entropy (keeps m from collapsing early)
    dec.ppo_clip = 0.2
    dec.value_coef = 0.5
    dec.ppo_epochs = 4
    dec.minibatches = 2
    dec.lr = 1e-3
    dec.episodes = 16  # episodes (prompts) per update, rolled out as one batch
    dec.updates = 30
    dec.save_every = 10
    # Chunk reward, all from the base model's unmodulated logits and the sampled tokens:
    #   − w_nll·mean NLL − w_band·(distance of the mean normalised entropy outside [band_low, band_high])
    #   − w_repeat·(share of tokens already in the window) + w_coherence·(share of bigrams seen in the corpus)
    dec.w_nll = 0.2
    dec.w_band = 1.0
    dec.band_low, dec.band_high = 0.1, 0.5
    dec.w_repeat = 1.0
    dec.w_coherence = 0.5

    eng = c.engine = ml_collections.ConfigDict()  # the per-query pipeline (mantis_jax/engine, docs/engine.md)
    eng.retrieve = "always"  # always | never: the fixed policy's memory gates (a learned controller replaces it)
    eng.exit_threshold = 1.0  # per-token confidence at which decoding stops running layers; 1.0 = full depth
    eng.exit_confidence = "softmax"  # softmax (top-1 probability) | margin (top-1 minus top-2): infer/early_exit.py
    eng.verify = False  # run the critic on each answer (needs a critic: python -m mantis_jax.control.train_critic)
    eng.span = "sentence"  # sentence | tokens: what one memory entry holds when reading a context
    eng.span_tokens = 32  # span = tokens: tokens per span
    eng.top_k = 3  # retrieved spans placed in the prompt before the question
    eng.memory_position = "after"  # retrieved spans go after | before the window (after: nearest the question)
    eng.min_score = 0.0  # retrieved spans scoring below this cosine are not placed in the prompt
    # hybrid retrieval (engine/memory.py rerank): fetch this many spans by cosine, keep the top_k by cosine +
    # lexical_weight x the idf-weighted overlap of the question's names with the span, dropping spans whose overlap
    # is below lexical_min x the best candidate's (0 = keep all); search_candidates 0 = the top_k by cosine alone
    eng.search_candidates = 64
    eng.lexical_weight = 0.5
    eng.lexical_min = 0.5
    eng.max_new_tokens = 16
    # greedy | tidal: sample with the knobs a trained decoding head (TIDAL, docs/tidal.md) sets every chunk (Beta
    # mean); tidal reads the head from decoding_policy (python -m mantis_jax.control.train_decoding --workdir=W)
    eng.decoding = "greedy"
    eng.decoding_policy = ""
    eng.window_tokens = 0  # tokens of recent context kept in the prompt (attention-only path); 0 = data.seq_len
    eng.encoder = ""  # directory of Stage-2 weights (python -m mantis_jax.memory.train); "" = mean-pooled hidden
    eng.semantic_capacity = 1000000  # semantic items at which the policy's semantic_fill reads 1
    eng.semantic_fallback = False  # service unreachable: log and use the in-process backend instead of failing
    rt = c.retrieval = ml_collections.ConfigDict()  # Stage 2: the retrieval encoder (mantis_jax/memory/train.py)
    rt.steps = 400
    rt.batch_size = 32  # questions per step; each brings its evidence sentence and its hard negatives
    rt.context_negatives = 3  # other sentences of the question's context
    rt.attribute_negatives = 1  # the same attribute of another entity
    rt.temperature = 0.05  # InfoNCE logits are cosines / temperature
    rt.lr = 1e-3
    rt.warmup_steps = 20
    rt.max_len = 32  # tokens per question or sentence (longer ones are cut)
    rt.eval_questions = 200  # test-split questions for recall@1/@5 (their contexts' sentences are the gallery)
    rt.eval_every = 100
    rt.save_every = 100
    rt.log_every = 10
    rt.max_minutes = 0.0  # wall-clock budget (saves and stops when spent); 0 = none
    rt.pool = 0  # train records the batches draw from, reshuffled each epoch (memory/pool.py); 0 = a new one each
    rt.cache_features = False  # with a pool: the frozen LM's hidden states of its texts computed once, then reused

    d = c.data = ml_collections.ConfigDict()
    d.source = "factworld"  # factworld | text | tokenized | tfds | hf
    d.path = ""
    d.val_file = ""
    d.val_split = 0.0
    d.seq_len = 256
    d.batch_size = 8
    d.shuffle_seed = 0
    d.worker_count = 0
    d.tokenizer = ""  # path of a tokenizer.json; "" = train one on the corpus
    d.tokenizer_vocab = 4096
    d.factworld_seed = 0
    d.factworld_entities = 2000
    d.factworld_docs = 200000  # training documents per epoch (generated on demand, never stored)
    d.factworld_val_docs = 256  # validation documents (val-split entities)
    d.factworld_qa_share = 0.35  # share of a document's lines that are Q/A pairs
    d.factworld_unknown_share = 0.1  # share of questions about never-stated attributes (answer "unknown")
    d.factworld_unstated_prob = 0.15  # probability that an entity's attribute is never stated
    d.factworld_filler_ratio = 0.3  # filler sentences per fact sentence (on average)
    d.factworld_paraphrase = 0.0  # probability of an alternative wording of a fact sentence (0 = canonical only)
    d.factworld_max_entities = 3  # entities per training document: uniform in [1, this]
    d.factworld_max_facts = 6  # fact sentences per training document (bounds its length; see docs/data.md)
    d.factworld_contrast = 0.0  # share of documents whose 2+ entities all state the same attributes (docs/perf/demo.md)
    d.factworld_tail_questions = 0.0  # share of documents that ask all their questions after the whole narrative
    d.factworld_curriculum_docs = 0  # ramp contrast/tail shares up from 0 over this many training docs (0 = none)
    d.answer_loss_weight = 1.0  # loss weight of answer tokens (after "A:" at a line start); 1 = plain LM
    d.add_bos = True  # each packed document is <bos> tokens <eos>
    d.packing = "auto"  # concat | first_fit (whole documents per window) | auto (first_fit for factworld)
    d.doc_separator = "blank_line"  # text files: blank_line | line | file
    d.cache_dir = ""  # token files made from text/hf data; "" = ~/.cache/mantis_jax/tokens
    d.split = "train"  # tfds/hf split to train on; for these sources val_file names the validation split
    d.data_dir = ""  # tfds data_dir
    d.text_field = "text"  # tfds/hf feature holding the text
    d.hf_data_files = ""  # hf: comma-separated data files (e.g. local jsonl with path="json")
    d.hf_config = ""  # hf: dataset config name

    t = c.train = ml_collections.ConfigDict()
    t.optimizer = "adamw"  # adamw | adamw_bf16 | adafactor
    t.lr = 3e-4
    t.min_lr_ratio = 0.1
    t.warmup_steps = 100
    t.total_steps = 1000
    t.steps_per_epoch = 0
    t.epochs = 0
    t.weight_decay = 0.1
    t.b1 = 0.9
    t.b2 = 0.95
    t.eps = 1e-8
    t.grad_clip = 1.0
    t.grad_accum = 1
    t.eval_every = 200
    t.eval_steps = 20
    t.save_every = 500
    t.log_every = 10
    t.patience = 0  # evals without val-loss improvement before stopping; 0 = never
    t.peak_flops = 0.0  # FLOP/s for MFU; 0 = measure with a matmul probe at start-up
    t.max_minutes = 0.0  # wall-clock budget of a run (saves and stops when spent); 0 = none
    t.min_delta = 0.0  # a val loss counts as an improvement (early stopping) when below best - min_delta
    # Trainer robustness (train/curriculum.py, train/trainer.py; checked by _validate_trainer).
    t.seq_len_schedule = ""  # length curriculum "step:len,...", e.g. "0:64,1000:256"; "" = data.seq_len throughout
    t.oom_recovery = True  # a step that runs out of memory: halve the micro-batch, double the accumulation, retry

    mesh = c.mesh = ml_collections.ConfigDict()
    mesh.data = -1  # -1 fills the remaining devices
    mesh.fsdp = 1
    mesh.expert = 1
    mesh.tensor = 1
    mesh.rules = DEFAULT_RULES
    mesh.rules_preset = ""  # dp | fsdp | fsdp_ep | fsdp_tp (parallel/rules.py); "" = use mesh.rules as given

    ck = c.checkpoint = ml_collections.ConfigDict()
    ck.max_to_keep = 3
    ck.keep_best = True
    ck.async_save = True

    # ---- post-training (mantis_jax/post/, docs/post.md): SFT, LoRA, DPO, GRPO ----
    po = c.post = ml_collections.ConfigDict()
    po.base = ""  # workdir of the model to start from (Stage 1 or an earlier post stage); "" = a fresh init
    po.data = ""  # JSONL of the stage's examples (docs/post.md schemas); "" = generated from factworld
    po.examples = 2000  # factworld examples generated for the stage (when post.data is "")
    po.eval_examples = 128  # held-out examples (test-split entities) for the stage's evaluation
    po.lora_rank = 0  # 0 = full fine-tuning; r > 0 = LoRA adapters of rank r (the base frozen)
    po.lora_alpha = 16.0  # adapter scale alpha / rank
    po.lora_dropout = 0.0  # drop rate of the adapter's input features
    po.lora_targets = "attn.wq,attn.wk,attn.wv,attn.wo,mlp.w_gate,mlp.w_up,mlp.w_down,moe.w_gate,moe.w_up,moe.w_down"
    po.dpo_beta = 0.1
    po.dpo_reference = "precomputed"  # precomputed (reference log-probs before training) | frozen (a frozen copy)
    po.grpo_group = 8  # samples per prompt (G)
    po.grpo_prompts = 4  # prompts per step
    po.grpo_clip = 0.2  # ratio clip epsilon
    po.grpo_kl = 0.04  # weight of the KL to the reference
    po.grpo_updates = 2  # optimizer updates per sampled batch (the clipped ratio acts from the second)
    po.grpo_temperature = 1.0
    po.grpo_max_new_tokens = 6
    po.grpo_unanswerable = 0.5  # share of unanswerable prompts

    lg = c.logging = ml_collections.ConfigDict()
    lg.tensorboard = True
    lg.jsonl = True
    lg.progress = True

    # ---- eval: `python -m mantis_jax.eval` (docs/eval.md) -------------------------------------------------
    ev = c.eval = ml_collections.ConfigDict()
    ev.limit = 100  # items per task (0 = all); factworld uses factworld_questions per kind
    ev.num_fewshot = 0  # MMLU dev / GSM8K train examples before each question
    ev.batch_size = 8  # rows per log-likelihood and generation batch
    ev.max_new_tokens = 256  # GSM8K and HumanEval completions
    ev.humaneval_samples = 1  # completions per problem (1 = greedy)
    ev.humaneval_k = "1"  # comma-separated k of pass@k (each <= humaneval_samples)
    ev.temperature = 0.8  # sampling temperature when humaneval_samples > 1
    ev.sandbox_timeout_s = 5.0  # wall (and CPU) seconds per executed completion
    ev.sandbox_memory_mb = 512  # address-space limit per executed completion
    ev.sandbox_workers = 2  # completions executed at once
    ev.factworld_questions = 50  # questions per kind
    ev.factworld_kinds = "near,far,cross_session,unanswerable"
    ev.factworld_distance = 0  # filler tokens between evidence and question (far, cross_session); 0 = the window
    return c


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(config: ml_collections.ConfigDict, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = _get(config, key)
        _require(value > 0, f"config.{key} ({value}) must be > 0")


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _equal(config: ml_collections.ConfigDict, key: str, ref: str) -> None:
    a, b = _get(config, key), _get(config, ref)
    _require(a == b, f"config.{key} ({a}) must equal config.{ref} ({b}); set --config.{key}={b}")


def _one_of(config: ml_collections.ConfigDict, key: str, choices: tuple[str, ...]) -> None:
    value = _get(config, key)
    _require(value in choices, f"config.{key} ({value!r}) must be one of {', '.join(choices)}")


def resolve_dtype(name: str) -> str:
    """A compute dtype name, with "auto" made concrete by the platform: bfloat16 on GPU/TPU, float32 on CPU.

    Called when the model is built (after `jax.distributed.initialize`), never by `validate`: asking JAX for its
    backend initialises it."""
    if name != "auto":
        return name
    import jax  # noqa: PLC0415 (config stays free of JAX at import time)

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def seq_len_schedule(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
    """`train.seq_len_schedule` as [(first step, row length), ...] ([(0, data.seq_len)] when empty)."""
    text = config.train.seq_len_schedule.strip()
    if not text:
        return [(0, config.data.seq_len)]
    try:
        stages = [(int(step), int(length)) for step, length in (part.split(":") for part in text.split(","))]
    except ValueError:  # not two integers per stage
        raise ConfigError(f"config.train.seq_len_schedule ({text!r}) must read 'step:len,step:len,...', e.g. "
                          f"'0:64,1000:{config.data.seq_len}'") from None
    return stages


def _validate_trainer(config: ml_collections.ConfigDict) -> None:
    stages, full = seq_len_schedule(config), config.data.seq_len
    key = f"config.train.seq_len_schedule ({config.train.seq_len_schedule!r})"
    _require(stages[0][0] == 0, f"{key} must start at step 0, e.g. '0:64,...'")
    _require(all(a[0] < b[0] for a, b in zip(stages, stages[1:])), f"{key}: its steps must increase")
    for _, length in stages:
        _require(0 < length <= full and full % length == 0,
                 f"{key}: each length must divide config.data.seq_len ({full}); {length} does not")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every invariant; raises one ConfigError naming the key and the fix. Returns the config."""
    m, moe = config.model, config.moe
    _positive(config, (
        "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads",
        "model.d_ff", "model.max_seq_len", "model.rope_theta", "model.norm_eps",
        "moe.n_experts", "moe.top_k", "moe.capacity_factor",
        "memory.episodic.d_state", "memory.episodic.d_conv", "memory.episodic.expand",
        "memory.episodic.n_layers", "memory.episodic.window", "memory.episodic.chunk_size",
        "memory.episodic.store_capacity", "memory.semantic.dim", "memory.semantic.k",
        "controller.d_hidden", "critic.d_hidden",
        "controller.depth", "controller.lr", "controller.episodes", "controller.ppo_epochs", "controller.minibatches",
        "controller.updates", "controller.save_every", "controller.expert_bias_std",
        "critic.window", "critic.lr", "critic.steps", "critic.batch_size", "critic.examples", "critic.save_every",
        "data.seq_len", "data.batch_size", "data.tokenizer_vocab",
        "train.lr", "train.grad_accum", "train.log_every", "train.eval_every", "train.save_every",
        "checkpoint.max_to_keep",
    ))
    _require(m.vocab_size % VOCAB_MULTIPLE == 0,
             f"config.model.vocab_size ({m.vocab_size}) must be a multiple of {VOCAB_MULTIPLE}; "
             f"use {-(-m.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE}")
    _require(m.d_model % m.n_heads == 0,
             f"config.model.n_heads ({m.n_heads}) must divide config.model.d_model ({m.d_model})")
    _require((m.d_model // m.n_heads) % 2 == 0,
             f"head dim config.model.d_model / config.model.n_heads ({m.d_model // m.n_heads}) must be even "
             "for rotary embeddings")
    _require(m.n_heads % m.n_kv_heads == 0,
             f"config.model.n_kv_heads ({m.n_kv_heads}) must divide config.model.n_heads ({m.n_heads})")
    _require(moe.top_k <= moe.n_experts,
             f"config.moe.top_k ({moe.top_k}) must be <= config.moe.n_experts ({moe.n_experts})")
    _require(config.data.seq_len <= m.max_seq_len,
             f"config.data.seq_len ({config.data.seq_len}) must be <= config.model.max_seq_len "
             f"({m.max_seq_len}); raise --config.model.max_seq_len")
    _one_of(config, "model.dtype", ("auto", "float32", "bfloat16"))
    _one_of(config, "model.param_dtype", ("float32", "bfloat16"))
    _one_of(config, "model.remat", ("none", "full", "dots", "dots_no_batch"))
    _require(m.get("attn_block_q", 0) >= 0,
             f"config.model.attn_block_q ({m.get('attn_block_q')}) must be >= 0 (0 = unblocked attention)")
    _require(m.get("kv_conv", 0) >= 0,
             f"config.model.kv_conv ({m.get('kv_conv')}) must be >= 0 (0 = no convolution on keys and values)")
    _require(m.get("exit_loss_weight", 0.0) >= 0,
             f"config.model.exit_loss_weight ({m.get('exit_loss_weight')}) must be >= 0 (0 = no early-exit loss)")
    _require(1 <= m.get("min_exit_layer", 1) <= m.n_layers,
             f"config.model.min_exit_layer ({m.get('min_exit_layer')}) must be in [1, config.model.n_layers "
             f"({m.n_layers})]")
    _one_of(config, "moe.impl", ("dense", "ragged", "capacity"))
    _one_of(config, "moe.router_impl", ("reference", "pallas", "pallas_interpret"))
    _one_of(config, "moe.gmm_impl", ("auto", "ragged_dot", "megablox", "padded", "block_loop"))
    _one_of(config, "memory.episodic.scan_impl", ("sequential", "associative", "chunked"))
    ep = config.memory.episodic
    _require(0.0 < ep.dt_min <= ep.dt_max,
             f"config.memory.episodic.dt_min ({ep.dt_min}) must be > 0 and <= config.memory.episodic.dt_max "
             f"({ep.dt_max})")
    _require(ep.dt_rank >= 0, f"config.memory.episodic.dt_rank ({ep.dt_rank}) must be >= 0 (0 = ceil(d_model / 16))")
    _one_of(config, "memory.semantic.index", ("flat", "ivfpq", "hnsw"))
    _one_of(config, "memory.semantic.metric", ("ip", "l2"))
    _positive(config, (
        "memory.semantic.nlist", "memory.semantic.pq_m", "memory.semantic.nprobe", "memory.semantic.hnsw_m",
        "memory.semantic.ef_search", "memory.semantic.refine_factor", "memory.semantic.max_k",
        "memory.semantic.max_batch", "memory.semantic.max_request_mb", "memory.semantic.timeout_s",
        "memory.semantic.ondisk_merge_rows",
        "memory.consolidation.queue_size", "memory.consolidation.batch_size",
        "memory.consolidation.decay_half_life",
    ))
    sem = config.memory.semantic
    _require(sem.index != "ivfpq" or sem.dim % sem.pq_m == 0,
             f"config.memory.semantic.pq_m ({sem.pq_m}) must divide config.memory.semantic.dim ({sem.dim})")
    _require(1 <= sem.pq_nbits <= 16, f"config.memory.semantic.pq_nbits ({sem.pq_nbits}) must be in [1, 16]")
    _require(not sem.ondisk or sem.index == "ivfpq",
             f"config.memory.semantic.ondisk keeps IVF lists on disk and needs index 'ivfpq' (got {sem.index!r}); "
             "set --config.memory.semantic.index=ivfpq or --config.memory.semantic.ondisk=False")
    _require(not sem.ondisk or sem.data_dir or sem.address,
             "config.memory.semantic.ondisk needs a file for the lists: set --config.memory.semantic.data_dir "
             "(or address, for a service started with --ondisk)")
    _require(0.0 < sem.compact_ratio < 1.0,
             f"config.memory.semantic.compact_ratio ({sem.compact_ratio}) must be in (0, 1)")
    clusters = max(sem.nlist, 2 ** sem.pq_nbits)  # ivfpq's k-means needs at least this many training points
    _require(sem.index != "ivfpq" or sem.train_min == 0 or sem.train_min >= clusters,
             f"config.memory.semantic.train_min ({sem.train_min}) must be 0 (= 39 x {clusters}) or at least "
             f"max(nlist, 2**pq_nbits) = {clusters}, the clusters ivfpq trains")
    _require(sem.index != "ivfpq" or sem.train_sample >= clusters,
             f"config.memory.semantic.train_sample ({sem.train_sample}) must be at least max(nlist, 2**pq_nbits) "
             f"= {clusters}, the clusters ivfpq trains")
    _require(bool(sem.tls_cert) == bool(sem.tls_key),
             "config.memory.semantic.tls_cert and tls_key go together: set both (PEM files) or neither")
    _require(-1.0 <= config.memory.consolidation.dedup_threshold <= 1.0,
             f"config.memory.consolidation.dedup_threshold ({config.memory.consolidation.dedup_threshold}) "
             "is a cosine and must be in [-1, 1]")
    _one_of(config, "train.optimizer", ("adamw", "adamw_bf16", "adafactor"))
    for key in ("train.max_minutes", "train.min_delta", "train.peak_flops", "train.patience"):
        _require(_get(config, key) >= 0, f"config.{key} ({_get(config, key)}) must be >= 0")
    _validate_trainer(config)
    _require(moe.lb_loss_weight >= 0 and moe.z_loss_weight >= 0,
             "config.moe.lb_loss_weight and config.moe.z_loss_weight must be >= 0")
    for key in ("memory.episodic.d_model", "memory.semantic.dim"):
        _equal(config, key, "model.d_model")
    _validate_control(config)
    _require(0.0 <= config.data.val_split < 1.0,
             f"config.data.val_split ({config.data.val_split}) must be in [0, 1)")
    _require(not (config.data.val_split > 0 and config.data.val_file),
             "config.data.val_split and config.data.val_file are both set; use one: "
             "--config.data.val_split=0 or --config.data.val_file=''")
    eng = config.engine
    _one_of(config, "engine.retrieve", ("always", "never"))
    _one_of(config, "engine.span", ("sentence", "tokens"))
    _one_of(config, "engine.memory_position", ("before", "after"))
    _one_of(config, "engine.exit_confidence", ("softmax", "margin"))
    _one_of(config, "engine.decoding", ("greedy", "tidal"))
    _require(0.0 < eng.exit_threshold <= 1.0,
             f"config.engine.exit_threshold ({eng.exit_threshold}) must be in (0, 1] (1.0 = full depth)")
    _positive(config, ("engine.span_tokens", "engine.top_k", "engine.max_new_tokens", "engine.semantic_capacity"))
    _positive(config, ("retrieval.steps", "retrieval.batch_size", "retrieval.temperature", "retrieval.lr",
                       "retrieval.max_len", "retrieval.eval_questions", "retrieval.eval_every", "retrieval.save_every",
                       "retrieval.log_every"))
    for key in ("retrieval.context_negatives", "retrieval.attribute_negatives", "retrieval.warmup_steps",
                "retrieval.max_minutes"):
        _require(_get(config, key) >= 0, f"config.{key} ({_get(config, key)}) must be >= 0")
    _require(eng.search_candidates == 0 or eng.search_candidates >= eng.top_k,
             f"config.engine.search_candidates ({eng.search_candidates}) must be 0 (no rerank) or >= "
             f"config.engine.top_k ({eng.top_k})")
    _require(eng.lexical_weight >= 0 and math.isfinite(eng.lexical_weight),
             f"config.engine.lexical_weight ({eng.lexical_weight}) must be a finite number >= 0")
    _require(0.0 <= eng.lexical_min <= 1.0,
             f"config.engine.lexical_min ({eng.lexical_min}) must be in [0, 1] (a share of the best lexical score)")
    _require(config.retrieval.pool == 0 or config.retrieval.pool >= config.retrieval.batch_size,
             f"config.retrieval.pool ({config.retrieval.pool}) must be 0 (no pool) or >= config.retrieval.batch_size "
             f"({config.retrieval.batch_size})")
    _require(not config.retrieval.cache_features or config.retrieval.pool > 0,
             "config.retrieval.cache_features needs a bounded pool of texts: set config.retrieval.pool (e.g. 4096)")
    _require(eng.window_tokens >= 0,
             f"config.engine.window_tokens ({eng.window_tokens}) must be >= 0 (0 = data.seq_len)")
    d = config.data
    _one_of(config, "data.source", ("factworld", "text", "tokenized", "tfds", "hf"))
    _one_of(config, "data.doc_separator", ("blank_line", "line", "file"))
    _one_of(config, "data.packing", ("auto", "concat", "first_fit"))
    _require(d.factworld_entities >= 30,
             f"config.data.factworld_entities ({d.factworld_entities}) must be >= 30 (10 per split)")
    _positive(config, ("data.factworld_docs", "data.factworld_val_docs", "data.answer_loss_weight"))
    _require(0.0 < d.factworld_qa_share < 1.0,
             f"config.data.factworld_qa_share ({d.factworld_qa_share}) must be in (0, 1)")
    _require(0.0 <= d.factworld_unknown_share <= 1.0,
             f"config.data.factworld_unknown_share ({d.factworld_unknown_share}) must be in [0, 1]")
    _require(0.0 <= d.factworld_unstated_prob < 1.0,
             f"config.data.factworld_unstated_prob ({d.factworld_unstated_prob}) must be in [0, 1)")
    _require(0.0 <= d.factworld_paraphrase <= 1.0 and d.factworld_filler_ratio >= 0.0,
             f"config.data.factworld_paraphrase ({d.factworld_paraphrase}) must be in [0, 1] and "
             f"config.data.factworld_filler_ratio ({d.factworld_filler_ratio}) >= 0")
    _require(1 <= d.factworld_max_entities <= 8,
             f"config.data.factworld_max_entities ({d.factworld_max_entities}) must be in [1, 8]")
    _require(0.0 <= d.factworld_contrast <= 1.0,
             f"config.data.factworld_contrast ({d.factworld_contrast}) must be in [0, 1]")
    _require(0.0 <= d.factworld_tail_questions <= 1.0,
             f"config.data.factworld_tail_questions ({d.factworld_tail_questions}) must be in [0, 1]")
    _require(d.factworld_curriculum_docs >= 0,
             f"config.data.factworld_curriculum_docs ({d.factworld_curriculum_docs}) must be >= 0 (0 = no ramp)")
    _require(d.factworld_max_facts >= 1,
             f"config.data.factworld_max_facts ({d.factworld_max_facts}) must be >= 1")
    _require(d.worker_count >= 0, f"config.data.worker_count ({d.worker_count}) must be >= 0")
    _require(0.0 < config.train.min_lr_ratio <= 1.0 or config.train.min_lr_ratio == 0.0,
             f"config.train.min_lr_ratio ({config.train.min_lr_ratio}) must be in [0, 1]")
    po = config.post  # post-training (mantis_jax/post/)
    _positive(config, ("post.examples", "post.eval_examples", "post.lora_alpha", "post.dpo_beta", "post.grpo_group",
                       "post.grpo_prompts", "post.grpo_updates", "post.grpo_max_new_tokens"))
    _require(po.lora_rank >= 0, f"config.post.lora_rank ({po.lora_rank}) must be >= 0 (0 = full fine-tuning)")
    _require(0.0 <= po.lora_dropout < 1.0, f"config.post.lora_dropout ({po.lora_dropout}) must be in [0, 1)")
    _require(po.lora_rank == 0 or bool(po.lora_targets.strip()),
             "config.post.lora_targets is empty; name the adapted weights, e.g. --config.post.lora_targets=attn.wq")
    _one_of(config, "post.dpo_reference", ("precomputed", "frozen"))
    _require(po.grpo_group >= 2, f"config.post.grpo_group ({po.grpo_group}) must be >= 2 (advantages compare "
             "samples within a group)")
    _require(0.0 < po.grpo_clip < 1.0, f"config.post.grpo_clip ({po.grpo_clip}) must be in (0, 1)")
    _require(po.grpo_kl >= 0, f"config.post.grpo_kl ({po.grpo_kl}) must be >= 0")
    _require(po.grpo_temperature > 0, f"config.post.grpo_temperature ({po.grpo_temperature}) must be > 0 "
             "(GRPO samples; 0 would make every sample of a group the same)")
    _require(0.0 <= po.grpo_unanswerable <= 1.0,
             f"config.post.grpo_unanswerable ({po.grpo_unanswerable}) must be in [0, 1]")
    mt = config.memory.get("tokens")  # memory tokens (mantis_jax/memory/tokens.py)
    if mt is not None:
        _positive(config, ("memory.tokens.n_tokens", "memory.tokens.n_experts", "memory.tokens.segments",
                           "memory.tokens.bptt", "memory.tokens.distance", "memory.tokens.max_answer_tokens"))
        _require(mt.segment_len > 2 * mt.n_tokens + mt.max_answer_tokens,
                 f"config.memory.tokens.segment_len ({mt.segment_len}) must exceed 2 x n_tokens + max_answer_tokens "
                 f"({2 * mt.n_tokens + mt.max_answer_tokens}): a segment holds N read, N write and text tokens")
        _require(mt.segment_len <= config.model.max_seq_len,
                 f"config.memory.tokens.segment_len ({mt.segment_len}) must be <= config.model.max_seq_len "
                 f"({config.model.max_seq_len})")
        _require(mt.segments >= 2, f"config.memory.tokens.segments ({mt.segments}) must be >= 2 (context segments, "
                 "then the question segment)")
        _require(min(mt.lb_loss_weight, mt.lm_loss_weight, mt.eval_every, mt.eval_questions) >= 0,
                 "config.memory.tokens.lb_loss_weight, lm_loss_weight, eval_every and eval_questions must be >= 0")
        for key, choices in (("update_init", ("random", "identity")), ("proposal", ("tanh", "vocab")),
                             ("write_init", ("random", "answer_slot"))):
            if key in mt:
                _one_of(config, f"memory.tokens.{key}", choices)
        _require(mt.get("curriculum_docs", 0) >= 0 and mt.get("update_scale", 1.0) >= 0,
                 f"config.memory.tokens.curriculum_docs ({mt.get('curriculum_docs')}) and "
                 f"config.memory.tokens.update_scale ({mt.get('update_scale')}) must be >= 0")
    sizes = [config.mesh[a] for a in MESH_AXES]
    _require(all(s == -1 or s > 0 for s in sizes) and sizes.count(-1) <= 1,
             f"config.mesh sizes {dict(zip(MESH_AXES, sizes))} must be positive, with at most one -1")
    _one_of(config, "mesh.rules_preset", RULE_PRESETS)
    _require(isinstance(config.moe.expert_parallel, bool),
             f"config.moe.expert_parallel ({config.moe.expert_parallel!r}) must be True or False")
    _require(not config.moe.expert_parallel or config.mesh.expert == -1
             or moe.n_experts % config.mesh.expert == 0,
             f"config.moe.n_experts ({moe.n_experts}) must be a multiple of config.mesh.expert "
             f"({config.mesh.expert}) for expert parallelism; set --config.mesh.expert to a divisor")
    rule_names = [r[0] for r in config.mesh.rules]
    _require(len(rule_names) == len(set(rule_names)),
             f"config.mesh.rules names a logical axis twice: {rule_names}")
    for name, target in config.mesh.rules:
        targets = target if isinstance(target, (tuple, list)) else (target,)
        for t in targets:
            _require(t is None or t in MESH_AXES,
                     f"config.mesh.rules maps {name!r} to unknown mesh axis {t!r}; use one of {MESH_AXES}")
    _validate_eval(config)
    _validate_decoding(config)
    return config


def _validate_eval(config: ml_collections.ConfigDict) -> None:
    if "eval" not in config:  # a config stored before the eval section existed
        return
    ev = config.eval
    _positive(config, ("eval.batch_size", "eval.max_new_tokens", "eval.humaneval_samples",
                       "eval.sandbox_timeout_s", "eval.sandbox_memory_mb", "eval.sandbox_workers",
                       "eval.factworld_questions"))
    _require(ev.limit >= 0 and ev.num_fewshot >= 0 and ev.factworld_distance >= 0,
             "config.eval.limit, config.eval.num_fewshot and config.eval.factworld_distance must be >= 0")
    ks = [k.strip() for k in str(ev.humaneval_k).split(",") if k.strip()]
    _require(bool(ks) and all(k.isdigit() and 1 <= int(k) <= ev.humaneval_samples for k in ks),
             f"config.eval.humaneval_k ({ev.humaneval_k!r}) must list integers in [1, config.eval.humaneval_samples "
             f"({ev.humaneval_samples})], e.g. --config.eval.humaneval_k=1,10 with humaneval_samples=10")
    kinds = ("near", "far", "cross_session", "unanswerable")
    bad = [k for k in str(ev.factworld_kinds).split(",") if k.strip() not in kinds]
    _require(not bad, f"config.eval.factworld_kinds names {bad}; use a comma-separated subset of {', '.join(kinds)}")


def _validate_decoding(config: ml_collections.ConfigDict) -> None:
    if "decoding" not in config:  # a config stored before the decoding policy existed
        return
    d = config.decoding
    _positive(config, ("decoding.chunk", "decoding.chunks", "decoding.prompt_len", "decoding.window",
                       "decoding.corpus_docs",
                       "decoding.d_hidden", "decoding.ppo_epochs", "decoding.minibatches", "decoding.lr",
                       "decoding.episodes", "decoding.updates", "decoding.save_every", "decoding.group"))
    _require(d.episodes % d.group == 0,
             f"config.decoding.group ({d.group}) must divide config.decoding.episodes ({d.episodes})")
    for lo, hi, ok in (("temperature_low", "temperature_high", d.temperature_low > 0),
                       ("top_p_low", "top_p_high", 0 < d.top_p_low <= 1 and d.top_p_high <= 1),
                       ("penalty_low", "penalty_high", d.penalty_low >= 1),
                       ("band_low", "band_high", 0 <= d.band_low)):
        _require(ok and d[lo] <= d[hi], f"config.decoding.{lo} ({d[lo]}) must be <= config.decoding.{hi} "
                 f"({d[hi]}) and in range (temperature > 0, top_p in (0, 1], penalty >= 1, band >= 0)")
    _require(d.top_k_low >= 1 and (d.top_k_high == 0 or d.top_k_high >= d.top_k_low),
             f"config.decoding.top_k_low ({d.top_k_low}) must be >= 1 and config.decoding.top_k_high "
             f"({d.top_k_high}) >= it (0 = the whole vocabulary)")
    _require(0 <= d.gamma <= 1 and 0 <= d.lam <= 1,
             f"config.decoding.gamma ({d.gamma}) and config.decoding.lam ({d.lam}) must be in [0, 1]")
    _require(0 < d.ppo_clip < 1, f"config.decoding.ppo_clip ({d.ppo_clip}) must be in (0, 1)")
    _require(min(d.entropy_coef, d.value_coef, d.w_nll, d.w_band, d.w_repeat, d.w_coherence) >= 0,
             "config.decoding.entropy_coef, value_coef and the reward weights w_* must be >= 0")
    _require(d.prompt_len >= max(d.window, d.chunk),
             f"config.decoding.prompt_len ({d.prompt_len}) must be >= config.decoding.window ({d.window}) and "
             f"config.decoding.chunk ({d.chunk})")
    _require((d.episodes * d.chunks) % d.minibatches == 0,
             f"config.decoding.minibatches ({d.minibatches}) must divide config.decoding.episodes * "
             f"config.decoding.chunks ({d.episodes * d.chunks})")


def _validate_control(config: ml_collections.ConfigDict) -> None:
    """The controller and critic keys: reward weights, PPO coefficients, thresholds."""
    ctl, cr = config.controller, config.critic
    for key in ("reward_correct", "reward_latency", "reward_compute", "reward_calibration", "value_coef",
                "entropy_coef", "expert_bias_scale"):
        value = ctl[key]
        _require(0.0 <= value <= 10.0, f"config.controller.{key} ({value}) must be in [0, 10]")
    _require(ctl.reward_correct > 0, f"config.controller.reward_correct ({ctl.reward_correct}) must be > 0 "
             "(a reward that never pays for correct answers trains nothing useful)")
    _require(0.0 < ctl.ppo_clip < 1.0, f"config.controller.ppo_clip ({ctl.ppo_clip}) must be in (0, 1)")
    thresholds = tuple(ctl.exit_thresholds)
    _require(len(thresholds) >= 1 and all(0.0 < t <= 1.0 for t in thresholds)
             and list(thresholds) == sorted(set(thresholds)),
             f"config.controller.exit_thresholds ({thresholds}) must be increasing values in (0, 1]")
    _require(ctl.episodes % ctl.minibatches == 0,
             f"config.controller.minibatches ({ctl.minibatches}) must divide config.controller.episodes "
             f"({ctl.episodes})")
    _require(0.0 <= cr.abstain_threshold <= 1.0,
             f"config.critic.abstain_threshold ({cr.abstain_threshold}) is a probability and must be in [0, 1]")
    _require(cr.examples >= 16, f"config.critic.examples ({cr.examples}) must be >= 16")
    _require(cr.weight_decay >= 0, f"config.critic.weight_decay ({cr.weight_decay}) must be >= 0")
    _require(cr.engine_episodes >= 0, f"config.critic.engine_episodes ({cr.engine_episodes}) must be >= 0 "
             "(0 = no engine answers among the examples)")
    _require(0.0 <= cr.max_accuracy_loss < 1.0,
             f"config.critic.max_accuracy_loss ({cr.max_accuracy_loss}) is a relative loss and must be in [0, 1)")


def to_json(config: ml_collections.ConfigDict) -> str:
    """A stable JSON form, stored beside every checkpoint."""
    return json.dumps(config.to_dict(), sort_keys=True, indent=1)


def from_json(text: str) -> ml_collections.ConfigDict:
    raw = json.loads(text)

    def fix(node):  # JSON has no tuples; the rules must come back as tuples to compare and hash.
        if isinstance(node, dict):
            return {k: fix(v) for k, v in node.items()}
        if isinstance(node, list):
            return tuple(fix(v) for v in node)
        return node

    return ml_collections.ConfigDict(fix(raw))


def set_d_model(config: ml_collections.ConfigDict, d_model: int) -> None:
    """Sets model.d_model and every field that must equal it (presets use this)."""
    config.model.d_model = d_model
    config.memory.episodic.d_model = d_model
    config.memory.semantic.dim = d_model


def set_shape(config: ml_collections.ConfigDict, *, d_model: int, n_layers: int, n_experts: int, top_k: int) -> None:
    """Sets the model shape and keeps the memory fields aligned with it."""
    set_d_model(config, d_model)
    config.model.n_layers = n_layers
    config.moe.n_experts = n_experts
    config.moe.top_k = top_k
