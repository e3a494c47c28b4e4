"""`python -m mantis_jax.eval --checkpoint=WORKDIR --tasks=factworld,mmlu --data_dir=DIR --output=report.json`.

A training workdir enters (its best-val-loss checkpoint, or `--step`); its stored config is completed with the
defaults of sections it predates (e.g. `eval`), then `--config.<section>.<key>=<value>` overrides apply
(`--config.data.factworld_seed=3` evaluates on another world, `--config.eval.limit=20` shortens every task). Each
task in `--tasks` (see tasks.py for the files each reads under `--data_dir`) runs on the LM; with `--quantize=int8`
on int8 weights. `--stage2`, `--critic`, `--controller` attach the engine's parts (see engine_parts.py): factworld
then also runs the engine under each policy, and the critic verifies and detects. Out come a table on stdout, the
JSON report at `--output` (config, every task's metrics and samples, notes) and, with `--plots=DIR`, PNG figures
(training curves from the workdir's metrics.jsonl, factworld's accuracy against compute and reliability diagram).
Bad input exits with one line (status 2): a missing or malformed data file names the file, the line and the format;
an unknown task lists the known ones.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import os
import sys
import time
from typing import TextIO

from absl import flags

from mantis_jax.cli import fail

FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "training workdir holding checkpoints/", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "checkpoint step (default: best val loss, else latest)", flag_values=FLAGS)
flags.DEFINE_string("tasks", "factworld", "comma-separated tasks", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "folder with the benchmarks' files (see docs/eval.md)", flag_values=FLAGS)
flags.DEFINE_string("output", None, "JSON report path", flag_values=FLAGS)
flags.DEFINE_string("plots", None, "folder for PNG figures", flag_values=FLAGS)
flags.DEFINE_enum("quantize", "none", ["none", "int8"], "evaluate int8 weight-only params", flag_values=FLAGS)
flags.DEFINE_string("stage2", None, "Stage-2 workdir: the engine's trained retrieval encoder", flag_values=FLAGS)
flags.DEFINE_string("critic", None, "critic workdir (python -m mantis_jax.control.train_critic)", flag_values=FLAGS)
flags.DEFINE_string("controller", None, "controller workdir (python -m mantis_jax.control.train_rl)",
                    flag_values=FLAGS)
KNOWN_TASKS = ("factworld", "mmlu", "truthfulqa", "gsm8k", "humaneval", "halueval", "perplexity")  # tasks.TASKS


def parse_tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in KNOWN_TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown)) or '(none given)'} in --tasks; known "
                         f"tasks: {', '.join(KNOWN_TASKS)}")
    return names


def apply_overrides(config, overrides: list[str]):
    """The stored config completed with today's defaults, then `--config.x.y=v` overrides, then validated."""
    from ml_collections import config_flags  # noqa: PLC0415

    from mantis_jax import cli  # noqa: PLC0415
    from mantis_jax.config import ConfigError, validate  # noqa: PLC0415
    from mantis_jax.memory.train import complete_config  # noqa: PLC0415

    full = complete_config(config)
    known = cli._all_keys(full)  # noqa: SLF001 (the same key list the training CLI checks overrides against)
    for arg in overrides:
        key = arg[len("--config."):].split("=", 1)[0]
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.8)
            raise ConfigError(f"unknown config key config.{key}"
                              + (f"; did you mean {', '.join('config.' + c for c in close)}?" if close else ""))
    if overrides:
        fv, saved = flags.FlagValues(), sys.argv
        sys.argv = ["eval", *overrides]  # config_flags finds the override flags in sys.argv
        try:
            holder = config_flags.DEFINE_config_dict("config", full, flag_values=fv)
            fv(["eval", *overrides])
            full = holder.value
        except flags.Error as e:
            raise ConfigError(str(e)) from None
        finally:
            sys.argv = saved
    return validate(full)


def table(results: dict) -> str:
    lines = [f"{'task':12s} {'metric':50s} value"]
    for task, res in results.items():
        for key, v in res["metrics"].items():
            if isinstance(v, float):
                lines.append(f"{task:12s} {key:50s} {v:.4f}" if math.isfinite(v) else f"{task:12s} {key:50s} n/a")
            elif isinstance(v, (int, str)) and v != "":
                lines.append(f"{task:12s} {key:50s} {v}")
    return "\n".join(lines)


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def evaluate(checkpoint: str, task_names: list[str], *, data_dir: str | None, overrides: list[str],
             step: int | None = None, quantize_mode: str = "none", parts: dict | None = None,
             command: str = "", out: TextIO = sys.stdout) -> dict:
    from mantis_jax.eval import engine_parts, evidence, tasks  # noqa: PLC0415
    from mantis_jax.eval.lm import ModelLM  # noqa: PLC0415
    from mantis_jax.infer import quantize  # noqa: PLC0415
    from mantis_jax.model.args import ModelArgs  # noqa: PLC0415
    from mantis_jax.train.checkpoint import load_for_inference  # noqa: PLC0415

    stored, tokenizer, params = load_for_inference(checkpoint, step)
    config = apply_overrides(stored, overrides)
    args = ModelArgs.from_config(config)
    float_params = None
    if quantize_mode != "none":
        float_params, params = params, quantize.quantize_params(params, quantize_mode)
    lm = ModelLM(args, params, tokenizer, batch_size=config.eval.batch_size, window=evidence.window(config))
    ctx = tasks.Context(lm, config, tokenizer, params, data_dir, float_params=float_params)
    engine_parts.attach(ctx, **(parts or {}))
    results = {}
    for name in task_names:
        t0 = time.monotonic()
        print(f"[{name}] running", file=out, flush=True)
        results[name] = tasks.TASKS[name](ctx)
        results[name]["seconds"] = time.monotonic() - t0
    return {"checkpoint": os.path.abspath(checkpoint), "date": datetime.date.today().isoformat(),
            "command": command, "quantize": quantize_mode,
            "notes": ctx.notes, "config": config.to_dict(), "tasks": results}


def main(argv: list[str] | None = None, out: TextIO | None = None) -> None:
    argv = sys.argv if argv is None else argv
    out = out or sys.stdout
    if any(a in ("-h", "--help", "-help", "--helpfull", "--helpshort") for a in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + FLAGS.get_help(), file=out)
        sys.exit(0)
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    try:
        FLAGS.unparse_flags()
        FLAGS([argv[0], *[a for a in argv[1:] if not a.startswith("--config.")]])
        if not FLAGS.checkpoint or not os.path.isdir(FLAGS.checkpoint):
            raise ValueError(f"--checkpoint {FLAGS.checkpoint!r} is not a training workdir; pass one, e.g. "
                             "--checkpoint=runs/demo")
        names = parse_tasks(FLAGS.tasks)
    except (flags.Error, ValueError) as e:
        fail(e)
    from mantis_jax.config import ConfigError  # noqa: PLC0415 (jax and the model only once the flags are good)
    from mantis_jax.eval import formats  # noqa: PLC0415
    from mantis_jax.train.checkpoint import CheckpointError  # noqa: PLC0415

    try:
        if FLAGS.data_dir and not os.path.isdir(FLAGS.data_dir):
            raise ValueError(f"--data_dir {FLAGS.data_dir!r} is not a directory")
        parts = {"stage2": FLAGS.stage2, "critic": FLAGS.critic, "controller": FLAGS.controller}
        report = evaluate(FLAGS.checkpoint, names, data_dir=FLAGS.data_dir, overrides=overrides, step=FLAGS.step,
                          quantize_mode=FLAGS.quantize, parts=parts,
                          command=" ".join(["python -m mantis_jax.eval", *argv[1:]]), out=out)
    except (flags.Error, ValueError, FileNotFoundError, ConfigError, CheckpointError, formats.DataFormatError) as e:
        fail(e)
    for note in report["notes"]:
        print(f"note: {note}", file=out)
    print(table(report["tasks"]), file=out, flush=True)
    if FLAGS.output:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            json.dump(_json_safe(report), f, indent=1)
        print(f"wrote {FLAGS.output}", file=out)
    if FLAGS.plots:
        from mantis_jax.eval import plots  # noqa: PLC0415

        fw = report["tasks"].get("factworld", {}).get("report")
        for path in plots.save_all(FLAGS.plots, records=plots.read_metrics(FLAGS.checkpoint), factworld_report=fw,
                                   command=report["command"]):
            print(f"wrote {path}", file=out)
