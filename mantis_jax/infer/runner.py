"""Host side of generation: text or ids in, completions and timing stats out, around the jitted `decode.generate`.

`Generator(args, params, tokenizer)` batches prompts (`batch_size` rows, the last batch filled with dummy rows),
left-pads them to a length bucket (multiples of `bucket`) so nearby lengths share one compilation, keeps one KV
cache per shape (donated to the jitted loop and handed back), and times each batch: the first call of a shape is
a warm-up reported as compile time; time to first token is a call with the step limit at 1 on the same
compilation (prefill + first sample); latency is the full call. Stop tokens are eos plus `extra_stop_ids`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mantis_jax.infer import decode, quantize
from mantis_jax.infer.early_exit import EarlyExit
from mantis_jax.infer.sampling import check_params
from mantis_jax.model.args import ModelArgs


@dataclasses.dataclass
class Stats:
    """Timing of one `generate` call (sums over its batches)."""

    prompts: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    latency_s: float = 0.0  # full prefill + decode calls
    ttft_s: float = 0.0  # time to first token of the first batch
    compile_s: float = 0.0  # warm-up calls of new shapes
    layers: int = 0  # layers run over the new tokens (< new_tokens · L when tokens exit early)

    def mean_layers(self) -> float:
        return self.layers / self.new_tokens if self.new_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.latency_s if self.latency_s > 0 else 0.0

    def add(self, other: "Stats") -> None:
        for f in dataclasses.fields(self):
            if f.name != "ttft_s":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.ttft_s = self.ttft_s or other.ttft_s

    def line(self) -> str:
        return (f"{self.prompts} prompts, {self.new_tokens} new tokens in {self.latency_s:.3f} s: "
                f"{self.tokens_per_s:.1f} tokens/s, time to first token {self.ttft_s * 1e3:.1f} ms, "
                f"{self.mean_layers():.2f} layers/token"
                + (f" (compile {self.compile_s:.1f} s)" if self.compile_s else ""))


def newline_ids(tokenizer) -> list[int]:
    """Ids whose text contains a newline (byte-level BPE merges newlines into several tokens)."""
    return [i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i], skip_special=False)]


class Generator:
    def __init__(self, args: ModelArgs, params, tokenizer, *, batch_size: int = 8, bucket: int = 32,
                 extra_stop_ids: Sequence[int] = (), exit: EarlyExit | None = None):
        """`exit`: the early-exit settings used whenever a call's `exit_threshold` is below 1."""
        if batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) must be >= 1")
        self.args, self.params, self.tokenizer = args, params, tokenizer
        self.batch_size, self.bucket = batch_size, bucket
        self.exit = exit
        self.stop_v = jnp.asarray(decode.stop_mask(args.vocab_size, [tokenizer.eos_id, *extra_stop_ids]))
        self._caches: dict[tuple[int, int], dict] = {}
        self._warm: set[tuple[int, int]] = set()

    @property
    def quantized(self) -> bool:
        return quantize.is_quantized(self.params)

    def _call(self, tokens, mask, key, knobs, limit, max_new_tokens, exit, exit_threshold):
        shape = tokens.shape
        cache = self._caches.pop(shape + (max_new_tokens,), None)
        if cache is None:
            cache = decode.new_cache(self.args, shape[0], shape[1], max_new_tokens)
        out = decode.generate(self.args, self.params, cache, tokens, mask, key, self.stop_v, *knobs,
                              self.tokenizer.pad_id, limit, jnp.float32(exit_threshold),
                              max_new_tokens=max_new_tokens, exit=exit)
        jax.block_until_ready(out.tokens_bn)
        self._caches[shape + (max_new_tokens,)] = out.cache
        return out

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int = 0, truncate: bool = False,
                     measure_ttft: bool = True, exit: EarlyExit | None = None,
                     exit_threshold: float = 1.0) -> tuple[list[list[int]], Stats]:
        """New token ids per prompt (up to and including a stop token) and the stats of the call.

        `exit` (e.g. `EarlyExit(min_layer=2)`) decodes with early exit at confidence `exit_threshold`
        (infer/early_exit.py); `Stats.layers` counts the layers run.
        Prompts longer than max_seq_len - max_new_tokens are an error, or keep their last tokens with truncate.
        """
        check_params(temperature, top_k, top_p)
        exit = exit or (self.exit if exit_threshold < 1.0 else None)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 1")
        room = self.args.max_seq_len - max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt within the model's "
                             f"max_seq_len ({self.args.max_seq_len}); lower --max_new_tokens")
        prompts = [list(p) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty; give at least one token of text")
            if len(p) > room and not truncate:
                raise ValueError(f"prompt {i} has {len(p)} tokens but max_seq_len ({self.args.max_seq_len}) - "
                                 f"max_new_tokens ({max_new_tokens}) leaves {room}; shorten it or lower "
                                 f"--max_new_tokens")
        prompts = [p[-room:] for p in prompts]
        knobs = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
        key = jax.random.key(seed)
        results: list[list[int]] = []
        stats = Stats()
        for b, start in enumerate(range(0, len(prompts), self.batch_size)):
            chunk = prompts[start:start + self.batch_size]
            length = decode.bucket(max(len(p) for p in chunk), self.bucket, room)
            tokens, mask = decode.left_pad(chunk, self.tokenizer.pad_id, length, self.batch_size)
            tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
            batch_key = jax.random.fold_in(key, b)
            shape = (self.batch_size, length, max_new_tokens, exit)
            run = functools.partial(self._call, exit=exit, exit_threshold=exit_threshold)
            if shape not in self._warm:
                t0 = time.perf_counter()
                run(tokens, mask, batch_key, knobs, 1, max_new_tokens)
                stats.compile_s += time.perf_counter() - t0
                self._warm.add(shape)
            if measure_ttft and b == 0:
                t0 = time.perf_counter()
                run(tokens, mask, batch_key, knobs, 1, max_new_tokens)
                stats.ttft_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = run(tokens, mask, batch_key, knobs, max_new_tokens, max_new_tokens)
            stats.latency_s += time.perf_counter() - t0
            toks, lens = np.asarray(out.tokens_bn), np.asarray(out.lengths_b)
            for r in range(len(chunk)):
                results.append(toks[r, :lens[r]].tolist())
            stats.prompts += len(chunk)
            stats.prompt_tokens += sum(len(p) for p in chunk)
            stats.new_tokens += int(lens[:len(chunk)].sum())
            stats.layers += int(np.asarray(out.layers_bn)[:len(chunk)].sum())
        return results, stats

    def generate(self, texts: Sequence[str], **kwargs) -> tuple[list[str], Stats]:
        """Completions (text, special tokens dropped) of each prompt text; kwargs as in `generate_ids`."""
        prompts = [self.tokenizer.encode(t, add_bos=True) for t in texts]
        ids, stats = self.generate_ids(prompts, **kwargs)
        return [self.tokenizer.decode(i) for i in ids], stats
