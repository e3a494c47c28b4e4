"""Named presets of logical-axis rules: which mesh axis each of the model's logical names lives on.

The model speaks only logical names (batch, length, embed, vocab, heads, kv_heads, head_dim, kv_conv, mlp, exp,
layers, ssm_*); a rule set maps each to a mesh axis of ("data", "fsdp", "expert", "tensor"), a tuple of them, or None
(replicated). `config.mesh.rules_preset` picks one of these by name; "" keeps `config.mesh.rules` as written.
Nothing here imports jax: the presets are plain data, resolved by `mantis_jax.parallel.mesh.logical_rules`.

  dp       pure data parallel: every parameter replicated, the batch split over every mesh axis but tensor
  fsdp     ZeRO-3 style: parameters and optimizer state split on their embed axis over `fsdp`; batch over all
  fsdp_ep  fsdp + expert parallel: expert weights split on their expert axis over `expert`; the expert axis also
           splits the batch, and the MoE dispatch exchanges tokens over it (model/expert_parallel.py)
  fsdp_tp  fsdp + Megatron-style tensor parallel: heads, mlp and vocab split over `tensor`; the batch is split over
           (data, fsdp) only, since the tensor group computes on the same tokens
"""

from __future__ import annotations

from typing import Any

Rules = tuple[tuple[str, Any], ...]

_REPLICATED_REST = (("length", None), ("head_dim", None), ("layers", None), ("ssm_state", None),
                    ("ssm_rank", None), ("ssm_conv", None), ("kv_conv", None))

PRESETS: dict[str, Rules] = {
    "dp": (
        ("batch", ("data", "fsdp", "expert")),
        ("embed", None), ("vocab", None), ("heads", None), ("kv_heads", None), ("mlp", None), ("exp", None),
        ("ssm_inner", None),
    ) + _REPLICATED_REST,
    "fsdp": (
        ("batch", ("data", "fsdp", "expert")),
        ("embed", "fsdp"), ("vocab", None), ("heads", None), ("kv_heads", None), ("mlp", None), ("exp", None),
        ("ssm_inner", None),
    ) + _REPLICATED_REST,
    "fsdp_ep": (
        ("batch", ("data", "fsdp", "expert")),
        ("exp", "expert"), ("embed", "fsdp"), ("vocab", None), ("heads", None), ("kv_heads", None),
        ("mlp", None), ("ssm_inner", None),
    ) + _REPLICATED_REST,
    "fsdp_tp": (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
        ("exp", None), ("ssm_inner", "tensor"),
    ) + _REPLICATED_REST,
}


def preset(name: str) -> Rules:
    """The rule set called `name`; a clear error listing the choices otherwise."""
    if name not in PRESETS:
        raise ValueError(f"config.mesh.rules_preset ({name!r}) must be one of {', '.join(PRESETS)} "
                         "(or '' to use config.mesh.rules)")
    return PRESETS[name]


def mesh_axes_of(rules: Rules, logical_name: str) -> tuple[str, ...]:
    """The mesh axes that a logical name maps to under `rules` (empty when replicated or unnamed)."""
    for name, target in rules:
        if name == logical_name:
            if target is None:
                return ()
            return tuple(target) if isinstance(target, (tuple, list)) else (target,)
    return ()
