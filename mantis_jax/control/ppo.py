"""PPO for the meta-controller, in pure JAX: the clipped loss and one jitted update over a batch of episodes.

An episode is one question: the controller acts once (at prefill) and the engine's outcome gives one reward, so
the return is the reward and the advantage is reward − value (a contextual bandit; no discounting). A batch holds
what the acting policy computed (features, actions, log-probabilities, values) and the rewards; `update` runs
`ppo_epochs` passes of `minibatches` gradient steps over it, with advantages normalised over the whole batch.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mantis_jax.control import controller as ctl


@flax.struct.dataclass
class Batch:
    features: jax.Array  # [N, F]
    actions: dict  # exit [N], gates [N, 3], bias [N, L, E]
    log_prob: jax.Array  # [N] under the policy that acted
    value: jax.Array  # [N] of the policy that acted
    reward: jax.Array  # [N]


@flax.struct.dataclass
class RLState:
    step: jax.Array  # updates done
    params: dict
    opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class PPOArgs:
    clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    epochs: int = 4
    minibatches: int = 2

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "PPOArgs":
        c = config.controller
        return cls(clip=float(c.ppo_clip), value_coef=float(c.value_coef), entropy_coef=float(c.entropy_coef),
                   epochs=int(c.ppo_epochs), minibatches=int(c.minibatches))


def optimizer(lr: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))


def init_state(spec: ctl.ControllerSpec, key: jax.Array, lr: float) -> RLState:
    params = ctl.init(spec, key)
    return RLState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer(lr).init(params))


def normalize(adv_n: jax.Array) -> jax.Array:
    return (adv_n - adv_n.mean()) / (adv_n.std() + 1e-8)


def clipped_loss(new_log_prob, old_log_prob, advantage, value, returns, entropy, *, clip: float,
                 value_coef: float, entropy_coef: float) -> tuple[jax.Array, dict]:
    """The PPO objective from its parts (all [N]); advantages already normalised. Returns (loss, metrics)."""
    ratio = jnp.exp(new_log_prob - old_log_prob)
    policy_loss = -jnp.mean(jnp.minimum(ratio * advantage, jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantage))
    value_loss = jnp.mean((value - returns) ** 2)
    ent = jnp.mean(entropy)
    loss = policy_loss + value_coef * value_loss - entropy_coef * ent
    metrics = {"loss": loss, "policy_loss": policy_loss, "value_loss": value_loss, "entropy": ent,
               "clip_frac": jnp.mean((jnp.abs(ratio - 1.0) > clip).astype(jnp.float32)),
               "approx_kl": jnp.mean(old_log_prob - new_log_prob)}
    return loss, metrics


def ppo_loss(spec: ctl.ControllerSpec, args: PPOArgs, params: dict, batch: Batch, advantage) -> tuple[jax.Array, dict]:
    out = ctl.apply(spec, params, batch.features)
    return clipped_loss(ctl.log_prob(spec, out, batch.actions), batch.log_prob, advantage, out["value"],
                        batch.reward, ctl.entropy(spec, out), clip=args.clip, value_coef=args.value_coef,
                        entropy_coef=args.entropy_coef)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3,))
def update(spec: ctl.ControllerSpec, args: PPOArgs, lr: float, state: RLState, batch: Batch,
           key: jax.Array) -> tuple[RLState, dict]:
    """`args.epochs` shuffled passes of `args.minibatches` Adam steps; returns the new state and mean metrics."""
    tx = optimizer(lr)
    n = batch.reward.shape[0]
    advantage = normalize(batch.reward - batch.value)
    size = n // args.minibatches
    grad_fn = jax.grad(functools.partial(ppo_loss, spec, args), has_aux=True)

    def step(carry, idx):
        params, opt_state = carry
        mb = jax.tree.map(lambda a: a[idx], batch)
        grads, metrics = grad_fn(params, mb, advantage[idx])
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), metrics

    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, args.epochs))  # [epochs, N]
    idx = perms[:, :size * args.minibatches].reshape(args.epochs * args.minibatches, size)
    (params, opt_state), metrics = jax.lax.scan(step, (state.params, state.opt_state), idx)
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics["reward"] = batch.reward.mean()
    return RLState(step=state.step + 1, params=params, opt_state=opt_state), metrics
