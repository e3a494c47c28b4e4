"""Entry points restart once with huge-page malloc (cli.reexec_with_malloc_tunables), unless told not to."""

import os
import platform
import subprocess
import sys

import pytest

from mantis_jax import cli

SCRIPT = """
import os, sys
print("start", flush=True)
from mantis_jax import cli
cli.reexec_with_malloc_tunables()
print("tunables", repr(os.environ.get("GLIBC_TUNABLES")), "argv", sys.argv[1:], flush=True)
"""

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="the re-exec applies to Linux/glibc only")


def _run(tmp_path, **env_changes):
    script = tmp_path / "entry.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MANTIS_NO_REEXEC")}
    env.update(env_changes, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__))))
    out = subprocess.run([sys.executable, str(script), "--flag=1", "two words"], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.splitlines()


def test_restarts_once_with_hugepage_malloc_and_the_same_arguments(tmp_path):
    lines = _run(tmp_path)
    assert lines == ["start", "start", f"tunables {cli.MALLOC_TUNABLES!r} argv ['--flag=1', 'two words']"]


@pytest.mark.parametrize("env", [{"GLIBC_TUNABLES": ""}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                 {"MANTIS_NO_REEXEC": "1"}])
def test_a_users_setting_or_opt_out_is_left_alone(tmp_path, env):
    lines = _run(tmp_path, **env)
    assert lines == ["start", f"tunables {env.get('GLIBC_TUNABLES')!r} argv ['--flag=1', 'two words']"]
