#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh: run on every TPU VM of a slice, from the copied
# checkout, it installs the code, starts the job detached and follows or stops it.
#
#   launch/tpu_worker.sh setup                 virtualenv: requirements.txt and jax[tpu]
#   launch/tpu_worker.sh start MODULE [FLAGS]  python -m MODULE --distributed FLAGS, detached
#   launch/tpu_worker.sh logs [LINES]          this worker's log, each line led by [worker I]
#   launch/tpu_worker.sh stop                  SIGTERM to the job (it checkpoints and exits)
#
# The job runs under nohup in its own session, so it outlives the ssh connection that
# started it; its output goes to LOG_DIR/worker-I.log (LOG_DIR defaults to ~/opd_jax_logs)
# and its process id to LOG_DIR/job.pid. I is the worker's index in the slice, from the TPU
# VM metadata (WORKER_ID overrides it). Environment: FOLLOW=0 makes `logs` print and exit,
# PYTHON the interpreter (default .venv/bin/python), STOP_TIMEOUT_S how long `stop` waits
# (default 120), DRY_RUN=1 makes `setup` print its commands instead of running them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

repo=$(cd "$(dirname "$0")/.." && pwd)
log_dir=${LOG_DIR:-$HOME/opd_jax_logs}
pid_file=$log_dir/job.pid
metadata=http://metadata.google.internal/computeMetadata/v1/instance/attributes

worker_id() {
  if [[ -n ${WORKER_ID:-} ]]; then
    echo "$WORKER_ID"
  else
    curl -sf -m 5 -H 'Metadata-Flavor: Google' "$metadata/agent-worker-number" || hostname
  fi
}

running() {
  [[ -f $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

make_venv() {
  # jax needs Python 3.11+; the TPU VM images ship 3.10, so uv provides one there.
  if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    run python3 -m venv .venv
  else
    run python3 -m pip install -q --user uv
    run "$HOME/.local/bin/uv" venv -q --seed --python 3.11 .venv
  fi
}

setup() {
  cd "$repo"
  local jax_version
  jax_version=$(sed -n 's/^jax==//p' requirements.txt)
  if [[ -n ${DRY_RUN:-} || ! -x .venv/bin/python ]]; then
    make_venv
  fi
  run .venv/bin/pip install -q -r requirements.txt "jax[tpu]==$jax_version"
}

start() {
  [[ $# -ge 1 ]] || die "start needs the experiment's MODULE"
  local module=$1 id log
  shift
  id=$(worker_id)
  log=$log_dir/worker-$id.log
  mkdir -p "$log_dir"
  if running; then
    die "[worker $id] a job is already running (pid $(cat "$pid_file")); stop it first"
  fi
  cd "$repo"
  echo "=== $(date -u +%FT%TZ) python -m $module --distributed $*" >>"$log"
  nohup setsid "${PYTHON:-.venv/bin/python}" -m "$module" --distributed "$@" \
    >>"$log" 2>&1 </dev/null &
  echo $! >"$pid_file"
  echo "[worker $id] started pid $!, log $log"
}

logs() {
  local id log follow=(-F)
  id=$(worker_id)
  log=$log_dir/worker-$id.log
  [[ -f $log ]] || die "[worker $id] no log at $log: no job was started here"
  if [[ ${FOLLOW:-1} == 0 ]]; then
    follow=()
  fi
  tail -n "${1:-50}" "${follow[@]}" "$log" | sed -u "s/^/[worker $id] /"
}

stop() {
  local id pid
  id=$(worker_id)
  if ! running; then
    rm -f "$pid_file"
    echo "[worker $id] no job running"
    return
  fi
  pid=$(cat "$pid_file")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for ((waited = 0; waited < ${STOP_TIMEOUT_S:-120}; waited++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$pid_file"
      echo "[worker $id] stopped pid $pid"
      return
    fi
    sleep 1
  done
  die "[worker $id] pid $pid still running after ${STOP_TIMEOUT_S:-120}s; kill -9 -$pid ends it"
}

case ${1:-} in
  setup | start | logs | stop)
    command=$1
    shift
    "$command" "$@"
    ;;
  *)
    sed -n '5,8p' "$0" >&2
    exit 2
    ;;
esac
