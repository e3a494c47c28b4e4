"""MantisLM: a decoder-only transformer whose feed-forward layers are sparse mixtures of experts.

tokens [B, T] → embedding → L × (RMSNorm → GQA attention → residual → RMSNorm → MoE/SwiGLU → residual)
→ final RMSNorm → LM head → logits [B, T, V] (float32), plus an aux dict:
  lb_loss, z_loss       mean over layers of the Switch load-balancing loss and the router z-loss
  moe_loss              lb_loss_weight·lb_loss + z_loss_weight·z_loss (the term the trainer adds)
  expert_load [L, E]    share of the top-k assignments each expert received, per layer
  dropped_frac [L]      share of token slots dropped by the capacity backend (0 otherwise)
  hidden [B, T, D]      the last layer's output before the final norm (memory and controller read it)
  cache                 the updated KV cache, when one was passed
Layers are stacked with `nn.scan` (`scan_layers`) or unrolled; `remat` picks the rematerialisation policy. The
optional expert bias [L, E] from the meta-controller is added to each layer's router logits. `forward(...,
exit_layer=k)` runs the first k layers and still produces logits through the final norm and head.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mantis_jax.model.args import ModelArgs
from mantis_jax.model.layers import Attention, RMSNorm, SwiGLU, constrain, logical_param
from mantis_jax.model.moe import MoEFeedForward

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
    """One transformer layer. Signature fits `nn.scan`: (carry, *broadcast, *per-layer) -> (carry, outputs)."""

    args: ModelArgs

    @nn.compact
    def __call__(self, x_btd, positions_bt, cache_index, kv_mask_bs, layer_cache, expert_bias_e, segment_ids_bt=None,
                 kv_only=False, rows_out=False):
        """`kv_only`: write this layer's keys/values for x into the cache and return x unchanged (no attention, no
        feed-forward): how early-exit decoding fills the layers a token skipped. `rows_out`: the new cache is only
        the new token's rows (`Attention`), written by the caller."""
        a = self.args
        dt, pdt = a.compute_dtype, a.weight_dtype
        h = RMSNorm(a.norm_eps, dt, pdt, name="attn_norm")(x_btd)
        attn = Attention(a.n_heads, a.n_kv_heads, a.head_dim, a.rope_theta, a.init_std, dt, pdt, a.attn_block_q,
                         a.kv_conv, name="attn")
        attn_out, new_cache = attn(h, positions_bt, layer_cache, cache_index, kv_mask_bs, segment_ids_bt,
                                   kv_only=kv_only, rows_out=rows_out)
        if kv_only:
            return x_btd, (new_cache, None)
        x_btd = x_btd + attn_out
        h = RMSNorm(a.norm_eps, dt, pdt, name="ffn_norm")(x_btd)
        if a.is_moe:
            ffn_out, aux = MoEFeedForward(a.n_experts, a.top_k, a.d_ff, a.init_std, a.moe_impl, a.capacity_factor,
                                          a.router_impl, a.gmm_impl, dt, pdt, expert_parallel=a.expert_parallel,
                                          name="moe")(h, expert_bias_e)
        else:
            ffn_out = SwiGLU(a.d_ff, a.init_std, dt, pdt, name="mlp")(h)
            aux = {"lb_loss": jnp.zeros((), jnp.float32), "z_loss": jnp.zeros((), jnp.float32),
                   "expert_load": jnp.ones((1,), jnp.float32), "dropped_frac": jnp.zeros((), jnp.float32)}
        x_btd = constrain(x_btd + ffn_out, ("batch", "length", "embed"))
        if a.exit_loss_weight > 0:  # every layer's output, for the early-exit loss (model/early_exit.py)
            aux = dict(aux, layer_hidden=x_btd)
        return x_btd, (new_cache, aux)


def _block_class(args: ModelArgs):
    if args.remat == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[args.remat], prevent_cse=not args.scan_layers)


class MantisLM(nn.Module):
    """Sparse-MoE decoder-only LM. `__call__(tokens, ...) -> (logits [B, T, V] float32, aux)`."""

    args: ModelArgs

    @nn.compact
    def __call__(self, tokens_bt, *, positions_bt=None, cache=None, kv_mask_bs=None, expert_bias_le=None,
                 segment_ids_bt=None, input_embeds_btd=None):
        a = self.args
        B, T = tokens_bt.shape
        cache_index = None if cache is None else cache["index"]
        if positions_bt is None:
            start = 0 if cache is None else cache_index
            positions_bt = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        # std init_std (not 1): with a tied head the logits' scale is rms(x)·std·sqrt(D), so they start near 0.
        embedding = logical_param(self, "embedding", nn.initializers.normal(a.init_std), (a.vocab_size, a.d_model),
                                  ("vocab", "embed"), a.weight_dtype)
        if input_embeds_btd is None:
            x_btd = jnp.take(embedding, tokens_bt, axis=0).astype(a.compute_dtype)
        else:  # precomputed input embeddings (e.g. memory tokens' rows replaced by a memory state)
            x_btd = input_embeds_btd.astype(a.compute_dtype)
        x_btd = constrain(x_btd, ("batch", "length", "embed"))
        layer_caches = None if cache is None else {n: c for n, c in cache.items() if n != "index"}

        block_cls = _block_class(a)
        if a.scan_layers:
            stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast), length=a.n_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x_btd, (new_caches, aux) = stack(a, name="layers")(x_btd, positions_bt, cache_index, kv_mask_bs,
                                                                layer_caches, expert_bias_le, segment_ids_bt)
        else:
            outs = []
            for i in range(a.n_layers):
                layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], layer_caches)
                bias = None if expert_bias_le is None else expert_bias_le[i]
                x_btd, out = block_cls(a, name=f"layer_{i}")(x_btd, positions_bt, cache_index, kv_mask_bs,
                                                             layer_cache, bias, segment_ids_bt)
                outs.append(out)
            new_caches, aux = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

        hidden_btd = x_btd
        x_btd = RMSNorm(a.norm_eps, a.compute_dtype, a.weight_dtype, name="final_norm")(x_btd)
        head = embedding
        if not a.tie_embeddings:
            head = logical_param(self, "lm_head", nn.initializers.normal(a.init_std), (a.d_model, a.vocab_size),
                                 ("embed", "vocab"), a.weight_dtype)
        logits = _head_logits(a, x_btd, head)

        lb_loss, z_loss = jnp.mean(aux["lb_loss"]), jnp.mean(aux["z_loss"])
        out_aux: dict[str, Any] = {
            "lb_loss": lb_loss, "z_loss": z_loss,
            "moe_loss": a.lb_loss_weight * lb_loss + a.z_loss_weight * z_loss,
            "expert_load": aux["expert_load"], "dropped_frac": aux["dropped_frac"], "hidden": hidden_btd,
        }
        if "layer_hidden" in aux:
            out_aux["layer_hidden"] = aux["layer_hidden"]  # [L, B, T, D]
        if cache is not None:
            out_aux["cache"] = dict(new_caches, index=cache_index + T)
        return logits, out_aux


def _head_logits(a: ModelArgs, normed_btd, head) -> jax.Array:
    """The LM head on final-normed states: float32 logits [B, T, V] (`head` is the embedding [V, D] when tied)."""
    if a.tie_embeddings:
        logits = jnp.einsum("btd,vd->btv", normed_btd, head.astype(a.compute_dtype))
    else:
        logits = jnp.einsum("btd,dv->btv", normed_btd, head.astype(a.compute_dtype))
    return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


def init_cache(args: ModelArgs, batch: int, max_len: int | None = None, dtype=None) -> dict:
    """A zeroed static KV cache: k, v [L, B, S, G, Dh] and the next write slot `index`; with `kv_conv` W > 1 also
    k_tail, v_tail [L, B, W-1, G, Dh] (the last W-1 raw keys and values the convolution reads)."""
    max_len = max_len or args.max_seq_len
    shape = (args.n_layers, batch, max_len, args.n_kv_heads, args.head_dim)
    dtype = dtype or args.compute_dtype
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32)}
    if args.kv_conv > 1:
        tail = (args.n_layers, batch, args.kv_conv - 1, args.n_kv_heads, args.head_dim)
        cache.update(k_tail=jnp.zeros(tail, dtype), v_tail=jnp.zeros(tail, dtype))
    return cache


def _first_layers(args: ModelArgs, params: dict, k: int) -> dict:
    """The parameters of a model made of the first k layers (the final norm and head are shared)."""
    if args.scan_layers:
        sliced = dict(params)
        sliced["layers"] = jax.tree.map(lambda p: p[:k], params["layers"])
        return sliced
    return {name: value for name, value in params.items()
            if not name.startswith("layer_") or int(name.split("_")[1]) < k}


def forward(args: ModelArgs, params: dict, tokens_bt, *, exit_layer: int | None = None, cache=None,
            positions_bt=None, kv_mask_bs=None, expert_bias_le=None, segment_ids_bt=None, input_embeds_btd=None):
    """Apply MantisLM, optionally stopping after `exit_layer` layers (static; 1 <= exit_layer <= L).

    `params` is the unboxed "params" collection. With exit_layer = k < L only the first k layers run (their
    parameters, cache rows and expert-bias rows), then the final norm and head: the early-exit gate's forward.
    `segment_ids_bt` [B, T] (with per-example `positions_bt`) runs packed rows: attention never crosses examples.
    `input_embeds_btd` [B, T, D] replaces the embedding lookup of `tokens_bt` (the head stays the embedding's):
    how memory tokens (memory/tokens.py) enter a memory state at their positions (start from `embed(...)`).
    """
    if exit_layer is not None and exit_layer != args.n_layers:
        if not 1 <= exit_layer <= args.n_layers:
            raise ValueError(f"exit_layer ({exit_layer}) must be in [1, {args.n_layers}] (config.model.n_layers)")
        params = _first_layers(args, params, exit_layer)
        if cache is not None:
            cache = {n: (c if n == "index" else c[:exit_layer]) for n, c in cache.items()}
        if expert_bias_le is not None:
            expert_bias_le = expert_bias_le[:exit_layer]
        args = args.replace(n_layers=exit_layer)
    return MantisLM(args).apply({"params": params}, tokens_bt, positions_bt=positions_bt, cache=cache,
                                kv_mask_bs=kv_mask_bs, expert_bias_le=expert_bias_le, segment_ids_bt=segment_ids_bt,
                                input_embeds_btd=input_embeds_btd)


def init_params(args: ModelArgs, rng: jax.Array, batch: int = 1, seq_len: int = 8) -> dict:
    """Unboxed float parameters (for tests and single-device use; sharded init lives in parallel/)."""
    tokens = jnp.zeros((batch, seq_len), jnp.int32)
    # jitted: an eager init dispatches op by op, several times slower than compiling it once
    variables = jax.jit(lambda key: MantisLM(args).init(key, tokens))(rng)
    return nn.unbox(variables)["params"]


def abstract_params(args: ModelArgs) -> Any:
    """Parameter shapes and dtypes (boxed with logical names) without allocating: `jax.eval_shape(init)`."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return jax.eval_shape(lambda t: MantisLM(args).init(jax.random.key(0), t), tokens)["params"]


# Layer-by-layer application, for loops that decide per layer (early-exit decoding, infer/early_exit.py). Each
# runs exactly the module code MantisLM runs, so a loop over them equals `forward` op for op.

def layer_params(args: ModelArgs, params: dict, i: int) -> dict:
    """Layer i's parameters (a static slice of the stacked scan parameters, or the unrolled layer's own)."""
    if args.scan_layers:
        return jax.tree.map(lambda p: p[i], params["layers"])
    return params[f"layer_{i}"]


def apply_block(args: ModelArgs, block_params: dict, x_btd, positions_bt, layer_cache: dict, cache_index,
                kv_mask_bs=None, expert_bias_e=None, *, kv_only: bool = False,
                rows_out: bool = False) -> tuple[jax.Array, dict]:
    """One layer on x [B, T, D] with its cache slice ({"k", "v"[, tails]}: [B, S, G, Dh]): (x out, new slice).
    kv_only: only write the layer's keys/values for x (x comes back unchanged). rows_out (T = 1): the slice is
    read, not written, and the second output is the token's rows ({"k", "v"}: [B, 1, G, Dh], new tails)."""
    x_btd, (new_cache, _) = Block(args).apply({"params": block_params}, x_btd, positions_bt, cache_index,
                                              kv_mask_bs, layer_cache, expert_bias_e, kv_only=kv_only,
                                              rows_out=rows_out)
    return x_btd, new_cache


def embed(args: ModelArgs, params: dict, tokens_bt) -> jax.Array:
    """The input embedding [B, T, D] in the compute dtype (as MantisLM computes it)."""
    x_btd = jnp.take(params["embedding"], tokens_bt, axis=0).astype(args.compute_dtype)
    return constrain(x_btd, ("batch", "length", "embed"))


def logits_from_hidden(args: ModelArgs, params: dict, hidden_btd) -> jax.Array:
    """Final norm + LM head on any layer's output [B, T, D] -> float32 logits [B, T, V]: the shared exit head."""
    normed = RMSNorm(args.norm_eps, args.compute_dtype, args.weight_dtype).apply(
        {"params": params["final_norm"]}, hidden_btd)
    return _head_logits(args, normed, params["embedding"] if args.tie_embeddings else params["lm_head"])
