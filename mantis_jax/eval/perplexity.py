"""Perplexity of a model (float or int8 params) on factworld validation text, and the quantization report.

Token windows [N, T + 1] enter (`val_windows` cuts them from factworld validation documents, bos/eos around each
document); `perplexity` is exp(mean next-token NLL) over them; `quantization_report` compares the float and the
quantized params on the same windows (memory and perplexity change). Evaluation owns these because they need a
dataset; `infer/quantize.py` only quantizes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mantis_jax.data import factworld
from mantis_jax.infer.quantize import for_apply, param_bytes
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import forward


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


def quantization_report(args: ModelArgs, params, qparams, windows: np.ndarray) -> dict:
    """Memory and perplexity (on `windows`) of the float and the quantized params."""
    ppl_f, ppl_q = perplexity(args, params, windows), perplexity(args, qparams, windows)
    bytes_f, bytes_q = param_bytes(params), param_bytes(qparams)
    return {"bytes_float": bytes_f, "bytes_quantized": bytes_q, "memory_ratio": bytes_q / bytes_f,
            "ppl_float": ppl_f, "ppl_quantized": ppl_q, "ppl_change": ppl_q / ppl_f - 1.0}
