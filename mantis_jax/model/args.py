"""`ModelArgs`: the static, hashable hyper-parameters of MantisLM, read from a validated config.

Flax modules need hashable attributes; a `ConfigDict` is not, so the model takes this frozen dataclass.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    vocab_size: int = 50304
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 1024
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    attn_block_q: int = 32
    kv_conv: int = 0
    init_std: float = 0.02
    n_experts: int = 1
    top_k: int = 1
    moe_impl: str = "ragged"
    capacity_factor: float = 1.25
    router_impl: str = "reference"
    gmm_impl: str = "auto"
    lb_loss_weight: float = 0.01
    z_loss_weight: float = 1e-3
    expert_parallel: bool = False
    exit_loss_weight: float = 0.0  # > 0: intermediate layers also predict (model/early_exit.py)
    min_exit_layer: int = 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 1

    def replace(self, **changes) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "ModelArgs":
        m, moe = config.model, config.moe
        return cls(
            vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads, d_ff=m.d_ff, max_seq_len=m.max_seq_len, rope_theta=m.rope_theta,
            norm_eps=m.norm_eps, tie_embeddings=m.tie_embeddings, dtype=m.dtype, param_dtype=m.param_dtype,
            scan_layers=m.scan_layers, remat=m.remat, attn_block_q=int(m.get("attn_block_q", 0)),
            kv_conv=int(m.get("kv_conv", 0)),
            init_std=m.init_std, n_experts=moe.n_experts, top_k=moe.top_k, moe_impl=moe.impl,
            capacity_factor=moe.capacity_factor, router_impl=moe.router_impl, gmm_impl=moe.gmm_impl,
            lb_loss_weight=moe.lb_loss_weight, z_loss_weight=moe.z_loss_weight,
            expert_parallel=bool(moe.get("expert_parallel", False)),
            exit_loss_weight=float(m.get("exit_loss_weight", 0.0)), min_exit_layer=int(m.get("min_exit_layer", 1)))
