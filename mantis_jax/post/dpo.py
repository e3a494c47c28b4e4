"""Direct preference optimisation: `python -m mantis_jax.post.dpo --config=configs/post_dpo.py --workdir=runs/dpo
--config.post.base=runs/sft`.

Pairs (`config.post.data`, the preference JSONL schema in post/data.py, or factworld pairs when "") become two
rows each, prompt + chosen and prompt + rejected, right-padded to `data.seq_len` with a mask on the response
targets. The loss is the sigmoid DPO loss with beta `post.dpo_beta` against the starting model as the reference,
whose sequence log-probabilities are either computed once before training (`post.dpo_reference=precomputed`:
one forward pass per pair, no second model in memory) or by a frozen copy inside every step (`frozen`; with
LoRA the frozen base is the reference, so no copy is made). Results ("dpo" in results.json): held-out
preference accuracy (the implicit reward margin > 0, and the policy's own log π(chosen) > log π(rejected))
before and after, QA exact match and hallucination rate after, the reference's memory and the step time.
"""

from __future__ import annotations

import time

import grain
import jax
import jax.numpy as jnp
import numpy as np

from mantis_jax.post import common, data, losses
from mantis_jax.train.checkpoint import Checkpointer

SIDES = ("chosen", "rejected")


class PairToRows:
    """A preference example -> {side_inputs, side_targets, side_mask} [T] for both sides, plus its index."""

    def __init__(self, tokenizer, seq_len: int):
        self.tokenizer, self.seq_len = tokenizer, seq_len

    def __call__(self, index: int, example: dict) -> dict[str, np.ndarray]:
        out = {"index": np.int32(index)}
        for side in SIDES:
            ids, n_prompt = data.prompt_and_response(self.tokenizer, example["messages"], example[side])
            cut = max(0, len(ids) - (self.seq_len + 1))  # drop the prompt's oldest tokens, keep the response
            ids, n_prompt = ids[cut:], n_prompt - cut
            if n_prompt < 1:
                raise data.PostDataError(f"preference example {index}: the {side} response alone is longer than "
                                         f"data.seq_len ({self.seq_len}); raise --config.data.seq_len")
            row = np.full(self.seq_len + 1, self.tokenizer.pad_id, np.int32)
            row[:len(ids)] = ids
            mask = np.zeros(self.seq_len, np.float32)
            mask[n_prompt - 1:len(ids) - 1] = 1.0  # targets t + 1 >= n_prompt: the response tokens
            out.update({f"{side}_inputs": row[:-1], f"{side}_targets": row[1:], f"{side}_mask": mask})
        return out


def pair_dataset(examples, tokenizer, *, seq_len: int, batch_size: int, seed: int, repeat: bool):
    ds = grain.MapDataset.source(list(examples)).map_with_index(PairToRows(tokenizer, seq_len))
    if repeat:
        ds = ds.shuffle(seed=seed).repeat(None)
    return ds.batch(batch_size, drop_remainder=repeat)


def pair_logprobs(args, params, batch) -> tuple[jax.Array, jax.Array, dict]:
    """(log π(chosen) [B], log π(rejected) [B], aux) in one forward pass over the 2B rows."""
    cat = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("inputs", "targets", "mask")}
    seq_b, aux = losses.sequence_logprobs(args, params, cat["inputs"], cat["targets"], cat["mask"])
    B = batch["chosen_inputs"].shape[0]
    return seq_b[:B], seq_b[B:], aux


def _padded_batches(examples, r: common.Run):
    """Every pair once, in order, in full batches (the last padded with copies of pair 0, flagged invalid)."""
    c = r.config
    for batch in pair_dataset(examples, r.tokenizer, seq_len=c.data.seq_len, batch_size=c.data.batch_size, seed=0,
                              repeat=False):
        n = batch["index"].shape[0]
        valid = np.arange(c.data.batch_size) < n
        if n < c.data.batch_size:
            batch = {k: np.concatenate([v, np.repeat(v[:1], c.data.batch_size - n, 0)]) for k, v in batch.items()}
        yield batch, valid


def reference_logprobs(r: common.Run, params, examples) -> tuple[np.ndarray, np.ndarray]:
    """Sequence log-probabilities of every pair's chosen and rejected response under `params`: [N] each."""
    fn = jax.jit(lambda p, b: pair_logprobs(r.args, p, b)[:2])
    chosen, rejected = np.zeros(len(examples), np.float32), np.zeros(len(examples), np.float32)
    for batch, valid in _padded_batches(examples, r):
        c, j = fn(params, batch)
        idx = batch["index"][valid]
        chosen[idx], rejected[idx] = np.asarray(c)[valid], np.asarray(j)[valid]
    return chosen, rejected


def preference_accuracy(r: common.Run, params, examples, ref: tuple[np.ndarray, np.ndarray]) -> dict:
    """Held-out: share of pairs whose implicit reward margin is > 0, and whose log π(chosen) > log π(rejected)."""
    chosen, rejected = reference_logprobs(r, params, examples)
    margin = (chosen - ref[0]) - (rejected - ref[1])
    return {"preference_accuracy": float(np.mean(margin > 0)),
            "policy_prefers_chosen": float(np.mean(chosen > rejected))}


def run(config, workdir: str, *, devices=None) -> dict:
    r = common.prepare(config, workdir, devices=devices)
    c = r.config
    beta, mode = float(c.post.dpo_beta), c.post.dpo_reference
    common.check_rows(r, c.data.batch_size, "config.data.batch_size")
    train_ex = data.load_examples(c, "preference", "train", c.post.examples)
    eval_ex = data.load_examples(c, "preference", "test", c.post.eval_examples)
    start_params = jax.device_put(r.base, jax.devices()[0])
    eval_ref = reference_logprobs(r, start_params, eval_ex)
    results = {f"{k}_before": v for k, v in preference_accuracy(r, start_params, eval_ex, eval_ref).items()}
    t0 = time.perf_counter()
    train_ref = reference_logprobs(r, r.base, train_ex) if mode == "precomputed" else None
    precompute_s = time.perf_counter() - t0
    iterator = iter(pair_dataset(train_ex, r.tokenizer, seq_len=c.data.seq_len, batch_size=c.data.batch_size,
                                 seed=c.data.shuffle_seed, repeat=True))

    def next_batch(_state):
        batch = next(iterator)
        if train_ref is not None:
            batch = dict(batch, ref_chosen=train_ref[0][batch["index"]], ref_rejected=train_ref[1][batch["index"]])
        return batch

    def loss_fn(params, frozen, batch, rng):
        pc, pr, aux = pair_logprobs(r.args, params, batch)
        if mode == "precomputed":
            rc, rr = batch["ref_chosen"], batch["ref_rejected"]
        else:
            rc, rr, _ = pair_logprobs(r.args, frozen["reference"], batch)
        loss, m = losses.dpo_loss(pc, pr, rc, rr, beta)
        return loss + aux["moe_loss"], m

    ckpt = Checkpointer(workdir, max_to_keep=c.checkpoint.max_to_keep, keep_best=False,
                        async_save=c.checkpoint.async_save)
    writer = common.writer_for(r)
    try:
        start, state, state_sh = common.restore_or_init(r, ckpt, iterator)
        frozen = common.frozen_trees(r, reference=mode == "frozen")
        step_fn = common.make_step(r, loss_fn, state_sh, frozen)
        state, last = common.train_loop(r, ckpt, writer, step_fn, state, frozen, next_batch, start,
                                        int(c.train.total_steps), iterator, jax.random.key(c.seed))
        params = common.policy_params(r, state, frozen)
        results.update(preference_accuracy(r, params, eval_ex, eval_ref))
        results.update(common.qa_metrics(r, params, c.post.eval_examples))
        ref_bytes = (sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(frozen["reference"]))
                     if mode == "frozen" and r.lora is None else 0)
        if train_ref is not None:
            ref_bytes = train_ref[0].nbytes + train_ref[1].nbytes
        results.update({"steps": int(state.step), "train_loss": last.get("loss"), "reference": mode,
                        "reference_bytes": ref_bytes, "precompute_s": precompute_s,
                        "step_time_s": last.get("step_time_s"), "beta": beta, "pairs": len(train_ex)})
        results.update(common.trainable_report(r, state))
        writer.write(int(state.step), results, prefix="dpo")
        merged = common.export_merged(r, state, frozen)
    finally:
        writer.close()
        ckpt.close()
    path = common.write_results(workdir, "dpo", results)
    return {"stage": "dpo", "results": path, "merged": merged, **results}


if __name__ == "__main__":
    from mantis_jax import cli

    cli.reexec_with_malloc_tunables()
    from mantis_jax.post import entry

    entry.main_for("dpo", run)
