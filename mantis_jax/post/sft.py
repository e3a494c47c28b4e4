"""Supervised fine-tuning on chats, packed: `python -m mantis_jax.post.sft --config=configs/post_sft.py
--workdir=runs/sft --config.post.base=runs/demo`.

Chats (`config.post.data`, the sft JSONL schema in post/data.py, or factworld QA chats when "") are tokenized with
the chat template, packed first-fit into rows of `data.seq_len` with segment ids and per-example positions (the
model attends within an example only; RoPE positions restart at each example) and trained with the loss on
assistant tokens only. Full fine-tuning, or LoRA with `post.lora_rank` > 0. At the end: the held-out (test-split
entities) response loss, the packing efficiency of the training rows (real tokens / window tokens), factworld QA
exact match on test questions (answerable, and "unknown" on unanswerable ones; also before: `before_*`) and the
trainable fraction and optimizer memory against full fine-tuning. They go to `<workdir>/results.json` under "sft".
"""

from __future__ import annotations

import jax
import numpy as np

from mantis_jax.data.pipeline import pad_batch
from mantis_jax.post import common, data, losses
from mantis_jax.train.checkpoint import Checkpointer


def evaluate_loss(run: common.Run, params, examples) -> float:
    c = run.config
    ds = data.sft_dataset(examples, run.tokenizer, seq_len=c.data.seq_len, batch_size=c.data.batch_size,
                          seed=0, repeat=False)
    fn = jax.jit(lambda p, b: losses.sft_loss(run.args, p, b)[1])
    total = tokens = 0.0
    for batch in ds:
        m = fn(params, {k: np.asarray(v) for k, v in pad_batch(batch, c.data.batch_size).items()})
        total += float(m["ce"]) * float(m["tokens"])
        tokens += float(m["tokens"])
    return total / max(tokens, 1.0)


def run(config, workdir: str, *, devices=None) -> dict:
    r = common.prepare(config, workdir, devices=devices)
    c = r.config
    common.check_rows(r, c.data.batch_size, "config.data.batch_size")
    train_ex = data.load_examples(c, "sft", "train", c.post.examples)
    eval_ex = data.load_examples(c, "sft", "test", c.post.eval_examples)
    iterator = iter(data.sft_dataset(train_ex, r.tokenizer, seq_len=c.data.seq_len, batch_size=c.data.batch_size,
                                     seed=c.data.shuffle_seed))
    before = common.qa_metrics(r, jax.device_put(r.base, jax.devices()[0]), c.post.eval_examples, prefix="before_")
    ckpt = Checkpointer(workdir, max_to_keep=c.checkpoint.max_to_keep, keep_best=False,
                        async_save=c.checkpoint.async_save)
    writer = common.writer_for(r)
    try:
        start, state, state_sh = common.restore_or_init(r, ckpt, iterator)
        frozen = common.frozen_trees(r, reference=False)
        step_fn = common.make_step(r, lambda p, f, b, k: losses.sft_loss(r.args, p, b), state_sh, frozen)
        counts = [0, 0]  # real tokens, window tokens of the rows trained on

        def on_batch(b):
            counts[0] += int(np.sum(b["segment_ids"] > 0))
            counts[1] += b["segment_ids"].size

        total = int(c.train.total_steps)
        state, last = common.train_loop(r, ckpt, writer, step_fn, state, frozen, lambda _: next(iterator), start,
                                        total, iterator, jax.random.key(c.seed), on_batch=on_batch)
        params = common.policy_params(r, state, frozen)
        results = {"steps": int(state.step), "train_loss": last.get("ce"),
                   "val_loss": evaluate_loss(r, params, eval_ex),
                   "packing_efficiency": counts[0] / max(counts[1], 1), "examples": len(train_ex)}
        results.update(before)
        results.update(common.qa_metrics(r, params, c.post.eval_examples))
        results.update(common.trainable_report(r, state))
        writer.write(int(state.step), results, prefix="sft")
        merged = common.export_merged(r, state, frozen)
    finally:
        writer.close()
        ckpt.close()
    path = common.write_results(workdir, "sft", results)
    return {"stage": "sft", "results": path, "merged": merged, **results}


if __name__ == "__main__":
    from mantis_jax import cli

    cli.reexec_with_malloc_tunables()
    from mantis_jax.post import entry

    entry.main_for("sft", run)
