#!/usr/bin/env bash
#SBATCH --job-name=opd-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=opd-jax-%j.log
# A multi-node GPU run under SLURM: one JAX process per node drives all of its GPUs, and
# jax.distributed finds the coordinator and the process ids from SLURM's environment
# (--distributed). Submit from the repository root, on a filesystem every node sees:
#
#   sbatch --nodes=4 launch/gpu_slurm.sh experiments.gkd_summarize \
#       --gin_file=experiments/configs/accelerator.gin --workdir=/shared/runs/gkd_4nodes
#
# The #SBATCH lines above are defaults; flags given to sbatch override them. The
# virtualenv (VENV, default .venv) is created on first use with jax[cuda12]. --workdir
# must be on the shared filesystem: checkpoints are written by all processes together.
# Every line of the log is led by its task's number (srun --label: "0: ...", "1: ...");
# `grep '^1: ' opd-jax-JOBID.log` is one node's output. DRY_RUN=1 prints the commands.
set -euo pipefail
# sbatch runs a copy of this script from its spool: find the launchers by the submit dir.
launch_dir=${SLURM_SUBMIT_DIR:+$SLURM_SUBMIT_DIR/launch}
source "${launch_dir:-$(dirname "${BASH_SOURCE[0]}")}/common.sh"

if [[ $# -lt 1 ]]; then
  sed -n '9,20p' "$0" >&2
  exit 2
fi
module=$1
shift
cd "${SLURM_SUBMIT_DIR:-.}"
venv=${VENV:-.venv}
if [[ ! -x $venv/bin/python ]]; then
  run python3 -m venv "$venv"
  run "$venv/bin/pip" install -q -r requirements.txt \
    "jax[cuda12]==$(sed -n 's/^jax==//p' requirements.txt)"
fi
run srun --label --kill-on-bad-exit=1 "$venv/bin/python" -m "$module" --distributed "$@"
