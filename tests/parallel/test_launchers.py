"""Launchers pass config overrides straight through and give each process its MANTIS_* coordinates: local.sh,
the SLURM batch script (with stand-in scontrol/srun) and the Kubernetes manifests (rendered, parsed); local.sh
forwards stop requests to its processes and waits for them."""

import os
import signal
import subprocess
import textwrap
import time

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = ["--config=configs/base.py", "--config.mesh.fsdp=8", "--config.name=two words"]


def _script(path, body):
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


@pytest.fixture()
def fake_python(tmp_path):
    """Stands in for the interpreter: prints what a training process would receive."""
    return _script(tmp_path / "python", """\
        printf 'id=%s n=%s coord=%s local=%s |' "$MANTIS_PROCESS_ID" "$MANTIS_NUM_PROCESSES" \\
            "$MANTIS_COORDINATOR" "${MANTIS_LOCAL_DEVICE_IDS:-}"
        printf ' <%s>' "$@"; echo
        """)


def _lines(out):
    return sorted(line.split("] ", 1)[-1] for line in out.splitlines() if "id=" in line)


def test_local_sh_defaults_to_the_trainer_and_passes_overrides(fake_python):
    env = dict(os.environ, PYTHON=fake_python, MANTIS_PORT="23456")
    out = subprocess.run(["bash", f"{ROOT}/launch/local.sh", "2", *OVERRIDES], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    args = " <-m> <mantis_jax.train> <--config=configs/base.py> <--config.mesh.fsdp=8> <--config.name=two words>"
    assert _lines(out.stdout) == [f"id={i} n=2 coord=127.0.0.1:23456 local= |{args}" for i in range(2)]


@pytest.mark.parametrize("tasks_per_node,local", [("1", ["", ""]), ("2(x1)", ["0", "1"])])
def test_slurm_script_sets_coordinates_per_task(tmp_path, fake_python, tasks_per_node, local):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "scontrol", 'echo gpu-node-07; echo gpu-node-08\n')
    _script(bin_dir / "srun", """\
        while [[ "$1" == --* ]]; do shift; done
        for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@"; done
        """)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=fake_python, SLURM_NTASKS="2",
               SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_NTASKS_PER_NODE=tasks_per_node, SLURM_JOB_NUM_NODES="2",
               SLURM_SUBMIT_DIR=ROOT)
    out = subprocess.run(["bash", f"{ROOT}/launch/slurm/train.sbatch", *OVERRIDES], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    args = " <-m> <mantis_jax.train> <--config=configs/base.py> <--config.mesh.fsdp=8> <--config.name=two words>"
    assert _lines(out.stdout) == [f"id={i} n=2 coord=gpu-node-07:12355 local={local[i]} |{args}" for i in range(2)]
    assert "coordinator gpu-node-07:12355" in out.stdout


@pytest.mark.parametrize("kind", ["job", "jobset"])
def test_k8s_manifest_renders_with_headless_coordinator(kind):
    out = subprocess.run(["bash", f"{ROOT}/launch/k8s/submit.sh", "--nodes=4", "--image=reg/mantis:1",
                          f"--kind={kind}", "--name=run1", "--dry-run", "--", *OVERRIDES],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    if kind == "job":
        service, job = docs
        assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
        assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 4
        pod = job["spec"]["template"]["spec"]
        assert pod["subdomain"] == "run1"
        coordinator = "run1-0.run1:12355"
    else:
        (jobset,) = docs
        assert jobset["kind"] == "JobSet" and jobset["spec"]["network"]["enableDNSHostnames"] is True
        pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
        coordinator = "run1-workers-0-0.run1:12355"
    container = pod["containers"][0]
    assert container["args"] == OVERRIDES and container["image"] == "reg/mantis:1"
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["MANTIS_COORDINATOR"] == coordinator and env["MANTIS_NUM_PROCESSES"] == "4"
    assert "job-completion-index" in env["MANTIS_PROCESS_ID"]["fieldRef"]["fieldPath"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_k8s_submit_rejects_bad_options():
    out = subprocess.run(["bash", f"{ROOT}/launch/k8s/submit.sh", "--nodes=2", "--dry-run"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "--image=IMG is required" in out.stderr


def _pids_running(marker):
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            pass
    return out


@pytest.mark.parametrize("child,signals,expected_rc", [
    ("saves", [signal.SIGTERM], 143),  # forwarded, waited for, 128 + SIGTERM
    ("saves", [signal.SIGINT], 130),  # Ctrl-C: forwarded as SIGTERM
    ("ignores", [signal.SIGTERM], 137),  # killed after MANTIS_STOP_TIMEOUT
    ("ignores", [signal.SIGTERM, signal.SIGINT], 137),  # a second request kills at once
])
def test_local_sh_forwards_stop_requests_and_waits(tmp_path, child, signals, expected_rc):
    on_term = ('echo "saving $MANTIS_PROCESS_ID"; sleep 0.3; echo "saved $MANTIS_PROCESS_ID"; exit 0'
               if child == "saves" else 'echo "ignoring $MANTIS_PROCESS_ID"')
    fake = _script(tmp_path / "python", f"""\
        trap '{on_term}' TERM
        echo "up $MANTIS_PROCESS_ID"
        while true; do sleep 0.05; done
        """)
    env = dict(os.environ, PYTHON=fake, MANTIS_PORT="23457",
               MANTIS_STOP_TIMEOUT="30" if len(signals) > 1 else "1")
    # A terminal's Ctrl-C reaches a launcher whose SIGINT is at its default; a job started in the background of a
    # non-interactive shell (`cmd &`, e.g. a CI runner's) inherits SIGINT ignored, and bash cannot trap a signal
    # ignored on entry: restore the default so the test sees what a user's Ctrl-C does.
    launcher = subprocess.Popen(["bash", f"{ROOT}/launch/local.sh", "2", "--config.name=x"], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        up = [launcher.stdout.readline() for _ in range(2)]
        assert sorted(line.split("] ", 1)[-1].strip() for line in up) == ["up 0", "up 1"], up
        t0 = time.monotonic()
        for sig in signals:
            launcher.send_signal(sig)
            time.sleep(0.3)
        out, _ = launcher.communicate(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        launcher.kill()
        for pid in _pids_running(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)
    assert launcher.returncode == expected_rc, out
    assert "unbound variable" not in out
    assert _pids_running(str(tmp_path)) == []  # the launcher waited for its processes
    if child == "saves":
        assert "saved 0" in out and "saved 1" in out
    elif len(signals) > 1:
        assert elapsed < 10 and "second stop request" in out
