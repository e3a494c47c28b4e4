"""The HumanEval sandbox: every program ends with a verdict and the machine is unharmed (a correct solution, a
wrong one, an endless loop, unbounded allocation, a socket, writes outside its folder); real HumanEval problems'
canonical solutions pass, wrong completions fail."""

import concurrent.futures
import os
import socket
import threading

import pytest

from mantis_jax.eval import formats, humaneval, sandbox

FAST = sandbox.Limits(timeout_s=0.5, memory_mb=256)


@pytest.fixture(scope="module")
def listener():
    """A TCP server on 127.0.0.1 that records whether anyone connected."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.2)
    hits, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                hits.append(1)
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1], hits
    stop.set()
    t.join()
    srv.close()


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel_layers", "python_guard_only"])
def test_hostile_programs_end_with_a_verdict(tmp_path, listener, kernel):
    port, hits = listener
    outside = tmp_path / "outside.txt"
    programs = {
        "correct": ("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n", "passed", ""),
        "wrong": ("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n", "failed", "AssertionError"),
        "loop": ("while True:\n    pass\n", "timeout", ""),
        "allocate": ("x = []\nwhile True:\n    x.append(bytearray(10 ** 8))\n", "failed", "MemoryError"),
        "socket": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n", "failed", ""),
        "raw_socket": (f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n",
                       "failed", ""),
        "write_outside": (f"open({str(outside)!r}, 'w').write('escaped')\n", "failed", "PermissionError"),
        "os_write_outside": (f"import os\nos.open({str(outside)!r}, os.O_CREAT | os.O_WRONLY)\n", "failed",
                             "PermissionError"),
        "write_inside": ("open('mine.txt', 'w').write('ok')\nassert open('mine.txt').read() == 'ok'\n", "passed", ""),
    }
    # Only the loop needs the short timeout; the others finish at once, so a long one costs nothing and keeps a
    # busy machine's slow start-ups from turning their verdicts into timeouts.
    short = sandbox.Limits(timeout_s=FAST.timeout_s, memory_mb=FAST.memory_mb, kernel=kernel)
    long = sandbox.Limits(timeout_s=10.0, memory_mb=FAST.memory_mb, kernel=kernel)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        verdicts = list(pool.map(lambda p: sandbox.run_program(p[0], short if p[1] == "timeout" else long),
                                 programs.values()))
    for (name, (_, status, detail)), v in zip(programs.items(), verdicts):
        assert v.status == status and detail in v.detail, (name, v)
        assert v.seconds < (FAST.timeout_s + sandbox.STARTUP_S + 1 if status == "timeout" else 30), (name, v)
    assert not outside.exists() and not hits  # nothing escaped: no file outside, no connection made
    assert "rlimits" in verdicts[0].layers and (kernel or verdicts[0].layers == ("rlimits",))


def test_canonical_solutions_pass_and_wrong_ones_fail():
    problems = formats.read_humaneval()
    picked = [problems[i] for i in (0, 2, 4, 12)]
    wrong = ["    return None\n", "    return 0.5\n", "    return 1.0\n", "    return None\n"]
    completions = [[p["canonical_solution"], w] for p, w in zip(picked, wrong)]
    verdicts = humaneval.check(picked, completions, sandbox.Limits(timeout_s=3.0), workers=2)
    assert [[v.status for v in vs] for vs in verdicts] == [["passed", "failed"]] * 4, verdicts
    assert humaneval.pass_at([vs[:1] for vs in verdicts], [1]) == {"pass@1": 1.0}
    assert humaneval.pass_at(verdicts, [1, 2]) == {"pass@1": 0.5, "pass@2": 1.0}
    assert os.path.basename(sandbox.CHILD) == "_sandbox_child.py"


def test_score_humaneval_runs_generated_completions():
    """score_humaneval end to end with an LM that writes each problem's canonical solution (plus text after a
    stop sequence, which must be cut), then one that writes a wrong body."""
    problems = formats.read_humaneval()[:3]
    solutions = {p["prompt"]: p["canonical_solution"] for p in problems}

    class LM:
        def __init__(self, wrong):
            self.wrong = wrong

        def generate(self, prompts, *, max_new_tokens, stop, temperature, seed):
            assert stop == humaneval.STOP and temperature == 0.0
            text = ["    return None\n" if self.wrong else solutions[p] for p in prompts]
            return [t + "\ndef junk(:\n" for t in text]  # a syntax error after the first stop sequence

    res = humaneval.score_humaneval(LM(False), problems, limits=sandbox.Limits(timeout_s=3.0))
    assert res["metrics"]["pass@1"] == 1.0 and res["metrics"]["n"] == 3
    assert all(s["status"] == ["passed"] for s in res["samples"])
    assert humaneval.score_humaneval(LM(True), problems, limits=sandbox.Limits(timeout_s=3.0))["metrics"][
        "pass@1"] == 0.0
