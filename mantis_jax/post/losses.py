"""The post-training objectives, as pure functions of log-probabilities (and the model call that makes them).

    token_logprobs   log p(target_t | inputs_<=t) [B, T] from one forward pass (packed rows: segment ids and
                     per-example positions), plus the model's aux dict
    sft_loss         mean negative log-likelihood over response tokens (loss_mask), + the MoE aux loss
    dpo_loss         -log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]), pair mean
    group_advantages (r − mean_group(r)) / (std_group(r) + eps): GRPO's baseline, per group of G samples
    grpo_loss        per token −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) + kl·k3(π_ref ‖ π), ρ = π / π_old,
                     k3 = exp(q) − q − 1 with q = log π_ref − log π; mean over a sample's completion tokens,
                     then over samples
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import forward
from mantis_jax.train.step import token_cross_entropy


def token_logprobs(args: ModelArgs, params, inputs_bt, targets_bt, *, positions_bt=None,
                   segment_ids_bt=None) -> tuple[jax.Array, dict]:
    logits_btv, aux = forward(args, params, inputs_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt)
    return -token_cross_entropy(logits_btv, targets_bt), aux


def sft_loss(args: ModelArgs, params, batch: dict) -> tuple[jax.Array, dict]:
    """Batch: inputs, targets, loss_mask (1 on response targets), segment_ids, positions — all [B, T]."""
    logp_bt, aux = token_logprobs(args, params, batch["inputs"], batch["targets"], positions_bt=batch["positions"],
                                  segment_ids_bt=batch["segment_ids"])
    w_bt = batch["loss_mask"].astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w_bt), 1.0)
    ce = -jnp.sum(logp_bt * w_bt) / n
    return ce + aux["moe_loss"], {"ce": ce, "tokens": jnp.sum(w_bt)}


def sequence_logprobs(args: ModelArgs, params, inputs_bt, targets_bt, mask_bt) -> tuple[jax.Array, dict]:
    """Σ_t log p(target_t) over the masked (response) targets of each row [B], and the model's aux dict."""
    logp_bt, aux = token_logprobs(args, params, inputs_bt, targets_bt)
    return jnp.sum(logp_bt * mask_bt.astype(jnp.float32), axis=1), aux


def dpo_loss(policy_chosen_b, policy_rejected_b, ref_chosen_b, ref_rejected_b, beta: float) -> tuple[jax.Array, dict]:
    """The sigmoid DPO loss over sequence log-probabilities [B]; the reference terms carry no gradient."""
    ref_chosen_b, ref_rejected_b = jax.lax.stop_gradient(ref_chosen_b), jax.lax.stop_gradient(ref_rejected_b)
    chosen_reward_b = beta * (policy_chosen_b - ref_chosen_b)
    rejected_reward_b = beta * (policy_rejected_b - ref_rejected_b)
    margin_b = chosen_reward_b - rejected_reward_b
    loss = -jnp.mean(jax.nn.log_sigmoid(margin_b))
    return loss, {"reward_accuracy": jnp.mean((margin_b > 0).astype(jnp.float32)),
                  "reward_margin": jnp.mean(margin_b), "chosen_reward": jnp.mean(chosen_reward_b),
                  "rejected_reward": jnp.mean(rejected_reward_b)}


def group_advantages(rewards_pg: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Group-normalised advantages [P, G]: each row sums to 0; a group of equal rewards gets 0 everywhere."""
    r = rewards_pg.astype(jnp.float32)
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    return centred / (jnp.std(r, axis=1, keepdims=True) + eps)


def grpo_loss(logp_nt, old_logp_nt, ref_logp_nt, mask_nt, advantages_n, *, clip: float,
              kl_weight: float) -> tuple[jax.Array, dict]:
    """The clipped-ratio policy loss with a KL penalty to the reference, over completion tokens (mask_nt)."""
    old_logp_nt, ref_logp_nt = jax.lax.stop_gradient(old_logp_nt), jax.lax.stop_gradient(ref_logp_nt)
    mask_nt = mask_nt.astype(jnp.float32)
    ratio_nt = jnp.exp(logp_nt - old_logp_nt)
    adv_n1 = jax.lax.stop_gradient(advantages_n)[:, None]
    pg_nt = -jnp.minimum(ratio_nt * adv_n1, jnp.clip(ratio_nt, 1.0 - clip, 1.0 + clip) * adv_n1)
    q_nt = ref_logp_nt - logp_nt
    kl_nt = jnp.exp(q_nt) - q_nt - 1.0
    per_token = pg_nt + kl_weight * kl_nt
    n_tokens_n = jnp.maximum(jnp.sum(mask_nt, axis=1), 1.0)
    loss = jnp.mean(jnp.sum(per_token * mask_nt, axis=1) / n_tokens_n)
    total = jnp.maximum(jnp.sum(mask_nt), 1.0)
    clipped = (jnp.abs(ratio_nt - 1.0) > clip).astype(jnp.float32)
    return loss, {"kl": jnp.sum(kl_nt * mask_nt) / total, "clip_fraction": jnp.sum(clipped * mask_nt) / total,
                  "policy_loss": jnp.mean(jnp.sum(pg_nt * mask_nt, axis=1) / n_tokens_n)}
