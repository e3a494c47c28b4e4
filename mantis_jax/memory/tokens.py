"""Memory tokens (MemXLNet): N read and N write tokens carry a learned memory across the segments of a document.

A document longer than the window is cut into segments of S tokens, each laid out as
    [READ x N] text [pad] [WRITE x N]        (the last segment: [READ x N] question answer [pad] [WRITE x N])
The READ tokens' input embeddings are replaced by the memory state (the model's `input_embeds_btd` hook); the
WRITE tokens' final hidden states h (after the LM's final norm) update it. The state is k expert memories
M [B, E, N, D] (E = k experts; slot i of every expert pairs with read/write token i) and the last routing p [B, E]:

    router    p = softmax(mean_i(h_i) W_r)                                              [B, E]
    write     u_i = tanh(h_i W_u + b_u)      (the proposal: a projection of WRITE token i's hidden state)
              g_e,i = sigmoid([M_e,i; h_i] W_g + b_g)                                   [B, E, N, D]
              M'_e,i = p_e g_e,i * u_i + (1 - p_e g_e,i) * M_e,i
    read      r_i = sum_e p_e M_e,i          (the routed mixture: READ token i's input embedding next segment)
With one expert (p = 1) the write is exactly m' = g*u + (1-g)*m; with several, an expert's gate is scaled by its
routing weight, so a segment writes mostly into the experts it is routed to. The read uses the routing of the last
write (uniform before the first): READ tokens sit at the start of a segment, so a route computed from the
segment's own tokens would leak its later tokens (the answer) into earlier positions. The router's load-balancing
loss is Switch's over the documents of a batch: E * sum_e f_e P_e (f_e: share of documents whose top expert is e,
P_e: mean routing weight of e); 1 when balanced. A segment with no text (a short document's leading padding)
leaves the state as it is.

Batches are time-step-major: arrays [T, B, S] hold segment t of every document in row t, so `lax.scan` over t
carries each document's memory in its own batch row; gradients flow back through `bptt` segments (the carried
memory passes `jax.lax.stop_gradient` at every multiple of bptt). Data enters as token ids (built by
`segment_document` / `time_major`); what leaves is the loss, its parts, the final memory and the logits.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from mantis_jax.data.tokenizer import Tokenizer
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.layers import RMSNorm
from mantis_jax.model.transformer import embed, forward
from mantis_jax.train.step import cross_entropy_and_hits

READ_TOKEN, WRITE_TOKEN = "<|mem_read_{}|>", "<|mem_write_{}|>"


# ---- vocabulary ---------------------------------------------------------------------------------------------
def add_memory_tokens(tokenizer: Tokenizer, n: int) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """(tokenizer with N read and N write special tokens, read ids [N], write ids [N]).

    They are added special tokens: ids past every learned token, so no text token is one of them (text never
    holds their spelling; `check_no_memory_tokens` guards the data). A tokenizer that already has them (a
    checkpoint's) is returned as it is; its padded vocab (a multiple of 128) grows only if 2N ids overflow it."""
    names = [READ_TOKEN.format(i) for i in range(n)] + [WRITE_TOKEN.format(i) for i in range(n)]
    if any(tokenizer.token_to_id(t) is None for t in names):
        tok = tokenizers.Tokenizer.from_str(tokenizer.to_json())
        tok.add_special_tokens(names)
        tokenizer = Tokenizer(tok)
    ids = np.asarray([tokenizer.token_to_id(t) for t in names], np.int32)
    return tokenizer, ids[:n], ids[n:]


def check_no_memory_tokens(ids: np.ndarray, memory_ids: np.ndarray, what: str) -> None:
    if np.isin(ids, memory_ids).any():
        raise ValueError(f"{what} encodes to a memory token id: the text holds a memory token's spelling "
                         f"({READ_TOKEN.format('i')} / {WRITE_TOKEN.format('i')}); remove it from the data")


# ---- data layout (host, numpy) ------------------------------------------------------------------------------
def segment_document(context_ids, question_ids, answer_ids, *, segments: int, segment_len: int,
                     read_ids: np.ndarray, write_ids: np.ndarray, pad_id: int, lm_weight: float,
                     question_in_context: bool = False) -> dict | None:
    """One document as `segments` rows of `segment_len` tokens (None when its context needs more rows).

    The context fills rows 0..T-2 right-aligned (leading rows of a short document are empty, `valid` 0); row T-1
    is the question and its answer. `targets` is the next token within a row; `weights` is 1 on the answer's
    tokens, `lm_weight` on the context's text, 0 on memory tokens and padding. `question_in_context` (MemXLNet-QA's
    layout) also ends every context row with the question, just before its WRITE tokens:
    [READ x N] text [pad] question [WRITE x N], so what a segment writes can depend on what will be asked."""
    n = len(read_ids)
    q_room = len(question_ids) if question_in_context else 0
    text_len = segment_len - 2 * n - q_room
    chunks = [context_ids[i:i + text_len] for i in range(0, len(context_ids), text_len)]
    qa = list(question_ids) + list(answer_ids)
    if len(chunks) > segments - 1 or len(qa) > segment_len - 2 * n or text_len < 1:
        return None
    tokens = np.full((segments, segment_len), pad_id, np.int32)
    weights = np.zeros((segments, segment_len), np.float32)
    tokens[:, :n], tokens[:, segment_len - n:] = read_ids, write_ids
    valid = np.zeros((segments,), np.float32)
    for row, chunk in zip(range(segments - 1 - len(chunks), segments - 1), chunks):
        tokens[row, n:n + len(chunk)] = chunk
        weights[row, n:n + len(chunk) - 1] = lm_weight  # predicting the chunk's next text token
        if q_room:
            tokens[row, segment_len - n - q_room:segment_len - n] = question_ids
        valid[row] = 1.0
    tokens[-1, n:n + len(qa)] = qa
    answer_start = n + len(question_ids)
    weights[-1, answer_start - 1:n + len(qa) - 1] = 1.0  # the answer's tokens, predicted from the one before
    valid[-1] = 1.0
    targets = np.concatenate([tokens[:, 1:], np.full((segments, 1), pad_id, np.int32)], axis=1)
    return {"tokens": tokens, "targets": targets, "weights": weights, "valid": valid,
            "answer_start": np.int32(answer_start)}


def time_major(docs: list[dict]) -> dict[str, np.ndarray]:
    """Per-document rows [T, S] -> time-step-major arrays [T, B, ...] (row t = segment t of every document)."""
    out = {}
    for key in docs[0]:
        stacked = np.stack([d[key] for d in docs])  # [B, T, ...] or [B]
        out[key] = stacked if stacked.ndim == 1 else np.swapaxes(stacked, 0, 1)
    return out


# ---- parameters and the memory operations -------------------------------------------------------------------
def init_memory_params(rng: jax.Array, d_model: int, n_tokens: int, n_experts: int, init_std: float, *,
                       gate_bias: float = 0.0, update_scale: float = 1.0, update_identity: bool = False) -> dict:
    """The memory's parameters. The gate starts near sigmoid(gate_bias) (0: 1/2); W_u ~ N(0, update_scale^2 / D),
    or update_scale x the identity (`update_identity`: the proposal starts as the scaled hidden state, which a
    tied head reads as the token it predicts, so a read starts out like that token's embedding)."""
    k_init, k_gate, k_u, k_router = jax.random.split(rng, 4)
    return {
        "init": init_std * jax.random.normal(k_init, (n_experts, n_tokens, d_model)),  # M before any write
        "w_gate": init_std * jax.random.normal(k_gate, (2 * d_model, d_model)),
        "b_gate": jnp.full((d_model,), gate_bias, jnp.float32),
        "w_u": update_scale * (jnp.eye(d_model) if update_identity else
                               jax.random.normal(k_u, (d_model, d_model)) / jnp.sqrt(d_model)),
        "b_u": jnp.zeros((d_model,)),
        "w_router": init_std * jax.random.normal(k_router, (d_model, n_experts)),
    }


def initial_state(mem_params: dict, batch: int) -> dict:
    """{"memory": the learned initial memory [B, E, N, D], "route": uniform [B, E]}."""
    E = mem_params["init"].shape[0]
    return {"memory": jnp.broadcast_to(mem_params["init"], (batch,) + mem_params["init"].shape),
            "route": jnp.full((batch, E), 1.0 / E)}


def route(mem_params: dict, query_bd: jax.Array) -> jax.Array:
    """Routing weights over the expert memories: softmax(q W_r) [B, E]."""
    return jax.nn.softmax(query_bd.astype(jnp.float32) @ mem_params["w_router"], axis=-1)


def load_balance_loss(probs_be: jax.Array, valid_b: jax.Array | None = None) -> jax.Array:
    """Switch load balance over the (valid) rows: E * sum_e f_e P_e; 1 when balanced, E when all go to one."""
    E = probs_be.shape[-1]
    valid_b = jnp.ones(probs_be.shape[:1]) if valid_b is None else valid_b
    n = jnp.maximum(jnp.sum(valid_b), 1.0)
    top_be = jax.nn.one_hot(jnp.argmax(probs_be, axis=-1), E)
    f_e = jnp.sum(top_be * valid_b[:, None], axis=0) / n
    p_e = jnp.sum(probs_be * valid_b[:, None], axis=0) / n
    return E * jnp.sum(f_e * p_e)


def read(memory_bend: jax.Array, probs_be: jax.Array) -> jax.Array:
    """The routed mixture of the expert memories: the READ tokens' input embeddings [B, N, D]."""
    return jnp.einsum("be,bend->bnd", probs_be, memory_bend)


def gated_update(mem_params: dict, memory_bend: jax.Array, h_bnd: jax.Array, probs_be: jax.Array,
                 valid_b: jax.Array, base_bnd: jax.Array | None = None) -> jax.Array:
    """M'_e = p_e g_e u + (1 - p_e g_e) M_e with u = tanh(h W_u + b_u) (+ base_bnd when given: the vocab
    proposal), g_e = sigmoid([M_e; h] W_g + b_g)."""
    D = h_bnd.shape[-1]
    h = h_bnd.astype(jnp.float32)
    u_bnd = jnp.tanh(h @ mem_params["w_u"] + mem_params["b_u"])
    if base_bnd is not None:
        u_bnd = u_bnd + base_bnd.astype(jnp.float32)
    w_m, w_h = mem_params["w_gate"][:D], mem_params["w_gate"][D:]  # [M; h] W_g = M W_m + h W_h
    g_bend = jax.nn.sigmoid(memory_bend @ w_m + (h @ w_h)[:, None] + mem_params["b_gate"])
    g_bend = g_bend * (probs_be * valid_b[:, None])[:, :, None, None]
    return g_bend * u_bnd[:, None] + (1.0 - g_bend) * memory_bend


# ---- one segment and the unrolled document ------------------------------------------------------------------
def segment_forward(args: ModelArgs, params: dict, state: dict, tokens_bs: jax.Array, valid_b: jax.Array,
                    pad_id: int, proposal: str = "tanh") -> tuple[dict, jax.Array, dict]:
    """(state after the segment's write, logits [B, S, V], LM aux) for segment tokens laid out
    [READ x N] text [pad] [WRITE x N] (N from the memory's shape). `state`: {"memory" [B, E, N, D], "route" [B, E]}.
    proposal "vocab" adds to u the embedding the LM's tied head expects after each WRITE token,
    softmax(logits_i) @ embedding: a write starts as the token the LM predicts there, which it can read back."""
    lm, mem = params["lm"], params["memory"]
    memory_bend, N, S = state["memory"], state["memory"].shape[2], tokens_bs.shape[1]
    x_bsd = embed(args, lm, tokens_bs)
    x_bsd = x_bsd.at[:, :N].set(read(memory_bend, state["route"]).astype(x_bsd.dtype))
    keep_bs = tokens_bs != pad_id
    logits, aux = forward(args, lm, tokens_bs, input_embeds_btd=x_bsd, kv_mask_bs=keep_bs)
    # The WRITE tokens' final hidden states after the LM's final norm (what its head reads): the residual stream
    # before it grows to an RMS of ~70 in a trained LM, which would saturate the gate's sigmoid and the proposal's
    # tanh and stop every gradient through the write.
    h_bnd = RMSNorm(args.norm_eps).apply({"params": lm["final_norm"]}, aux["hidden"][:, S - N:])
    probs_be = route(mem, jnp.mean(h_bnd, axis=1))
    keep_b = valid_b[:, None]
    base = None
    if proposal == "vocab":
        base = jax.nn.softmax(logits[:, S - N:].astype(jnp.float32), axis=-1) @ lm["embedding"].astype(jnp.float32)
    new_state = {"memory": gated_update(mem, memory_bend, h_bnd, probs_be, valid_b, base),
                 "route": keep_b * probs_be + (1.0 - keep_b) * state["route"]}
    return new_state, logits, dict(aux, route=probs_be)


def unroll(args: ModelArgs, params: dict, batch: dict, *, pad_id: int, bptt: int,
           keep_logits: bool = False, proposal: str = "tanh") -> tuple[dict, dict]:
    """`lax.scan` over the T segments of time-step-major `batch` (tokens/targets/weights [T, B, S], valid [T, B]).

    Returns (final state {"memory" [B, E, N, D], "route" [B, E]}, outputs stacked over T: ce_sum, weight_sum,
    hits and count (top-1 hits among weighted tokens), lb_loss, moe_loss, valid, and logits [T, B, S, V] when
    `keep_logits`)."""
    B = batch["tokens"].shape[1]

    def body(carry, xs):
        state, t = carry
        # Truncated back-propagation: no gradient reaches segments more than bptt back (none is cut at t = 0, so
        # the learned initial memory is trained through the first bptt segments).
        cut = (t > 0) & (t % bptt == 0)
        state = jax.tree.map(lambda x: jnp.where(cut, jax.lax.stop_gradient(x), x), state)
        state, logits, aux = segment_forward(args, params, state, xs["tokens"], xs["valid"], pad_id, proposal)
        ce_bs, hit_bs = cross_entropy_and_hits(logits, xs["targets"])
        w = xs["weights"]
        out = {"ce_sum": jnp.sum(ce_bs * w), "weight_sum": jnp.sum(w), "hits": jnp.sum(hit_bs * (w > 0)),
               "count": jnp.sum(w > 0), "lb_loss": load_balance_loss(aux["route"], xs["valid"]),
               "moe_loss": aux["moe_loss"], "valid": jnp.sum(xs["valid"])}
        if keep_logits:
            out["logits"] = logits
        return (state, t + 1), out

    xs = {k: batch[k] for k in ("tokens", "targets", "weights", "valid")}
    (state, _), outs = jax.lax.scan(body, (initial_state(params["memory"], B), jnp.int32(0)), xs)
    return state, outs


def memory_loss(params: dict, batch: dict, args: ModelArgs, *, pad_id: int, bptt: int,
                lb_weight: float, proposal: str = "tanh") -> tuple[jax.Array, dict]:
    """Weighted CE over all segments + lb_weight x the router's load-balance loss (mean over the segments with
    text) + the LM's MoE loss. Metrics: loss, ce (weighted), answer_accuracy (top-1 on answer tokens), lb_loss."""
    _, outs = unroll(args, params, batch, pad_id=pad_id, bptt=bptt, proposal=proposal)
    ce = jnp.sum(outs["ce_sum"]) / jnp.maximum(jnp.sum(outs["weight_sum"]), 1e-6)
    has_text = (outs["valid"] > 0).astype(jnp.float32)
    lb = jnp.sum(outs["lb_loss"] * has_text) / jnp.maximum(jnp.sum(has_text), 1.0)
    loss = ce + lb_weight * lb + jnp.mean(outs["moe_loss"])
    last = jax.tree.map(lambda x: x[-1], outs)  # the question segment: its weights mark the answer
    answer_ce = last["ce_sum"] / jnp.maximum(last["weight_sum"], 1e-6)
    metrics = {"loss": loss, "ce": ce, "lb_loss": lb, "answer_ce": answer_ce,
               "answer_accuracy": last["hits"] / jnp.maximum(last["count"], 1.0)}
    return loss, metrics


def greedy_answer(args: ModelArgs, params: dict, state: dict | None, tokens_bs: jax.Array,
                  start_b: jax.Array, n_new: int, pad_id: int) -> jax.Array:
    """Greedy tokens [B, n_new] written at positions start_b.. of `tokens_bs` (padding there), one full forward
    per token (segments are short). With a memory `state` the segment reads it (memory layout); None = plain LM."""
    B = tokens_bs.shape[0]
    rows = jnp.arange(B)

    def step(i, tokens):
        if state is None:
            logits, _ = forward(args, params["lm"], tokens, kv_mask_bs=tokens != pad_id)
        else:
            _, logits, _ = segment_forward(args, params, state, tokens, jnp.zeros((B,)), pad_id)
        nxt = jnp.argmax(logits[rows, start_b + i - 1], axis=-1).astype(tokens.dtype)
        return tokens.at[rows, start_b + i].set(nxt)

    tokens = jax.lax.fori_loop(0, n_new, step, tokens_bs)
    return jnp.stack([tokens[rows, start_b + i] for i in range(n_new)], axis=1)


def state_before_question(args: ModelArgs, params: dict, batch: dict, *, pad_id: int,
                          proposal: str = "tanh") -> dict:
    """The memory state after the context segments (rows 0..T-2) of a time-step-major batch: what the question
    segment reads."""
    context = {k: v[:-1] for k, v in batch.items() if k in ("tokens", "targets", "weights", "valid")}
    state, _ = unroll(args, params, context, pad_id=pad_id, bptt=1, proposal=proposal)
    return state


def param_count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
