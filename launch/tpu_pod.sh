#!/usr/bin/env bash
# An experiment on every worker of a Cloud TPU VM slice, detached: the job outlives this
# terminal, every worker keeps its own log, and later commands follow or stop it.
#
#   launch/tpu_pod.sh create NAME ZONE ACCELERATOR    the slice, on the type's runtime image
#   launch/tpu_pod.sh run NAME ZONE ACCELERATOR MODULE [FLAGS...]   copy, install, start the job
#   launch/tpu_pod.sh logs NAME ZONE [LINES]          follow all workers' logs, led by [worker I]
#   launch/tpu_pod.sh stop NAME ZONE                  SIGTERM the job everywhere (it checkpoints)
#   launch/tpu_pod.sh delete NAME ZONE                delete the slice
#
#   launch/tpu_pod.sh run opd-v4 us-central2-b v4-32 experiments.gkd_summarize \
#       --gin_file=experiments/configs/accelerator.gin --gin_param='make_mesh.shape=(-1, 4, 1)' \
#       --workdir=gs://YOUR_BUCKET/runs/gkd_v4
#
# `run` creates the slice if it does not exist, copies this checkout's tracked files to
# every worker, installs requirements.txt and jax[tpu] in a virtualenv there, and starts
# `python -m MODULE --distributed FLAGS` under nohup on each (launch/tpu_worker.sh), logging
# to ~/opd_jax_logs/worker-I.log. The processes find each other through the TPU metadata;
# checkpoints are written collectively, so --workdir must be a path every worker sees (a
# gs:// bucket). After `stop`, `run` again resumes from the newest checkpoint.
#
# The runtime image follows the accelerator type: v2/v3/v4 tpu-ubuntu2204-base, v5e
# (v5litepod-N) v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e. Environment:
# TPU_VERSION (another image), PROJECT (gcloud project, else gcloud's default), SPOT=1 (a
# spot slice), REMOTE_DIR (the checkout on the workers, default opd-jax in their home),
# FOLLOW=0 (`logs` prints and exits), DRY_RUN=1 (print the gcloud commands, run none).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

repo=$(cd "$(dirname "$0")/.." && pwd)
remote_dir=${REMOTE_DIR:-opd-jax}
worker="bash $remote_dir/launch/tpu_worker.sh"

usage() {
  sed -n '5,9p' "$0" >&2
  exit 2
}

runtime_image() {
  if [[ -n ${TPU_VERSION:-} ]]; then
    echo "$TPU_VERSION"
    return
  fi
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "accelerator type '$1' is not v4-N, v5litepod-N, v5p-N or v6e-N; set TPU_VERSION" ;;
  esac
}

tpu() {  # VERB NAME [ARGS...]: a gcloud TPU VM command in the slice's zone and project
  local verb=$1 target=$2
  shift 2
  run gcloud compute tpus tpu-vm "$verb" "$target" --zone="$zone" \
    ${PROJECT:+--project="$PROJECT"} "$@"
}

on_workers() {  # COMMAND: one shell command on every worker at once
  tpu ssh "$name" --worker=all --command="$1"
}

create() {
  local accelerator=$1 image
  image=$(runtime_image "$accelerator")
  tpu create "$name" --accelerator-type="$accelerator" --version="$image" ${SPOT:+--spot}
}

exists() {
  [[ -z ${DRY_RUN:-} ]] && tpu describe "$name" >/dev/null 2>&1
}

start() {
  local accelerator=$1 module=$2 archive job
  shift 2
  runtime_image "$accelerator" >/dev/null
  exists || create "$accelerator"
  staging=$(mktemp -d)
  trap 'rm -rf "$staging"' EXIT
  archive=$staging/opd-jax.tar.gz
  git -C "$repo" ls-files -z | tar -C "$repo" --null -czf "$archive" -T -
  run gcloud compute tpus tpu-vm scp "$archive" "$name:opd-jax.tar.gz" --worker=all \
    --zone="$zone" ${PROJECT:+--project="$PROJECT"}
  job=$(printf '%q ' "$module" "$@")
  on_workers "set -euo pipefail; mkdir -p $remote_dir; tar -xzf opd-jax.tar.gz -C $remote_dir; \
$worker setup; $worker start ${job% }"
}

[[ $# -ge 3 ]] || usage
subcommand=$1 name=$2 zone=$3
shift 3
case $subcommand in
  create)
    (($# == 1)) || usage
    create "$1"
    ;;
  run)
    (($# >= 2)) || usage
    start "$@"
    ;;
  logs)
    lines=${1:-50}
    (($# <= 1)) && [[ $lines =~ ^[0-9]+$ ]] || usage
    on_workers "FOLLOW=${FOLLOW:-1} $worker logs $lines"
    ;;
  stop)
    (($# == 0)) || usage
    on_workers "$worker stop"
    ;;
  delete)
    (($# == 0)) || usage
    tpu delete "$name"
    ;;
  *) die "unknown subcommand '$subcommand': create, run, logs, stop or delete" ;;
esac
