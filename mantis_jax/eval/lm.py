"""The language model as the benchmarks see it: log-likelihood of continuations, and greedy generation.

`ModelLM(args, params, tokenizer)` answers the two requests of lm-evaluation-harness's model API:
- `loglikelihood([(context, continuation), ...])` -> [(sum of the continuation tokens' log-probs, whether every
  continuation token is the argmax)], tokenized as the harness does (the context's trailing spaces move to the
  continuation; the pair is encoded whole and split at the context's length), left-truncated to `window`,
  batched in length buckets through one jitted forward per (batch, bucket) shape;
- `generate(prompts, max_new_tokens=..., stop=[...])` -> completions cut at the first stop string, through the
  cached decoder (`infer.runner.Generator`), prompts keeping their last `window - max_new_tokens` tokens.
Scorers take any object with these two methods, so their tests can hand in an LM with known log-likelihoods.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mantis_jax.infer.quantize import for_apply
from mantis_jax.infer.runner import Generator
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import forward


@functools.partial(jax.jit, static_argnames=("args",))
def _target_logprobs(args: ModelArgs, params, inputs_bt, targets_bt):
    """log p(target) and whether the target is the argmax, at every position [B, T]."""
    logits_btv, _ = forward(args, for_apply(params), inputs_bt)
    logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    logp_bt = jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
    return logp_bt, jnp.argmax(logp_btv, axis=-1) == targets_bt


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest stop string (the whole text when none occurs)."""
    ends = [text.find(s) for s in stop if s and s in text]
    return text[:min(ends)] if ends else text


class ModelLM:
    def __init__(self, args: ModelArgs, params, tokenizer, *, batch_size: int = 8, bucket: int = 64,
                 window: int | None = None):
        """`window`: the tokens the model attends to (default max_seq_len; the CLI passes the length it trained
        on); longer contexts keep their last tokens."""
        self.args, self.params, self.tokenizer = args, params, tokenizer
        self.batch_size, self.bucket = batch_size, bucket
        self.window = min(window or args.max_seq_len, args.max_seq_len)
        self._generator: Generator | None = None

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.tokenizer.encode(context, add_bos=True)
        whole = self.tokenizer.encode(context + continuation, add_bos=True)
        if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, self.tokenizer.encode(continuation)  # a merge across the boundary: encode the parts apart

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(c, x) for c, x in requests]
        for (c, x), (_, cont) in zip(requests, pairs):
            if not cont:
                raise ValueError(f"continuation {x!r} after {c[-40:]!r} has no tokens; give a non-empty answer")
        window = self.window
        seqs = [(ctx + cont)[-(window + 1):] for ctx, cont in pairs]
        n_cont = [min(len(cont), len(s) - 1) for (_, cont), s in zip(pairs, seqs)]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
        B = self.batch_size
        for start in range(0, len(order), B):
            rows = order[start:start + B]
            longest = max(len(seqs[i]) - 1 for i in rows)
            length = min(window, -(-longest // self.bucket) * self.bucket)
            inputs = np.full((B, length), self.tokenizer.pad_id, np.int32)
            targets = np.zeros((B, length), np.int32)
            for r, i in enumerate(rows):
                s = seqs[i]
                inputs[r, :len(s) - 1], targets[r, :len(s) - 1] = s[:-1], s[1:]
            logp, greedy = _target_logprobs(self.args, self.params, jnp.asarray(inputs), jnp.asarray(targets))
            logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
            for r, i in enumerate(rows):
                end = len(seqs[i]) - 1
                span = slice(end - n_cont[i], end)
                results[i] = (float(logp[r, span].sum()), bool(greedy[r, span].all()))
        return results

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 32, stop: Sequence[str] = (),
                 temperature: float = 0.0, seed: int = 0) -> list[str]:
        if self._generator is None:
            self._generator = Generator(self.args, self.params, self.tokenizer, batch_size=self.batch_size)
        keep = max(1, self.window - max_new_tokens)
        ids = [self.tokenizer.encode(p, add_bos=True)[-keep:] for p in prompts]
        out, _ = self._generator.generate_ids(ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                              truncate=True, measure_ttft=False)
        return [cut_at_stop(self.tokenizer.decode(i), stop) for i in out]
