#!/usr/bin/env bash
# Run one training as N cooperating local processes, each with K fake CPU devices, joined by
# jax.distributed -- the multi-host code path (process-local data, cross-process collectives, only
# process 0 writing) on one machine, without accelerators.
#
# usage:
#   launch/local_multiprocess.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [-l LOG_DIR] \
#       CONFIG [key=value ...]
#
#   -n  number of processes                     (env NUM_PROCESSES, default 2)
#   -d  fake CPU devices per process            (env DEVICES_PER_PROCESS, default 4)
#   -p  coordinator port on localhost           (env PORT, default: a free port)
#   -l  directory for the per-process logs      (env LOG_DIR, default: a new temporary directory)
#   CONFIG and the overrides go to `mtgrpo train --config CONFIG key=value ...` unchanged.
#
# Each process i gets:
#   JAX_PLATFORMS=cpu
#   XLA_FLAGS="$XLA_FLAGS --xla_force_host_platform_device_count=K" (any device count already in
#     XLA_FLAGS is dropped first)
#   JAX_COORDINATOR_ADDRESS=localhost:PORT  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i
# which mtgrpo_jax.parallel.initialize_distributed() passes to jax.distributed.initialize.
#
# Process 0's output goes to the terminal and LOG_DIR/process_0.log, the others' only to their logs.
# The script waits for all of them; if one fails it stops the rest (they would otherwise block in a
# collective forever), prints the tail of the failed log and exits with that process's status.
#
# MTGRPO_CMD overrides the program (default: .venv/bin/mtgrpo of this checkout, else `mtgrpo` on PATH);
# it is split on spaces, e.g. MTGRPO_CMD="python -m mtgrpo_jax.cli".
#
# example (the tiny demo on 2 processes x 4 devices):
#   launch/local_multiprocess.sh -n 2 -d 4 configs/demo.yaml output_dir=runs/demo_2proc
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

num_processes="${NUM_PROCESSES:-2}"
devices_per_process="${DEVICES_PER_PROCESS:-4}"
port="${PORT:-}"
log_dir="${LOG_DIR:-}"
while getopts ":n:d:p:l:h" opt; do
  case "$opt" in
    n) num_processes="$OPTARG" ;;
    d) devices_per_process="$OPTARG" ;;
    p) port="$OPTARG" ;;
    l) log_dir="$OPTARG" ;;
    h) usage; exit 0 ;;
    :) echo "error: -$OPTARG needs a value" >&2; exit 2 ;;
    *) echo "error: unknown option -$OPTARG (see -h)" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if (($# < 1)); then
  echo "error: missing CONFIG (usage: $0 [-n N] [-d K] [-p PORT] [-l LOG_DIR] CONFIG [key=value ...])" >&2
  exit 2
fi
config="$1"
shift

for pair in "num_processes:$num_processes" "devices_per_process:$devices_per_process"; do
  if ! [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: ${pair%%:*} must be a positive integer, got '${pair#*:}'" >&2
    exit 2
  fi
done

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${MTGRPO_CMD:-}" ]]; then
  read -r -a mtgrpo_cmd <<<"$MTGRPO_CMD"
elif [[ -x "$repo_root/.venv/bin/mtgrpo" ]]; then
  mtgrpo_cmd=("$repo_root/.venv/bin/mtgrpo")
else
  mtgrpo_cmd=(mtgrpo)
fi

if [[ -z "$port" ]]; then
  python_bin="$repo_root/.venv/bin/python"
  [[ -x "$python_bin" ]] || python_bin=python3
  port="$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')"
fi
if [[ -z "$log_dir" ]]; then
  log_dir="$(mktemp -d "${TMPDIR:-/tmp}/mtgrpo_local_mp.XXXXXX")"
fi
mkdir -p "$log_dir"

# Drop a device count the caller's XLA_FLAGS may carry (e.g. a test suite's), so K is the one that counts.
xla_flags="$(sed -E 's/(^| )--xla_force_host_platform_device_count=[^ ]*//g; s/^ +//' <<<"${XLA_FLAGS:-}")"
xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$devices_per_process"
echo "launching $num_processes processes x $devices_per_process CPU devices, coordinator localhost:$port," \
  "logs in $log_dir" >&2

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    if [[ -n "$pid" ]]; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

for ((i = 0; i < num_processes; i++)); do
  log="$log_dir/process_$i.log"
  env_vars=(
    JAX_PLATFORMS=cpu
    "XLA_FLAGS=$xla_flags"
    "JAX_COORDINATOR_ADDRESS=localhost:$port"
    "JAX_NUM_PROCESSES=$num_processes"
    "JAX_PROCESS_ID=$i"
  )
  if ((i == 0)); then
    env "${env_vars[@]}" "${mtgrpo_cmd[@]}" train --config "$config" "$@" > >(tee "$log") 2>&1 &
  else
    env "${env_vars[@]}" "${mtgrpo_cmd[@]}" train --config "$config" "$@" >"$log" 2>&1 &
  fi
  pids+=("$!")
done

# Reap processes as they finish; the first failure stops the others.
status=0
remaining="$num_processes"
while ((remaining > 0)); do
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}"
    [[ -n "$pid" ]] || continue
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" || rc=$?
    pids[i]=""
    remaining=$((remaining - 1))
    if ((rc != 0 && status == 0)); then
      status="$rc"
      echo "error: process $i exited with status $rc; stopping the others. Tail of $log_dir/process_$i.log:" >&2
      tail -n 30 "$log_dir/process_$i.log" >&2 || true
      stop_all
    fi
  done
  if ((remaining > 0)); then sleep 1; fi
done
exit "$status"
