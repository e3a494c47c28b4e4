"""Hardware detection: the platform chooses the compute dtype ("auto": bfloat16 on GPU/TPU, float32 on CPU), an
explicit model.dtype overrides it, and the description names what was found."""

import jax
import pytest

from mantis_jax import config as config_lib
from mantis_jax.model.args import ModelArgs
from mantis_jax.train import hardware


@pytest.mark.parametrize("backend,dtype,expected", [("cpu", "auto", "float32"), ("gpu", "auto", "bfloat16"),
                                                    ("tpu", "auto", "bfloat16"), ("gpu", "float32", "float32"),
                                                    ("cpu", "bfloat16", "bfloat16")])
def test_platform_chooses_the_compute_dtype(monkeypatch, backend, dtype, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    config = config_lib.default_config()
    assert config.model.dtype == "auto"
    config.model.dtype = dtype
    config_lib.validate(config)
    assert ModelArgs.from_config(config).dtype == expected


def test_detects_this_machine():
    config = config_lib.default_config()
    hw = hardware.detect(jax.devices()[:2])
    assert (hw.platform, hw.devices, hw.processes) == ("cpu", 2, 1) and hw.memory_bytes > 2 ** 30
    text = hw.describe(config)
    assert text.startswith("hardware: 2 x cpu (cpu) in 1 process(es)") and "compute dtype float32 (auto" in text
    config.model.dtype = "bfloat16"
    assert hw.metrics(config)["compute_dtype"] == "bfloat16" and "set by config.model.dtype" in hw.describe(config)
    with pytest.raises(config_lib.ConfigError, match="config.model.dtype"):
        config.model.dtype = "float16"
        config_lib.validate(config)
