#!/usr/bin/env bash
# Runs the same command on every worker of a Cloud TPU pod slice; JAX finds the pod itself.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- python -m mmret.main --config=configs/solar.py --workdir=gs://bucket/run
#
# Copies this checkout to every worker (~/mmret), installs it, and starts the command with
# --distributed=auto on all workers at once. The workdir should be on shared storage (GCS).
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE [PROJECT] -- COMMAND..." >&2
  exit 2
fi
tpu=$1; zone=$2; shift 2
project_args=()
if [[ $1 != "--" ]]; then project_args=(--project "$1"); shift; fi
[[ $1 == "--" ]] || { echo "missing -- before the command" >&2; exit 2; }
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm scp --recurse "$repo" "$tpu":~/mmret --zone "$zone" --worker=all \
  "${project_args[@]}"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all "${project_args[@]}" \
  --command "cd ~/mmret && pip install -q -e . 'jax[tpu]' && $(printf '%q ' "$@") --distributed=auto"
