"""Memory-token training on factworld far questions: `python -m mantis_jax.memory.train_tokens`.

    python -m mantis_jax.memory.train_tokens --config=configs/memory_tokens.py --workdir=runs/memtok
    python -m mantis_jax.memory.train_tokens --config=configs/memory_tokens.py --workdir=runs/nomem \
        --config.memory.tokens.enabled=False                  # the no-memory baseline, at equal training tokens

Data: train-split factworld far QA records (`qa_record(split, "far", i, distance=memory.tokens.distance)`, the
distance counted in this tokenizer's tokens), drawn in index order; a record whose context needs more than
`segments - 1` segments is skipped (in both modes, so both train on the same documents). With memory each record
is `segments` rows of `segment_len` tokens (memory/tokens.py) and a step takes `data.batch_size` documents,
time-step-major. Without memory a record is one window, the last `segment_len` tokens before the answer's end
(the evidence lies further back), and a step takes batch_size x segments windows: the same tokens per step.

The model is MantisLM from `config.model` (vocab from the tokenizer, which gains the memory tokens) plus the memory
parameters; the optimizer is `train/state.make_optimizer`. What leaves the run: orbax checkpoints
(`train/checkpoint.Checkpointer`: state, data position, config, tokenizer, meta) in `<workdir>/checkpoints`, metrics
in `<workdir>/metrics.jsonl` and TensorBoard (`train/metrics.MetricsWriter`), a progress bar, and a summary with
the exact match on `eval_questions` test-split far questions (greedy answers, `factworld.exact_match`). Re-running
with the same workdir resumes exactly: the state and the record index are restored and every batch is a pure
function of the record index.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from mantis_jax import cli
from mantis_jax import config as config_lib
from mantis_jax.data import factworld, pipeline
from mantis_jax.data.tokenizer import Tokenizer, check_compatible
from mantis_jax.memory import tokens as mt
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import forward, init_params
from mantis_jax.train import metrics as metrics_lib
from mantis_jax.train import state as state_lib
from mantis_jax.train.checkpoint import Checkpointer, CheckpointError, config_differences
from mantis_jax.train.step import cross_entropy_and_hits
from mantis_jax.train.trainer import TrainingError

# Config fields that shape the saved state or the meaning of the data position: resuming across a change is refused.
RESUME_KEYS = ("memory.tokens.enabled", "memory.tokens.n_tokens", "memory.tokens.n_experts",
               "memory.tokens.segment_len", "memory.tokens.segments", "memory.tokens.distance", "data.batch_size",
               "data.factworld_seed", "data.factworld_entities")


# ---- data ---------------------------------------------------------------------------------------------------
class FarQuestions:
    """Far-question records of one split as model inputs; `batch(start, n)` -> (arrays, next record index)."""

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str):
        self.mt, self.tok, self.split = config.memory.tokens, tokenizer, split
        self.world = factworld.world_from_config(config)
        _, self.read_ids, self.write_ids = mt.add_memory_tokens(tokenizer, self.mt.n_tokens)
        self.memory_ids = np.concatenate([self.read_ids, self.write_ids])
        self.count = lambda s: len(tokenizer.encode(s))

    def distance(self, index: int) -> int:
        """Filler tokens between evidence and question for record `index`: 0 (the evidence in the context segment
        just before the question) for training records below `curriculum_docs`, else `distance`."""
        short = self.split == "train" and index < self.mt.get("curriculum_docs", 0)
        return 0 if short else self.mt.distance

    def _encode(self, text: str, what: str) -> np.ndarray:
        ids = np.asarray(self.tok.encode(text), np.int32)
        mt.check_no_memory_tokens(ids, self.memory_ids, what)
        return ids

    def record(self, index: int, *, with_answer: bool = True) -> dict | None:
        """Record `index` laid out for the configured mode (None when it does not fit); keys as the batch's."""
        c = self.mt
        rec = self.world.qa_record(self.split, "far", index, distance=self.distance(index), count_tokens=self.count)
        context = self._encode(" " + rec["context"], f"factworld record {rec['id']}")
        question = self._encode(f"\nQ: {rec['question']}\nA:", f"factworld record {rec['id']}")
        if with_answer:
            answer = self._encode(f" {rec['answer']}\n", f"factworld record {rec['id']}")
        else:  # room for the generated answer: padding the greedy loop writes into
            answer = np.full((c.max_answer_tokens,), self.tok.pad_id, np.int32)
        doc = mt.segment_document(context, question, answer, segments=c.segments, segment_len=c.segment_len,
                                  read_ids=self.read_ids, write_ids=self.write_ids, pad_id=self.tok.pad_id,
                                  lm_weight=c.lm_loss_weight, question_in_context=c.get("question_in_context", False))
        if doc is None:
            return None
        if not c.enabled:
            doc = self._window(context, question, answer if with_answer else [], with_answer)
        doc["answer"] = rec["answer"]
        return doc

    def _window(self, context, question, answer, with_answer: bool) -> dict:
        """The no-memory layout: the last segment_len tokens (fewer the answer's room at evaluation), left-aligned."""
        S = self.mt.segment_len
        room = S if with_answer else S - self.mt.max_answer_tokens
        ids = np.concatenate([context, question, np.asarray(answer, np.int32)])[-room:]
        tokens = np.full((S,), self.tok.pad_id, np.int32)
        tokens[:len(ids)] = ids
        weights = np.zeros((S,), np.float32)
        n_ctx = len(ids) - len(answer) - len(question)  # context tokens left in the window
        weights[:max(n_ctx - 1, 0)] = self.mt.lm_loss_weight
        answer_mask = np.zeros((S,), np.float32)
        answer_mask[len(ids) - len(answer) - 1:len(ids) - 1] = 1.0 if len(answer) else 0.0
        weights = np.maximum(weights, answer_mask)
        targets = np.concatenate([tokens[1:], [self.tok.pad_id]]).astype(np.int32)
        return {"inputs": tokens, "targets": targets, "loss_mask": weights, "answer_mask": answer_mask,
                "answer_start": np.int32(len(ids))}

    def batch(self, start: int, n: int, *, with_answer: bool = True) -> tuple[dict, list[str], int]:
        """(arrays, answers, next index) for the first n fitting records from `start` (time-major with memory)."""
        docs, i = [], start
        while len(docs) < n:
            doc = self.record(i, with_answer=with_answer)
            i += 1
            if doc is not None:
                docs.append(doc)
            elif i - start > 20 * n + 100:
                raise ValueError(f"almost no factworld far record fits: raise config.memory.tokens.segments "
                                 f"({self.mt.segments}) or lower config.memory.tokens.distance ({self.mt.distance})")
        answers = [d.pop("answer") for d in docs]
        arrays = mt.time_major(docs) if self.mt.enabled else {k: np.stack([d[k] for d in docs]) for k in docs[0]}
        return arrays, answers, i

    @property
    def rows_per_step(self) -> int:
        return 1 if self.mt.enabled else self.mt.segments


# ---- model, steps -------------------------------------------------------------------------------------------
def window_loss(params: dict, batch: dict, args: ModelArgs) -> tuple[jax.Array, dict]:
    """The no-memory loss: weighted next-token CE over windows [B, S] (+ the LM's MoE loss), metrics as
    `tokens.memory_loss`'s."""
    logits, aux = forward(args, params["lm"], batch["inputs"])
    ce_bs, hit_bs = cross_entropy_and_hits(logits, batch["targets"])
    w, ans = batch["loss_mask"], batch["answer_mask"]
    ce = jnp.sum(ce_bs * w) / jnp.maximum(jnp.sum(w), 1e-6)
    n_ans = jnp.maximum(jnp.sum(ans), 1.0)
    metrics = {"loss": ce + aux["moe_loss"], "ce": ce, "lb_loss": jnp.zeros(()),
               "answer_ce": jnp.sum(ce_bs * ans) / n_ans, "answer_accuracy": jnp.sum(hit_bs * ans) / n_ans}
    return metrics["loss"], metrics


def init_all(args: ModelArgs, config, rng: jax.Array) -> dict:
    k_lm, k_mem = jax.random.split(rng)
    params = {"lm": init_params(args, k_lm)}
    if config.memory.tokens.enabled:
        c = config.memory.tokens
        params["memory"] = mt.init_memory_params(k_mem, args.d_model, c.n_tokens, c.n_experts, args.init_std,
                                                 gate_bias=c.get("gate_bias", 0.0),
                                                 update_scale=c.get("update_scale", 1.0),
                                                 update_identity=c.get("update_init", "random") == "identity")
    return params


@functools.lru_cache(maxsize=4)
def compiled(args: ModelArgs, config_json: str, pad_id: int) -> dict:
    """The optimizer and the jitted init / train step / greedy answer of one (model, config): cached, so runs in
    one process (tests, the benchmark) compile once."""
    config = config_lib.from_json(config_json)
    c = config.memory.tokens
    tx, schedule = state_lib.make_optimizer(config), state_lib.lr_schedule(config)
    proposal = c.get("proposal", "tanh")  # a checkpoint made before the option was added: its default
    if c.enabled:
        loss = functools.partial(mt.memory_loss, args=args, pad_id=pad_id, bptt=c.bptt, lb_weight=c.lb_loss_weight,
                                 proposal=proposal)
    else:
        loss = functools.partial(window_loss, args=args)

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def train_step(state: state_lib.TrainState, batch: dict) -> tuple[state_lib.TrainState, dict]:
        (_, metrics), grads = grad_fn(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        if c.enabled:  # the write path's gradients: zero would mean the memory cannot learn what to carry
            metrics.update(grad_norm_update=optax.tree.norm((grads["memory"]["w_u"], grads["memory"]["b_u"])),
                           grad_norm_gate=optax.tree.norm((grads["memory"]["w_gate"], grads["memory"]["b_gate"])))
        return state_lib.TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), metrics

    def init(rng):
        params = init_all(args, config, rng)
        return state_lib.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    def init_warm(rng, lm_params):  # a fresh state whose LM is a Stage-1 LM (embedding rows grown: grow_embedding)
        params = dict(init_all(args, config, rng), lm=lm_params)
        return state_lib.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    def answer(params, batch):
        if c.enabled:
            state = mt.state_before_question(args, params, batch, pad_id=pad_id, proposal=proposal)
            tokens, start = batch["tokens"][-1], batch["answer_start"]
        else:
            state, tokens, start = None, batch["inputs"], batch["answer_start"]
        return mt.greedy_answer(args, params, state, tokens, start, c.max_answer_tokens, pad_id)

    # One device, explicitly: a fresh state and a restored (committed) one then hit the same compiled step.
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {"init": jax.jit(init, out_shardings=dev), "init_warm": jax.jit(init_warm, out_shardings=dev),
            "train_step": jax.jit(train_step, in_shardings=(dev, dev), out_shardings=(dev, dev), donate_argnums=0),
            "answer": jax.jit(answer, in_shardings=(dev, dev), out_shardings=dev)}


def load_stage1(config: ml_collections.ConfigDict, *, with_params: bool) -> tuple[Tokenizer, Any]:
    """For `memory.tokens.init_from`: sets `config.model` and `config.data.factworld_*` to the Stage-1 run's (its
    shape, and the world its LM knows); returns (its tokenizer with the memory tokens, its LM params or None)."""
    from mantis_jax.train.checkpoint import list_steps, load_for_inference  # noqa: PLC0415

    path = config.memory.tokens.init_from
    if not list_steps(path):
        raise CheckpointError(f"config.memory.tokens.init_from ({path!r}) holds no Stage-1 checkpoint; train one "
                              "(make demo, or python -m mantis_jax.train --config=configs/demo.py --workdir=...) "
                              "or set --config.memory.tokens.init_from=''")
    if with_params:
        saved, tokenizer, params = load_for_inference(path)
    else:  # the shape and tokenizer only, from the step load_for_inference would take
        ckpt = Checkpointer(path, create=False, async_save=False)
        try:
            step = ckpt.best_step()
            saved, tokenizer, params = ckpt.config_at(step), ckpt.tokenizer_at(step), None
        finally:
            ckpt.close()
    with config.ignore_type():
        config.model = ml_collections.ConfigDict(saved.model.to_dict())
        for key, value in saved.data.items():
            if key.startswith("factworld_"):
                config.data[key] = value
    tokenizer, _, _ = mt.add_memory_tokens(tokenizer, config.memory.tokens.n_tokens)
    return tokenizer, params


def grow_embedding(lm_params: dict, vocab_size: int, rng: jax.Array, init_std: float,
                   write_rows: tuple[np.ndarray, int] | None = None) -> dict:
    """Stage-1 LM params with the embedding (tied head) grown to `vocab_size` rows: the learned rows kept, the new
    ones (the memory tokens, the padding) drawn like a fresh embedding's. `write_rows` (ids, source id): those rows
    start as a copy of row `source` instead."""
    emb = lm_params["embedding"]
    extra = init_std * jax.random.normal(rng, (vocab_size - emb.shape[0], emb.shape[1]), emb.dtype)
    grown = jnp.concatenate([emb, extra], axis=0)
    if write_rows is not None:
        ids, source = write_rows
        grown = grown.at[np.asarray(ids)].set(jnp.broadcast_to(emb[source], (len(ids), emb.shape[1])))
    return dict(lm_params, embedding=grown)


def _get(config: ml_collections.ConfigDict | None, key: str) -> Any:
    for part in key.split("."):
        config = config.get(part) if config is not None else None
    return config


def _resume_differences(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict) -> list[str]:
    """The state- and data-shaping fields that differ, as "config.k: checkpoint a, this run b"."""
    defaults, out = config_lib.default_config(), []
    for diff in config_differences(saved, current):
        key = diff.split(":", 1)[0].removeprefix("config.")
        if _get(saved, key) is None and _get(current, key) == _get(defaults, key):
            continue  # a key added after the checkpoint was saved, at its default value
        out.append(diff)
    return out + [f"config.{k}: checkpoint {_get(saved, k)!r}, this run {_get(current, k)!r}" for k in RESUME_KEYS
                  if _get(saved, k) != _get(current, k)]


def evaluate(fns: dict, params: Any, data: FarQuestions, n: int, batch_size: int, tokenizer: Tokenizer) -> dict:
    """Greedy exact match on the first n fitting far records of `data`'s split."""
    correct, seen, index = 0, 0, 0
    while seen < n:  # full batches only (one compiled shape); the last one's surplus rows are not scored
        batch, answers, index = data.batch(index, batch_size, with_answer=False)
        generated = np.asarray(fns["answer"](params, batch))
        for ids, answer in list(zip(generated, answers))[:n - seen]:
            correct += factworld.exact_match(tokenizer.decode(ids), answer)
            seen += 1
    return {"far_em": correct / max(seen, 1), "far_questions": seen}


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains memory tokens (or the no-memory baseline) in `workdir`, resuming from its newest checkpoint."""
    config = config_lib.validate(ml_collections.ConfigDict(config.to_dict()))
    c, t = config.memory.tokens, config.train
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer.from_config(workdir, config)
    try:
        steps = ckpt.steps()
        stage1_params = None
        if c.init_from:
            stage1_tokenizer, stage1_params = load_stage1(config, with_params=not steps)
        if steps:
            tokenizer = ckpt.tokenizer_at(steps[-1])
            config.model.vocab_size = tokenizer.padded_vocab_size
            diffs = _resume_differences(ckpt.config_at(steps[-1]), config)
            if diffs:
                raise CheckpointError(f"the checkpoint in {ckpt.directory} was made with another config: "
                                      f"{'; '.join(diffs)}. Resume with the same settings, or start a new --workdir")
            if config.data.tokenizer:
                given, _, _ = mt.add_memory_tokens(pipeline.build_tokenizer(config), c.n_tokens)
                check_compatible(given, tokenizer.fingerprint(), what=f"checkpoint in {ckpt.directory}")
        elif c.init_from:
            tokenizer = stage1_tokenizer
        else:
            tokenizer, _, _ = mt.add_memory_tokens(pipeline.build_tokenizer(config), c.n_tokens)
        config.model.vocab_size = tokenizer.padded_vocab_size
        return _train(config, workdir, ckpt, tokenizer, stage1_params)
    finally:
        ckpt.close()


def _train(config, workdir: str, ckpt: Checkpointer, tokenizer: Tokenizer, stage1_params=None) -> dict[str, Any]:
    c, t = config.memory.tokens, config.train
    args = ModelArgs.from_config(config)
    fns = compiled(args, config_lib.to_json(config), tokenizer.pad_id)
    train_data = FarQuestions(config, tokenizer, "train")
    rows = config.data.batch_size * train_data.rows_per_step
    total = state_lib.total_steps(config)
    tokens_per_step = config.data.batch_size * c.segments * c.segment_len
    abstract = jax.eval_shape(fns["init"], jax.random.key(config.seed))
    restored = ckpt.restore(abstract) if ckpt.steps() else None
    if restored is not None:
        start, state, data, _ = restored
        index = int(data["states"][0]["next_index"])
    elif stage1_params is not None:
        start, index = 0, 0
        k_state, k_rows = jax.random.split(jax.random.key(config.seed))
        write_rows = None
        if c.write_init == "answer_slot":  # WRITE tokens start as the token ending "A:": the answer's slot
            write_rows = (train_data.write_ids, tokenizer.encode("\nA:")[-1])
        lm = grow_embedding(stage1_params, config.model.vocab_size, k_rows, config.model.init_std, write_rows)
        state = fns["init_warm"](k_state, lm)
    else:
        start, index = 0, 0
        state = fns["init"](jax.random.key(config.seed))
    writer = metrics_lib.MetricsWriter(workdir, jsonl=config.logging.jsonl, tensorboard=config.logging.tensorboard)
    n_params = {k: mt.param_count(v) for k, v in abstract.params.items()}
    writer.write(start, {"params_lm": n_params["lm"], "params_memory": n_params.get("memory", 0),
                         "tokens_per_step": tokens_per_step}, prefix="setup")
    progress = tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                         disable=not (config.logging.progress and sys.stderr.isatty()))
    deadline = time.monotonic() + 60 * t.max_minutes if t.max_minutes > 0 else None
    pending, clock, done, last, stopped = [], time.perf_counter(), start, {}, "done"
    evals = []

    def save(step):
        ckpt.save(step, state, data_states=[json.dumps({"next_index": index})], config=config, tokenizer=tokenizer,
                  metrics={"train_loss": last.get("loss")})

    def log(step):
        nonlocal pending, clock, last
        host = [metrics_lib.to_host(m) for m in pending]
        if not all(math.isfinite(h["loss"]) for h in host):
            raise TrainingError(f"the loss is not finite at step {step}: training diverged; lower --config.train.lr "
                                f"(now {t.lr}); the last checkpoint in {ckpt.directory} is good")
        elapsed = time.perf_counter() - clock
        last = dict(metrics_lib.mean_metrics(host), tokens_per_s=len(host) * tokens_per_step / max(elapsed, 1e-9),
                    tokens_seen=step * tokens_per_step)
        writer.write(step, last, prefix="train")
        progress.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['answer_accuracy']:.2f}", refresh=False)
        pending, clock = [], time.perf_counter()

    def run_eval(step):
        if not c.eval_questions:
            return
        m = evaluate(fns, state.params, FarQuestions(config, tokenizer, "test"), c.eval_questions,
                     config.data.batch_size * train_data.rows_per_step, tokenizer)
        writer.write(step, m, prefix="eval")
        evals.append(dict(m, step=step))

    try:
        for step in range(start, total):
            batch, _, index = train_data.batch(index, rows)
            state, m = fns["train_step"](state, batch)
            done = step + 1
            pending.append(m)
            progress.update(1)
            over_time = deadline is not None and time.monotonic() > deadline
            if done % t.log_every == 0 or done == total or over_time or done == start + 1:
                log(done)
            if c.eval_every and done % c.eval_every == 0 and done < total:
                run_eval(done)
            if done % t.save_every == 0 or done == total or over_time:
                save(done)
            if over_time:
                stopped = "time_budget"
                break
        progress.close()
        if pending:
            log(done)
        if done > start and done not in ckpt.steps():
            save(done)
        ckpt.wait()
        run_eval(done)
    finally:
        writer.close()
    return {"step": done, "stopped": stopped, "train": last, "eval": evals[-1] if evals else None, "evals": evals,
            "tokens_seen": done * tokens_per_step, "params": n_params, "resumed_from": start or None,
            "memory": bool(c.enabled), "state": state, "workdir": workdir}


def main(argv: list[str]) -> None:
    from absl import flags  # noqa: PLC0415

    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}; settings go in --config.<section>.<key>=<value>")
    try:
        summary = train(flags.FLAGS.config, flags.FLAGS.workdir)
    except (CheckpointError, TrainingError, ValueError) as e:
        cli.fail(e)
    summary.pop("state")
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    from absl import flags

    cli.define_config_flag("configs/memory_tokens.py")
    flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics.jsonl, tensorboard/")
    flags.mark_flag_as_required("workdir")
    cli.run(main)
