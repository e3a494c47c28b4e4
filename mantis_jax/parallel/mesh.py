"""The device mesh and the logical-axis rules that place parameters and activations on it.

The model names axes logically ("embed", "mlp", "exp", "batch", ...); `config.mesh.rules` maps those names to the
mesh axes ("data", "fsdp", "expert", "tensor"), whose sizes come from `config.mesh` (-1 fills the rest). This
module turns both into `jax.sharding` objects: a mesh (Auto axis types, for GSPMD), the rules context to trace
under, shardings for a boxed abstract pytree, and the batch sharding. Parameters are created already sharded by
`create_sharded` (shapes from `jax.eval_shape`, then `jax.jit(init, out_shardings=...)`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from mantis_jax.config import MESH_AXES, ConfigError
from mantis_jax.parallel import rules as rule_presets


def mesh_shape(config: ml_collections.ConfigDict, n_devices: int) -> tuple[int, ...]:
    """Axis sizes for `n_devices`, with the (at most one) -1 filled; a clear error when they do not fit."""
    sizes = [config.mesh[a] for a in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % fixed:
            raise ConfigError(f"config.mesh sizes {dict(zip(MESH_AXES, sizes))} leave {n_devices} devices "
                              f"indivisible by {fixed}; change the fixed sizes so their product divides {n_devices}")
        sizes[sizes.index(-1)] = n_devices // fixed
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"config.mesh sizes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices but "
                          f"{n_devices} are available; set one axis to -1 (e.g. --config.mesh.data=-1)")
    return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    """The rules to trace under: the named preset when `config.mesh.rules_preset` is set, else `mesh.rules`."""
    preset = config.mesh.get("rules_preset", "")
    if preset:
        return rule_presets.preset(preset)
    return tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in config.mesh.rules)


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules) -> Any:
    """The context to trace and run sharded code in: the mesh plus the logical-axis rules."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def shardings_of(abstract_boxed: Any, mesh: jax.sharding.Mesh, rules) -> Any:
    """NamedShardings for a pytree whose leaves are `nn.LogicallyPartitioned` boxes (or plain leaves: replicated).

    The result has the structure of `nn.unbox(abstract_boxed)`. A box whose value is not an array of the box's rank
    (e.g. Adafactor's factored moments inside a parameter's box) is replicated."""
    replicated_ = NamedSharding(mesh, P())

    def one(x):
        if isinstance(x, nn.Partitioned):
            value = x.value
            if hasattr(value, "shape") and len(value.shape) == len(x.names):
                return NamedSharding(mesh, nn.logical_to_mesh_axes(x.names, rules))
            return jax.tree.map(lambda _: replicated_, value)
        return replicated_

    return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def create_sharded(init_boxed: Callable[..., Any], mesh: jax.sharding.Mesh, rules, *args) -> tuple[Any, Any]:
    """Runs `init_boxed(*args)` under jit with every output placed by its logical names; returns (tree, shardings).

    No full replica is ever built: XLA materialises each shard on its own device."""
    with activate(mesh, rules):
        abstract = jax.eval_shape(init_boxed, *args)
        shardings = shardings_of(abstract, mesh, rules)
        tree = jax.jit(lambda *a: unbox_values(init_boxed(*a)), out_shardings=shardings)(*args)
    return tree, shardings


def unbox_values(boxed: Any) -> Any:
    """The values of `nn.Partitioned` boxes, without the sharding constraints `nn.unbox` adds.

    Under jit with out_shardings the constraints are redundant, and wrong for a box whose value is not an array of
    the box's rank (Adafactor's factored moments inherit the parameter's box): `nn.unbox` raises on those."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: jax.sharding.Mesh, rules, ndim: int = 2) -> NamedSharding:
    """Batch arrays [B, ...] split over the mesh axes that the "batch" rule names."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
