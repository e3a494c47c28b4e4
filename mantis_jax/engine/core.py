"""The per-query pipeline: read → encode → decide → retrieve → generate → verify, with a trace of each step.

`Engine.read(text, session=...)` splits a context of any length into spans (sentences, or fixed token spans:
`engine.span`), encodes each with the retrieval encoder (the Stage-2 weights, or the frozen LM's mean-pooled
hidden states) and writes them to memory (engine/memory.py); the current session's last spans are also kept as
text, the window the model sees directly. `Engine.answer(question)`:
  1. encode the question; search memory (its best score is part of the state summary); with
     `engine.search_candidates` > 0 the search fetches that many spans and keeps the top_k by dense score +
     `engine.lexical_weight` x word overlap with the question, dropping spans whose overlap is below
     `engine.lexical_min` x the best one's (hybrid retrieval, engine/memory.py `rerank`);
  2. prefill the window + question once: the state summary (pooled state, entropy, exit-layer confidence, fills);
  3. the policy decides the gates (`policy.decide(summary) -> Decisions`);
  4. when a memory gate is on and memory holds spans, the retrieved spans' text goes into the prompt beside the
     window (`engine.memory_position`: after it by default, nearest the question) and that prompt is prefilled
     once; otherwise the step-2 cache is the one generation continues from (unless the policy set an expert bias:
     the step-2 pass was routed without it, so the prompt is prefilled again with the bias added to every layer's
     router logits);
  5. greedy decoding from that cache (routed with the same bias), stopping at a newline (one line); with a
     decoding head (`engine.decoding=tidal`, engine/decoding.py) tokens are sampled with the knobs it sets every chunk;
  6. with `verify`, the critic scores (question, answer, evidence) and below its threshold the answer is "unknown".
FLOPs are added to the trace as each device call returns, from the tokens, layers and cache slots it processed.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mantis_jax import config as config_lib
from mantis_jax.engine import decoding, runtime
from mantis_jax.engine.memory import Memory, Span, rerank
from mantis_jax.engine.policy import Decisions, FixedPolicy, StateSummary
from mantis_jax.engine.trace import Answer, Trace
from mantis_jax.infer.decode import left_pad, stop_mask
from mantis_jax.infer.early_exit import EarlyExit
from mantis_jax.infer.runner import newline_ids
from mantis_jax.memory import encoder as enc
from mantis_jax.memory.train import complete_config, load_encoder_params, set_key
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.ssm import SSMArgs
from mantis_jax.model.transformer import init_cache

UNKNOWN = "unknown"
TRAIN_CRITIC = "python -m mantis_jax.control.train_critic"
ENCODE_BATCH = 64
ENCODE_CACHE = 200_000  # texts whose vectors an engine keeps


def split_spans(text: str, mode: str, tokenizer, span_tokens: int) -> list[str]:
    """Sentences (ending at . ! ? or a newline), or consecutive runs of `span_tokens` tokens."""
    if mode == "sentence":
        return enc.split_sentences(text)
    ids = tokenizer.encode(text, add_bos=False)
    return [tokenizer.decode(ids[i:i + span_tokens]).strip() for i in range(0, len(ids), span_tokens)
            if tokenizer.decode(ids[i:i + span_tokens]).strip()]


class Engine:
    def __init__(self, config: ml_collections.ConfigDict, params, tokenizer, *, policy=None, critic=None,
                 memory: Memory | None = None, encoder_params: dict | None = None,
                 decoder: decoding.DecodingHead | None = None):
        self.config = config = complete_config(config)
        self.args = ModelArgs.from_config(config)
        self.ssm_args = SSMArgs.from_config(config)
        device = jax.devices()[0]  # batch-1 serving on one device: a replicated training state is copied there
        params = jax.device_put(params, device)
        encoder_params = None if encoder_params is None else jax.device_put(encoder_params, device)
        self.params, self.tokenizer = params, tokenizer
        self.policy = policy if policy is not None else FixedPolicy.from_config(config)
        self.critic = critic
        if config.engine.verify and critic is None:
            raise ValueError(f"config.engine.verify is set but the engine has no critic; train one with "
                             f"`{TRAIN_CRITIC}` and pass it (Engine(..., critic=...), or --critic=DIR to "
                             "`python -m mantis_jax.control`), or set --config.engine.verify=False")
        if decoder is None and config.engine.decoding == "tidal":
            decoder = decoding.load(config.engine.decoding_policy)
        self.decoder = None if decoder is None else decoder.check(self.args.d_model, self.args.vocab_size)
        self.memory = memory if memory is not None else Memory(config)
        self.encoder_params = encoder_params
        self._encode = enc.encode_fn(self.args, self.ssm_args, encoder_params is not None)
        self.stop_v = jnp.asarray(stop_mask(self.args.vocab_size, [tokenizer.eos_id, *newline_ids(tokenizer)]))
        e = config.engine
        self.window = min(e.window_tokens or config.data.seq_len, self.args.max_seq_len)
        self.budget = self.window - e.max_new_tokens
        if self.budget < 8:
            raise ValueError(f"config.engine.max_new_tokens ({e.max_new_tokens}) leaves {self.budget} prompt tokens "
                             f"in the window ({self.window}); lower it or raise config.engine.window_tokens")
        self.exit_layer = max(1, min(config.model.get("min_exit_layer", 1), self.args.n_layers))
        self.early_exit = EarlyExit(min_layer=self.exit_layer, confidence=e.exit_confidence).check(self.args.n_layers)
        self._vectors: dict[str, np.ndarray] = {}
        self.sessions: dict[str, list[tuple[str, int]]] = {}  # recent spans per session: (text, tokens)
        self._offsets: dict[str, int] = {}
        self.session = "default"

    @classmethod
    def from_workdir(cls, workdir: str, *, policy=None, critic=None, stage2: str | None = None,
                     overrides: dict | None = None, memory: Memory | None = None,
                     decoder: decoding.DecodingHead | None = None, lm: tuple | None = None) -> "Engine":
        """An engine from a Stage-1 workdir (its best checkpoint); `stage2` (default `engine.encoder`) names the
        Stage-2 workdir whose trained retrieval encoder to use; `lm` = what `load_for_inference(workdir)`
        returned, when the caller already loaded it (a critic on the same LM)."""
        from mantis_jax.train.checkpoint import load_for_inference  # noqa: PLC0415

        saved, tokenizer, params = lm if lm is not None else load_for_inference(workdir)
        config = complete_config(saved)
        for key, value in (overrides or {}).items():
            set_key(config, key, value)
        config_lib.validate(config)
        path = stage2 if stage2 is not None else config.engine.encoder
        encoder_params = load_encoder_params(path) if path else None
        return cls(config, params, tokenizer, policy=policy, critic=critic, memory=memory,
                   encoder_params=encoder_params, decoder=decoder)

    # ------------------------------------------------------------------------------------------ encoding
    def encode(self, texts: list[str], cache: bool = True) -> tuple[np.ndarray, float]:
        """(unit vectors [N, D], FLOPs spent) of texts, in batches of ENCODE_BATCH padded to 16-token buckets.
        Texts already encoded by this engine come from its cache (the encoder is a pure function of the text):
        a long context repeats many sentences, and only the new ones cost FLOPs. Questions are encoded afresh
        (`cache=False`), so a query's FLOPs do not depend on what was asked before."""
        if not cache:
            return self._encode_batches(texts)
        todo = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        flops = 0.0
        if todo:
            vectors, flops = self._encode_batches(todo)
            if len(self._vectors) + len(todo) > ENCODE_CACHE:
                self._vectors.clear()
            self._vectors.update(zip(todo, vectors))
        return np.stack([self._vectors[t] for t in texts]), flops

    def _encode_batches(self, texts: list[str]) -> tuple[np.ndarray, float]:
        out, flops = [], 0.0
        ids = [self.tokenizer.encode(t, add_bos=True)[:self.args.max_seq_len] for t in texts]
        for i in range(0, len(ids), ENCODE_BATCH):
            chunk = ids[i:i + ENCODE_BATCH]
            rows = ENCODE_BATCH if len(ids) > ENCODE_BATCH else len(chunk)
            tokens, mask = enc.right_pad(chunk + [[self.tokenizer.pad_id]] * (rows - len(chunk)),
                                         self.tokenizer.pad_id)
            out.append(np.asarray(self._encode(self.encoder_params, self.params, tokens, mask))[:len(chunk)])
            flops += rows * enc.flops_per_span(self.args, self.ssm_args, tokens.shape[1],
                                               self.encoder_params is not None)
        return np.concatenate(out), flops

    # -------------------------------------------------------------------------------------------- read
    def read(self, text: str, session: str | None = None) -> dict:
        """Reads a context into memory; returns {"spans", "tokens", "seconds"}."""
        if not isinstance(text, str):
            raise TypeError(f"Engine.read takes text (str), got {type(text).__name__}")
        if not text.strip():
            raise ValueError("the context is empty; give the engine some text to read")
        self.session = session = session or self.session
        t0 = time.perf_counter()
        e = self.config.engine
        texts = split_spans(text, e.span, self.tokenizer, e.span_tokens)
        vectors, _ = self.encode(texts)
        offset = start = self._offsets.get(session, 0)
        spans, recent = [], self.sessions.setdefault(session, [])
        for t, v in zip(texts, vectors):
            n = len(self.tokenizer.encode(" " + t, add_bos=False))
            spans.append(Span(t, (offset, offset + n), v, session))
            recent.append((t, n))
            offset += n
        self._offsets[session] = offset
        keep, total = [], 0  # only what can still enter a prompt
        for t, n in reversed(recent):
            if total + n > self.budget:
                break
            keep.append((t, n))
            total += n
        self.sessions[session] = keep[::-1]
        self.memory.write(spans)
        return {"spans": len(spans), "tokens": offset - start,
                "seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------------------------------ answer
    def _prompt(self, question: str, hits) -> tuple[list[int], str, list]:
        """Token ids, text and the spans placed: the retrieved spans that fit (best first), as much of the window
        as fits, then the question. `engine.memory_position` orders them: `before` the window (best first), or
        `after` it (best last: nearest the question, after whatever the window says about other entities)."""
        tail = f"\nQ: {question.strip()}\nA:"
        room = self.budget - len(self.tokenizer.encode(tail, add_bos=False)) - 2
        recent = self.sessions.get(self.session, [])
        recent_texts = {t for t, _ in recent}
        head, placed = [], []
        for h in hits:
            n = len(self.tokenizer.encode(" " + h.text, add_bos=False))
            if h.text not in recent_texts and n <= room:
                head.append(h.text)
                placed.append(h)
                room -= n
        window = []
        for t, n in reversed(recent):
            if n > room:
                break
            window.append(t)
            room -= n
        if self.config.engine.memory_position == "after":
            text = " " + " ".join(window[::-1] + head[::-1]) + tail
        else:
            text = " " + " ".join(head + window[::-1]) + tail
        ids = self.tokenizer.encode(text, add_bos=True)
        return ids[-self.budget:], text, placed

    def _prefill(self, ids: list[int], summary: bool = True, expert_bias_le=None):
        """(Prefill, padded length, cache slots, FLOPs of the full-depth pass, FLOPs of the exit-layer pass, which
        runs only for the `summary`). `expert_bias_le` [L, E] (or None) is added to the router logits."""
        length = min(-(-len(ids) // 16) * 16, self.budget)
        tokens, mask = left_pad([ids], self.tokenizer.pad_id, length)
        slots = length + self.config.engine.max_new_tokens
        cache = init_cache(self.args, 1, slots)
        out = runtime.prefill(self.args, self.params, cache, jnp.asarray(tokens), jnp.asarray(mask), expert_bias_le,
                              exit_layer=self.exit_layer if summary else 0)
        jax.block_until_ready(out.first_logits_v)
        # every layer over the padded prompt against every cache slot; the exit-layer pass is cache-less
        full = enc.forward_flops(self.args, length, self.args.n_layers, length * slots)
        exit_flops = enc.forward_flops(self.args, length, self.exit_layer, length * length) if summary else 0.0
        return out, length, slots, full, exit_flops

    def answer(self, question: str) -> Answer:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty; ask something")
        e, trace, times = self.config.engine, Trace(question=question), {}
        t0 = time.perf_counter()
        qvec, qflops = self.encode([question.strip()], cache=False)
        trace.add_flops("retrieval_encoder", qflops)
        times["encode"] = time.perf_counter() - t0

        t = time.perf_counter()
        self.memory.settle()  # spans evicted while reading reach semantic memory before it is searched
        times["consolidate"] = time.perf_counter() - t
        t = time.perf_counter()
        counts = self.memory.counts()
        trace.memory = counts
        wide = max(e.search_candidates, e.top_k)  # hybrid retrieval: a wider dense search, reranked to top_k
        hits = self.memory.search(qvec[0], wide) if sum(counts.values()) else []
        if e.search_candidates:
            hits = rerank(question, hits, e.top_k, e.lexical_weight, e.lexical_min)
        hits = [h for h in hits if h.score >= e.min_score]
        times["search"] = time.perf_counter() - t

        t = time.perf_counter()
        base_ids, base_text, _ = self._prompt(question, [])
        pre, length, slots, base_flops, exit_flops = self._prefill(base_ids)
        base_slots = slots
        trace.prefills = 1
        trace.add_flops("summary", exit_flops)
        ep_fill, sem_fill = self.memory.fill()
        summary = StateSummary(pooled=pre.pooled_d, entropy=pre.entropy,
                               context_fill=jnp.float32(len(base_ids) / self.window),
                               episodic_fill=jnp.float32(ep_fill), semantic_fill=jnp.float32(sem_fill),
                               best_score=jnp.float32(hits[0].score if hits else 0.0),
                               exit_confidence=pre.exit_confidence)
        trace.summary = {k: float(getattr(summary, k)) for k in ("entropy", "context_fill", "episodic_fill",
                                                                 "semantic_fill", "best_score", "exit_confidence")}
        times["prefill_summary"] = time.perf_counter() - t
        t = time.perf_counter()
        decisions: Decisions = self.policy.decide(summary)
        trace.decisions = decisions.to_dict()
        times["decide"] = time.perf_counter() - t
        if decisions.verify and self.critic is None:
            raise ValueError(f"the policy asked to verify but the engine has no critic; train one with "
                             f"`{TRAIN_CRITIC}` and pass it (Engine(..., critic=...))")
        bias = self._expert_bias(decisions.expert_bias)

        used = [h for h in hits if (h.tier == "episodic" and decisions.episodic)
                or (h.tier == "semantic" and decisions.semantic)]
        if not sum(counts.values()):
            trace.notes.append("memory is empty: answered from the window")
        elif not used and (decisions.episodic or decisions.semantic):
            trace.notes.append("no span in the enabled tiers passed engine.min_score: answered from the window")
        full_ids, full_text, full_placed = self._prompt(question, hits)  # the full path: every tier searched
        t = time.perf_counter()
        ids, text, placed = self._prompt(question, used) if used else (base_ids, base_text, [])
        if used and not placed:
            trace.notes.append("the retrieved spans are already in the window or do not fit the prompt")
        if not placed:
            ids, text = base_ids, base_text
        if placed or bias is not None:  # a new prompt, or the same one routed with the policy's bias
            trace.prefills = 2
            trace.add_flops("summary", base_flops)  # the window-only prefill served the summary alone
            pre, length, slots, full_flops, _ = self._prefill(ids, summary=False, expert_bias_le=bias)
            trace.add_flops("prefill", full_flops)
        else:  # the step-2 cache is the one generation continues from
            trace.add_flops("prefill", base_flops)
        trace.expert_load = np.asarray(pre.expert_load_le).tolist()
        trace.retrieved = [h.to_dict() for h in placed]
        trace.prompt, trace.prompt_tokens = text, len(ids)
        times["prefill"] = time.perf_counter() - t

        t = time.perf_counter()
        if self.decoder is not None:
            dec = self._decode_modulated(pre, ids, length, decisions, bias, trace)
        else:
            dec = runtime.decode(self.args, self.params, pre.cache, pre.first_logits_v, pre.kv_mask_bs,
                                 jnp.int32(len(ids)), self.stop_v, self.tokenizer.pad_id,
                                 jnp.float32(decisions.exit_threshold), bias, max_new_tokens=e.max_new_tokens,
                                 exit=self.early_exit)
        n = int(dec.length)
        toks, layers = np.asarray(dec.tokens_n)[:n].tolist(), np.asarray(dec.layers_n)[:n].tolist()
        trace.layers_per_token = layers
        for i in range(1, n):  # step i fed token i-1 through layers[i] layers against the whole cache
            trace.add_flops("decode", self._step_flops(layers[i], slots) if self.decoder is None
                            else enc.forward_flops(self.args, 1, self.args.n_layers, slots))  # no exit heads read
        candidate = self.tokenizer.decode(toks).split("\n", 1)[0].strip()
        trace.candidate = candidate
        times["decode"] = time.perf_counter() - t

        text_out = candidate
        if decisions.verify:
            t = time.perf_counter()
            evidence = [text.rsplit("\nQ:", 1)[0].strip()]  # what the model read: retrieved spans and the window
            score = float(self.critic.score(question, candidate, evidence))
            critic_flops = float(getattr(self.critic, "flops", lambda *a: 0.0)(question, candidate, evidence))
            trace.add_flops("critic", critic_flops)
            trace.critic_score = score
            trace.abstained = score < float(self.critic.threshold)
            text_out = UNKNOWN if trace.abstained else candidate
            times["verify"] = time.perf_counter() - t
        trace.full_prefills = 1 + int(bool(full_placed))
        trace.flops_full = self._full_path_flops(question, full_ids if full_placed else None, full_text,
                                                 qflops + exit_flops + base_flops, base_slots)
        trace.latency_ms = {k: v * 1e3 for k, v in times.items()}
        trace.latency_ms["total"] = (time.perf_counter() - t0) * 1e3
        return Answer(text_out, trace)

    def _decode_modulated(self, pre: runtime.Prefill, ids: list[int], length: int, decisions: Decisions,
                          bias: jax.Array | None, trace: Trace) -> runtime.Decoded:
        """Sampling with the decoding head's knobs (Beta mean per chunk; keys from config.seed, so an answer is
        reproducible); every token runs every layer. The trace gets m and the knobs of each chunk reached."""
        n_new = self.config.engine.max_new_tokens
        if decisions.exit_threshold < 1.0:
            trace.notes.append("the decoding head reads every layer's output: exit_threshold ignored")
        prompt, _ = left_pad([ids], self.tokenizer.pad_id, length)
        out = decoding.decode(self.args, self.decoder.spec, self.params, self.decoder.params, pre.cache,
                              pre.first_logits_v, pre.hidden_td, jnp.asarray(prompt[0]), pre.kv_mask_bs,
                              jnp.int32(len(ids)), self.stop_v, self.tokenizer.pad_id,
                              jax.random.key(self.config.seed), bias, max_new_tokens=n_new)
        n = int(out.length)
        chunks = -(-n // self.decoder.spec.chunk)
        kn = {name: np.asarray(v)[:chunks].tolist() for name, v in out.knobs._asdict().items()}
        trace.modulation = [{"m": float(m), **{name: kn[name][k] for name in kn}}
                            for k, m in enumerate(np.asarray(out.m_k)[:chunks])]
        layers = jnp.where(jnp.arange(n_new) < n, self.args.n_layers, 0).astype(jnp.int32)
        return runtime.Decoded(out.tokens_n, out.length, layers, out.cache)

    def _full_path_flops(self, question: str, retrieval_ids: list[int] | None, full_text: str, before: float,
                         base_slots: int) -> float:
        """The same query on the full path, a function of the query and the memory alone (never of the policy's
        decisions, so `compute` compares policies): what ran before the decision (`before`: the question's
        encoding, the summary passes), the prompt with every retrieved span prefilled at full depth (when memory
        has spans to place), `engine.max_new_tokens` - 1 decode steps at full depth (the generation budget: how
        many tokens the full path would produce is not known without running it), and one critic call whenever the
        engine has a critic (its FLOPs over the full path's evidence), whether or not this query verified."""
        a, total = self.args, before
        slots = base_slots  # no span to place: the window prompt is the full path's prompt too
        if retrieval_ids is not None:
            length = min(-(-len(retrieval_ids) // 16) * 16, self.budget)
            slots = length + self.config.engine.max_new_tokens
            total += enc.forward_flops(a, length, a.n_layers, length * slots)
        total += (self.config.engine.max_new_tokens - 1) * self._step_flops(a.n_layers, slots)
        if self.critic is not None and hasattr(self.critic, "flops"):
            total += float(self.critic.flops(question, "", [full_text.rsplit("\nQ:", 1)[0].strip()]))
        return float(total)

    def _expert_bias(self, bias) -> jax.Array | None:
        """The policy's expert bias as the router's [L, E] float32 array (None: no bias, the unbiased program)."""
        if bias is None:
            return None
        L, E = self.args.n_layers, self.args.n_experts
        if not self.args.is_moe:
            raise ValueError(f"the policy set an expert bias but the model is dense (config.moe.n_experts = {E}): "
                             "there is no router to bias; use a policy trained for this model")
        bias = np.asarray(bias, np.float32)
        if bias.shape != (L, E):
            raise ValueError(f"the policy's expert bias has shape {bias.shape}, the model routes [n_layers, "
                             f"n_experts] = [{L}, {E}]; use a policy trained for this model")
        return jnp.asarray(bias)

    def _step_flops(self, layers: int, slots: int) -> float:
        """One early-exit decode step that ran `layers` full layers: their FLOPs and the head that gave the logits;
        the skipped layers' key/value projections (they fill the cache); and the exit heads read before the last
        one (after layers min_exit_layer .. min(layers, L-1): the step reads them even at threshold 1.0)."""
        a = self.args
        kv = 2 * 2 * a.d_model * a.n_kv_heads * a.head_dim
        extra_heads = (a.n_layers - self.exit_layer) if layers >= a.n_layers else (layers - self.exit_layer)
        return (enc.forward_flops(a, 1, layers, slots) + (a.n_layers - layers) * kv
                + max(extra_heads, 0) * 2 * a.d_model * a.vocab_size)

    def reset(self, memory: Memory | None = None) -> None:
        """Starts afresh for a new document or episode: new (or the given) memory, no sessions, no read offsets,
        the default session; the compiled functions and the text encodings (a pure function of the text) stay.
        Nothing else outlives a query."""
        self.memory.close()
        self.memory = memory if memory is not None else Memory(self.config)
        self.sessions, self._offsets, self.session = {}, {}, "default"

    forget = reset  # the older name (demo, eval, benchmarks)

    def close(self) -> None:
        self.memory.close()


def read_context_file(path: str) -> str:
    """The text of a context file; one clear error when it is missing, empty or not UTF-8."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--context_file {path!r} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = raw[err.start:err.start + 4]
        raise ValueError(f"--context_file {path!r} is not UTF-8 text (byte {err.start}: {bad!r}); convert it, "
                         "e.g. `iconv -f latin1 -t utf-8`") from None
    if not text.strip():
        raise ValueError(f"--context_file {path!r} is empty; give the engine some text to read")
    return text
