#!/usr/bin/env bash
# Trains on a SLURM GPU cluster: writes an sbatch script (one process per GPU, started by srun)
# and submits it.
#
#   launch/slurm.sh [--dry_run] CONFIG WORKDIR [FLAGS...]
#   NODES=4 GPUS_PER_NODE=8 launch/slurm.sh configs/tokenizer.py:data=coinrun \
#       /shared/workdirs/tok_cr --config.total_steps=20000
#
# The job runs, on every task: python -m genie_jax.cli.train --config=CONFIG --workdir=WORKDIR
#   --distributed=yes FLAGS...; JAX reads the coordinator, process count and ids from SLURM's
#   environment (SLURM_JOB_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID) and gives each
#   process its own GPU.
# Flags passed to genie_jax.cli.train: --config=CONFIG --workdir=WORKDIR --distributed=yes FLAGS...
# Environment: NODES (default 1), GPUS_PER_NODE (default 8), PARTITION, ACCOUNT, TIME (default
#   24:00:00), CPUS_PER_TASK (default 8), JOB_NAME (default genie-jax), DATA_DIR (optional:
#   --config.data.data_dir), SETUP (optional shell line run before training, e.g.
#   "source ~/venvs/genie/bin/activate"; default: activate ./.venv if present). genie_jax must be
#   installed (`pip install -e . "jax[cuda12]"`) where the job runs.
# WORKDIR and DATA_DIR must be on a filesystem every node shares. Logs: WORKDIR/slurm-JOBID.out.
# --dry_run prints the sbatch script and the sbatch command instead of submitting.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
dry_run=0
while [[ $# -gt 0 && "$1" == -* ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry_run) dry_run=1 ;;
    *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 2 ]]; then usage >&2; exit 2; fi
config="$1"; workdir="$2"; shift 2

gpus="${GPUS_PER_NODE:-8}"
main_flags=(--config="${config}" --workdir="${workdir}" --distributed=yes "$@")
[[ -n "${DATA_DIR:-}" ]] && main_flags+=(--config.data.data_dir="${DATA_DIR}")
repo="$(cd "$(dirname "$0")/.." && pwd)"
setup="${SETUP:-if [[ -f .venv/bin/activate ]]; then source .venv/bin/activate; fi}"

script="#!/usr/bin/env bash
#SBATCH --job-name=${JOB_NAME:-genie-jax}
#SBATCH --nodes=${NODES:-1}
#SBATCH --ntasks-per-node=${gpus}
#SBATCH --gpus-per-node=${gpus}
#SBATCH --cpus-per-task=${CPUS_PER_TASK:-8}
#SBATCH --time=${TIME:-24:00:00}
#SBATCH --output=${workdir}/slurm-%j.out
${PARTITION:+#SBATCH --partition=${PARTITION}}
${ACCOUNT:+#SBATCH --account=${ACCOUNT}}
set -euo pipefail
cd $(printf '%q' "${repo}")
${setup}
srun python -m genie_jax.cli.train$(printf ' %q' "${main_flags[@]}")
"

echo "${script}"
printf '%q ' mkdir -p "${workdir}"; echo
echo "sbatch  # reads the script above on stdin"
if [[ "${dry_run}" == 0 ]]; then
  mkdir -p "${workdir}"
  sbatch <<< "${script}"
fi
