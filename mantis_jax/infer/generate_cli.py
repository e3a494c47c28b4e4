"""The generate CLI: `python -m mantis_jax.generate --checkpoint=runs/micro --prompt="..."`.

A checkpoint (a training workdir, read by `train.checkpoint.load_for_inference`) enters with one of three input
modes: `--prompt` (one completion to stdout), `--prompts_file` (one prompt per line with `\\n` escapes, or JSONL
with a "prompt" field) to `--output` (JSONL: prompt, completion) or stdout, and `--interactive`
(prompts on stdin; `set <param> <value>`, `stats`, `help`, `quit`). Every run reports tokens/s, latency and time
to first token. `--exit_threshold` < 1 decodes with early exit (infer/early_exit.py; the stats then give the mean
layers run per token). `--quantize int8` stores the weights as int8 and reports the memory and factworld-val
perplexity change. Bad input (missing checkpoint, empty prompts file, bad flag values) exits with one line.
The flags live in their own FlagValues, so importing this module never clashes with other entry points' flags.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TextIO

from absl import flags

from mantis_jax.cli import fail

FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "training workdir holding checkpoints/", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "checkpoint step (default: best val loss, else latest)", flag_values=FLAGS)
flags.DEFINE_string("prompt", None, "one prompt", flag_values=FLAGS)
flags.DEFINE_string("prompts_file", None, "prompts: one per line (\\n escapes) or .jsonl with 'prompt'",
                    flag_values=FLAGS)
flags.DEFINE_string("output", None, "JSONL output file for --prompts_file (default: stdout)", flag_values=FLAGS)
flags.DEFINE_boolean("interactive", False, "read prompts and commands from stdin", flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.0, "0 = greedy", flag_values=FLAGS)
flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0 = off)", flag_values=FLAGS)
flags.DEFINE_float("top_p", 1.0, "nucleus mass (1 = off)", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate per prompt", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "prompts per decode batch", flag_values=FLAGS)
flags.DEFINE_enum("quantize", "none", ["none", "int8"], "weight-only quantization", flag_values=FLAGS)
flags.DEFINE_float("exit_threshold", 1.0, "early exit: a token stops running layers once its confidence reaches "
                   "this (1 = off: full depth)", flag_values=FLAGS)
flags.DEFINE_enum("exit_confidence", "softmax", ["softmax", "margin"], "early-exit confidence: top-1 probability "
                  "or top-1 minus top-2", flag_values=FLAGS)
flags.DEFINE_integer("min_exit_layer", None, "first layer a token may exit after (default: the checkpoint's "
                     "model.min_exit_layer)", flag_values=FLAGS)

SETTABLE = {"temperature": float, "top_k": int, "top_p": float, "max_new_tokens": int, "seed": int,
            "exit_threshold": float}
HELP = ("commands: set <param> <value> (params: " + ", ".join(SETTABLE) + "), stats, help, quit; "
        "any other line is a prompt (\\n escapes allowed)")


def read_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ValueError(f"--prompts_file {path!r} does not exist; pass a text file with one prompt per line")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    prompts.append(str(json.loads(line)["prompt"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n} is not a JSON object with a 'prompt' field ({e})") from None
            else:
                prompts.append(line.rstrip("\n").replace("\\n", "\n"))
    if not prompts:
        raise ValueError(f"--prompts_file {path!r} holds no prompts; write one prompt per line")
    return prompts


def sampling_kwargs(settings: dict) -> dict:
    from mantis_jax.infer.sampling import check_params  # noqa: PLC0415 (jax only after flags are checked)

    check_params(settings["temperature"], settings["top_k"], settings["top_p"])
    if settings["max_new_tokens"] < 1:
        raise ValueError(f"--max_new_tokens ({settings['max_new_tokens']}) must be >= 1")
    if not 0.0 <= settings["exit_threshold"] <= 1.0:
        raise ValueError(f"--exit_threshold ({settings['exit_threshold']}) must be in [0, 1] (1 = no early exit)")
    return dict(settings)


def check_flags() -> dict:
    """The sampling settings from the flags; raises ValueError naming a bad flag."""
    if not FLAGS.checkpoint:
        raise ValueError("--checkpoint is required: the workdir of a training run (e.g. --checkpoint=runs/micro)")
    if not os.path.isdir(FLAGS.checkpoint):
        raise ValueError(f"--checkpoint {FLAGS.checkpoint!r} is not a directory; pass a training workdir")
    modes = [m for m in ("prompt", "prompts_file", "interactive") if FLAGS[m].value]
    if len(modes) != 1:
        raise ValueError("give exactly one of --prompt, --prompts_file, --interactive"
                         + (f" (got {', '.join('--' + m for m in modes)})" if modes else ""))
    if FLAGS.output and not FLAGS.prompts_file:
        raise ValueError("--output needs --prompts_file")
    if FLAGS.batch_size < 1:
        raise ValueError(f"--batch_size ({FLAGS.batch_size}) must be >= 1")
    return sampling_kwargs({k: FLAGS[k].value for k in SETTABLE})


def load(path: str, step: int | None, quantize_mode: str, batch_size: int, out: TextIO):
    """(Generator, config) from a checkpoint, with the quantization report printed when asked for."""
    from mantis_jax.infer import quantize  # noqa: PLC0415
    from mantis_jax.infer.early_exit import EarlyExit  # noqa: PLC0415
    from mantis_jax.infer.runner import Generator  # noqa: PLC0415
    from mantis_jax.model.args import ModelArgs  # noqa: PLC0415
    from mantis_jax.train.checkpoint import load_for_inference  # noqa: PLC0415

    config, tokenizer, params = load_for_inference(path, step)
    args = ModelArgs.from_config(config)
    if quantize_mode != "none":
        qparams = quantize.quantize_params(params, quantize_mode)
        windows = quantize.val_windows(config, tokenizer, seq_len=min(config.data.seq_len, 128), max_windows=16)
        r = quantize.report(args, params, qparams, windows)
        print(f"{quantize_mode}: weights {r['bytes_float'] / 2**20:.2f} MiB -> {r['bytes_quantized'] / 2**20:.2f} MiB "
              f"({r['memory_ratio']:.2f}x); factworld val perplexity {r['ppl_float']:.3f} -> "
              f"{r['ppl_quantized']:.3f} ({100 * r['ppl_change']:+.2f}%)", file=out, flush=True)
        params = qparams
    min_layer = args.min_exit_layer if FLAGS.min_exit_layer is None else FLAGS.min_exit_layer
    exit = EarlyExit(min_layer, FLAGS.exit_confidence).check(args.n_layers)
    return Generator(args, params, tokenizer, batch_size=batch_size, exit=exit), config


def interactive(gen, settings: dict, inp: TextIO, out: TextIO) -> None:
    from mantis_jax.infer.runner import Stats  # noqa: PLC0415

    total = Stats()
    print(HELP, file=out, flush=True)
    for line in inp:
        line = line.strip()
        if not line:
            continue
        words = line.split()
        if line in ("quit", "exit"):
            break
        if line == "help":
            print(HELP, file=out, flush=True)
        elif line == "stats":
            print(f"stats: {total.line()}; settings: {settings}", file=out, flush=True)
        elif words[0] == "set":
            if len(words) != 3 or words[1] not in SETTABLE:
                print(f"error: usage: set <param> <value> with param one of {', '.join(SETTABLE)}", file=out,
                      flush=True)
                continue
            try:
                trial = dict(settings, **{words[1]: SETTABLE[words[1]](words[2])})
                settings.update(sampling_kwargs(trial))
                print(f"{words[1]} = {settings[words[1]]}", file=out, flush=True)
            except ValueError as e:
                print(f"error: {e}", file=out, flush=True)
        else:
            try:
                texts, stats = gen.generate([line.replace("\\n", "\n")], **settings)
            except ValueError as e:
                print(f"error: {e}", file=out, flush=True)
                continue
            total.add(stats)
            print(texts[0], file=out)
            print(f"[{stats.line()}]", file=out, flush=True)


def main(argv: list[str] | None = None, inp: TextIO | None = None, out: TextIO | None = None) -> None:
    argv = sys.argv if argv is None else argv
    inp, out = inp or sys.stdin, out or sys.stdout
    if any(a in ("-h", "--help", "-help", "--helpfull", "--helpshort") for a in argv[1:]):
        # Our flags live outside absl's global FLAGS, so absl's own --help does not know them: print ours.
        print(__doc__.strip() + "\n\nflags:\n" + FLAGS.get_help(), file=out)
        sys.exit(0)
    try:
        FLAGS.unparse_flags()
        FLAGS(argv)
        settings = check_flags()
        prompts = read_prompts(FLAGS.prompts_file) if FLAGS.prompts_file else None
        gen, _ = load(FLAGS.checkpoint, FLAGS.step, FLAGS.quantize, FLAGS.batch_size, out)
    except (flags.Error, ValueError, FileNotFoundError) as e:
        fail(e)
    if FLAGS.interactive:
        interactive(gen, settings, inp, out)
        return
    try:
        texts, stats = gen.generate(prompts or [FLAGS.prompt], **settings)
    except ValueError as e:
        fail(e)
    if FLAGS.prompt is not None:
        print(texts[0], file=out)
    elif FLAGS.output:
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            for p, t in zip(prompts, texts):
                f.write(json.dumps({"prompt": p, "completion": t}) + "\n")
        print(f"wrote {len(texts)} completions to {FLAGS.output}", file=out)
    else:
        for p, t in zip(prompts, texts):
            print(json.dumps({"prompt": p, "completion": t}), file=out)
    print(stats.line(), file=out, flush=True)
