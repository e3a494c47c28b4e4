"""Memory estimator: per-device bytes of parameters, gradients, optimizer state and activations of a training
step for a config on a mesh of N devices, from shapes and shardings only (nothing allocated, no devices needed).
The caller passes the boxed abstract train state (`train.state.abstract_train_state(config, boxed=True)`); the
command line is train/memory_estimate.py:

    python -m mantis_jax.train.memory_estimate --config=configs/base.py --devices=8 [--device_gb=80] [--config.x=y]

Parameters, gradients and optimizer state are exact: every leaf's per-device shard shape follows from its logical
axis names, the config's rules and the mesh sizes (uneven splits are padded, as XLA does). Activations are an
estimate per micro-batch (`data.batch_size` rows split over the batch's mesh axes), by the remat policy:
  saved      what the backward pass keeps from every layer (the layer input under "full"; matmul outputs under
             "dots*"; everything under "none")
  working    one layer recomputed in the backward pass: projections, attention scores and probabilities
             [H, T, T] in float32 (the attention is not fused), SwiGLU buffers of the K routed copies, and the
             expert-parallel exchange buffers (`ep_exchange_bytes`: sized by model/dispatch.exchange_capacities,
             the function model/expert_parallel.py sizes them with; checked against the compiled program)
  logits     [tokens, V] float32 logits and their gradient
The estimate leaves out XLA's fragmentation and collective scratch; `headroom` is what remains of the device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from mantis_jax.config import MESH_AXES
from mantis_jax.model import dispatch
from mantis_jax.model.args import ModelArgs
from mantis_jax.parallel import mesh as mesh_lib
from mantis_jax.parallel import rules as rule_presets

GB = 1e9


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    mesh: dict[str, int]
    params: int  # bytes per device
    grads: int
    opt_state: int
    act_saved: int
    act_working: int
    act_logits: int
    tokens_per_device: int

    @property
    def activations(self) -> int:
        return self.act_saved + self.act_working + self.act_logits

    @property
    def total(self) -> int:
        return self.params + self.grads + self.opt_state + self.activations


def shard_shape(shape: tuple[int, ...], spec: Any, sizes: dict[str, int]) -> tuple[int, ...]:
    """The per-device shape of an array of `shape` laid out by PartitionSpec `spec` on a mesh of `sizes`."""
    out = []
    for i, dim in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        out.append(-(-dim // math.prod(sizes[a] for a in axes)))
    return tuple(out)


def _leaf_bytes(tree: Any, rules, sizes: dict[str, int]) -> int:
    """Per-device bytes of a boxed abstract pytree (boxes give logical names; other leaves are replicated)."""
    total = 0

    def one(x):
        nonlocal total
        if isinstance(x, nn.Partitioned):
            value = x.value
            if hasattr(value, "shape") and len(value.shape) == len(x.names):
                spec = nn.logical_to_mesh_axes(x.names, rules)
                total += math.prod(shard_shape(value.shape, spec, sizes)) * value.dtype.itemsize
                return
            leaves = jax.tree.leaves(value)
        else:
            leaves = [x]
        total += sum(math.prod(v.shape) * v.dtype.itemsize for v in leaves)

    jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return total


def ep_exchange_bytes(tokens_local: int, d_model: int, d_ff: int, n_experts: int, top_k: int,
                      capacity_factor: float | None, itemsize: int) -> int:
    """Per-device bytes of one MoE layer's expert-parallel buffers, forward and backward, for `tokens_local`
    tokens per device: send/receive rows [E·C, D] both ways and the SwiGLU's [E·C, F] buffers, for every buffer
    size C the layer compiles (dropless: a `lax.switch` over the ladder, whose residuals JAX keeps for every branch,
    so the sizes add up)."""
    caps = dispatch.exchange_capacities(tokens_local, top_k, n_experts, capacity_factor)
    rows = n_experts * sum(caps)
    return 2 * rows * (2 * d_model + 3 * d_ff) * itemsize


def _activation_bytes(args: ModelArgs, config, tokens: int, seqs: int, seq_len: int,
                      tokens_local: int) -> tuple[int, ...]:
    c = 2 if args.dtype == "bfloat16" else 4
    D, F, H, G, Dh, K, E = (args.d_model, args.d_ff, args.n_heads, args.n_kv_heads, args.head_dim, args.top_k,
                            args.n_experts)
    proj = H * Dh + 2 * G * Dh + H * Dh + D  # q, k, v, attention output, output projection
    ffn = K * (2 * F + F + D) + (E * 4 // c if E > 1 else 0)  # gate, up, silu·up, down of K copies; router f32
    everything = 4 * D + proj + ffn + K * D  # + norms, residuals, the permuted copies
    per_token = {"full": D, "dots": D + proj + ffn, "dots_no_batch": D + proj + ffn, "none": everything}[args.remat]
    saved = args.n_layers * tokens * per_token * c
    scores = 2 * seqs * H * seq_len * seq_len * 4  # scores and probabilities, float32
    working = tokens * everything * c + scores
    if tokens_local:  # expert parallelism: the layer's exchange buffers
        cf = config.moe.capacity_factor if config.moe.impl == "capacity" else None
        working += ep_exchange_bytes(tokens_local, D, F, E, K, cf, c)
    logits = 2 * tokens * args.vocab_size * 4
    return saved, working, logits


def estimate(config: ml_collections.ConfigDict, n_devices: int, boxed_state: Any) -> MemoryEstimate:
    """Per-device memory of one training step of `config` on `n_devices` (mesh from `config.mesh`).

    `boxed_state`: the abstract train state with its logical-axis boxes (`train.state.abstract_train_state(config,
    boxed=True)`): parameter and optimizer bytes are read from it."""
    sizes = dict(zip(MESH_AXES, mesh_lib.mesh_shape(config, n_devices)))
    rules = mesh_lib.logical_rules(config)
    params = _leaf_bytes(boxed_state.params, rules, sizes)
    opt = _leaf_bytes(boxed_state.opt_state, rules, sizes) + 4  # + the step counter
    batch_shards = math.prod(sizes[a] for a in rule_presets.mesh_axes_of(rules, "batch"))
    seqs = -(-config.data.batch_size // batch_shards)
    tokens = seqs * config.data.seq_len
    args = ModelArgs.from_config(config)
    ep = config.moe.expert_parallel and sizes["expert"] > 1 and args.is_moe
    # Expert parallelism splits the tokens over every mesh axis (model/expert_parallel.py).
    tokens_local = -(-config.data.batch_size * config.data.seq_len // n_devices) if ep else 0
    saved, working, logits = _activation_bytes(args, config, tokens, seqs, config.data.seq_len, tokens_local)
    return MemoryEstimate(sizes, params, params, opt, saved, working, logits, tokens)


def real_bytes_per_device(tree: Any) -> int:
    """Bytes the arrays of `tree` really hold on their most-loaded device (to check the estimate)."""
    per_device: dict[Any, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values())


def table(config: ml_collections.ConfigDict, n_devices: int, device_gb: float, boxed_state: Any) -> str:
    e = estimate(config, n_devices, boxed_state)
    mesh = " x ".join(f"{a}={s}" for a, s in e.mesh.items() if s > 1) or "1 device"
    preset = config.mesh.get("rules_preset", "") or "config.mesh.rules"
    rows = [("parameters", e.params), ("gradients", e.grads), ("optimizer state", e.opt_state),
            ("activations: saved by remat", e.act_saved), ("activations: one layer's backward", e.act_working),
            ("activations: logits", e.act_logits), ("total", e.total)]
    lines = [f"{config.name}: {n_devices} devices ({mesh}), rules {preset}, remat {config.model.remat}, "
             f"optimizer {config.train.optimizer}, {e.tokens_per_device} tokens per device per micro-batch",
             f"{'per device':<36}{'GB':>10}"]
    lines += [f"{name:<36}{b / GB:>10.2f}" for name, b in rows]
    headroom = device_gb * GB - e.total
    verdict = "fits" if headroom >= 0 else "does NOT fit"
    lines.append(f"{verdict} on {device_gb:g} GB devices: headroom {headroom / GB:.2f} GB "
                 f"({100 * headroom / (device_gb * GB):.0f}% of the device)")
    return "\n".join(lines)
