"""Metrics: MFU arithmetic, the matmul peak probe, host conversion and averaging, JSONL and TensorBoard files."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.train import metrics as m


def test_mfu_is_model_flops_over_peak():
    assert m.mfu(6e6, 1e3, 1e10) == pytest.approx(0.6)
    assert m.mfu(6e6, 1e3, 0.0) == 0.0


def test_peak_probe_is_a_plausible_matmul_rate():
    peak = m.measure_peak_flops(n=256, reps=3)
    assert math.isfinite(peak) and 1e7 < peak < 1e14


def test_to_host_and_mean():
    host = m.to_host({"loss": jnp.float32(2.5), "expert_load": jnp.array([[0.25, 0.75], [0.5, 0.5]])})
    assert host == {"loss": 2.5, "expert_load": [[0.25, 0.75], [0.5, 0.5]]}
    hist = [{"loss": 1.0, "tokens": 10.0, "expert_load": [[0.0, 1.0]]},
            {"loss": 3.0, "tokens": 30.0, "expert_load": [[1.0, 0.0]]}]
    assert m.mean_metrics(hist) == {"loss": 2.0, "tokens": 40.0, "expert_load": [[0.5, 0.5]]}


def test_writer_jsonl_and_tensorboard(tmp_path):
    w = m.MetricsWriter(str(tmp_path))
    rows = [{"loss": 3.0 - 0.5 * i, "expert_load": [[0.1 * i, 1 - 0.1 * i]]} for i in range(3)]
    for i, row in enumerate(rows):
        w.write(10 * (i + 1), row)
    w.write(30, {"val_loss": 1.25}, prefix="val")
    w.close()
    train = m.read_jsonl(str(tmp_path), "train")
    assert [r["step"] for r in train] == [10, 20, 30] and [r["loss"] for r in train] == [3.0, 2.5, 2.0]
    assert m.read_jsonl(str(tmp_path), "val") == [{"step": 30, "split": "val", "val_loss": 1.25}]
    scalars = m.read_event_scalars(str(tmp_path / m.TENSORBOARD_DIR))
    assert scalars["train/loss"] == [(10, 3.0), (20, 2.5), (30, 2.0)]
    assert scalars["val/val_loss"] == [(30, 1.25)]
    load = [v for tag, vals in scalars.items() if "layer_0" in tag and tag.endswith("expert_1") for v in vals]
    np.testing.assert_allclose([v for _, v in sorted(load)], [1.0, 0.9, 0.8], rtol=1e-6)


def test_writer_disabled_writes_nothing(tmp_path):
    w = m.MetricsWriter(str(tmp_path / "w"), enabled=False)
    w.write(1, {"loss": 1.0})
    w.close()
    assert not (tmp_path / "w").exists()
