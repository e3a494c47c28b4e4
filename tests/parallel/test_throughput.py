"""Per-device throughput metrics against hand-computed values."""

import pytest

from mantis_jax.model.args import ModelArgs
from mantis_jax.model.summary import flops_per_token
from mantis_jax.parallel.throughput import H100_BF16_PEAK, per_device_metrics


def test_per_device_metrics_known_values():
    m = per_device_metrics(tokens=8 * 4096, seconds=2.0, n_devices=8, flops_per_token=6e9,
                           peak_flops_per_device=1e12)
    assert m["tokens_per_s_per_device"] == pytest.approx(2048.0)
    assert m["tflops_per_device"] == pytest.approx(2048 * 6e9 / 1e12)
    assert m["mfu"] == pytest.approx(2048 * 6e9 / 1e12)
    # The same step on twice the devices in the same time: half the per-device rate and MFU.
    m16 = per_device_metrics(8 * 4096, 2.0, 16, 6e9, 1e12)
    assert m16["mfu"] == pytest.approx(m["mfu"] / 2)
    with pytest.raises(ValueError, match="seconds > 0"):
        per_device_metrics(1, 0.0, 1, 1.0, 1.0)


def test_uses_model_flops_per_token():
    args = ModelArgs(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, n_experts=4, top_k=2)
    f = flops_per_token(args, 16)["active"]
    m = per_device_metrics(1000, 1.0, 4, f, H100_BF16_PEAK)
    assert m["tflops_per_device"] == pytest.approx(250 * f / 1e12)
