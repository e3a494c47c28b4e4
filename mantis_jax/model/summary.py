"""Parameter counts (from `jax.eval_shape`, no allocation) and model FLOPs per token, and the presets table.

    python -m mantis_jax.model.summary                      # the README's presets table
    python -m mantis_jax.model.summary --config=configs/base.py --config.moe.n_experts=16

Active parameters are those a token touches: everything except the (E - K) / E share of expert weights that its
router did not select. FLOPs count matmuls (2 per multiply-add); attention scores and values are counted causally
(a token attends to (T + 1) / 2 keys on average); training is 3× the forward pass.
"""

from __future__ import annotations

import glob
import os
import sys

import flax.linen as nn
import jax
import numpy as np

from mantis_jax.model.args import ModelArgs

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def param_counts(args: ModelArgs) -> dict[str, int]:
    """{"total", "active", "expert", "embedding"} parameter counts, from shapes only."""
    from mantis_jax.model.transformer import abstract_params  # noqa: PLC0415 (avoids a cycle at import)

    total = expert = embedding = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(abstract_params(args))):
        keys = [getattr(k, "key", "") for k in path]
        size = int(np.prod(leaf.shape))
        total += size
        if "moe" in keys and keys[-1] in EXPERT_WEIGHTS:
            expert += size
        if "embedding" in keys or "lm_head" in keys:
            embedding += size
    inactive = expert * (args.n_experts - args.top_k) // args.n_experts if args.is_moe else 0
    return {"total": total, "active": total - inactive, "expert": expert, "embedding": embedding}


def flops_per_token(args: ModelArgs, seq_len: int, *, training: bool = True) -> dict[str, float]:
    """Model FLOPs per token: "active" (the top-k experts a token uses) and "dense" (as if it used all E)."""
    D, H, G, Dh, F = args.d_model, args.n_heads, args.n_kv_heads, args.head_dim, args.d_ff
    proj = 2 * (D * H * Dh + 2 * D * G * Dh + H * Dh * D)
    scores = 2 * 2 * H * Dh * (seq_len + 1) / 2
    expert = 2 * 3 * D * F
    router = 2 * D * args.n_experts if args.is_moe else 0
    head = 2 * D * args.vocab_size
    mult = 3.0 if training else 1.0
    active = args.n_layers * (proj + scores + router + expert * args.top_k) + head
    dense = args.n_layers * (proj + scores + router + expert * args.n_experts) + head
    return {"active": mult * active, "dense": mult * dense}


def _fmt(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def table(configs: dict) -> str:
    rows = ["| preset | d_model | layers | heads (kv) | d_ff | experts (top-k) | total params | active params "
            "| train GFLOPs/token @ seq |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, config in configs.items():
        a = ModelArgs.from_config(config)
        counts = param_counts(a)
        fl = flops_per_token(a, config.data.seq_len)["active"]
        rows.append(f"| {name} | {a.d_model} | {a.n_layers} | {a.n_heads} ({a.n_kv_heads}) | {a.d_ff} | "
                    f"{a.n_experts} (top-{a.top_k}) | {_fmt(counts['total'])} | {_fmt(counts['active'])} | "
                    f"{fl / 1e9:.2f} @ {config.data.seq_len} |")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    from mantis_jax import cli  # noqa: PLC0415
    from mantis_jax.config import ConfigError  # noqa: PLC0415

    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip())
        return
    unknown = [a for a in argv[1:] if not a.startswith("--config")]
    if unknown:
        cli.fail(f"unknown arguments {unknown}: pass --config=<preset.py> [--config.x=y], or nothing for every preset")
    if any(a.startswith("--config") for a in argv[1:]):
        try:
            config = cli.load_config(argv)
        except ConfigError as e:
            cli.fail(e)
        print(table({config.name: config}))
        return
    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    order = ["micro", "tiny", "small", "base"]
    paths = sorted(glob.glob(os.path.join(root, "*.py")),
                   key=lambda p: (order.index(os.path.basename(p)[:-3]) if os.path.basename(p)[:-3] in order
                                  else len(order), p))
    configs = {os.path.basename(p)[:-3]: cli.load_preset(p) for p in paths if not p.endswith("__init__.py")}
    print("Parameters at the preset's vocab (50304); counted with jax.eval_shape, nothing allocated.\n")
    print(table(configs))


if __name__ == "__main__":
    main(sys.argv)
