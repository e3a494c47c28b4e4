"""Stage 3: PPO for the meta-controller.
`python -m mantis_jax.control.train_rl --checkpoint=STAGE1_WORKDIR --critic=CRITIC_WORKDIR --workdir=W`

Each update collects `controller.episodes` episodes (control/episodes.py: factworld questions of the four kinds
answered by the engine, the controller sampling its actions with a key that is a pure function of the update and
episode index), scores them with the reward (control/reward.py), and runs one jitted PPO update (control/ppo.py)
on the log-probabilities and values of the policy that acted. Episodes run one at a time (the engine answers one
query at a time; its device steps are jitted once per shape); the update is batched. Every `controller.save_every`
updates and at the end: an orbax checkpoint (params, Adam state, update count); re-running the command resumes
exactly. Metrics (reward and its terms, accuracy, gate rates, PPO losses, episodes/s) go to `metrics.jsonl` and
TensorBoard; a progress bar shows the reward.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from mantis_jax import cli
from mantis_jax.config import ConfigError
from mantis_jax.control import controller as ctl
from mantis_jax.control import ppo, reward, store
from mantis_jax.control.episodes import EngineEpisodes, Environment, Episode
from mantis_jax.train.checkpoint import CheckpointError
from mantis_jax.train.metrics import MetricsWriter

RewardFn = Callable[[Episode], float]


def collect(env: Environment, spec: ctl.ControllerSpec, params, first: int, n: int, key: jax.Array,
            reward_fn: RewardFn) -> tuple[ppo.Batch, list[Episode], np.ndarray]:
    """n episodes from index `first` under the sampling controller; (batch, episodes, rewards)."""
    policy = ctl.Controller(spec, params, sampling=True)
    rows, episodes, rewards = [], [], []
    for i in range(n):
        policy.reseed(jax.random.fold_in(key, i))
        ep = env.run(first + i, policy)
        if policy.last is None:
            raise RuntimeError("the environment never asked the controller to decide; no action to learn from")
        rows.append(policy.last)
        episodes.append(ep)
        rewards.append(reward_fn(ep))
        policy.last = None
    actions = {k: jnp.asarray(np.stack([r["actions"][k] for r in rows])) for k in rows[0]["actions"]}
    batch = ppo.Batch(features=jnp.asarray(np.stack([r["features"] for r in rows])), actions=actions,
                      log_prob=jnp.asarray([r["log_prob"] for r in rows], jnp.float32),
                      value=jnp.asarray([r["value"] for r in rows], jnp.float32),
                      reward=jnp.asarray(rewards, jnp.float32))
    return batch, episodes, np.asarray(rewards, np.float32)


def episode_metrics(episodes: list[Episode], rewards: np.ndarray, weights: reward.Weights) -> dict:
    terms = [reward.reward(ep.outcome, weights)[1] for ep in episodes]
    out = {"reward": float(rewards.mean()), "accuracy": float(np.mean([ep.outcome.correct for ep in episodes]))}
    for k in ("latency", "compute", "calibration"):
        out[k] = float(np.mean([t[k] for t in terms]))
    for g in ("episodic", "semantic", "verify"):
        out[f"rate_{g}"] = float(np.mean([getattr(ep.decisions, g) for ep in episodes]))
    out["mean_exit_threshold"] = float(np.mean([ep.decisions.exit_threshold for ep in episodes]))
    return out


def train(config: ml_collections.ConfigDict, workdir: str, env: Environment, *, reward_fn: RewardFn | None = None,
          meta: dict | None = None) -> dict:
    """Runs (or resumes) Stage 3 in `workdir` on `env`; returns the summary the CLI prints."""
    c = config.controller
    spec = ctl.ControllerSpec.from_config(config)
    args = ppo.PPOArgs.from_config(config)
    weights = reward.Weights.from_config(config)
    reward_fn = reward_fn or (lambda ep: reward.reward(ep.outcome, weights)[0])
    init_key, key = jax.random.split(jax.random.key(config.seed))
    state = ppo.init_state(spec, init_key, float(c.lr))
    saved = store.steps(workdir)
    if saved:
        state = store.restore_state(workdir, store.abstract(state), saved[-1])
    start = int(state.step)
    os.makedirs(workdir, exist_ok=True)
    writer = MetricsWriter(workdir, jsonl=config.logging.jsonl, tensorboard=config.logging.tensorboard)
    progress = tqdm.tqdm(total=c.updates, initial=start, unit="update", desc="ppo",
                         disable=not (config.logging.progress and sys.stderr.isatty()))
    history, t_start, n_episodes = [], time.perf_counter(), 0
    for u in range(start, c.updates):
        k_act, k_update = jax.random.split(jax.random.fold_in(key, u))
        t0 = time.perf_counter()
        batch, episodes, rewards = collect(env, spec, state.params, u * c.episodes, c.episodes, k_act, reward_fn)
        t_collect = time.perf_counter() - t0
        state, ppo_metrics = ppo.update(spec, args, float(c.lr), state, batch, k_update)
        n_episodes += len(episodes)
        metrics = {**episode_metrics(episodes, rewards, weights),
                   **{k: float(v) for k, v in ppo_metrics.items() if k != "reward"},
                   "episodes_per_s": len(episodes) / max(t_collect, 1e-9),
                   "update_s": time.perf_counter() - t0 - t_collect}
        history.append(metrics)
        writer.write(u + 1, metrics, prefix="ppo")
        progress.update(1)
        progress.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}")
        if (u + 1) % c.save_every == 0 or u + 1 == c.updates:
            store.save(workdir, u + 1, state, config=config, meta={**(meta or {}), "updates": u + 1})
    progress.close()
    writer.close()
    wall = time.perf_counter() - t_start
    return {"updates": int(state.step), "history": history, "wall_s": wall,
            "episodes_per_s": n_episodes / wall if n_episodes else 0.0, "state": state, "workdir": workdir}


def main(argv: list[str] | None = None) -> dict:
    import argparse  # noqa: PLC0415

    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--critic", default="", help="critic workdir (python -m mantis_jax.control.train_critic)")
    pre.add_argument("--split", default="train", choices=("train", "val", "test"))
    pre.add_argument("--stage2", default="", help="Stage-2 workdir: its trained retrieval encoder (default: none)")
    known, rest = pre.parse_known_args(argv)
    args, overrides = store.parse_args("python -m mantis_jax.control.train_rl", __doc__.splitlines()[0], rest)
    from mantis_jax.control.critic import Critic  # noqa: PLC0415
    from mantis_jax.engine.core import Engine  # noqa: PLC0415
    from mantis_jax.memory.train import Stage2Error, load_encoder_params  # noqa: PLC0415
    from mantis_jax.train.checkpoint import load_for_inference  # noqa: PLC0415

    try:
        if not known.critic:
            raise store.ControlCheckpointError(
                "Stage 3 needs a trained critic (the verify gate calls it): pass --critic=DIR, trained with "
                + store.CRITIC_COMMAND.format("DIR"))
        saved, tokenizer, params = load_for_inference(args.checkpoint)
        config = store.control_config(saved, overrides)
        critic = Critic.from_workdir(known.critic, lm=(config, tokenizer, params))
        encoder = load_encoder_params(known.stage2) if known.stage2 else None
        engine = Engine(config, params, tokenizer, critic=critic, encoder_params=encoder)
        env = EngineEpisodes(engine, known.split, distance=config.controller.distance)
        meta = {"checkpoint": os.path.abspath(args.checkpoint), "critic": os.path.abspath(known.critic),
                "stage2": os.path.abspath(known.stage2) if known.stage2 else ""}
        summary = train(config, args.workdir, env, meta=meta)
    except (CheckpointError, store.ControlCheckpointError, ConfigError, Stage2Error) as e:
        cli.fail(e)
    store.print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
