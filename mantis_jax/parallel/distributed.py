"""Multi-host start-up: `jax.distributed.initialize` from environment variables, and process-local batches.

Every launcher (launch/local.sh, launch/slurm/train.sbatch, launch/k8s/) starts one Python process per host (or
per GPU) with three variables set, and every entry point calls `initialize_from_env()` before touching devices:
  MANTIS_COORDINATOR      host:port of process 0's coordinator service
  MANTIS_NUM_PROCESSES    how many processes the job has
  MANTIS_PROCESS_ID       this process's index in [0, MANTIS_NUM_PROCESSES)
  MANTIS_LOCAL_DEVICE_IDS optional, comma-separated: the local GPUs this process drives (one process per GPU)
Without them (or with MANTIS_NUM_PROCESSES=1) nothing happens: a single process sees its local devices. CPU
processes exchange collectives over gloo (`jax_cpu_collectives_implementation`, the default here). After start-up
`jax.devices()` lists every process's devices; the mesh (parallel/mesh.py) orders them so that the slow,
between-host hops fall on the outer `data`/`fsdp` axes. Data enters per process: each process reads its own rows
and `global_batch` assembles them into one array sharded over the mesh.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np

ENV_COORDINATOR = "MANTIS_COORDINATOR"
ENV_NUM_PROCESSES = "MANTIS_NUM_PROCESSES"
ENV_PROCESS_ID = "MANTIS_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "MANTIS_LOCAL_DEVICE_IDS"


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    coordinator: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None


def spec_from_env(env: Mapping[str, str] | None = None) -> ProcessSpec | None:
    """The job's process layout from MANTIS_* variables; None for a single process. Bad values: one clear error."""
    env = os.environ if env is None else env
    n_raw = env.get(ENV_NUM_PROCESSES, "").strip()
    if not n_raw:
        return None
    try:
        n = int(n_raw)
    except ValueError:
        raise ValueError(f"{ENV_NUM_PROCESSES}={n_raw!r} must be an integer number of processes") from None
    if n < 1:
        raise ValueError(f"{ENV_NUM_PROCESSES}={n} must be >= 1")
    if n == 1:
        return None
    coordinator = env.get(ENV_COORDINATOR, "").strip()
    if ":" not in coordinator:
        raise ValueError(f"{ENV_COORDINATOR}={coordinator!r} must be host:port of process 0 (e.g. 10.0.0.1:12355) "
                         f"when {ENV_NUM_PROCESSES}={n}")
    pid_raw = env.get(ENV_PROCESS_ID, "").strip()
    if not pid_raw.isdigit() or not 0 <= int(pid_raw) < n:
        raise ValueError(f"{ENV_PROCESS_ID}={pid_raw!r} must be an integer in [0, {n}) ({ENV_NUM_PROCESSES}={n})")
    ids_raw = env.get(ENV_LOCAL_DEVICE_IDS, "").strip()
    ids = tuple(int(i) for i in ids_raw.split(",")) if ids_raw else None
    return ProcessSpec(coordinator, n, int(pid_raw), ids)


def initialize_from_env(env: Mapping[str, str] | None = None) -> ProcessSpec | None:
    """Calls `jax.distributed.initialize` for a multi-process job (idempotent); returns the spec, or None."""
    spec = spec_from_env(env)
    if spec is None or is_initialized():
        return spec
    jax.distributed.initialize(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                               process_id=spec.process_id, local_device_ids=spec.local_device_ids)
    return spec


def is_initialized() -> bool:
    return jax.distributed.is_initialized()


def process_rows(sharding: jax.sharding.Sharding, global_batch_size: int) -> slice:
    """The rows of a global batch [B, ...] that this process must supply under `sharding` (its devices' rows).

    Read from the sharding, not assumed from the process index: the mesh decides which devices own which rows."""
    index_map = sharding.devices_indices_map((global_batch_size,))
    local = [index_map[d][0] for d in sharding.addressable_devices]
    start = min(s.start or 0 for s in local)
    stop = max(global_batch_size if s.stop is None else s.stop for s in local)
    covered = set()
    for s in local:
        covered.update(range(s.start or 0, global_batch_size if s.stop is None else s.stop))
    if covered != set(range(start, stop)):
        raise ValueError(f"this process's devices own non-contiguous batch rows under {sharding}; order the mesh "
                         "so that each process's devices are adjacent on the batch axes (data, fsdp)")
    return slice(start, stop)


def global_batch(local: Mapping[str, Any], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Assembles each process's rows [B/P, ...] into global arrays [B, ...] laid out by `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
