#!/usr/bin/env bash
# Runs N processes of the same command on this machine, as one multi-host JAX job.
#
#   launch/local.sh NUM_PROCESSES [DEVICES_PER_PROCESS] -- python -m mmret.main --config=... --workdir=...
#
# Each process gets --coordinator_address/--num_processes/--process_id; on CPU each gets
# DEVICES_PER_PROCESS fake devices (default 1) and gloo collectives. Logs: <workdir>/proc<i>.log
# when --workdir is given, else ./proc<i>.log. The script waits for all and fails if any fails.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 NUM_PROCESSES [DEVICES_PER_PROCESS] -- COMMAND..." >&2
  exit 2
fi
num=$1; shift
per=1
if [[ $1 != "--" ]]; then per=$1; shift; fi
[[ $1 == "--" ]] || { echo "missing -- before the command" >&2; exit 2; }
shift
port=${MMRET_COORDINATOR_PORT:-$((20000 + RANDOM % 20000))}
logdir=.
for arg in "$@"; do
  case $arg in --workdir=*) logdir=${arg#--workdir=} ;; esac
done
mkdir -p "$logdir"
pids=()
for ((i = 0; i < num; i++)); do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$per" \
  JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
    "$@" --coordinator_address=127.0.0.1:$port --num_processes=$num --process_id=$i \
    >"$logdir/proc$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $logdir/proc$i.log" >&2
    status=1
  fi
done
exit $status
