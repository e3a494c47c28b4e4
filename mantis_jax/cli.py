"""Command-line configs: `--config=configs/tiny.py --config.moe.n_experts=8`, with one clear error on bad input.

Every entry point defines its flags with `define_config_flag()` and starts with `cli.run(main)`; programs and
tests that are not absl apps call `load_config(argv)`. Overrides are checked against the preset before absl parses
them (config_flags alone answers an unknown key with a traceback), then `validate()` runs on the result.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import platform
import sys
from typing import Callable, Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from mantis_jax.config import ConfigError, validate

DEFAULT_PRESET = os.path.join(os.path.dirname(__file__), "..", "configs", "micro.py")
HELP = "Preset file (configs/*.py); override any field with --config.<section>.<key>=<value>"
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"


def reexec_with_malloc_tunables() -> None:
    """Restart this process once with glibc's malloc backing its large blocks with transparent huge pages.

    XLA:CPU allocates a step's temporary buffers afresh on every call, and glibc serves blocks above its mmap
    threshold with fresh mappings, so every step page-faults its whole working set back in: ~96,000 faults (375 MiB)
    per micro train step, ~60,000 for the demo's. With `glibc.malloc.hugetlb=1` those mappings are huge pages:
    ~500 faults a step and 15-25% faster CPU steps (docs/perf/train_step.md). glibc reads GLIBC_TUNABLES only at
    start-up, hence the re-exec; call this only from a `__main__` block (it replaces the running process). Skipped
    off Linux/glibc, when GLIBC_TUNABLES is already set (the user's choice stands) or MANTIS_NO_REEXEC=1.
    """
    if (sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or "GLIBC_TUNABLES" in os.environ
            or os.environ.get("MANTIS_NO_REEXEC") == "1"):
        return
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def define_config_flag(default: str = DEFAULT_PRESET, flag_values: flags.FlagValues = flags.FLAGS):
    return config_flags.DEFINE_config_file("config", os.path.normpath(default), HELP, flag_values=flag_values,
                                           lock_config=True)


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass --config=configs/<preset>.py "
                          f"(presets: {', '.join(_presets())})")


def load_preset(path: str) -> ml_collections.ConfigDict:
    _check_file(path)
    spec = importlib.util.spec_from_file_location(f"_preset_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _presets() -> list[str]:
    root = os.path.dirname(DEFAULT_PRESET)
    return sorted(f[:-3] for f in os.listdir(root) if f.endswith(".py") and not f.startswith("_"))


def _config_path(argv: Sequence[str], default: str) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def check_overrides(argv: Sequence[str], default: str = DEFAULT_PRESET) -> None:
    """Raises ConfigError for an override whose key is not in the preset, naming the closest keys."""
    _check_file(_config_path(argv, default))
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if not overrides:
        return
    config = load_preset(_config_path(argv, default))
    known = _all_keys(config)
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.8)
            hint = f"; did you mean {', '.join('config.' + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key config.{key}{hint} (see mantis_jax/config.py for all keys)")


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in config.items():
        keys.append(prefix + name)
        if isinstance(value, ml_collections.ConfigDict):
            keys += _all_keys(value, prefix + name + ".")
    return keys


def load_config(argv: Sequence[str], default: str = DEFAULT_PRESET) -> ml_collections.ConfigDict:
    """Parses `--config=...` and `--config.x=y` from argv (argv[0] is the program) and validates the result."""
    check_overrides(argv, default)
    flag_values = flags.FlagValues()
    args = [argv[0] if argv else "mantis"] + [a for a in argv[1:] if a.startswith("--config")]
    saved_argv = sys.argv
    sys.argv = args  # config_flags reads sys.argv to find the file whose fields it turns into override flags
    try:
        holder = define_config_flag(_config_path(argv, default), flag_values)
        flag_values(args)
    except flags.Error as e:
        raise ConfigError(str(e)) from None
    finally:
        sys.argv = saved_argv
    return validate(holder.value)


def fail(error: Exception) -> None:
    """Prints one line and exits with status 2: how every CLI reports bad input."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)` with the config checked first and ConfigError printed as one line (exit status 2)."""
    try:
        check_overrides(sys.argv)
    except ConfigError as e:
        fail(e)

    def checked(argv):
        try:
            validate(flags.FLAGS.config)
            return main(argv)
        except ConfigError as e:
            fail(e)

    app.run(checked)
