"""LoRA: low-rank adapters on chosen weights, as a functional transform of the parameter tree.

The model code does not know about adapters. A weight W named by `config.post.lora_targets` ("module.param", e.g.
`attn.wq`, `moe.w_gate`) gets A [..., *in, r] and B [..., r, *out] and the forward pass runs on
    W' = W + (alpha / r) · A·B
computed inside the jitted step (`apply`), so gradients reach A and B only; the base stays frozen (it is an
argument of the step, never updated). A weight's input and output axes are its trailing axes (`AXES`: wq
[D, H, Dh] is D → (H, Dh), wo [H, Dh, D] is (H, Dh) → D, an expert weight [E, D, F] is D → F per expert); leading
axes (experts, and the layer axis of a scanned stack) each get their own adapter. B starts at zero, so the
adapted model starts equal to the base. Dropout (`lora_dropout`) drops input features of the adapter path (rows
of A, a fresh mask per step and per weight, scaled by 1/(1-p)): the weight-space form of LoRA dropout.

`merge(params, adapters)` folds the adapters into the weights for export (a plain Stage-1 parameter tree);
the adapters alone are what a LoRA run checkpoints (`count` gives their size against the base).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from mantis_jax.config import ConfigError

# parameter name -> (number of trailing input axes, number of trailing output axes)
AXES = {"wq": (1, 2), "wk": (1, 2), "wv": (1, 2), "wo": (2, 1), "w_gate": (1, 1), "w_up": (1, 1), "w_down": (1, 1)}
TARGETS = tuple(f"attn.{n}" for n in ("wq", "wk", "wv", "wo")) + tuple(
    f"{m}.{n}" for m in ("mlp", "moe") for n in ("w_gate", "w_up", "w_down"))


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attn.wq", "attn.wk", "attn.wv", "attn.wo")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, config) -> "LoraSpec | None":
        """None for full fine-tuning (post.lora_rank 0); bad target names raise ConfigError."""
        p = config.post
        if p.lora_rank == 0:
            return None
        targets = tuple(t.strip() for t in p.lora_targets.split(",") if t.strip())
        for t in targets:
            if t not in TARGETS:
                raise ConfigError(f"config.post.lora_targets names {t!r}; use a comma-separated subset of "
                                  f"{','.join(TARGETS)}")
        return cls(int(p.lora_rank), float(p.lora_alpha), float(p.lora_dropout), targets)


def _target_of(path: tuple[str, ...], spec: LoraSpec) -> bool:
    return len(path) >= 2 and f"{path[-2]}.{path[-1]}" in spec.targets


def targeted(params: Any, spec: LoraSpec) -> dict[tuple[str, ...], Any]:
    """{path: weight} of the weights the spec adapts; raises ConfigError when it matches none."""
    flat = traverse_util.flatten_dict(params)
    found = {p: w for p, w in flat.items() if _target_of(p, spec)}
    if not found:
        kinds = sorted({f"{p[-2]}.{p[-1]}" for p in flat if len(p) >= 2 and p[-1] in AXES})
        raise ConfigError(f"config.post.lora_targets ({','.join(spec.targets)}) matches no weight of this model; "
                          f"its adaptable weights are {', '.join(kinds)}")
    return found


def _split_shape(path, shape) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    n_in, n_out = AXES[path[-1]]
    lead = len(shape) - n_in - n_out
    return tuple(shape[:lead]), tuple(shape[lead:lead + n_in]), tuple(shape[lead + n_in:])


def init_adapters(params: Any, spec: LoraSpec, rng: jax.Array) -> Any:
    """{"a", "b"} per targeted weight, nested like `params`: A ~ N(0, 1/fan_in), B = 0 (float32)."""
    out = {}
    for i, (path, w) in enumerate(sorted(targeted(params, spec).items())):
        lead, ins, outs = _split_shape(path, jnp.shape(w))
        a = jax.random.normal(jax.random.fold_in(rng, i), lead + ins + (spec.rank,), jnp.float32)
        out[path] = {"a": a / math.sqrt(math.prod(ins)), "b": jnp.zeros(lead + (spec.rank,) + outs, jnp.float32)}
    return traverse_util.unflatten_dict(out)


def delta(a: jax.Array, b: jax.Array, n_in: int) -> jax.Array:
    """A·B contracted over the rank: [..., *in, r] x [..., r, *out] -> [..., *in, *out] (float32)."""
    lead, ins, outs = a.shape[:a.ndim - n_in - 1], a.shape[a.ndim - n_in - 1:-1], b.shape[len(a.shape) - n_in:]
    a2 = a.reshape(lead + (math.prod(ins), a.shape[-1]))
    b2 = b.reshape(lead + (b.shape[len(lead)], math.prod(outs)))
    return jnp.matmul(a2, b2, preferred_element_type=jnp.float32).reshape(lead + ins + outs)


def apply(params: Any, adapters: Any, spec: LoraSpec, rng: jax.Array | None = None) -> Any:
    """The adapted parameters W + scale·A·B (dropout on A's input rows when `rng` is given and dropout > 0)."""
    flat = dict(traverse_util.flatten_dict(params))
    ad = traverse_util.flatten_dict(adapters)
    keep = 1.0 - spec.dropout
    for i, path in enumerate(sorted({p[:-1] for p in ad})):
        a, b, w = ad[path + ("a",)], ad[path + ("b",)], flat[path]
        if rng is not None and spec.dropout > 0:
            mask = jax.random.bernoulli(jax.random.fold_in(rng, i), keep, a.shape[:-1])
            a = a * (mask[..., None] / keep)
        d = delta(a, b, AXES[path[-1]][0])
        flat[path] = (w.astype(jnp.float32) + spec.scale * d).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def merge(params: Any, adapters: Any, spec: LoraSpec) -> Any:
    """The base with the adapters folded in (no dropout): a plain parameter tree for export and inference."""
    return apply(params, adapters, spec)


def count(params: Any, adapters: Any) -> dict[str, float]:
    """Adapter and base parameter counts, and the trainable fraction."""
    n_base = sum(int(x.size) for x in jax.tree.leaves(params))
    n_lora = sum(int(x.size) for x in jax.tree.leaves(adapters))
    return {"lora_params": n_lora, "base_params": n_base, "trainable_fraction": n_lora / n_base}
