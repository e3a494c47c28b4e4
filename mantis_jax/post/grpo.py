"""Group-relative policy optimisation with verifiable factworld rewards: `python -m mantis_jax.post.grpo
--config=configs/post_grpo.py --workdir=runs/grpo --config.post.base=runs/dpo`.

Each round takes `post.grpo_prompts` questions (`config.post.data` in the grpo JSONL schema, or factworld
questions with `post.grpo_unanswerable` of them unanswerable), samples G = `post.grpo_group` answers to each with
the jitted decode loop (`infer.runner.Generator`, temperature `post.grpo_temperature`, stop at a newline) and
scores every answer: +1 when it matches the answer (for an unanswerable question the answer is "unknown"), -1
otherwise. Advantages are the rewards normalised within each group (`losses.group_advantages`), the sampling
policy's and the reference's token log-probabilities are computed once per round, and `post.grpo_updates`
optimizer steps minimise the clipped-ratio loss with a KL penalty (`losses.grpo_loss`; `train.total_steps` counts
these updates). The reference is the starting model (a frozen copy; with LoRA, the frozen base).
Results ("grpo" in results.json): hallucination rate on unanswerable test questions, answerable accuracy and
overall QA accuracy, before and after; the mean reward of the first and last rounds.
"""

from __future__ import annotations

import grain
import jax
import numpy as np

from mantis_jax.data import factworld
from mantis_jax.infer.runner import Generator, newline_ids
from mantis_jax.post import common, data, losses
from mantis_jax.train.checkpoint import Checkpointer


def reward(completion: str, answer: str) -> float:
    """+1 for the answer (for an unanswerable question, "unknown"), -1 for anything else."""
    return 1.0 if factworld.exact_match(completion.split("\n", 1)[0], answer) else -1.0


def rollout_rows(prompt_ids: list[list[int]], completions: list[list[int]], seq_len: int, pad_id: int) -> dict:
    """Rows of prompt + completion right-padded to seq_len: inputs, targets, mask on the completion targets."""
    n = len(completions)
    rows = np.full((n, seq_len + 1), pad_id, np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    for i, (p, comp) in enumerate(zip(prompt_ids, completions)):
        ids = (p + comp)[:seq_len + 1]
        rows[i, :len(ids)] = ids
        mask[i, len(p) - 1:len(ids) - 1] = 1.0
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "mask": mask}


def run(config, workdir: str, *, devices=None) -> dict:
    r = common.prepare(config, workdir, devices=devices)
    c, po = r.config, r.config.post
    G, P, T = int(po.grpo_group), int(po.grpo_prompts), int(c.data.seq_len)
    room = T - int(po.grpo_max_new_tokens)
    if room < 8:
        raise common.PostError(f"data.seq_len ({T}) leaves {room} prompt tokens after post.grpo_max_new_tokens "
                               f"({po.grpo_max_new_tokens}); raise --config.data.seq_len")
    common.check_rows(r, P * G, "config.post.grpo_prompts × config.post.grpo_group")
    prompts = data.load_examples(c, "grpo", "train", po.examples)
    prompt_ids = [data.encode_chat(r.tokenizer, p["messages"])[0][-room:] for p in prompts]
    iterator = iter(grain.MapDataset.range(len(prompts)).shuffle(seed=c.data.shuffle_seed).repeat(None)
                    .batch(P, drop_remainder=True).to_iter_dataset())
    logprob_fn = jax.jit(lambda p, b: losses.token_logprobs(r.args, p, b["inputs"], b["targets"])[0])
    generator = Generator(r.args, None, r.tokenizer, batch_size=P * G, extra_stop_ids=newline_ids(r.tokenizer))
    start_params = jax.device_put(r.base, jax.devices()[0])
    results = common.qa_metrics(r, start_params, po.eval_examples, prefix="before_", unanswerable=po.grpo_unanswerable)
    rounds: list[float] = []
    cached: dict = {}

    def next_batch(state) -> dict:
        """A new round every grpo_updates steps: sample, score, and the old and reference log-probabilities."""
        if int(state.step) % po.grpo_updates and cached:
            return cached["batch"]
        idx = next(iterator)
        policy = common.policy_params(r, state, frozen)
        generator.params = policy
        group_prompts = [prompt_ids[i] for i in idx for _ in range(G)]
        completions, _ = generator.generate_ids(group_prompts, max_new_tokens=int(po.grpo_max_new_tokens),
                                                temperature=float(po.grpo_temperature), seed=int(state.step),
                                                measure_ttft=False)
        rewards = np.array([reward(r.tokenizer.decode(comp), prompts[i]["answer"])
                            for i, comp in zip(np.repeat(idx, G), completions)], np.float32)
        rounds.append(float(rewards.mean()))
        batch = rollout_rows(group_prompts, completions, T, r.tokenizer.pad_id)
        batch["advantages"] = np.asarray(losses.group_advantages(rewards.reshape(P, G))).reshape(-1)
        batch["rewards"] = rewards
        batch["old_logp"] = np.asarray(logprob_fn(policy, batch))
        batch["ref_logp"] = np.asarray(logprob_fn(frozen["reference"], batch))
        cached["batch"] = batch
        return batch

    def loss_fn(params, frozen_, batch, rng):
        logp, aux = losses.token_logprobs(r.args, params, batch["inputs"], batch["targets"])
        loss, m = losses.grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["mask"], batch["advantages"],
                                   clip=float(po.grpo_clip), kl_weight=float(po.grpo_kl))
        return loss + aux["moe_loss"], dict(m, reward=batch["rewards"].mean())

    ckpt = Checkpointer(workdir, max_to_keep=c.checkpoint.max_to_keep, keep_best=False,
                        async_save=c.checkpoint.async_save)
    writer = common.writer_for(r)
    try:
        start, state, state_sh = common.restore_or_init(r, ckpt, iterator)
        frozen = common.frozen_trees(r, reference=True)
        step_fn = common.make_step(r, loss_fn, state_sh, frozen)
        state, last = common.train_loop(r, ckpt, writer, step_fn, state, frozen, next_batch, start,
                                        int(c.train.total_steps), iterator, jax.random.key(c.seed))
        params = common.policy_params(r, state, frozen)
        results.update(common.qa_metrics(r, params, po.eval_examples, prefix="after_",
                                         unanswerable=po.grpo_unanswerable))
        results.update({"steps": int(state.step), "rounds": len(rounds), "group": G, "prompts_per_round": P,
                        "reward_first_round": rounds[0] if rounds else None,
                        "reward_last_rounds": float(np.mean(rounds[-5:])) if rounds else None,
                        "kl": last.get("kl"), "clip_fraction": last.get("clip_fraction")})
        results.update(common.trainable_report(r, state))
        writer.write(int(state.step), results, prefix="grpo")
        merged = common.export_merged(r, state, frozen)
    finally:
        writer.close()
        ckpt.close()
    path = common.write_results(workdir, "grpo", results)
    return {"stage": "grpo", "results": path, "merged": merged, **results}


if __name__ == "__main__":
    from mantis_jax import cli

    cli.reexec_with_malloc_tunables()
    from mantis_jax.post import entry

    entry.main_for("grpo", run)
