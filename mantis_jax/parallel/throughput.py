"""Per-device step throughput: tokens/s/device, TFLOP/s/device and MFU of a sharded training step.

A step's global figures (tokens it consumed, wall seconds) enter with the device count of the mesh; model FLOPs
per token come from `mantis_jax.model.summary.flops_per_token` (active parameters, causal attention, training =
3x forward). MFU divides the achieved model FLOP/s of ONE device by that device's peak, so it reads the same on 1
or 1024 devices: `peak_flops_per_device` is a spec sheet figure (H100 SXM bf16 dense: 989e12) or, on CPU, the
matmul probe `train.metrics.measure_peak_flops` run on one device.
"""

from __future__ import annotations

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of one H100 SXM (NVIDIA datasheet), the usual MFU denominator


def per_device_metrics(tokens: float, seconds: float, n_devices: int, flops_per_token: float,
                       peak_flops_per_device: float) -> dict[str, float]:
    """{"tokens_per_s_per_device", "tflops_per_device", "mfu"} of a step that consumed `tokens` in `seconds`."""
    if seconds <= 0 or n_devices < 1:
        raise ValueError(f"per_device_metrics needs seconds > 0 and n_devices >= 1 (got {seconds}, {n_devices})")
    tokens_per_s_per_device = tokens / seconds / n_devices
    flops_per_device = tokens_per_s_per_device * flops_per_token
    mfu = flops_per_device / peak_flops_per_device if peak_flops_per_device > 0 else 0.0
    return {"tokens_per_s_per_device": tokens_per_s_per_device, "tflops_per_device": flops_per_device / 1e12,
            "mfu": mfu}
