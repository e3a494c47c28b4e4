"""Training state and optimizer: a `flax.struct` pytree (step, params, opt_state) and the optax transform.

The state holds arrays only, so it is what gets sharded, donated and checkpointed; the optimizer transform and the
model's static args live outside it (closed over by the jitted step). Optimizers (`config.train.optimizer`):
  adamw       AdamW, float32 moments (8 bytes of state per parameter)
  adamw_bf16  AdamW with bfloat16 moments (4 bytes per parameter): the low-memory stand-in for 8-bit Adam
  adafactor   factored second moments (O(rows + cols) per matrix) and no first moment
All use linear warm-up then cosine decay to lr·min_lr_ratio, and global-norm gradient clipping.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import MantisLM
from mantis_jax.parallel import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any


def lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    t = config.train
    total = max(total_steps(config), t.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(0.0, t.lr, t.warmup_steps, total, end_value=t.lr * t.min_lr_ratio)


def total_steps(config: ml_collections.ConfigDict) -> int:
    """`train.total_steps`, or `epochs × steps_per_epoch` when both are set."""
    t = config.train
    if t.epochs and t.steps_per_epoch:
        return int(t.epochs * t.steps_per_epoch)
    return int(t.total_steps)


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only (not norms' scales)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    t = config.train
    schedule = lr_schedule(config)
    if t.optimizer == "adafactor":
        core = optax.adafactor(learning_rate=schedule, weight_decay_rate=t.weight_decay or None,
                               multiply_by_parameter_scale=False, clipping_threshold=None,
                               min_dim_size_to_factor=32)
    else:
        adam = (optax.scale_by_adam(b1=t.b1, b2=t.b2, eps=t.eps) if t.optimizer == "adamw"
                else scale_by_adam_low_memory(t.b1, t.b2, t.eps, jnp.bfloat16))
        core = optax.chain(adam, optax.add_decayed_weights(t.weight_decay, mask=_decay_mask),
                           optax.scale_by_learning_rate(schedule))
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), core)


class LowMemoryAdamState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any


def scale_by_adam_low_memory(b1: float, b2: float, eps: float, dtype=jnp.bfloat16) -> optax.GradientTransformation:
    """Adam whose two moments are stored in `dtype` between steps (the update itself is computed in float32)."""

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params)
        return LowMemoryAdamState(jnp.zeros((), jnp.int32), zeros, zeros)

    def update(grads, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m.astype(jnp.float32) + (1 - b1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v.astype(jnp.float32) + (1 - b2) * jnp.square(g), state.nu, grads)
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = 1 - b2 ** count.astype(jnp.float32)
        updates = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
        cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)  # noqa: E731
        return updates, LowMemoryAdamState(count, cast(mu), cast(nu))

    return optax.GradientTransformation(init, update)


def init_state_fn(args: ModelArgs, tx: optax.GradientTransformation, batch: int = 1,
                  seq_len: int = 8) -> Callable[[jax.Array], TrainState]:
    """rng -> TrainState whose params and moments are boxed with logical axis names (unbox after sharding)."""

    def init(rng):
        tokens = jnp.zeros((batch, seq_len), jnp.int32)
        params = MantisLM(args).init(rng, tokens)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init


def abstract_state_of(args: ModelArgs, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh | None = None,
                      rules=None, *, boxed: bool = False) -> Any:
    """The TrainState of (`args`, `tx`) as `jax.ShapeDtypeStruct`s (one `jax.eval_shape`: nothing is allocated).

    boxed=True: leaves keep their `nn.Partitioned` boxes (logical axis names: what memory estimates and
    `mesh_lib.shardings_of` read). Otherwise leaves are unboxed and carry where each array goes: its NamedSharding
    on `mesh` by `rules`, or, without a mesh, the first device (a checkpoint read onto one device)."""
    init = init_state_fn(args, tx)
    if mesh is None:
        abstract = jax.eval_shape(init, jax.random.key(0))
        if boxed:
            return abstract
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                            mesh_lib.unbox_values(abstract))
    if rules is None:
        raise ValueError("abstract_state_of: a mesh needs its logical-axis rules (mesh_lib.logical_rules(config))")
    with mesh_lib.activate(mesh, rules):
        abstract = jax.eval_shape(init, jax.random.key(0))
        if boxed:
            return abstract
        shardings = mesh_lib.shardings_of(abstract, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        mesh_lib.unbox_values(abstract), shardings)


def abstract_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None, rules=None, *,
                         boxed: bool = False) -> Any:
    """The TrainState `config` builds, abstract (see `abstract_state_of`); `rules` default to the config's.

    The one builder of the abstract state: the trainer, checkpoint readers, resharding restores and the memory
    estimator all take their shapes (and shardings) from here."""
    if mesh is not None and rules is None:
        rules = mesh_lib.logical_rules(config)
    return abstract_state_of(ModelArgs.from_config(config), make_optimizer(config), mesh, rules, boxed=boxed)


def bytes_per_param(state: TrainState) -> float:
    """Optimizer-state bytes per parameter (the low-memory optimizers' figure of merit)."""
    n = sum(x.size for x in jax.tree.leaves(nn.unbox(state.params)))
    opt = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nn.unbox(state.opt_state)))
    return opt / n
