#!/usr/bin/env bash
# Runs an experiment on every worker of a Cloud TPU VM slice (creating the slice if it
# does not exist): copies this checkout to all workers, bootstraps a virtualenv there,
# starts the experiment on --worker=all and streams every worker's output here.
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR MODULE [EXPERIMENT FLAGS...]
#   launch/tpu_pod.sh opd-v4 us-central2-b v4-32 experiments.gkd_summarize \
#       --gin_file=experiments/configs/accelerator.gin --gin_param='make_mesh.shape=(-1, 4, 1)' \
#       --workdir=gs://YOUR_BUCKET/runs/gkd_v4
#
# The processes find each other through the TPU metadata (--distributed); checkpoints
# are written collectively, so --workdir must be a path every worker sees (a gs:// bucket
# or a shared disk). Rerunning the same command resumes.
#
# Environment: PROJECT (gcloud project, else gcloud's default), TPU_VERSION (VM runtime,
# default tpu-ubuntu2204-base), SPOT=1 for a spot slice, REMOTE_DIR (default opd-jax, in
# the workers' home), DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,9p' "$0" >&2
  exit 2
fi
name=$1 zone=$2 accelerator=$3 module=$4
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)
remote_dir=${REMOTE_DIR:-opd-jax}
jax_version=$(sed -n 's/^jax==//p' "$repo/requirements.txt")
tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone" ${PROJECT:+--project="$PROJECT"})

run() {
  if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [[ -n ${DRY_RUN:-} ]] || ! "${tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  run "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" \
    --version="${TPU_VERSION:-tpu-ubuntu2204-base}" ${SPOT:+--spot}
fi

archive=$(mktemp -d)/opd-jax.tar.gz
git -C "$repo" ls-files -z | tar -C "$repo" --null -czf "$archive" -T -
run "${tpu[@]}" scp "$archive" "$name:opd-jax.tar.gz" --worker=all "${where[@]}"

flags=$(printf '%q ' "$@")
bootstrap="set -euo pipefail; mkdir -p $remote_dir; tar -xzf opd-jax.tar.gz -C $remote_dir; \
cd $remote_dir; [[ -x .venv/bin/python ]] || python3 -m venv .venv; \
.venv/bin/pip install -q -r requirements.txt 'jax[tpu]==$jax_version'; \
.venv/bin/python -m $module --distributed $flags"
run "${tpu[@]}" ssh "$name" --worker=all "${where[@]}" --command="$bootstrap"
