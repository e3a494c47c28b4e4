"""Hardware detection: the platform, device kind and memory a run starts on, and the defaults they choose.

`detect(devices)` reads them from JAX once the backend is up (after `jax.distributed.initialize`). The default
compute dtype, `model.dtype = "auto"`, becomes bfloat16 on GPU and TPU and float32 on CPU (`config.resolve_dtype`,
which the model's args call); `--config.model.dtype=float32` (or bfloat16) overrides it. The trainer prints
`describe()` at start and records the same fields in the metrics' "setup" record. Memory is the device's allocator
limit where the platform reports one (GPU, TPU) and the host's RAM on CPU, where fake devices share it.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from mantis_jax.config import resolve_dtype

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Hardware:
    platform: str  # cpu | gpu | tpu
    device_kind: str  # e.g. "NVIDIA H100 80GB HBM3", "TPU v5 lite", "cpu"
    devices: int  # in the whole job
    processes: int
    memory_bytes: int | None  # per device (None: not reported)

    def compute_dtype(self, config: ml_collections.ConfigDict) -> str:
        return resolve_dtype(config.model.dtype)

    def describe(self, config: ml_collections.ConfigDict) -> str:
        memory = f"{self.memory_bytes / GIB:.1f} GiB" if self.memory_bytes else "memory not reported"
        if self.platform == "cpu":
            memory = f"{memory} of host memory shared"
        chosen = config.model.dtype
        how = ("auto: bfloat16 on GPU/TPU, float32 on CPU; override with --config.model.dtype"
               if chosen == "auto" else "set by config.model.dtype")
        return (f"hardware: {self.devices} x {self.platform} ({self.device_kind}) in {self.processes} process(es), "
                f"{memory}; compute dtype {self.compute_dtype(config)} ({how})")

    def metrics(self, config: ml_collections.ConfigDict) -> dict:
        return {"platform": self.platform, "device_kind": self.device_kind, "compute_dtype": self.compute_dtype(config),
                "device_memory_gib": round(self.memory_bytes / GIB, 2) if self.memory_bytes else None}


def _memory_bytes(device) -> int | None:
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 (backends without allocator statistics raise; the figure is informative)
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def detect(devices=None) -> Hardware:
    devices = list(jax.devices() if devices is None else devices)
    local = [d for d in devices if d.process_index == jax.process_index()] or jax.local_devices()
    first = local[0]
    return Hardware(platform=first.platform, device_kind=first.device_kind, devices=len(devices),
                    processes=jax.process_count(), memory_bytes=_memory_bytes(first))
