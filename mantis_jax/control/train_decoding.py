"""Train the decoding policy (TIDAL): `python -m mantis_jax.control.train_decoding --checkpoint=STAGE1_WORKDIR
--workdir=W [--config=configs/tidal.py] [--config.decoding.updates=30 ...]`

The decoding section comes from the preset (`--config`, default the defaults) and `--config.decoding.*`
overrides; everything else (the model) from the checkpoint.

Each update rolls out `decoding.episodes` continuations of factworld text (train-split documents; the prompts of
update u are a pure function of (seed, u)) as one jitted program (control/decoding.py `rollout`), the head
sampling m every chunk; then PPO with GAE over the chunks (control/ppo.py `gae`, `clipped_loss`,
`minibatch_passes`) updates the head. The base model is frozen. Every `decoding.save_every` updates and at the
end: an orbax checkpoint (head params, Adam state, update count); re-running the command resumes exactly. Metrics
(reward and its terms, the mean modulation and knobs, perplexity, repetition, distinct-2, PPO losses) go to
`metrics.jsonl` and TensorBoard in the workdir; a progress bar shows the reward. The summary prints as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from mantis_jax import cli
from mantis_jax.config import ConfigError
from mantis_jax.control import decoding as dec
from mantis_jax.control import ppo, store
from mantis_jax.data import factworld
from mantis_jax.model.args import ModelArgs
from mantis_jax.train.checkpoint import CheckpointError, load_for_inference
from mantis_jax.train.metrics import MetricsWriter

COMMAND = "python -m mantis_jax.control.train_decoding --checkpoint=<stage-1 workdir> --workdir={}"


@dataclasses.dataclass(frozen=True)
class PPOArgs:
    clip: float
    value_coef: float
    entropy_coef: float
    epochs: int
    minibatches: int
    gamma: float
    lam: float
    lr: float
    group: int = 1

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "PPOArgs":
        d = config.decoding
        return cls(float(d.ppo_clip), float(d.value_coef), float(d.entropy_coef), int(d.ppo_epochs),
                   int(d.minibatches), float(d.gamma), float(d.lam), float(d.lr), int(d.get("group", 1)))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_state(spec: dec.DecodingSpec, key: jax.Array, lr: float) -> ppo.RLState:
    params = dec.init(spec, key)
    return ppo.RLState(step=jnp.zeros((), jnp.int32), params=params, opt_state=ppo.optimizer(lr).init(params))


def init_state(spec: dec.DecodingSpec, key: jax.Array, lr: float) -> ppo.RLState:
    """A fresh state, committed to the device like `update`'s outputs (an uncommitted first state would make the
    second update compile again)."""
    return jax.device_put(_init_state(spec, key, lr), jax.local_devices()[0])


def loss(spec: dec.DecodingSpec, args: PPOArgs, params: dict, mb: tuple) -> tuple[jax.Array, dict]:
    x_nf, m_n, old_lp_n, adv_n, ret_n = mb
    out = dec.apply(spec, params, x_nf)
    return ppo.clipped_loss(dec.beta_log_prob(out["alpha"], out["beta"], m_n), old_lp_n, adv_n, out["value"], ret_n,
                            dec.beta_entropy(out["alpha"], out["beta"]), clip=args.clip,
                            value_coef=args.value_coef, entropy_coef=args.entropy_coef)


def group_baseline(adv_bk: jax.Array, group: int) -> jax.Array:
    """[B, K] advantages minus the mean of their group (G consecutive rows: rollouts of one prompt) per chunk."""
    if group <= 1:
        return adv_bk
    adv_gpk = adv_bk.reshape(-1, group, adv_bk.shape[1])
    return (adv_gpk - jnp.mean(adv_gpk, axis=1, keepdims=True)).reshape(adv_bk.shape)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def update(spec: dec.DecodingSpec, args: PPOArgs, state: ppo.RLState, roll: dec.Rollout,
           key: jax.Array) -> tuple[ppo.RLState, dict]:
    """GAE over each episode's chunks (the episode ends after the last chunk: bootstrap value 0), then PPO passes
    over the B·K (observation, m) samples with advantages normalised over the batch. With `group` G > 1 the rows
    are G rollouts of each prompt (consecutive) and each chunk's advantage loses its group's mean at that chunk:
    what a prompt makes easy or hard is not credited to the action."""
    adv_bk, ret_bk = ppo.gae(roll.reward, roll.value, jnp.zeros_like(roll.value[:, 0]), gamma=args.gamma,
                             lam=args.lam)
    adv_bk = group_baseline(adv_bk, args.group)
    flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
    data = (flat(roll.features), flat(roll.m), flat(roll.log_prob), ppo.normalize(flat(adv_bk)), flat(ret_bk))
    return ppo.minibatch_passes(functools.partial(loss, spec, args), ppo.optimizer(args.lr), state, data, key,
                                epochs=args.epochs, minibatches=args.minibatches)


class Corpus:
    """Tokenized factworld text of one split, prompts cut from it, and (train split) the sorted bigram ids."""

    def __init__(self, config: ml_collections.ConfigDict, tokenizer, split: str):
        world = factworld.world_from_config(config)
        ids = tokenizer.encode_batch(list(world.iter_documents(split, 0, config.decoding.corpus_docs)))
        self.tokens = np.concatenate([np.asarray(i, np.int32) for i in ids if i])
        V = config.model.vocab_size
        if V * V >= 2 ** 31:
            raise ConfigError(f"config.model.vocab_size ({V}) is too large for int32 bigram ids (V² < 2³¹)")
        self.bigrams = np.unique(self.tokens[:-1] * V + self.tokens[1:]).astype(np.int32)

    def prompts(self, seed: int, index: int, batch: int, length: int) -> np.ndarray:
        """`batch` windows of `length` tokens at offsets that are a pure function of (seed, index)."""
        rng = np.random.default_rng([seed, index])
        starts = rng.integers(0, len(self.tokens) - length, size=batch)
        return np.stack([self.tokens[s:s + length] for s in starts])


def rollout_metrics(roll: dec.Rollout) -> dict:
    out = {"reward": float(roll.reward.mean()), "m": float(roll.m.mean())}
    out.update({f"r_{k}": float(v.mean()) for k, v in roll.terms.items()})
    out.update({f"knob_{k}": float(jnp.mean(v)) for k, v in roll.knobs._asdict().items()})
    out.update(dec.text_metrics(roll.tokens, roll.nll))
    return out


def decoding_config(saved: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """The base model's config with today's decoding section (the preset's, or the defaults, + overrides)."""
    from mantis_jax.memory.train import complete_config  # noqa: PLC0415 (keys added since the run was saved)

    config = complete_config(saved)
    config.decoding = ml_collections.ConfigDict(cli.load_config(["prog", *overrides]).decoding.to_dict())
    from mantis_jax.config import validate  # noqa: PLC0415

    return validate(config)


def train(config: ml_collections.ConfigDict, workdir: str, lm_params, tokenizer, *, meta: dict | None = None) -> dict:
    """Runs (or resumes) the decoding policy's PPO in `workdir`; returns the summary the CLI prints."""
    d = config.decoding
    args, spec = ModelArgs.from_config(config), dec.DecodingSpec.from_config(config)
    pargs = PPOArgs.from_config(config)
    corpus = Corpus(config, tokenizer, "train")
    bigrams = jnp.asarray(corpus.bigrams)
    init_key, key = jax.random.split(jax.random.key(config.seed))
    state = init_state(spec, init_key, pargs.lr)
    saved = store.steps(workdir)
    if saved:
        _, before, _ = store.read_json(workdir, COMMAND, saved[-1])
        was = dec.DecodingSpec.from_config(before)
        changed = [f for f in ("d_model", "vocab_size", "d_hidden", "observe_pooled")
                   if getattr(was, f) != getattr(spec, f)]
        if changed:
            diff = ", ".join(f"{f} {getattr(was, f)} -> {getattr(spec, f)}" for f in changed)
            raise store.ControlCheckpointError(
                f"{workdir!r} holds a decoding policy with other shapes ({diff}); use a new --workdir, or the same "
                "base model and config.decoding.d_hidden")
        state = jax.device_put(store.restore_state(workdir, store.abstract(state), saved[-1]),
                               jax.local_devices()[0])
    start = int(state.step)
    os.makedirs(workdir, exist_ok=True)
    writer = MetricsWriter(workdir, jsonl=config.logging.jsonl, tensorboard=config.logging.tensorboard)
    progress = tqdm.tqdm(total=d.updates, initial=start, unit="update", desc="tidal",
                         disable=not (config.logging.progress and sys.stderr.isatty()))
    history, t_start = [], time.perf_counter()
    for u in range(start, d.updates):
        k_roll, k_update = jax.random.split(jax.random.fold_in(key, u))
        t0 = time.perf_counter()
        prompts = jnp.asarray(np.repeat(corpus.prompts(config.seed, u, d.episodes // d.group, d.prompt_len),
                                        d.group, axis=0))
        roll = dec.rollout(args, spec, lm_params, state.params, prompts, k_roll, bigrams, mode="sample")
        metrics = rollout_metrics(roll)
        t_roll = time.perf_counter() - t0
        state, ppo_metrics = update(spec, pargs, state, roll, k_update)
        metrics.update({k: float(v) for k, v in ppo_metrics.items()})
        metrics.update(tokens_per_s=roll.tokens.size / max(t_roll, 1e-9), update_s=time.perf_counter() - t0 - t_roll)
        history.append(metrics)
        writer.write(u + 1, metrics, prefix="tidal")
        progress.update(1)
        progress.set_postfix(reward=f"{metrics['reward']:.3f}", m=f"{metrics['m']:.2f}")
        if (u + 1) % d.save_every == 0 or u + 1 == d.updates:
            store.save(workdir, u + 1, state, config=config, meta={**(meta or {}), "updates": u + 1})
    progress.close()
    writer.close()
    return {"updates": int(state.step), "history": history, "wall_s": time.perf_counter() - t_start,
            "state": state, "workdir": workdir}


def load_policy(workdir: str) -> tuple[dec.DecodingSpec, dict, ml_collections.ConfigDict]:
    """(spec, head params, config) of a trained decoding-policy workdir's newest step."""
    step, config, _ = store.read_json(workdir, COMMAND)
    spec = dec.DecodingSpec.from_config(config)
    shapes = jax.eval_shape(lambda k: _init_state(spec, k, float(config.decoding.lr)), jax.random.key(0))
    return spec, store.restore_state(workdir, shapes, step).params, config


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m mantis_jax.control.train_decoding", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="Stage-1 training workdir: the frozen base model")
    p.add_argument("--workdir", required=True, help="where this run's checkpoints and metrics go (resumes there)")
    known, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith(("--config.decoding.", "--config="))]
    if bad:
        p.error(f"unexpected arguments {bad}; only --config=PRESET and --config.decoding.* may be set here (the "
                "model comes from --checkpoint)")
    try:
        saved, tokenizer, params = load_for_inference(known.checkpoint)
        config = decoding_config(saved, rest)
        summary = train(config, known.workdir, params, tokenizer,
                        meta={"checkpoint": os.path.abspath(known.checkpoint)})
    except (CheckpointError, store.ControlCheckpointError, ConfigError) as e:
        cli.fail(e)
    store.print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
