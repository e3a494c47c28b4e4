"""`make demo`: train the micro model on factworld under a wall-clock budget, then generate and answer questions.

    python -m mantis_jax.demo [--minutes=14] [--workdir=runs/demo] [--questions=50] [--config=configs/demo.py]
                              [--stage2_minutes=3] [--far_questions=20] [--control_questions=12] [--seed=S]

What goes in: the `configs/demo.py` preset (the micro shape, a 1024-token BPE, QA-dense documents, answer tokens
weighted in the loss; see docs/perf/demo.md for why). What happens: `train.trainer.train` runs with its progress
bar until `--minutes` of training are spent (or the schedule ends) and saves an orbax checkpoint in
`<workdir>/checkpoints`; the trained model then continues the opening of a test-split factworld document, and
answers `--questions` near-range questions about test-split entities whose fact sentences are in the context
(never seen in training), plus as many unanswerable ones (attributes never stated: the answer is "unknown").
What comes out: the continuation, a few sample answers, and exact-match accuracy for answerable (overall and per
wording of the evidence sentence: canonical / alternative) and unanswerable questions. Then the memory path:
Stage 2 trains the retrieval encoder for `--stage2_minutes` in `<workdir>_stage2` (recall@1/@5 against the
untrained encoder), the engine reads a long test document (a far question's context: the evidence is
FAR_DISTANCE tokens before the question, far outside the window), answers from memory and prints its trace,
beside the attention-only answer; then EM over `--far_questions` such questions, attention-only vs engine.
Then the deciders (`control_demo`, ~1.5 min): the critic trains in `<workdir>_critic` on factworld examples and
the engine's own answers, PPO trains the meta-controller in `<workdir>_rl`, and `--control_questions` test
questions of each kind (near, far, cross_session, unanswerable) are answered without a critic, always verifying,
and under the controller (accuracy, hallucination, compute), with two of the controller's traces (each gate's
decision and probability, the critic's verdict). `run()` returns every figure as a dict.

`--workdir` and its stage folders are started afresh (a previous demo run there is removed) unless `--resume`
is given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Any, Callable

from mantis_jax import cli

if __name__ == "__main__":  # restart before the heavy imports below (jax, flax, orbax), not after them
    cli.reexec_with_malloc_tunables()

import flax.linen as nn  # noqa: E402
import ml_collections  # noqa: E402
import tqdm  # noqa: E402

from mantis_jax import config as config_lib  # noqa: E402
from mantis_jax.data import factworld  # noqa: E402
from mantis_jax.data.tokenizer import FILENAME as TOKENIZER_FILENAME, Tokenizer  # noqa: E402
from mantis_jax.eval.qa import answer_questions  # noqa: E402
from mantis_jax.infer.runner import Generator  # noqa: E402
from mantis_jax.memory import train as stage2  # noqa: E402
from mantis_jax.model.args import ModelArgs  # noqa: E402
from mantis_jax.model.summary import param_counts  # noqa: E402
from mantis_jax.train.checkpoint import checkpoint_dir  # noqa: E402
from mantis_jax.train.trainer import train  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.py")
CONTINUATION_TOKENS = 48
FAR_DISTANCE = 2048
Printer = Callable[[str], None]
say: Printer = tqdm.tqdm.write  # print() that keeps the trainer's progress bar intact


def load_config(path: str = DEFAULT_CONFIG, *, minutes: float | None = None,
                seed: int | None = None) -> ml_collections.ConfigDict:
    """The preset at `path` (`get_config()`), with `train.max_minutes` set to `minutes` when given and the
    initialisation and data-order seeds (`seed`, `data.shuffle_seed`) set to `seed` when given (the factworld world
    stays the same, so every seed answers the same test questions)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist; pass --config=configs/demo.py")
    config = cli.load_preset(path)
    if minutes is not None:
        if minutes <= 0:
            raise ValueError(f"--minutes ({minutes}) must be > 0: it is the training budget in minutes")
        config.train.max_minutes = float(minutes)
    if seed is not None:
        config.seed = int(seed)
        config.data.shuffle_seed = int(seed)
    if config.data.source != "factworld":
        raise ValueError(f"the demo trains and asks questions on factworld; {path} sets config.data.source="
                         f"{config.data.source!r}: set it to 'factworld'")
    return config_lib.validate(config)


STAGE_SUFFIXES = ("_stage2", "_critic", "_rl")  # the later stages' folders beside the workdir


def prepare_workdir(workdir: str, resume: bool) -> None:
    """Removes a previous demo run in `workdir` and its stage folders (`<workdir>_stage2`, `_critic`, `_rl`: they
    were trained on the previous LM) unless resuming; refuses to touch a folder that is not a run (and then removes
    nothing)."""
    if resume:
        return
    marks = {os.path.basename(checkpoint_dir(workdir)), TOKENIZER_FILENAME, "metrics.jsonl", stage2.STAGE2_FILE}
    folders = [workdir] + [workdir.rstrip("/") + suffix for suffix in STAGE_SUFFIXES]
    for folder in folders:
        entries = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        if entries and not marks & entries:
            raise FileExistsError(f"--workdir {workdir!r}: {folder!r} exists and holds no demo run "
                                  f"({sorted(entries)[:5]}); pass an empty or new folder, e.g. --workdir=runs/demo")
    for folder in folders:
        if os.path.isdir(folder) and os.listdir(folder):
            shutil.rmtree(folder)


def _val_printer(out: Printer, t0: float) -> Callable[[int, str, dict], None]:
    def on_log(step: int, split: str, metrics: dict) -> None:
        if split == "val":
            out(f"  step {step:5d}  {(time.monotonic() - t0) / 60:5.1f} min  val loss {metrics['val_loss']:.3f}  "
                f"val token accuracy {metrics['val_accuracy']:.3f}")
    return on_log


def continuation(config, tokenizer: Tokenizer, generator: Generator) -> tuple[str, str]:
    """(prompt, greedy continuation) for the narrative before the first question of the first test document:
    a model that learned the format goes on with a `Q:` line about those facts and its `A:` line."""
    lines = factworld.world_from_config(config).document("test", 0).text.split("\n")
    first_q = next((i for i, line in enumerate(lines) if line.startswith("Q:")), 1)
    prompt = "\n".join(lines[:max(first_q, 1)]) + "\n"
    completions, _ = generator.generate([prompt], max_new_tokens=CONTINUATION_TOKENS, temperature=0.0,
                                        truncate=True, measure_ttft=False)
    return prompt, completions[0]


def evaluate(config, tokenizer: Tokenizer, params: Any, n_questions: int, out: Printer = say) -> dict[str, Any]:
    """Generates a continuation and answers near-range + unanswerable test questions; prints and returns figures."""
    args = ModelArgs.from_config(config)
    generator = Generator(args, params, tokenizer, batch_size=1)
    prompt, cont = continuation(config, tokenizer, generator)
    out("\n== continuation of a test-split document (greedy) ==")
    out(prompt + "\u2192" + cont)
    records = (factworld.eval_questions("test", "near", n_questions, config=config)
               + factworld.eval_questions("test", "unanswerable", n_questions, config=config))
    t0 = time.monotonic()
    predictions, metrics = answer_questions(config, tokenizer, params, records)
    out(f"\n== {len(records)} questions about test-split entities (facts given in the context) ==")
    shown = [0, 1, 2, n_questions, n_questions + 1]
    for i in shown:
        r = records[i]
        ok = "ok " if factworld.exact_match(predictions[i], r["answer"]) else "bad"
        out(f"  [{ok}] Q: {r['question']}  model: {predictions[i]!r}  answer: {r['answer']!r}")
    out(f"near-range answerable exact match:   {metrics['answerable_accuracy']:.1%} "
        f"({round(metrics['answerable_accuracy'] * metrics['n_answerable'])}/{metrics['n_answerable']})")
    for w in ("canonical", "alternative"):
        hits = [factworld.exact_match(p, r["answer"]) for p, r in zip(predictions, records)
                if r["answerable"] and stage2.wording(r) == w]
        metrics[f"accuracy_{w}"] = sum(hits) / len(hits) if hits else float("nan")
        metrics[f"n_{w}"] = len(hits)
        out(f"  evidence in the {w} wording:  {metrics[f'accuracy_{w}']:.1%} ({sum(hits)}/{len(hits)})")
    out(f"unanswerable exact match ('unknown'): {metrics['unanswerable_accuracy']:.1%} "
        f"({round(metrics['unanswerable_accuracy'] * metrics['n_unanswerable'])}/{metrics['n_unanswerable']})")
    out(f"(answered in {time.monotonic() - t0:.1f} s)")
    return {"continuation": cont, "prompt": prompt, **metrics}


def memory_demo(config, workdir: str, tokenizer: Tokenizer, params: Any, *, stage2_minutes: float,
                far_questions: int, out: Printer = say) -> dict[str, Any]:
    """Stage 2 within its budget, then the engine on far questions beside attention-only answers."""
    from mantis_jax.engine.core import Engine  # noqa: PLC0415
    from mantis_jax.engine.policy import FixedPolicy  # noqa: PLC0415

    result: dict[str, Any] = {}
    encoder_params = None
    if stage2_minutes > 0:
        s2_dir = workdir.rstrip("/") + "_stage2"
        out(f"\n== Stage 2: the retrieval encoder on the frozen LM, up to {stage2_minutes:g} min in {s2_dir} ==")
        summary = stage2.train(workdir, s2_dir, {"retrieval.max_minutes": str(stage2_minutes)}, out=out)
        rec = summary["recall"]
        out(f"trained {summary['step']} steps ({summary['stopped']}) in {summary['minutes']:.1f} min; evidence "
            f"recall@1 / @5 over {rec['gallery']} test sentences: trained {rec['trained_recall@1']:.3f} / "
            f"{rec['trained_recall@5']:.3f}, untrained mean-pooled {rec['baseline_recall@1']:.3f} / "
            f"{rec['baseline_recall@5']:.3f}")
        result["recall"] = rec
        encoder_params = summary["params"]
    engine = Engine(config, params, tokenizer, encoder_params=encoder_params)
    records = factworld.eval_questions("test", "far", max(far_questions, 1), config=config, distance=FAR_DISTANCE)
    answers, attention = [], []
    policy, window_only = engine.policy, FixedPolicy(retrieve="never")
    for r in records:
        engine.forget()
        engine.read(r["context"])
        answers.append(engine.answer(r["question"]))
        engine.policy = window_only  # attention only: the same engine and window, memory gates off
        attention.append(engine.answer(r["question"]).text)
        engine.policy = policy
    engine.close()
    r, ans = records[0], answers[0]
    out(f"\n== a far question: the evidence is {r['distance_tokens']} tokens before it; the window is "
        f"{engine.window} ==")
    out(f"evidence: {r['context'][r['evidence_span'][0]:r['evidence_span'][1]]!r}")
    out(f"Q: {r['question']}   answer: {r['answer']!r}")
    out(f"attention only (the last window):  {attention[0]!r}")
    out(f"engine with memory:                {ans.text!r}")
    out("trace:\n" + "\n".join("  " + line for line in ans.trace.format().split("\n")))
    att_em = sum(factworld.exact_match(p, r["answer"]) for p, r in zip(attention, records)) / len(records)
    eng_em = sum(factworld.exact_match(a.text, r["answer"]) for a, r in zip(answers, records)) / len(records)
    out(f"\nfar questions ({len(records)}, evidence {FAR_DISTANCE}+ tokens back): attention-only EM {att_em:.1%}, "
        f"engine EM {eng_em:.1%}")
    result.update(far_attention_em=att_em, far_engine_em=eng_em, far_n=len(records),
                  far_trace=ans.trace.to_dict(), far_answer=ans.text)
    return result


# the demo's control stage (~2 minutes on 2 idle cores): the critic as in docs/perf/control.md with 320 engine
# answers (160 on val choose the threshold), 30 PPO updates (the reward plateaus after ~15)
CONTROL_OVERRIDES = {"critic.examples": 2000, "critic.engine_episodes": 320, "critic.steps": 600,
                     "critic.lr": 1e-3, "critic.weight_decay": 0.5, "controller.updates": 30,
                     "controller.save_every": 10}


def control_demo(config, workdir: str, tokenizer: Tokenizer, params: Any, *, encoder_dir: str | None,
                 control_questions: int, out: Printer = say, overrides: dict | None = None) -> dict[str, Any]:
    """The critic and the meta-controller on the demo LM: train the critic in `<workdir>_critic` (factworld
    examples and the engine's own answers), PPO for the controller in `<workdir>_rl`, then the engine answers
    `control_questions` test questions of each kind (near, far, cross_session, unanswerable) without a critic,
    always verifying, and under the controller; prints the figures and two traces with each gate's decision and
    probability. `overrides` (default CONTROL_OVERRIDES) sets the stage's critic.* and controller.* keys."""
    from mantis_jax.control import compare, reward, train_critic, train_rl  # noqa: PLC0415
    from mantis_jax.control.controller import Controller  # noqa: PLC0415
    from mantis_jax.control.critic import Critic  # noqa: PLC0415
    from mantis_jax.control.episodes import EngineEpisodes  # noqa: PLC0415
    from mantis_jax.engine.core import Engine  # noqa: PLC0415
    from mantis_jax.engine.policy import FixedPolicy  # noqa: PLC0415
    from mantis_jax.memory.train import load_encoder_params  # noqa: PLC0415

    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in (CONTROL_OVERRIDES if overrides is None else overrides).items():
        stage2.set_key(config, key, value)
    config.engine.encoder = os.path.abspath(encoder_dir) if encoder_dir else ""
    critic_dir, rl_dir = workdir.rstrip("/") + "_critic", workdir.rstrip("/") + "_rl"
    lm = (config, tokenizer, params)
    t0 = time.monotonic()
    out(f"\n== the critic: a head on the frozen LM, trained on factworld and the engine's own answers, in "
        f"{critic_dir} ==")
    summary = train_critic.train(config, workdir, critic_dir, lm=lm)
    test = summary["test"]
    out(f"{summary['step']} steps in {(time.monotonic() - t0) / 60:.1f} min; test split: AUROC {test['auroc']:.3f}, "
        f"ECE {test['ece']:.3f}; abstain below P(supported) {summary['threshold']:.3f} (chosen on val)")
    critic = Critic.from_workdir(critic_dir, lm=lm)
    encoder = load_encoder_params(encoder_dir) if encoder_dir else None
    engine = Engine(config, params, tokenizer, critic=critic, encoder_params=encoder)
    env = EngineEpisodes(engine, "train", distance=config.controller.distance)
    t1 = time.monotonic()
    out(f"\n== Stage 3: PPO for the meta-controller ({config.controller.updates} updates of "
        f"{config.controller.episodes} episodes) in {rl_dir} ==")
    rl = train_rl.train(config, rl_dir, env, meta={"checkpoint": os.path.abspath(workdir),
                                                     "critic": os.path.abspath(critic_dir)})
    hist = rl["history"]
    out(f"{rl['updates']} updates in {(time.monotonic() - t1) / 60:.1f} min, {rl['episodes_per_s']:.1f} "
        f"episodes/s; reward {hist[0]['reward']:.3f} -> {hist[-1]['reward']:.3f}" if hist else
        f"{rl['updates']} updates (resumed: nothing left to run)")
    env.split = "test"
    weights = reward.Weights.from_config(config)
    indices = list(range(4 * control_questions))
    controller = Controller.from_workdir(rl_dir)
    policies = {"no critic (always retrieve)": FixedPolicy("always", 1.0, False),
                "critic (always retrieve + verify)": FixedPolicy("always", 1.0, True),
                "PPO controller": controller}
    out(f"\n== {len(indices)} test questions ({control_questions} of each kind) under three policies ==")
    results = {}
    for name, policy in policies.items():
        results[name] = compare.evaluate(env, policy, indices, weights)
        out(compare.format_row(name, results[name], width=34))
    # two traces under the controller: an unanswerable question (the critic's verdict) and a far one
    for index, what in ((3, "an unanswerable question"), (1, "a far question")):
        ep = env.run(index, controller)
        out(f"\n{what} under the controller: Q: {ep.info['trace'].question}   expected {ep.info['expected']!r}, "
            f"candidate {ep.info['candidate']!r}, answer {ep.info['answer']!r}")
        out("trace:\n" + "\n".join("  " + line for line in ep.info["trace"].format().split("\n")))
    engine.close()
    base, verified = results["no critic (always retrieve)"], results["critic (always retrieve + verify)"]
    out(f"\nthe critic: hallucination {base['hallucinated']:.1%} -> {verified['hallucinated']:.1%}, accuracy "
        f"{base['accuracy']:.1%} -> {verified['accuracy']:.1%}; the controller: accuracy "
        f"{results['PPO controller']['accuracy']:.1%} at compute {results['PPO controller']['compute']:.2f} of the "
        f"full path (always verify: {verified['compute']:.2f})")
    return {"control": results, "critic_test": {k: test[k] for k in ("auroc", "ece", "threshold")},
            "control_minutes": (time.monotonic() - t0) / 60}


def run(config: ml_collections.ConfigDict, workdir: str, *, n_questions: int = 50, resume: bool = False,
        out: Printer = say, stage2_minutes: float = 3.0, far_questions: int = 20,
        control_questions: int = 12, control_overrides: dict | None = None) -> dict[str, Any]:
    """Trains `config` in `workdir`, then evaluates; returns the training summary's figures and the QA metrics."""
    if n_questions < 3:
        raise ValueError(f"--questions ({n_questions}) must be >= 3")
    prepare_workdir(workdir, resume)
    t0 = time.monotonic()
    budget = config.train.max_minutes
    out(f"training {config.name} on factworld in {workdir} for up to {config.train.total_steps} steps"
        + (f" or {budget:g} minutes" if budget > 0 else "")
        + f" ({config.data.batch_size} x {config.data.seq_len} tokens per step)")
    summary = train(config, workdir, on_log=_val_printer(out, t0))
    train_min = (time.monotonic() - t0) / 60
    tokenizer = Tokenizer.load(os.path.join(workdir, TOKENIZER_FILENAME))
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.vocab_size = tokenizer.padded_vocab_size
    params = nn.unbox(summary["state"].params)
    n_params = param_counts(ModelArgs.from_config(config))["total"]
    tps = summary.get("tokens_per_s") or 0.0
    out(f"\ntrained {summary['step']} steps ({summary['stopped']}) in {train_min:.1f} min, {n_params / 1e6:.2f}M "
        f"parameters (vocab {tokenizer.padded_vocab_size}), {tps:,.0f} tokens/s; final train loss "
        f"{summary['train'].get('loss', float('nan')):.3f}; checkpoint in {checkpoint_dir(workdir)}")
    result = evaluate(config, tokenizer, params, n_questions, out)
    result.update(memory_demo(config, workdir, tokenizer, params, stage2_minutes=stage2_minutes,
                              far_questions=far_questions, out=out))
    if control_questions > 0:
        encoder_dir = workdir.rstrip("/") + "_stage2" if stage2_minutes > 0 else None
        result.update(control_demo(config, workdir, tokenizer, params, encoder_dir=encoder_dir,
                                   control_questions=control_questions, out=out, overrides=control_overrides))
    result.update(step=summary["step"], stopped=summary["stopped"], train_minutes=train_min,
                  tokens_per_s=tps, total_minutes=(time.monotonic() - t0) / 60)
    out(f"demo finished in {result['total_minutes']:.1f} min")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mantis_jax.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=None,
                   help="training budget in minutes (default: the preset's train.max_minutes: 14 in configs/demo.py)")
    p.add_argument("--workdir", default="runs/demo", help="run folder (cleared first unless --resume)")
    p.add_argument("--questions", type=int, default=50, help="near-range questions (and as many unanswerable)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="preset file with get_config()")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir instead of restarting")
    p.add_argument("--stage2_minutes", type=float, default=3.0,
                   help="Stage-2 (retrieval encoder) budget in minutes; 0 = the untrained mean-pooled encoder")
    p.add_argument("--far_questions", type=int, default=20, help="far questions answered by the engine")
    p.add_argument("--control_questions", type=int, default=12,
                   help="test questions of each kind for the critic and controller stage (0 = skip the stage)")
    p.add_argument("--seed", type=int, default=None,
                   help="initialisation and data-order seed (default: the preset's); the test questions stay the same")
    a = p.parse_args(argv)
    try:
        config = load_config(a.config, minutes=a.minutes, seed=a.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    run(config, a.workdir, n_questions=a.questions, resume=a.resume, stage2_minutes=a.stage2_minutes,
        far_questions=a.far_questions, control_questions=a.control_questions)


if __name__ == "__main__":
    main()
