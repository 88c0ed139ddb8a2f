#!/usr/bin/env bash
# Runs the same command on every worker of a Cloud TPU pod slice; JAX finds the pod itself.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- python -m mmret.main --config=configs/solar.py --workdir=gs://bucket/run
#
# Copies the code of this checkout to ~/mmret on every worker: the files git tracks and new files
# it does not ignore, so no .git, run folders (/runs/), caches or virtual environments (add other
# run folders to .gitignore). A second launch unpacks over the same ~/mmret (files deleted here
# stay there). Each worker then installs mmret with jax[tpu] into ~/mmret-venv, a Python 3.11
# environment made by uv (TPU VM images ship Python 3.10; uv itself comes from pip --user when
# missing), and starts the command in ~/mmret with --distributed=auto on all workers at once.
# The workdir should be on shared storage (GCS).
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
if ! git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  echo "$repo is not a git checkout: $0 copies the files git tracks" >&2
  exit 2
fi
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
# Tracked and untracked-but-not-ignored files that exist (a deleted tracked file is left out).
(cd "$repo" && git ls-files -z --cached --others --exclude-standard --deduplicate \
  | while IFS= read -r -d '' f; do if [[ -f $f || -L $f ]]; then printf '%s\0' "$f"; fi; done \
  | tar -czf "$staging/mmret.tar.gz" --null --files-from=-)
gcloud compute tpus tpu-vm scp "$staging/mmret.tar.gz" "$tpu":mmret.tar.gz --zone "$zone" \
  --worker=all "${project_args[@]}"
remote='set -e
mkdir -p ~/mmret && tar -xzf ~/mmret.tar.gz -C ~/mmret && rm ~/mmret.tar.gz
export PATH="$HOME/.local/bin:$PATH"
command -v uv >/dev/null || python3 -m pip install -q --user uv
[ -x ~/mmret-venv/bin/python ] || uv venv -q --python 3.11 ~/mmret-venv
. ~/mmret-venv/bin/activate
cd ~/mmret && uv pip install -q -e ".[gcs]" "jax[tpu]"
'
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all "${project_args[@]}" \
  --command "$remote$(printf '%q ' "$@")--distributed=auto"
