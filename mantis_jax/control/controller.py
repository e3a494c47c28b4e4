"""The meta-controller: a small MLP over the engine's state summary, five action heads and a value head.

features [B, F] (`StateSummary.features()`: pooled [D], then six scalars) → LayerNorm on the pooled part → MLP →
  exit      categorical over `config.controller.exit_thresholds` (the early-exit threshold)
  gates     three Bernoulli logits: episodic read, semantic search, verify with the critic
  bias      Gaussian expert bias [L, E]: mean = scale·tanh(.), a learned state-independent log-std
            (only with moe.n_experts > 1; a dense model has no router to bias)
  value     [B], the PPO baseline
Actions are a dict of arrays with a leading batch axis: exit [B] int32, gates [B, 3] float (0/1), bias [B, L, E].
`sample` draws them (training), `mode` picks the most likely ones (inference); `log_prob` and `entropy` sum over
the heads. `Controller` wraps trained parameters as an engine policy (`decide(summary) -> Decisions`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mantis_jax.engine.policy import SCALAR_FEATURES, Decisions, StateSummary

GATES = ("episodic", "semantic", "verify")
LOG_2PI = math.log(2.0 * math.pi)


@dataclasses.dataclass(frozen=True)
class ControllerSpec:
    """Shapes and constants of a controller, all derived from the config (nothing to keep equal by hand)."""

    d_model: int
    n_layers: int
    n_experts: int
    thresholds: tuple[float, ...]
    d_hidden: int = 128
    depth: int = 2
    bias_scale: float = 1.0
    bias_std: float = 0.1

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "ControllerSpec":
        c = config.controller
        return cls(d_model=config.model.d_model, n_layers=config.model.n_layers, n_experts=config.moe.n_experts,
                   thresholds=tuple(float(t) for t in c.exit_thresholds), d_hidden=c.d_hidden, depth=c.depth,
                   bias_scale=float(c.expert_bias_scale), bias_std=float(c.expert_bias_std))

    @property
    def n_features(self) -> int:
        return StateSummary.feature_dim(self.d_model)

    @property
    def use_bias(self) -> bool:
        return self.n_experts > 1


class ControllerNet(nn.Module):
    """features [B, F] -> {"exit_logits" [B, C], "gate_logits" [B, 3], "bias_mean" [B, L, E],
    "bias_log_std" [L, E], "value" [B]}."""

    spec: ControllerSpec

    @nn.compact
    def __call__(self, x_bf):
        s = self.spec
        x_bf = jnp.asarray(x_bf, jnp.float32)
        pooled, scalars = x_bf[:, :s.d_model], x_bf[:, s.d_model:]
        h = jnp.concatenate([nn.LayerNorm(name="pooled_norm")(pooled), scalars], axis=-1)
        for i in range(s.depth):
            h = nn.gelu(nn.Dense(s.d_hidden, name=f"hidden_{i}")(h))
        L, E = s.n_layers, s.n_experts
        small = nn.initializers.normal(0.01)  # start near uniform gates and a zero bias
        out = {
            "exit_logits": nn.Dense(len(s.thresholds), kernel_init=small, name="exit")(h),
            "gate_logits": nn.Dense(len(GATES), kernel_init=small, name="gates")(h),
            "bias_mean": s.bias_scale * jnp.tanh(nn.Dense(L * E, kernel_init=small, name="bias")(h)).reshape(-1, L, E),
            "bias_log_std": self.param("bias_log_std", nn.initializers.constant(math.log(s.bias_std)), (L, E)),
            "value": nn.Dense(1, name="value")(h)[:, 0],
        }
        return out


@functools.partial(jax.jit, static_argnums=0)  # jitted: an eager Flax init dispatches op by op
def init(spec: ControllerSpec, key: jax.Array) -> dict:
    return ControllerNet(spec).init(key, jnp.zeros((1, spec.n_features), jnp.float32))["params"]


def apply(spec: ControllerSpec, params: dict, x_bf) -> dict:
    return ControllerNet(spec).apply({"params": params}, x_bf)


def sample(spec: ControllerSpec, out: dict, key: jax.Array) -> dict:
    k_exit, k_gate, k_bias = jax.random.split(key, 3)
    gates = jax.random.bernoulli(k_gate, jax.nn.sigmoid(out["gate_logits"])).astype(jnp.float32)
    noise = jax.random.normal(k_bias, out["bias_mean"].shape)
    bias = out["bias_mean"] + jnp.exp(out["bias_log_std"]) * noise if spec.use_bias else out["bias_mean"]
    return {"exit": jax.random.categorical(k_exit, out["exit_logits"]).astype(jnp.int32), "gates": gates,
            "bias": bias}


def mode(spec: ControllerSpec, out: dict) -> dict:
    del spec
    return {"exit": jnp.argmax(out["exit_logits"], axis=-1).astype(jnp.int32),
            "gates": (out["gate_logits"] > 0).astype(jnp.float32), "bias": out["bias_mean"]}


def log_prob(spec: ControllerSpec, out: dict, actions: dict) -> jax.Array:
    """log π(actions | state) [B]: the sum of the heads' log-probabilities."""
    exit_lp = jnp.take_along_axis(jax.nn.log_softmax(out["exit_logits"]), actions["exit"][:, None], axis=-1)[:, 0]
    g, z = actions["gates"], out["gate_logits"]
    gate_lp = jnp.sum(g * jax.nn.log_sigmoid(z) + (1.0 - g) * jax.nn.log_sigmoid(-z), axis=-1)
    total = exit_lp + gate_lp
    if spec.use_bias:
        log_std = out["bias_log_std"]
        zsq = ((actions["bias"] - out["bias_mean"]) / jnp.exp(log_std)) ** 2
        total = total + jnp.sum(-0.5 * zsq - log_std - 0.5 * LOG_2PI, axis=(-2, -1))
    return total


def entropy(spec: ControllerSpec, out: dict) -> jax.Array:
    """Entropy of the joint action distribution [B] (the heads are independent given the state)."""
    logp = jax.nn.log_softmax(out["exit_logits"])
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    z = out["gate_logits"]
    p = jax.nn.sigmoid(z)
    ent = ent - jnp.sum(p * jax.nn.log_sigmoid(z) + (1.0 - p) * jax.nn.log_sigmoid(-z), axis=-1)
    if spec.use_bias:
        ent = ent + jnp.sum(out["bias_log_std"] + 0.5 * (LOG_2PI + 1.0))
    return ent


def probabilities(spec: ControllerSpec, out: dict, actions: dict) -> dict:
    """Per-row probabilities for the trace: of each gate being on, and of the chosen exit threshold."""
    del spec
    p_exit = jnp.take_along_axis(jax.nn.softmax(out["exit_logits"]), actions["exit"][:, None], axis=-1)[:, 0]
    p_gates = jax.nn.sigmoid(out["gate_logits"])
    return {"exit_threshold": p_exit, **{name: p_gates[:, i] for i, name in enumerate(GATES)}}


def to_decisions(spec: ControllerSpec, actions: dict, probs: dict, row: int = 0) -> Decisions:
    """Row `row` of batched actions as the engine's Decisions."""
    gates = np.asarray(actions["gates"][row])
    bias = np.asarray(actions["bias"][row], np.float32) if spec.use_bias else None
    return Decisions(exit_threshold=spec.thresholds[int(actions["exit"][row])], episodic=bool(gates[0]),
                     semantic=bool(gates[1]), verify=bool(gates[2]), expert_bias=bias,
                     probs={k: float(v[row]) for k, v in probs.items()})


@functools.partial(jax.jit, static_argnums=(0, 3))
def act(spec: ControllerSpec, params: dict, x_bf, deterministic: bool, key: jax.Array) -> dict:
    """One jitted call: actions, their log-probability, the value and the trace probabilities."""
    out = apply(spec, params, x_bf)
    actions = mode(spec, out) if deterministic else sample(spec, out, key)
    return {"actions": actions, "log_prob": log_prob(spec, out, actions), "value": out["value"],
            "probs": probabilities(spec, out, actions)}


class Controller:
    """A trained meta-controller as an engine policy: deterministic (most likely actions) unless `sampling`.

    With sampling on, each `decide` draws from the policy with the next key of `seed` and remembers what it drew
    (`last`: features, actions, log-probability, value), which is how Stage 3 collects its episodes.
    """

    def __init__(self, spec: ControllerSpec, params: dict, *, sampling: bool = False, seed: int = 0):
        self.spec, self.params, self.sampling = spec, params, sampling
        self._key, self._calls = jax.random.key(seed), 0
        self.last: dict | None = None

    @classmethod
    def from_workdir(cls, workdir: str, **kwargs) -> "Controller":
        from mantis_jax.control import store  # noqa: PLC0415

        spec, params = store.load_controller(workdir)
        return cls(spec, params, **kwargs)

    def reseed(self, key: jax.Array) -> None:
        """Sample the following decisions with keys fold_in(key, 0), fold_in(key, 1), ..."""
        self._key, self._calls = key, 0

    def decide(self, summary: StateSummary) -> Decisions:
        x_bf = jnp.asarray(summary.features(), jnp.float32).reshape(1, -1)
        if x_bf.shape[-1] != self.spec.n_features:
            raise ValueError(f"the state summary has {x_bf.shape[-1]} features but the controller was trained on "
                             f"{self.spec.n_features} (model.d_model {self.spec.d_model} + "
                             f"{len(SCALAR_FEATURES)}); use the controller trained for this model")
        key = jax.random.fold_in(self._key, self._calls)
        self._calls += 1
        res = act(self.spec, self.params, x_bf, not self.sampling, key)
        self.last = {"features": np.asarray(x_bf[0]), "actions": jax.tree.map(lambda a: np.asarray(a[0]),
                                                                               res["actions"]),
                     "log_prob": float(res["log_prob"][0]), "value": float(res["value"][0])}
        return to_decisions(self.spec, res["actions"], res["probs"])
