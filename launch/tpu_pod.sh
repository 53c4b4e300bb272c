#!/usr/bin/env bash
# Cloud TPU VM pod slice: install the project on every worker and start the same `mtgrpo train` on all
# of them with one command. On a pod, jax.distributed.initialize() finds the coordinator, the process
# count and this worker's id from the TPU metadata by itself, so no JAX_COORDINATOR_ADDRESS,
# JAX_NUM_PROCESSES or JAX_PROCESS_ID is needed.
#
# usage:
#   launch/tpu_pod.sh setup                          clone (or update) and install on every worker
#   launch/tpu_pod.sh train CONFIG [key=value ...]   start training on every worker
#   launch/tpu_pod.sh stop                           SIGTERM the training everywhere (it checkpoints)
#   launch/tpu_pod.sh logs [WORKER]                  follow a worker's training log (default 0)
#
# Environment:
#   TPU_NAME      name of the TPU VM                                    (required)
#   ZONE          its zone, e.g. us-central2-b                          (required)
#   PROJECT       GCP project                                (default: gcloud's configured one)
#   REPO_URL      git URL to clone in `setup`                (default: this checkout's origin)
#   REPO_REF      branch, tag or commit to check out         (default: this checkout's HEAD commit)
#   REMOTE_DIR    checkout on the workers, relative to $HOME or absolute     (default: mtgrpo_jax)
#   SETUP_PYTHON  Python >= 3.11 on the workers for the venv                 (default: python3)
#   DETACH        1: run under nohup and return at once, logs in REMOTE_DIR/logs/;
#                 0: stay attached and stream every worker's output         (default: 1)
#   TRAIN_ENV     extra "VAR=value ..." exported before training, e.g. "LIBTPU_INIT_ARGS=..."
#   GCLOUD_SSH_FLAGS  extra flags for `gcloud compute tpus tpu-vm ssh`, e.g. "--internal-ip"
#
# The run directory (output_dir=...) must be one place every worker can write: a gs:// bucket for
# orbax checkpoints, mounted with gcsfuse if metrics should land there too (metrics.jsonl is appended
# to, which needs a POSIX path; only worker 0 writes it), or a shared filesystem such as Filestore.
#
# example:
#   export TPU_NAME=my-v4-32 ZONE=us-central2-b
#   launch/tpu_pod.sh setup
#   launch/tpu_pod.sh train configs/paper/exp1.yaml output_dir=/mnt/gcs/runs/exp1 model.path=/mnt/gcs/qwen2.5-3b
#   launch/tpu_pod.sh logs 0
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

if (($# < 1)); then
  usage >&2
  exit 2
fi
action="$1"
shift
case "$action" in
  -h | --help) usage; exit 0 ;;
  setup | train | stop | logs) ;;
  *) echo "error: unknown action '$action' (setup | train | stop | logs)" >&2; exit 2 ;;
esac

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
remote_dir="${REMOTE_DIR:-mtgrpo_jax}"
detach="${DETACH:-1}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

gcloud_args=(compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE")
if [[ -n "${PROJECT:-}" ]]; then gcloud_args+=(--project "$PROJECT"); fi
if [[ -n "${GCLOUD_SSH_FLAGS:-}" ]]; then
  read -r -a extra_flags <<<"$GCLOUD_SSH_FLAGS"
  gcloud_args+=("${extra_flags[@]}")
fi

# Run a bash script on the given worker(s). Arguments are quoted with printf %q, so configs and
# overrides with spaces or shell characters reach the remote command unchanged.
on_workers() {
  local worker="$1" script="$2"
  shift 2
  local quoted=""
  if (($# > 0)); then quoted="$(printf ' %q' "$@")"; fi
  gcloud "${gcloud_args[@]}" --worker="$worker" --command "bash -c $(printf '%q' "$script") mtgrpo-remote$quoted"
}

# Remote test "is the training in logs/train.pid still running": the pid is alive, not a zombie, and
# still an mtgrpo process (not a recycled pid).
# shellcheck disable=SC2016  # expanded on the worker
running_fn='{ [[ -f logs/train.pid ]] && ps -o stat=,args= -p "$(cat logs/train.pid)" 2>/dev/null | grep -v "^Z" | grep -q mtgrpo; }'

case "$action" in
  setup)
    repo_url="${REPO_URL:-$(git -C "$here" remote get-url origin 2>/dev/null || true)}"
    repo_ref="${REPO_REF:-$(git -C "$here" rev-parse HEAD 2>/dev/null || true)}"
    if [[ -z "$repo_url" || -z "$repo_ref" ]]; then
      echo "error: set REPO_URL and REPO_REF (this checkout has no origin remote or commit)" >&2
      exit 2
    fi
    # shellcheck disable=SC2016  # expanded on the worker
    on_workers all '
      set -euo pipefail
      dir="$1"; url="$2"; ref="$3"; python="$4"
      if [[ ! -d "$dir/.git" ]]; then git clone --quiet "$url" "$dir"; fi
      cd "$dir"
      # Fetching the ref itself works for a branch, a tag or a (pushed) commit alike.
      git fetch --quiet origin "$ref"
      git checkout --quiet --detach FETCH_HEAD
      make install PYTHON="$python"
      # The pinned jax with its TPU runtime (libtpu), at the version constraints.txt pins.
      jax_version="$(.venv/bin/python -c "import jax; print(jax.__version__)")"
      .venv/bin/python -m pip install --quiet -c constraints.txt "jax[tpu]==$jax_version"
      .venv/bin/python -c "import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)"
    ' "$remote_dir" "$repo_url" "$repo_ref" "${SETUP_PYTHON:-python3}"
    ;;

  train)
    if (($# < 1)); then
      echo "error: usage: launch/tpu_pod.sh train CONFIG [key=value ...]" >&2
      exit 2
    fi
    # shellcheck disable=SC2016  # expanded on the worker
    on_workers all '
      set -euo pipefail
      dir="$1"; detach="$2"; train_env="$3"; shift 3
      cd "$dir"
      if [[ -n "$train_env" ]]; then
        read -r -a pairs <<<"$train_env"
        export "${pairs[@]}"
      fi
      if [[ "$detach" == 1 ]]; then
        mkdir -p logs
        if '"$running_fn"'; then
          echo "error: $(hostname): training already running (pid $(cat logs/train.pid)); stop it first" >&2
          exit 1
        fi
        setsid nohup .venv/bin/mtgrpo train --config "$@" >logs/train.log 2>&1 </dev/null &
        echo "$!" >logs/train.pid
        echo "$(hostname): started pid $!, log $PWD/logs/train.log"
      else
        exec .venv/bin/mtgrpo train --config "$@"
      fi
    ' "$remote_dir" "$detach" "${TRAIN_ENV:-}" "$@"
    ;;

  stop)
    # SIGTERM to the whole process group: the trainer writes a checkpoint and exits.
    # shellcheck disable=SC2016  # expanded on the worker
    on_workers all '
      set -euo pipefail
      cd "$1"
      if '"$running_fn"'; then
        kill -TERM -- "-$(cat logs/train.pid)"
        echo "$(hostname): sent SIGTERM to $(cat logs/train.pid)"
      else
        echo "$(hostname): no training running"
      fi
    ' "$remote_dir"
    ;;

  logs)
    worker="${1:-0}"
    # shellcheck disable=SC2016  # expanded on the worker
    on_workers "$worker" 'tail -n 200 -F "$1/logs/train.log"' "$remote_dir"
    ;;
esac
