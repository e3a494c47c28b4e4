"""Weight-only int8 quantization, symmetric, one scale per output channel.

A float params pytree enters `quantize_params`; the matmul weights leave as `QTensor(q int8, scale float32)`:
attention wq/wk/wv/wo, the dense and expert SwiGLU w_gate/w_up/w_down, the embedding (its rows are the output
channels of the tied LM head) and an untied lm_head. Norm scales and the MoE router stay float (tiny, and routing
is sensitive). For each weight the scale is max|w| / 127 over the *input* (contracted) axes, so every output
channel keeps its own range and |w - dequant(q)| <= scale / 2 elementwise.

The quantized tree is what stays resident (int8 + scales: ~1/4 of float32). The decode loop (infer/decode.py)
dequantizes the whole tree once per call with `dequantize_params`, before its loop: per step it would redo the
same work (a step does only what changes per step). A single forward (perplexity) uses `for_apply`, which
dequantizes the embedding and head and leaves each layer's weights int8: the model's own `w.astype(dtype)` cast
(QTensor.astype) dequantizes them inside that layer, so float weights exist one layer at a time.
`param_bytes` measures a tree; `perplexity` / `val_windows` give the factworld-val perplexity change.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import forward

# Leaf name -> the contracted (input) axes, counted from the end so a stacked [L, ...] leading axis is ignored.
INPUT_AXES = {
    "wq": (-3,), "wk": (-3,), "wv": (-3,),  # [D, H, Dh]: contracts D
    "wo": (-3, -2),  # [H, Dh, D]
    "w_gate": (-2,), "w_up": (-2,), "w_down": (-2,),  # [D, F] / [F, D], experts [E, D, F] / [E, F, D]
    "embedding": (-1,),  # [V, D]: the tied head contracts D, a row per vocabulary entry
    "lm_head": (-2,),  # [D, V]
}
MODES = ("none", "int8")


@struct.dataclass
class QTensor:
    """int8 values and float32 per-output-channel scales (size 1 on the input axes); `dtype` is the float dtype."""

    q: jax.Array
    scale: jax.Array
    dtype: str = struct.field(pytree_node=False, default="float32")

    def dequantize(self) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale).astype(self.dtype)

    def astype(self, dtype) -> jax.Array:
        """The model casts every layer weight with `w.astype(compute_dtype)`: dequantizing here puts the float
        copy inside the layer (inside the layer scan), so one layer's float weights exist at a time."""
        return self.dequantize().astype(dtype)


def quantize_tensor(w: jax.Array, input_axes: tuple[int, ...]) -> QTensor:
    axes = tuple(a % w.ndim for a in input_axes)
    w32 = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)  # an all-zero channel stays exactly zero
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return QTensor(q, scale.astype(jnp.float32), jnp.dtype(w.dtype).name)


def _name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def quantize_params(params: Any, mode: str = "int8") -> Any:
    """The params tree with every weight named in INPUT_AXES replaced by a QTensor (mode "none": unchanged)."""
    if mode not in MODES:
        raise ValueError(f"quantize mode {mode!r} is not supported; use one of {', '.join(MODES)}")
    if mode == "none":
        return params

    def one(path, leaf):
        axes = INPUT_AXES.get(_name(path))
        if axes is None or jnp.ndim(leaf) < len(axes) + 1 or not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        return quantize_tensor(leaf, axes)

    return jax.tree_util.tree_map_with_path(one, params)


def _is_q(x) -> bool:
    return isinstance(x, QTensor)


def dequantize_params(params: Any) -> Any:
    """Float params from a (possibly) quantized tree; float leaves pass through. Call inside jit."""
    return jax.tree.map(lambda x: x.dequantize() if _is_q(x) else x, params, is_leaf=_is_q)


def for_apply(params: Any) -> Any:
    """What the jitted forward gets: top-level leaves (embedding, head) dequantized, the layer weights left as
    QTensors for the model's per-layer `.astype` to dequantize. A float tree passes through unchanged."""
    if not is_quantized(params):
        return params
    return {k: v if k == "layers" or k.startswith("layer_") else dequantize_params(v) for k, v in params.items()}


def is_quantized(params: Any) -> bool:
    return any(_is_q(x) for x in jax.tree.leaves(params, is_leaf=_is_q))


def param_bytes(params: Any) -> int:
    """Bytes held by a params tree (int8 values + scales for quantized leaves)."""
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


@functools.partial(jax.jit, static_argnames=("args",))
def _nll_sum(args: ModelArgs, params, windows_bt, rows_b):
    logits_btv, _ = forward(args, for_apply(params), windows_bt[:, :-1])
    logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_bt = jnp.take_along_axis(logits_btv, windows_bt[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum((logz_bt - target_bt) * rows_b[:, None])


def perplexity(args: ModelArgs, params, windows: np.ndarray, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over token windows [N, T+1] (float or quantized params)."""
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"perplexity needs token windows [N >= 1, T + 1 >= 2]; got shape {windows.shape}")
    total = 0.0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        rows = np.zeros((batch_size,), np.float32)
        rows[:len(chunk)] = 1.0  # the last chunk is padded with copies (one shape, one compile), weighted 0
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
        total += float(_nll_sum(args, params, jnp.asarray(chunk), jnp.asarray(rows)))
    return float(np.exp(total / (windows.shape[0] * (windows.shape[1] - 1))))


def val_windows(config, tokenizer, *, n_docs: int = 32, seq_len: int | None = None, max_windows: int = 32):
    """Token windows [N, seq_len + 1] from factworld validation documents (bos/eos around each document)."""
    from mantis_jax.data import factworld  # noqa: PLC0415 (only the report needs the corpus)

    seq_len = seq_len or config.data.seq_len
    world = factworld.world_from_config(config)
    ids: list[int] = []
    for text in world.iter_documents("val", 0, n_docs):
        ids += tokenizer.encode(text, add_bos=True, add_eos=True)
    n = min(max_windows, (len(ids) - 1) // seq_len)
    if n < 1:
        raise ValueError(f"{n_docs} factworld val documents give {len(ids)} tokens, fewer than one window of "
                         f"{seq_len + 1}; raise n_docs or lower seq_len")
    flat = np.asarray(ids[:n * seq_len + 1], np.int32)
    return np.stack([flat[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])


def report(args: ModelArgs, params, qparams, windows: np.ndarray) -> dict:
    """Memory and factworld-val perplexity of the float and the quantized params."""
    ppl_f, ppl_q = perplexity(args, params, windows), perplexity(args, qparams, windows)
    bytes_f, bytes_q = param_bytes(params), param_bytes(qparams)
    return {"bytes_float": bytes_f, "bytes_quantized": bytes_q, "memory_ratio": bytes_q / bytes_f,
            "ppl_float": ppl_f, "ppl_quantized": ppl_q, "ppl_change": ppl_q / ppl_f - 1.0}
