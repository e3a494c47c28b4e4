#!/usr/bin/env bash
# N processes of one job on this host, each calling jax.distributed.initialize from MANTIS_* variables
# (mantis_jax/parallel/distributed.py); CPU processes exchange collectives over gloo.
#
#   launch/local.sh N [--config=configs/micro.py --workdir=runs/x --config.mesh.fsdp=4 ...]
#   launch/local.sh N python -m mantis_jax.train --config=...     (any command)
#
# With no command, or arguments that start with "--", the command is `python -m mantis_jax.train` and every
# argument is passed straight through (config overrides included). Environment knobs:
#   MANTIS_CPU_DEVICES=K   fake CPU devices per process (sets XLA_FLAGS, JAX_PLATFORMS=cpu)
#   MANTIS_PORT=P          coordinator port (default: a free one)
#   PYTHON=...             interpreter (default: .venv/bin/python when present, else python3)
#   MANTIS_STOP_TIMEOUT=S  seconds the processes get to save and exit after a stop request (default 300)
# Every output line is prefixed with "[p<i>] ". If one process fails, the others are stopped (SIGTERM, SIGKILL after
# 10 s: without the failed one their collectives cannot finish) and the exit status is that process's.
# SIGTERM or SIGINT (Ctrl-C) to this script is forwarded to every process as SIGTERM: the trainer's processes agree
# on a step, save a checkpoint there and exit (re-run the same command to resume). The script waits for them
# (SIGKILL after MANTIS_STOP_TIMEOUT, or at once on a second signal) and exits 128 + the signal's number.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: launch/local.sh N [command ...] (N >= 1 processes; default command: python -m mantis_jax.train)" >&2
  exit 2
fi
N=$1
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ $# -eq 0 || "$1" == --* ]]; then
  set -- "$PYTHON" -m mantis_jax.train "$@"
fi
PORT="${MANTIS_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${MANTIS_CPU_DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${MANTIS_CPU_DEVICES}"
fi

pids=()
stopping=0
signal_status=0

kill_at=""  # SECONDS at which processes asked to stop are killed

stop_children() {  # $1: the signal; $2: seconds before SIGKILL
  for pid in "${pids[@]}"; do kill -"$1" "$pid" 2>/dev/null || true; done
  if [[ -z "$kill_at" ]]; then kill_at=$((SECONDS + $2)); fi
}

on_signal() {  # $1: the exit status this script will report (128 + signal number)
  if ((stopping)); then
    echo "launch/local.sh: second stop request: killing the processes" >&2
    kill_at=$SECONDS
  else
    stopping=1
    signal_status=$1
    echo "launch/local.sh: stop requested: the processes save a checkpoint and exit" >&2
    stop_children TERM "${MANTIS_STOP_TIMEOUT:-300}"
  fi
  return 0  # (a bare return would hand back the interrupted wait's status, and errexit would end the script)
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

for ((i = 0; i < N; i++)); do
  MANTIS_COORDINATOR="127.0.0.1:$PORT" MANTIS_NUM_PROCESSES="$N" MANTIS_PROCESS_ID="$i" \
    "$@" > >(sed -u "s/^/[p$i] /") 2> >(sed -u "s/^/[p$i] /" >&2) &
  pids+=($!)
done

status=0
ended() {  # $1: pid, $2: its exit status
  if (($2 != 0 && status == 0)); then
    status=$2
    if ((!stopping)); then
      echo "launch/local.sh: process $1 exited with status $2; stopping the others" >&2
      stopping=1
      stop_children TERM 10
    fi
  fi
}

# Polled rather than `wait -n`: a trap that interrupts `wait -n` can lose the status of a process it reaped. The
# shell reaps each ended process and keeps its status for `wait PID`. The pause is a background sleep and `wait`,
# which a trapped signal interrupts at once (a foreground sleep would make bash drop a SIGINT its child ignored).
live=("${pids[@]}")
while ((${#live[@]} > 0)); do
  next=()
  for pid in "${live[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      next+=("$pid")
    else
      set +e
      wait "$pid"
      rc=$?
      set -e
      ended "$pid" "$rc"
    fi
  done
  live=("${next[@]+"${next[@]}"}")
  if [[ -n "$kill_at" ]] && ((SECONDS >= kill_at)); then
    for pid in "${live[@]+"${live[@]}"}"; do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  if ((${#live[@]} > 0)); then
    sleep 0.5 &
    pause=$!
    wait "$pause" || true
  fi
done
if [[ -n "${pause:-}" ]]; then kill "$pause" 2>/dev/null || true; fi
if ((status == 0)); then status=$signal_status; fi
exit "$status"
