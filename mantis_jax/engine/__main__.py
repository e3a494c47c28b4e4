"""Engine CLI: read a context, answer questions from memory, print the trace.

    python -m mantis_jax.engine --checkpoint=runs/demo --context_file=story.txt --question="Where does Tavo live?"
    python -m mantis_jax.engine --checkpoint=runs/demo --stage2=runs/demo_stage2 --interactive
    ... --config.engine.retrieve=never --config.memory.semantic.address=127.0.0.1:50051   (any config key)
    ... --decoding_policy=runs/demo_tidal    (sample with a trained decoding head: engine.decoding=tidal)

`--checkpoint` is a Stage-1 workdir; `--stage2` (or `--config.engine.encoder`) a Stage-2 workdir whose trained
retrieval encoder to use (without it: the LM's mean-pooled hidden states). `--interactive` reads commands from
stdin: `read <file>` (or `read: <text>`), `ask <question>`, `trace` (the last answer's full trace as JSON),
`quit`. One-shot mode prints the answer and its trace (`--json` for JSON). Bad input ends with one line on
stderr and status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, TextIO

from mantis_jax import cli

if __name__ == "__main__":  # restart before the heavy imports below (jax, flax, orbax), not after them
    cli.reexec_with_malloc_tunables()

from mantis_jax.config import ConfigError  # noqa: E402
from mantis_jax.engine.core import Engine, read_context_file  # noqa: E402
from mantis_jax.engine.memory import MemoryUnavailable  # noqa: E402
from mantis_jax.memory.semantic import SemanticMemoryError  # noqa: E402
from mantis_jax.memory.train import Stage2Error, parse_overrides  # noqa: E402
from mantis_jax.train.checkpoint import CheckpointError  # noqa: E402

ERRORS = (ConfigError, CheckpointError, Stage2Error, MemoryUnavailable, SemanticMemoryError, FileNotFoundError,
          ValueError)
HELP = "commands: read <file> | read: <text> | ask <question> | trace | quit"


def interactive(engine: Engine, inp: TextIO, out: TextIO) -> None:
    last = None
    out.write(HELP + "\n")
    for line in inp:
        line = line.strip()
        if not line:
            continue
        cmd, _, arg = line.partition(" ")
        try:
            if cmd == "quit":
                break
            if cmd == "read:":
                info = engine.read(arg)
                out.write(f"read {info['spans']} spans ({info['tokens']} tokens)\n")
            elif cmd == "read":
                info = engine.read(read_context_file(arg.strip()))
                out.write(f"read {info['spans']} spans ({info['tokens']} tokens) from {arg.strip()}\n")
            elif cmd == "ask":
                last = engine.answer(arg)
                out.write(f"answer: {last.text}\n{last.trace.format()}\n")
            elif cmd == "trace":
                out.write((last.trace.to_json() if last else "no answer yet: ask <question> first") + "\n")
            else:
                out.write(f"unknown command {cmd!r}; {HELP}\n")
        except ERRORS as e:  # one bad command does not end the session
            out.write(f"error: {e}\n")
        out.flush()


def main(argv: list[str] | None = None, inp: TextIO | None = None, out: TextIO | None = None, *,
         prog: str = "python -m mantis_jax.engine", description: str | None = None,
         add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
         build: Callable[[argparse.Namespace, dict], Engine] | None = None,
         errors: tuple[type[Exception], ...] = ()) -> None:
    """The CLI. A layer above the engine (control/__main__.py: the critic and the controller) reuses it with
    `add_arguments` (its flags), `build(flags, config overrides) -> Engine` (default: `Engine.from_workdir` of
    --checkpoint and --stage2) and `errors` (its exceptions, reported as one line like the engine's)."""
    argv = sys.argv[1:] if argv is None else argv
    inp, out = inp or sys.stdin, out or sys.stdout
    p = argparse.ArgumentParser(prog=prog, description=description or __doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="Stage-1 workdir")
    p.add_argument("--stage2", default=None, help="Stage-2 workdir (trained retrieval encoder)")
    p.add_argument("--context_file", default=None, help="text to read before answering")
    p.add_argument("--question", default=None, help="question to answer (one-shot mode)")
    p.add_argument("--interactive", action="store_true", help="read commands from stdin")
    p.add_argument("--json", action="store_true", help="one-shot: print the answer and trace as JSON")
    p.add_argument("--decoding_policy", default=None, help="decoding-policy workdir (python -m mantis_jax.control."
                   "train_decoding): sample with its knobs (= --config.engine.decoding=tidal + decoding_policy)")
    if add_arguments is not None:
        add_arguments(p)
    engine = None
    try:
        rest, overrides = parse_overrides(argv)
        a = p.parse_args(rest)
        if not a.interactive and not a.question:
            raise ValueError("pass --question=\"...\" (one-shot) or --interactive")
        if a.decoding_policy is not None:
            overrides = {**overrides, "engine.decoding": "tidal", "engine.decoding_policy": a.decoding_policy}
        context = read_context_file(a.context_file) if a.context_file else None
        if build is None:
            engine = Engine.from_workdir(a.checkpoint, stage2=a.stage2, overrides=overrides)
        else:
            engine = build(a, overrides)
        if context is not None:
            engine.read(context)
        if a.interactive:
            interactive(engine, inp, out)
            return
        answer = engine.answer(a.question)
        if a.json:
            out.write(json.dumps(answer.to_dict(), indent=1) + "\n")
        else:
            out.write(f"answer: {answer.text}\n{answer.trace.format()}\n")
    except ERRORS + errors as e:
        cli.fail(e)
    finally:
        if engine is not None:
            engine.close()


if __name__ == "__main__":
    main()
