"""Promotion gates between post-training stages: `python -m mantis_jax.post.gates --results=R.json
--gate=sft_to_dpo [--gates=configs/post_gates.py]`.

A gates file (`get_config()`, configs/post_gates.py) maps each transition to its checks, (metric, direction,
threshold) triples: `metric` is a dotted path into the results JSON (`sft.val_loss` reads
{"sft": {"val_loss": ...}}, as the stages write their results.json), `direction` is "higher" (the metric must be
>= threshold) or "lower" (<= threshold). A metric that is missing, not a number or not finite FAILS its check:
a gate never passes on what it cannot read. Every check is printed; exit status 0 = all pass, 1 = a check failed,
2 = missing input (no results file, unreadable JSON, unknown gate, a malformed gates file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Sequence

DIRECTIONS = ("higher", "lower")
DEFAULT_GATES = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "post_gates.py"))
PASS, FAIL, MISSING_INPUT = 0, 1, 2


class GateInputError(ValueError):
    """The results or the gates file cannot be used (exit status 2)."""


def load_gates(path: str) -> dict[str, list[tuple[str, str, float]]]:
    """{transition: [(metric, direction, threshold), ...]} from a gates file; GateInputError when malformed."""
    from mantis_jax.cli import load_preset  # noqa: PLC0415

    if not os.path.isfile(path):
        raise GateInputError(f"no gates file {path!r}; pass --gates=configs/post_gates.py")
    try:
        raw = load_preset(path).gates
    except Exception as e:  # noqa: BLE001 (any failure to load is the same bad input)
        raise GateInputError(f"{path}: cannot read its get_config().gates ({type(e).__name__}: {e})") from e
    gates = {}
    for name in raw.keys():
        checks = []
        for check in raw[name]:
            if len(check) != 3 or check[1] not in DIRECTIONS or not isinstance(check[2], (int, float)):
                raise GateInputError(f"{path}: gate {name!r} has check {tuple(check)!r}; each check is (metric, "
                                     f"direction in {DIRECTIONS}, numeric threshold)")
            checks.append((str(check[0]), str(check[1]), float(check[2])))
        gates[name] = checks
    return gates


def lookup(results: Any, metric: str) -> float | None:
    """The metric's value at a dotted path, or None when missing / not a finite number."""
    node = results
    for part in metric.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
        return None
    return float(node)


def evaluate(results: dict, checks: Sequence[tuple[str, str, float]]) -> tuple[bool, list[str]]:
    """(every check passed, one line per check)."""
    ok, lines = True, []
    for metric, direction, threshold in checks:
        value = lookup(results, metric)
        op = ">=" if direction == "higher" else "<="
        if value is None:
            ok = False
            lines.append(f"FAIL {metric}: missing (or not a finite number) in the results; needs {op} {threshold}")
            continue
        passed = value >= threshold if direction == "higher" else value <= threshold
        ok &= passed
        lines.append(f"{'PASS' if passed else 'FAIL'} {metric} = {value:.6g} (needs {op} {threshold:g})")
    return ok, lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mantis_jax.post.gates", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True, help="results JSON (a stage's <workdir>/results.json)")
    p.add_argument("--gate", required=True, help="transition name in the gates file, e.g. sft_to_dpo")
    p.add_argument("--gates", default=DEFAULT_GATES, help="gates file with get_config().gates")
    a = p.parse_args(argv)
    try:
        gates = load_gates(a.gates)
        if a.gate not in gates:
            raise GateInputError(f"unknown gate {a.gate!r}; {a.gates} defines {', '.join(sorted(gates))}")
        if not os.path.isfile(a.results):
            raise GateInputError(f"no results file {a.results!r}; run the stage first (it writes "
                                 "<workdir>/results.json)")
        try:
            with open(a.results, encoding="utf-8") as f:
                results = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GateInputError(f"{a.results} is not JSON ({e})") from None
    except GateInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return MISSING_INPUT
    ok, lines = evaluate(results, gates[a.gate])
    for line in lines:
        print(line)
    print(f"gate {a.gate}: {'PASS' if ok else 'FAIL'}")
    return PASS if ok else FAIL


if __name__ == "__main__":
    sys.exit(main())
