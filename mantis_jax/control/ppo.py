"""PPO for the meta-controller, in pure JAX: the clipped loss and one jitted update over a batch of episodes.

An episode is one question: the controller acts once (at prefill) and the engine's outcome gives one reward, so
the return is the reward and the advantage is reward − value (a contextual bandit; no discounting). The decoding
policy (control/decoding.py) acts every chunk of an episode and takes its advantages from `gae`. A batch holds
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


def gae(reward_bk: jax.Array, value_bk: jax.Array, last_value_b: jax.Array, *, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over K steps of each row (a decoding episode's chunks, control/decoding.py):
    delta_k = r_k + gamma·V_{k+1} − V_k (V_K = last_value, 0 for an episode that ended), A_k = delta_k +
    gamma·lam·A_{k+1}. Returns (advantages [B, K], returns = advantages + values [B, K])."""
    next_value_bk = jnp.concatenate([value_bk[:, 1:], last_value_b[:, None]], axis=1)
    delta_bk = reward_bk + gamma * next_value_bk - value_bk

    def back(carry_b, delta_b):
        adv_b = delta_b + gamma * lam * carry_b
        return adv_b, adv_b

    _, adv_kb = jax.lax.scan(back, jnp.zeros_like(last_value_b), delta_bk.T, reverse=True)
    return adv_kb.T, adv_kb.T + value_bk


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
    advantage = normalize(batch.reward - batch.value)
    loss_fn = lambda params, mb: ppo_loss(spec, args, params, mb[0], mb[1])  # noqa: E731
    state, metrics = minibatch_passes(loss_fn, optimizer(lr), state, (batch, advantage), key, epochs=args.epochs,
                                      minibatches=args.minibatches)
    metrics["reward"] = batch.reward.mean()
    return state, metrics


def minibatch_passes(loss_fn, tx: optax.GradientTransformation, state: RLState, data, key: jax.Array, *,
                     epochs: int, minibatches: int) -> tuple[RLState, dict]:
    """`epochs` shuffled passes of `minibatches` steps of `tx` on `loss_fn(params, minibatch) -> (loss, metrics)`
    over `data` (a pytree of arrays with a leading sample axis); returns the new state and the mean metrics."""
    n = jax.tree.leaves(data)[0].shape[0]
    size = n // minibatches
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def step(carry, idx):
        params, opt_state = carry
        grads, metrics = grad_fn(params, jax.tree.map(lambda a: a[idx], data))
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), metrics

    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, epochs))  # [epochs, N]
    idx = perms[:, :size * minibatches].reshape(epochs * minibatches, size)
    (params, opt_state), metrics = jax.lax.scan(step, (state.params, state.opt_state), idx)
    return RLState(step=state.step + 1, params=params, opt_state=opt_state), jax.tree.map(jnp.mean, metrics)
