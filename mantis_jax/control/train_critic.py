"""Train the critic: `python -m mantis_jax.control.train_critic --checkpoint=STAGE1_WORKDIR --workdir=W`.

`--stage2=STAGE2_WORKDIR` gives the engine whose answers are among the examples its trained retrieval encoder
(train the critic on the engine it will judge).

Examples come from the factworld the LM trained on (control/critic_data.py: train, val and test entities), among
them the LM's own greedy answers and the engine's answers to Stage-3 episodes (`critic.engine_episodes` on train,
half as many on val and on test). The frozen LM's features of every example are computed once (and cached in the
workdir); the head then trains for `critic.steps` Adam steps on shuffled minibatches, a pure function of the step
(so a resume continues exactly). Every `critic.save_every` steps and at the end, on val: Platt scaling (a, b) of
the head's logit (P = sigmoid(a·logit + b)), loss, ECE and AUROC of the calibrated probabilities, and the abstain
threshold (critic.py `abstain_threshold`: the one with the least hallucination whose accuracy loss relative to no
critic is at most `critic.max_accuracy_loss`, on val's engine answers, else on val's examples), saved with an orbax
checkpoint. At the end, on test: ECE (10 bins), AUROC, the abstention figures per kind of example, and the
engine's accuracy and hallucination without and with the critic at that threshold. Metrics go to `metrics.jsonl`
and TensorBoard in the workdir; the final summary is printed as JSON. Re-running the command resumes.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from mantis_jax import cli
from mantis_jax.config import ConfigError
from mantis_jax.control import critic as critic_lib
from mantis_jax.control import critic_data, store
from mantis_jax.data import factworld
from mantis_jax.infer.runner import Generator, newline_ids
from mantis_jax.model.args import ModelArgs
from mantis_jax.train.checkpoint import CheckpointError, load_for_inference
from mantis_jax.train.metrics import MetricsWriter

FEATURE_BATCH = 16


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.adamw(float(config.critic.lr), weight_decay=float(config.critic.weight_decay))


def init_state(config: ml_collections.ConfigDict, key: jax.Array) -> dict:
    params = critic_lib.init_head(config.model.d_model, config.critic.d_hidden, key)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer(config).init(params)}


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3,))
def train_step(d_hidden: int, lr: float, weight_decay: float, state: dict, feats: dict,
               labels_b) -> tuple[dict, jax.Array]:
    loss, grads = jax.value_and_grad(functools.partial(critic_lib.bce_loss, d_hidden))(state["params"], feats,
                                                                                        labels_b)
    tx = optax.adamw(lr, weight_decay=weight_decay)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}, loss


def lm_features(args: ModelArgs, lm_params, tokenizer, items: list[dict], window: int,
                grounding: bool = True) -> dict[str, np.ndarray]:
    """The critic's features of examples: the frozen LM's, in batches of FEATURE_BATCH (the last one padded with
    repeats), and the text's (`critic_lib.grounding`; zeros when `grounding` is off)."""
    parts = []
    for start in range(0, len(items), FEATURE_BATCH):
        chunk = items[start:start + FEATURE_BATCH]
        encoded = [critic_lib.encode(tokenizer, e["question"], e["answer"], e["evidence"], window) for e in chunk]
        encoded += [encoded[-1]] * (FEATURE_BATCH - len(encoded))
        arrays = critic_lib.batch_arrays(encoded, window, tokenizer.pad_id)
        feats = critic_lib.features(args, lm_params, *map(jnp.asarray, arrays))
        parts.append(jax.tree.map(lambda a, n=len(chunk): np.asarray(a)[:n], feats))
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out["ground"] = critic_lib.grounding_batch([(e["question"], e["answer"], e["evidence"]) for e in items],
                                               grounding)
    return out


def _answer_fn(config, tokenizer, lm_params, max_new_tokens: int = 8):
    # one length bucket for the usual prompt (up to 128 tokens): the decode loop compiles once for every split
    bucket = min(config.model.max_seq_len - max_new_tokens, 128)
    generator = Generator(ModelArgs.from_config(config), lm_params, tokenizer, batch_size=FEATURE_BATCH,
                          bucket=bucket, extra_stop_ids=newline_ids(tokenizer))

    def answer(records: list[dict]) -> list[str]:
        texts, _ = generator.generate([factworld.prompt(r) for r in records], max_new_tokens=max_new_tokens,
                                      temperature=0.0, truncate=True, measure_ttft=False)
        return texts

    return answer


FEATURE_KEYS = ("h_answer", "h_prompt", "lm")  # cached; "ground" is recomputed from the cached texts on load
TEXT_KEYS = ("question", "answer", "evidence")
ARRAY_KEYS = ("labels", "answerable", "kinds")
ENGINE_KEYS = ("correct", "answerable", "abstained", "episode_kinds")


def _engine_env(config, tokenizer, lm_params, split: str):
    """Stage-3 episodes of `split` on an engine over the frozen LM (its retrieval encoder: `engine.encoder`)."""
    from mantis_jax.control.episodes import EngineEpisodes  # noqa: PLC0415
    from mantis_jax.engine.core import Engine  # noqa: PLC0415
    from mantis_jax.memory.train import load_encoder_params  # noqa: PLC0415

    encoder = load_encoder_params(config.engine.encoder) if config.engine.encoder else None
    engine = Engine(config, lm_params, tokenizer, encoder_params=encoder)
    return EngineEpisodes(engine, split, distance=config.controller.distance)


def _dataset(config, tokenizer, lm_params, workdir: str) -> dict[str, dict]:
    """{split: {"feats", "labels", "answerable", "kinds", "engine"}}, cached in `<workdir>/critic_data.npz`. The
    examples include the engine's answers that are claims (not "unknown"); "engine" holds every engine answer of
    the split (features, correct, answerable, abstained, episode kinds): what the threshold rule and the test
    figures read. The cache holds the LM's features and the texts; the text features ("ground",
    `critic.grounding`) are computed from the texts on every load, so one cache serves both settings."""
    path = os.path.join(workdir, "critic_data.npz")
    cr = config.critic
    splits = {"train": (cr.examples, cr.engine_episodes), "val": (cr.examples // 4, cr.engine_episodes // 2),
              "test": (cr.examples // 4, cr.engine_episodes // 2)}
    if os.path.exists(path):
        raw = np.load(path, allow_pickle=False)
        if "train/question" not in raw.files:
            raise store.ControlCheckpointError(
                f"{path} was written before the critic read text features (it holds no texts): delete it (the "
                "examples are recomputed) or train in a new --workdir")
        data = {s: {"feats": {k: raw[f"{s}/{k}"] for k in FEATURE_KEYS},
                    "texts": {k: raw[f"{s}/{k}"] for k in TEXT_KEYS},
                    **{k: raw[f"{s}/{k}"] for k in ARRAY_KEYS},
                    "engine": {"feats": {k: raw[f"{s}/engine/{k}"] for k in FEATURE_KEYS},
                               "texts": {k: raw[f"{s}/engine/{k}"] for k in TEXT_KEYS},
                               **{k: raw[f"{s}/engine/{k}"] for k in ENGINE_KEYS}}}
                for s in splits}
        return _with_grounding(data, bool(cr.grounding))
    world = factworld.world_from_config(config)
    answer_fn = _answer_fn(config, tokenizer, lm_params)
    args = ModelArgs.from_config(config)
    env = _engine_env(config, tokenizer, lm_params, "train") if cr.engine_episodes else None
    data, flat = {}, {}
    for split, (n, n_engine) in splits.items():
        items = critic_data.examples(world, split, n, seed=config.seed, answer_fn=answer_fn)
        answers = []
        if n_engine:
            env.split = split
            answers = critic_data.engine_answers(env, n_engine)
        items += [a for a in answers if not a["abstained"]]  # "unknown" is no claim to judge
        feats = lm_features(args, lm_params, tokenizer, items + answers, critic_lib.window(config),
                            bool(cr.grounding))
        texts = {"question": np.array([e["question"] for e in items + answers]),
                 "answer": np.array([e["answer"] for e in items + answers]),
                 "evidence": np.array([" ".join(e["evidence"]) for e in items + answers])}
        data[split] = {"feats": {k: v[:len(items)] for k, v in feats.items()},
                       "texts": {k: v[:len(items)] for k, v in texts.items()},
                       "labels": np.array([e["label"] for e in items], np.float32),
                       "answerable": np.array([e["answerable"] for e in items], bool),
                       "kinds": np.array([e["kind"] for e in items]),
                       "engine": {"feats": {k: v[len(items):] for k, v in feats.items()},
                                  "texts": {k: v[len(items):] for k, v in texts.items()},
                                  "correct": np.array([a["label"] > 0.5 for a in answers], bool),
                                  "answerable": np.array([a["answerable"] for a in answers], bool),
                                  "abstained": np.array([a["abstained"] for a in answers], bool),
                                  "episode_kinds": np.array([a["episode_kind"] for a in answers], dtype="<U16")}}
        for k in FEATURE_KEYS:
            flat[f"{split}/{k}"] = data[split]["feats"][k]
            flat[f"{split}/engine/{k}"] = data[split]["engine"]["feats"][k]
        for k in TEXT_KEYS:
            flat[f"{split}/{k}"] = data[split]["texts"][k]
            flat[f"{split}/engine/{k}"] = data[split]["engine"]["texts"][k]
        for k in ARRAY_KEYS:
            flat[f"{split}/{k}"] = data[split][k]
        for k in ENGINE_KEYS:
            flat[f"{split}/engine/{k}"] = data[split]["engine"][k]
    tmp = path + ".tmp.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)
    return data


def _with_grounding(data: dict, enabled: bool) -> dict:
    """Adds each group's text features ("ground") from its cached texts (a freshly built set has them from
    `lm_features`)."""
    for split in data.values():
        for group in (split, split["engine"]):
            t = group["texts"]
            group["feats"]["ground"] = critic_lib.grounding_batch(
                [(q, a, [ev]) for q, a, ev in zip(t["question"], t["answer"], t["evidence"])], enabled)
    return data


def _logits(config, params, feats: dict) -> np.ndarray:
    return np.asarray(critic_lib.head_logits(config.critic.d_hidden, params, jax.tree.map(jnp.asarray, feats)),
                      np.float64)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


def calibrate(config, params, val: dict) -> tuple[tuple[float, float], float]:
    """((a, b), threshold) on the val split: Platt scaling of the head's logits on val's examples, then the
    abstain threshold (`critic_lib.abstain_threshold`) on val's engine answers (on val's examples when there are
    none)."""
    a, b = critic_lib.fit_platt(_logits(config, params, val["feats"]), val["labels"])
    eng, max_loss = val["engine"], float(config.critic.max_accuracy_loss)
    if len(eng["correct"]):
        probs = _sigmoid(a * _logits(config, params, eng["feats"]) + b)
        return (a, b), critic_lib.abstain_threshold(probs, eng["correct"], eng["answerable"], eng["abstained"],
                                                    max_loss)
    probs = _sigmoid(a * _logits(config, params, val["feats"]) + b)
    return (a, b), critic_lib.abstain_threshold(probs, val["labels"] > 0.5, val["answerable"], None, max_loss)


def evaluate(config, params, split: dict, calibration=(1.0, 0.0),
             threshold: float | None = None) -> tuple[dict, np.ndarray]:
    """Loss, AUROC, ECE and accuracy at 0.5 of a split's calibrated P(supported) (with a threshold, also the
    abstention figures, and the engine's accuracy and hallucination without and with the critic)."""
    labels = split["labels"]
    z = calibration[0] * _logits(config, params, split["feats"]) + calibration[1]
    probs = _sigmoid(z)
    loss = float(np.mean(np.maximum(z, 0) - z * labels + np.log1p(np.exp(-np.abs(z)))))
    out = {"loss": loss, "auroc": critic_lib.auroc(probs, labels), "ece": critic_lib.ece(probs, labels),
           "accuracy": float(np.mean((probs >= 0.5) == (labels > 0.5)))}
    if threshold is not None:
        accept = probs >= threshold
        out.update(threshold=threshold,
                   answered_accuracy=float(np.mean(np.where(accept, labels > 0.5, ~split["answerable"]))),
                   unsupported_accepted=float(np.mean(accept[labels < 0.5])),
                   supported_rejected=float(np.mean(~accept[labels > 0.5])),
                   accepted_by_kind={str(k): float(np.mean(accept[split["kinds"] == k]))
                                     for k in np.unique(split["kinds"])})
        eng = split["engine"]
        if len(eng["correct"]):
            p = _sigmoid(calibration[0] * _logits(config, params, eng["feats"]) + calibration[1])
            rows = (p, eng["correct"], eng["answerable"], eng["abstained"])
            acc0, hall0 = critic_lib.abstain_outcomes(*rows, 0.0)
            acc, hall = critic_lib.abstain_outcomes(*rows, threshold)
            out.update(engine_answers=len(p), engine_accuracy=acc0, engine_hallucination=hall0,
                       engine_accuracy_verified=acc, engine_hallucination_verified=hall)
    return out, probs


def train(config: ml_collections.ConfigDict, checkpoint: str, workdir: str, *, lm=None) -> dict:
    """Trains (or resumes) a critic for the LM in `checkpoint`; returns the summary printed by the CLI."""
    os.makedirs(workdir, exist_ok=True)
    _, tokenizer, lm_params = lm if lm is not None else load_for_inference(checkpoint)
    data = _dataset(config, tokenizer, lm_params, workdir)
    cr = config.critic
    state = init_state(config, jax.random.key(config.seed))
    saved = store.steps(workdir)
    if saved:
        state = store.restore_state(workdir, store.abstract(state), saved[-1])
    start = int(state["step"])
    n = len(data["train"]["labels"])
    batch = min(cr.batch_size, n)
    writer = MetricsWriter(workdir, jsonl=config.logging.jsonl, tensorboard=config.logging.tensorboard)
    progress = tqdm.tqdm(total=cr.steps, initial=start, unit="step", desc="critic",
                         disable=not (config.logging.progress and sys.stderr.isatty()))
    feats = jax.tree.map(jnp.asarray, data["train"]["feats"])
    labels = jnp.asarray(data["train"]["labels"])
    losses = []
    for step in range(start, cr.steps):
        idx = jax.random.choice(jax.random.fold_in(jax.random.key(config.seed), step), n, (batch,), replace=False)
        state, loss = train_step(cr.d_hidden, float(cr.lr), float(cr.weight_decay), state,
                                 jax.tree.map(lambda a: a[idx], feats), labels[idx])
        losses.append(float(loss))
        progress.update(1)
        done = step + 1
        if done % config.train.log_every == 0:
            writer.write(done, {"loss": float(np.mean(losses[-config.train.log_every:]))}, prefix="critic_train")
        if done % cr.save_every == 0 or done == cr.steps:
            calibration, threshold = calibrate(config, state["params"], data["val"])
            val, _ = evaluate(config, state["params"], data["val"], calibration, threshold)
            writer.write(done, {**val, "platt_a": calibration[0], "platt_b": calibration[1]}, prefix="critic_val")
            progress.set_postfix(val_loss=f"{val['loss']:.3f}", auroc=f"{val['auroc']:.3f}")
            store.save(workdir, done, state, config=config,
                       meta={"threshold": threshold, "calibration": list(calibration),
                             "checkpoint": os.path.abspath(checkpoint), "val": val})
    progress.close()
    step, _, meta = store.read_json(workdir, store.CRITIC_COMMAND)
    threshold, calibration = float(meta["threshold"]), tuple(meta["calibration"])
    test, _ = evaluate(config, state["params"], data["test"], calibration, threshold)
    writer.write(step, test, prefix="critic_test")
    writer.close()
    kinds = {str(k): int(np.sum(data["train"]["kinds"] == k)) for k in np.unique(data["train"]["kinds"])}
    return {"step": step, "threshold": threshold, "calibration": list(calibration), "test": test,
            "train_losses": losses, "train_kinds": kinds,
            "workdir": workdir}


def main(argv: list[str] | None = None) -> dict:
    import argparse  # noqa: PLC0415

    from mantis_jax.memory.train import Stage2Error, load_encoder_params  # noqa: PLC0415

    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--stage2", default="", help="Stage-2 workdir: the retrieval encoder of the engine whose "
                     "answers the critic learns from (= --config.engine.encoder; default: none)")
    known, rest = pre.parse_known_args(argv)
    args, overrides = store.parse_args("python -m mantis_jax.control.train_critic", __doc__.splitlines()[0], rest)
    try:
        saved_config, tokenizer, lm_params = load_for_inference(args.checkpoint)
        config = store.control_config(saved_config, overrides)
        if known.stage2:
            load_encoder_params(known.stage2)  # a missing or foreign encoder fails here, before any work
            config.engine.encoder = os.path.abspath(known.stage2)
        summary = train(config, args.checkpoint, args.workdir, lm=(config, tokenizer, lm_params))
    except (CheckpointError, store.ControlCheckpointError, ConfigError, Stage2Error) as e:
        cli.fail(e)
    printable = {k: v for k, v in summary.items() if k != "train_losses"}
    print(json.dumps(printable, indent=1, default=float))
    return summary


if __name__ == "__main__":
    main()
