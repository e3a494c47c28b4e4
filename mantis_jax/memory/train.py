"""Stage 2: train the retrieval encoder on the frozen LM of a Stage-1 run.

    python -m mantis_jax.memory.train --checkpoint=runs/demo --workdir=runs/demo_stage2 [--config.retrieval.steps=400]

What goes in: a Stage-1 workdir (its best checkpoint: config, tokenizer, LM weights, frozen here) and factworld's
train split. Each step takes `retrieval.batch_size` questions about train entities (near-range records: a short
context holding the evidence sentence); the keys are every question's evidence sentence (in-batch negatives for
the others) plus hard negatives per question: other sentences of its context, a filler sentence and the same
attribute of another entity (`retrieval.context_negatives`, `retrieval.attribute_negatives`). The loss is InfoNCE
over cosines / `retrieval.temperature` between unit vectors: the same normalisation the semantic index compares
with. Only the encoder (memory/encoder.py: the episodic SSM stack over the LM's hidden states, pooled and
projected) learns; the batch of step s is a pure function of (seed, s), so a resumed run continues exactly.

What comes out, in `--workdir`: orbax checkpoints (train/checkpoint.py: encoder state, config, tokenizer),
`stage2.json` (which Stage-1 run and step it encodes for), metrics.jsonl + TensorBoard, and at every
`retrieval.eval_every` and at the end evidence recall@1/@5 on test-split questions (the gallery: every sentence of
`retrieval.eval_questions` contexts) for the trained encoder and, in the same run, the untrained baseline (the
LM's mean-pooled hidden states), overall and per wording of the evidence sentence.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import time

from mantis_jax import cli

if __name__ == "__main__":  # restart before the heavy imports below (jax, flax, orbax), not after them
    cli.reexec_with_malloc_tunables()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import tqdm  # noqa: E402

from mantis_jax import config as config_lib  # noqa: E402
from mantis_jax.data import factworld  # noqa: E402
from mantis_jax.memory import encoder as enc  # noqa: E402
from mantis_jax.memory.pool import HiddenCache, PoolBatches  # noqa: E402
from mantis_jax.model.args import ModelArgs  # noqa: E402
from mantis_jax.model.ssm import SSMArgs  # noqa: E402
from mantis_jax.train.checkpoint import Checkpointer, CheckpointError, checkpoint_dir  # noqa: E402
from mantis_jax.train.metrics import MetricsWriter  # noqa: E402
from mantis_jax.train.state import TrainState  # noqa: E402

COMMAND = "python -m mantis_jax.memory.train --checkpoint=<stage-1 workdir> --workdir=<stage-2 workdir>"
STAGE2_FILE = "stage2.json"


class Stage2Error(ValueError):
    """Bad Stage-2 input (a workdir without weights, a mismatched Stage-1 run); the message names the fix."""


def wording(record: dict) -> str:
    """'canonical' when the record's evidence sentence uses the first template of its attribute, else
    'alternative' (factworld's paraphrase)."""
    start, end = record["evidence_span"]
    canonical = factworld.ATTRIBUTES[record["attribute"]][0][0].format(n=record["entity"], v=record["answer"])
    return "canonical" if record["context"][start:end] == canonical else "alternative"


class Batches:
    """Step s -> (questions [B], keys [B * (1 + negatives)]): keys[:B] are the evidence sentences, then each
    question's hard negatives in order."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.world = factworld.world_from_config(config)
        self.rt, self.seed = config.retrieval, config.seed

    @property
    def negatives(self) -> int:
        return self.rt.context_negatives + self.rt.attribute_negatives

    def _other_attribute(self, r: random.Random, attribute: str, entity: str) -> str:
        while True:
            facts = self.world.facts("train", r.randrange(self.world.split_size("train")))
            for f in facts:
                if f.attribute == attribute and f.value is not None and f.entity != entity:
                    return f.sentence(r, self.world.paraphrase)

    def batch(self, step: int) -> tuple[list[str], list[str]]:
        questions, evidence, negatives = [], [], []
        B = self.rt.batch_size
        for i in range(B):
            rec = self.world.qa_record("train", "near", step * B + i, distance=0)
            r = random.Random(f"stage2-{self.seed}-{step}-{i}")
            start, end = rec["evidence_span"]
            ev = rec["context"][start:end]
            pool = [s for s in enc.split_sentences(rec["context"]) if s != ev] + [self.world.filler(r)]
            r.shuffle(pool)
            own = pool[:self.rt.context_negatives]
            own += [self._other_attribute(r, rec["attribute"], rec["entity"])
                    for _ in range(self.negatives - len(own))]
            questions.append(rec["question"])
            evidence.append(ev)
            negatives += own
        return questions, evidence + negatives


def tokenize(tokenizer, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-shape [N, max_len] right-padded ids and mask (one compilation for every batch)."""
    tokens = np.full((len(texts), max_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(texts), max_len), bool)
    for r, t in enumerate(texts):
        ids = tokenizer.encode(t, add_bos=True)[:max_len]
        tokens[r, :len(ids)] = ids
        mask[r, :len(ids)] = True
    return tokens, mask


def batch_inputs(batch: tuple[list[str], list[str]], tokenizer, rt, cache: HiddenCache | None) -> tuple:
    """(questions, their mask, keys, their mask) for the step: token ids, or the cached hidden states."""
    questions, keys = batch
    if cache is not None:
        return (*cache.batch(questions), *cache.batch(keys))
    return (*tokenize(tokenizer, questions, rt.max_len), *tokenize(tokenizer, keys, rt.max_len))


def make_optimizer(rt: ml_collections.ConfigDict) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, rt.lr, rt.warmup_steps, max(rt.steps, rt.warmup_steps + 1),
                                                  end_value=rt.lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


def _optimizer_key(rt: ml_collections.ConfigDict) -> tuple:
    return tuple((k, rt[k]) for k in ("lr", "warmup_steps", "steps"))


def infonce(q_bd: jax.Array, k_kd: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """(loss, accuracy): query i's positive is key i; every other key is a negative."""
    logits_bk = q_bd @ k_kd.T / temperature
    labels = jnp.arange(q_bd.shape[0])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_bk, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits_bk, axis=-1) == labels)


@functools.lru_cache(maxsize=4)
def make_train_step(model_args: ModelArgs, ssm_args: SSMArgs, rt_key: tuple, temperature: float, cached: bool):
    """The jitted step, built once per (model, encoder, optimizer settings): a resumed run in the same process
    reuses its compilation. On the fly it takes token ids and runs the frozen LM; `cached` it takes the LM's
    hidden states ([N, T, D], memory/pool.py) in their place and `lm_params` is unused."""
    tx = make_optimizer(ml_collections.ConfigDict(dict(rt_key)))

    def vectors(p, lm_params, x, mask):
        if cached:
            return enc.encode_hidden(ssm_args, p, x, mask)
        return enc.embed(model_args, ssm_args, p, lm_params, x, mask)

    @jax.jit
    def train_step(state: TrainState, lm_params, q_x, q_mask, k_x, k_mask):
        def loss_fn(p):
            return infonce(vectors(p, lm_params, q_x, q_mask), vectors(p, lm_params, k_x, k_mask), temperature)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "accuracy": acc, "grad_norm": optax.global_norm(grads)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def recall(config, tokenizer, lm_params, enc_params, n_questions: int, cache: HiddenCache | None = None
           ) -> dict[str, float]:
    """Evidence recall@1/@5 of test-split questions against every sentence of their contexts, for the trained
    encoder (`enc_params`, skipped when None) and the untrained mean-pooled baseline; overall and per wording.
    With a `cache` the LM's hidden states of the gallery are computed once and kept there."""
    model_args, ssm_args = ModelArgs.from_config(config), SSMArgs.from_config(config)
    records = factworld.world_from_config(config).qa_records("test", "near", n_questions, distance=0)
    records = list(records)
    gallery = sorted({s for r in records for s in enc.split_sentences(r["context"])})
    index = {s: i for i, s in enumerate(gallery)}
    targets = np.array([index[r["context"][r["evidence_span"][0]:r["evidence_span"][1]]] for r in records])
    kinds = np.array([wording(r) for r in records])
    out = {}
    for name, params in (("baseline", None), ("trained", enc_params)):
        if name == "trained" and params is None:
            continue
        fn = enc.encode_fn(model_args, ssm_args, params is not None)
        hidden_fn = _encode_hidden_fn(ssm_args, params is not None)

        def embed(texts):
            vecs = []
            for i in range(0, len(texts), 64):  # every call [64, max_len]: one compilation
                chunk = texts[i:i + 64] + [""] * (64 - len(texts[i:i + 64]))
                if cache is not None:
                    vecs.append(np.asarray(hidden_fn(params, *cache.batch(chunk))))
                else:
                    tok, mask = tokenize(tokenizer, chunk, config.retrieval.max_len)
                    vecs.append(np.asarray(fn(params, lm_params, tok, mask)))
            return np.concatenate(vecs)[:len(texts)]

        scores = embed([r["question"] for r in records]) @ embed(gallery).T
        rank = np.sum(scores > scores[np.arange(len(records)), targets][:, None], axis=1)  # 0 = best
        for k in (1, 5):
            out[f"{name}_recall@{k}"] = float(np.mean(rank < k))
            for w in ("canonical", "alternative"):
                if np.any(kinds == w):
                    out[f"{name}_recall@{k}_{w}"] = float(np.mean(rank[kinds == w] < k))
    out["gallery"] = len(gallery)
    return out


@functools.lru_cache(maxsize=8)
def _encode_hidden_fn(ssm_args: SSMArgs, trained: bool):
    if trained:
        return jax.jit(lambda e, h, m: enc.encode_hidden(ssm_args, e, h, m))
    return jax.jit(lambda e, h, m: enc.encode_hidden(ssm_args, None, h, m))


def _load_stage1(checkpoint: str):
    from mantis_jax.train.checkpoint import list_steps, load_for_inference  # noqa: PLC0415

    if not list_steps(checkpoint):
        raise Stage2Error(f"--checkpoint {checkpoint!r} holds no Stage-1 checkpoint; train one with "
                          "`python -m mantis_jax.train --config=configs/demo.py --workdir=...` (or make demo)")
    saved, tokenizer, params = load_for_inference(checkpoint)
    return saved, tokenizer, params


def train(checkpoint: str, workdir: str, overrides: dict | None = None, *, out=tqdm.tqdm.write,
          stop_at: int | None = None) -> dict:
    """Trains (or resumes) the encoder in `workdir` on the frozen LM of `checkpoint`; returns a summary.
    `stop_at` saves and stops before `retrieval.steps` (the schedule is unchanged: a later run resumes it)."""
    saved, tokenizer, lm_params = _load_stage1(checkpoint)
    config = complete_config(saved)
    for key, value in (overrides or {}).items():
        set_key(config, key, value)
    config_lib.validate(config)
    rt = config.retrieval
    os.makedirs(workdir, exist_ok=True)
    meta_path = os.path.join(workdir, STAGE2_FILE)
    stage1 = {"checkpoint": os.path.abspath(checkpoint), "tokenizer_fingerprint": tokenizer.fingerprint()}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            prev = json.load(f)
        if prev.get("tokenizer_fingerprint") != stage1["tokenizer_fingerprint"]:
            raise Stage2Error(f"--workdir {workdir!r} holds an encoder trained for another Stage-1 run "
                              f"({prev.get('checkpoint')}); pass a new --workdir")
    with open(meta_path, "w") as f:
        json.dump(stage1, f)

    model_args, ssm_args = ModelArgs.from_config(config), SSMArgs.from_config(config)
    tx = make_optimizer(rt)
    init = lambda key: (lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)))(
        enc.init_encoder(config, key))
    state = init(jax.random.key(config.seed))
    ckpt = Checkpointer(workdir, max_to_keep=2, keep_best=False, async_save=False)
    restored = ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
    start = 0
    if restored is not None:
        start, state, _, _ = restored
        out(f"resumed Stage 2 from step {start} in {checkpoint_dir(workdir)}")
    cached = bool(rt.cache_features)
    step_fn = make_train_step(model_args, ssm_args, _optimizer_key(rt), rt.temperature, cached)
    batches = PoolBatches(config) if rt.pool else Batches(config)
    cache = None
    if cached:  # the LM is frozen: every text a batch can hold goes through it once, here
        cache = HiddenCache(model_args, lm_params, tokenizer, rt.max_len)
        texts = batches.texts()
        t_fill = time.monotonic()
        with tqdm.tqdm(total=len(texts), desc="stage 2 features", disable=not config.logging.progress,
                       dynamic_ncols=True) as fill_bar:
            cache.fill(texts, progress=fill_bar.update)
        out(f"cached the frozen LM's hidden states of {len(texts)} texts ({len(batches.records)} records, "
            f"{cache.nbytes / 2**20:.0f} MiB) in {time.monotonic() - t_fill:.0f} s")
    writer = MetricsWriter(workdir, jsonl=config.logging.jsonl, tensorboard=config.logging.tensorboard)
    t0, last, history = time.monotonic(), {}, []
    stopped = "done"
    bar = tqdm.tqdm(total=rt.steps, initial=start, desc="stage 2", disable=not config.logging.progress,
                    dynamic_ncols=True)
    step = start
    try:
        while step < rt.steps:
            if rt.max_minutes and (time.monotonic() - t0) / 60 > rt.max_minutes:
                stopped = "time"
                break
            if stop_at is not None and step >= stop_at:
                stopped = "stop_at"
                break
            state, metrics = step_fn(state, lm_params, *batch_inputs(batches.batch(step), tokenizer, rt, cache))
            step += 1
            bar.update(1)
            history.append(metrics)
            if step % rt.log_every == 0 or step == rt.steps:
                last = {k: float(np.mean([float(m[k]) for m in history])) for k in history[0]}
                history = []
                writer.write(step, last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.2f}")
            if step % rt.eval_every == 0 and step < rt.steps:
                ev = recall(config, tokenizer, lm_params, state.params, rt.eval_questions, cache)
                writer.write(step, ev, prefix="test")
                out(f"  step {step}: recall@1 {ev['trained_recall@1']:.3f} @5 {ev['trained_recall@5']:.3f} "
                    f"(untrained {ev['baseline_recall@1']:.3f} / {ev['baseline_recall@5']:.3f})")
            if step % rt.save_every == 0 and step < rt.steps:
                ckpt.save(step, state, data_states=[json.dumps({"step": step})], config=config,
                          tokenizer=tokenizer, metrics=last)
    except KeyboardInterrupt:
        stopped = "interrupted"
    bar.close()
    if step not in ckpt.steps():
        ckpt.save(step, state, data_states=[json.dumps({"step": step})], config=config, tokenizer=tokenizer,
                  metrics=last)
    ckpt.close()
    ev = recall(config, tokenizer, lm_params, state.params, rt.eval_questions, cache)
    writer.write(step, ev, prefix="test")
    writer.close()
    return {"step": step, "stopped": stopped, "train": last, "recall": ev, "params": state.params,
            "minutes": (time.monotonic() - t0) / 60}


def load_encoder_params(workdir: str) -> dict:
    """The trained encoder's params from a Stage-2 workdir (its newest step); one error naming the command."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise Stage2Error(f"{workdir!r} holds no Stage-2 encoder weights; train them with `{COMMAND}`")
    ckpt = Checkpointer(workdir, create=False, async_save=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise Stage2Error(f"{workdir!r} holds no Stage-2 encoder weights; train them with `{COMMAND}`")
        if not os.path.exists(os.path.join(workdir, STAGE2_FILE)):
            raise Stage2Error(f"{workdir!r} is not a Stage-2 run (no {STAGE2_FILE}): it holds no encoder weights; "
                              f"train them with `{COMMAND}`")
        config = complete_config(config_lib.from_json(json.dumps(ckpt.read_json(steps[-1], "config")["config"])))
        tx = make_optimizer(config.retrieval)
        params = jax.eval_shape(lambda k: enc.init_encoder(config, k), jax.random.key(0))
        abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                              opt_state=jax.eval_shape(tx.init, params))
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
        _, state, _, _ = ckpt.restore(abstract, step=steps[-1])
    except CheckpointError as e:
        raise Stage2Error(f"{workdir!r}: {e}; retrain with `{COMMAND}`") from None
    finally:
        ckpt.close()
    return state.params


def complete_config(saved: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A saved run's config with every key added since it was written, at its default (then validated)."""
    full = config_lib.default_config()
    _merge(full, saved)
    return config_lib.validate(full)


def _merge(into: ml_collections.ConfigDict, other: ml_collections.ConfigDict) -> None:
    for key, value in other.items():
        if isinstance(value, ml_collections.ConfigDict) and key in into:
            _merge(into[key], value)
        else:
            with into.ignore_type():
                into[key] = value


def set_key(config: ml_collections.ConfigDict, key: str, value) -> None:
    """`config.<key> = value` for a dotted key, parsing strings to the field's type; unknown keys are an error."""
    node, parts = config, key.split(".")
    for p in parts[:-1]:
        if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
            raise config_lib.ConfigError(f"unknown config key config.{key} (see mantis_jax/config.py for all keys)")
        node = node[p]
    if parts[-1] not in node:
        raise config_lib.ConfigError(f"unknown config key config.{key} (see mantis_jax/config.py for all keys)")
    old = node[parts[-1]]
    if isinstance(value, str) and not isinstance(old, str):
        if isinstance(old, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise config_lib.ConfigError(f"config.{key} must be true or false, got {value!r}")
            value = value.lower() in ("true", "1")
        elif isinstance(old, int):
            value = int(value)
        elif isinstance(old, float):
            value = float(value)
    node[parts[-1]] = value


def parse_overrides(argv: list[str]) -> tuple[list[str], dict]:
    """Splits `--config.a.b=v` overrides (values parsed to the field's type later) from the other arguments."""
    rest, overrides = [], {}
    for a in argv:
        if a.startswith("--config."):
            if "=" not in a:
                raise config_lib.ConfigError(f"override {a!r} needs a value: --config.<section>.<key>=<value>")
            key, value = a[len("--config."):].split("=", 1)
            overrides[key] = value
        else:
            rest.append(a)
    return rest, overrides


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m mantis_jax.memory.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="Stage-1 workdir (its best checkpoint's LM stays frozen)")
    p.add_argument("--workdir", required=True, help="Stage-2 run folder (re-running resumes it)")
    try:
        rest, overrides = parse_overrides(argv)
        a = p.parse_args(rest)
        summary = train(a.checkpoint, a.workdir, overrides)
    except (Stage2Error, CheckpointError, config_lib.ConfigError, FileNotFoundError) as e:
        cli.fail(e)
    summary.pop("params")
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
