#!/usr/bin/env bash
# Renders launch/k8s/{indexed-job,jobset}.yaml and applies it with kubectl; every argument after "--" goes
# straight to `python -m mantis_jax.train` in each pod.
#
#   launch/k8s/submit.sh --nodes=4 --image=registry/mantis:latest -- \
#       --config=configs/base.py --workdir=/runs/base --config.data.batch_size=32 --config.train.grad_accum=8
#
# Options: --nodes=N (pods, one per node; default 1) --gpus=G (per pod; default 8) --image=IMG (required)
# --name=NAME (default mantis) --pvc=CLAIM (shared volume mounted at /runs; default mantis-runs)
# --kind=job|jobset (default job: Indexed Job + headless Service) --dry-run (print the manifest, apply nothing)
set -euo pipefail

NAME=mantis NODES=1 GPUS=8 IMAGE="" PVC=mantis-runs KIND=job DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;;
    --gpus=*) GPUS="${1#*=}" ;;
    --image=*) IMAGE="${1#*=}" ;;
    --name=*) NAME="${1#*=}" ;;
    --pvc=*) PVC="${1#*=}" ;;
    --kind=*) KIND="${1#*=}" ;;
    --dry-run) DRY=1 ;;
    --) shift; break ;;
    *) echo "launch/k8s/submit.sh: unknown option $1 (training arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$IMAGE" ]] || { echo "launch/k8s/submit.sh: --image=IMG is required (an image with mantis_jax installed)" >&2; exit 2; }
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || { echo "launch/k8s/submit.sh: --nodes=$NODES must be a positive integer" >&2; exit 2; }
[[ "$KIND" == job || "$KIND" == jobset ]] || { echo "launch/k8s/submit.sh: --kind=$KIND must be job or jobset" >&2; exit 2; }
[[ "$NAME" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || { echo "launch/k8s/submit.sh: --name=$NAME must be a DNS label (a-z, 0-9, -)" >&2; exit 2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATE="$HERE/indexed-job.yaml"
[[ "$KIND" == jobset ]] && TEMPLATE="$HERE/jobset.yaml"
PY="$(command -v python3 || command -v python)"
# The training arguments become a YAML flow list (JSON is valid YAML), so quoting survives any override value.
manifest="$(NAME="$NAME" NODES="$NODES" GPUS="$GPUS" IMAGE="$IMAGE" PVC="$PVC" "$PY" - "$TEMPLATE" "$@" <<'PYEOF'
import json, os, string, sys
text = open(sys.argv[1]).read()
values = {k: os.environ[k] for k in ("NAME", "NODES", "GPUS", "IMAGE", "PVC")}
values["ARGS"] = json.dumps(sys.argv[2:])
print(string.Template(text).substitute(values))
PYEOF
)"
if ((DRY)); then
  printf '%s\n' "$manifest"
else
  printf '%s\n' "$manifest" | kubectl apply -f -
fi
