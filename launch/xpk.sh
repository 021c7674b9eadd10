#!/usr/bin/env bash
# Trains on TPU slices of a GKE cluster through xpk (one JobSet; JAX processes on every host).
#
#   launch/xpk.sh [--dry_run] [--steps=create,logs] CONFIG WORKDIR [FLAGS...]
#   CLUSTER=my-cluster TPU_TYPE=v5p-64 launch/xpk.sh configs/tokenizer.py:data=coinrun \
#       /gcs/my-bucket/tok_cr --config.total_steps=20000
#
# Steps (default create,logs; also: list, delete):
#   create  xpk workload create --cluster=$CLUSTER --workload=$WORKLOAD --tpu-type=$TPU_TYPE
#           --num-slices=$NUM_SLICES --base-docker-image=$BASE_IMAGE --script-dir=<this repo>
#           --command="pip install -e . && python -m genie_jax.cli.train ..."
#           (xpk builds an image holding the repository on top of BASE_IMAGE)
#   logs    kubectl logs -f of the workload's pods (worker 0 of slice 0 carries the progress)
#   list    xpk workload list --cluster=$CLUSTER
#   delete  xpk workload delete --cluster=$CLUSTER --workload=$WORKLOAD
# Flags passed to genie_jax.cli.train: --config=CONFIG --workdir=WORKDIR --distributed=yes FLAGS...
#   (JAX reads the TPU pod / multi-slice topology from the environment GKE gives each pod.)
# Environment: CLUSTER (required), WORKLOAD (default genie-jax-$USER), TPU_TYPE (default
#   v5p-64), NUM_SLICES (default 1; >1 makes a multi-slice job), BASE_IMAGE (default
#   python:3.11-slim; genie_jax and jax[tpu] of the pinned jax version are installed on it at
#   start), PROJECT and ZONE
#   (optional, passed to xpk), DATA_DIR (optional: --config.data.data_dir). xpk, gcloud and
#   kubectl must be installed and logged in.
# WORKDIR may be a gs:// URL (the pods' service account needs write access) or a volume every
#   pod mounts. DATA_DIR must be a path in the pods (datasets are read through local file
#   handles): mount the data bucket with GKE's Cloud Storage FUSE CSI driver, or a Filestore
#   volume, and pass its path.
# --dry_run prints the commands instead of running them.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
dry_run=0
steps="create,logs"
while [[ $# -gt 0 && "$1" == -* ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry_run) dry_run=1 ;;
    --steps=*) steps="${1#--steps=}" ;;
    *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 2 ]]; then usage >&2; exit 2; fi
config="$1"; workdir="$2"; shift 2
if [[ -z "${CLUSTER:-}" ]]; then echo "set CLUSTER to the xpk cluster's name" >&2; exit 2; fi

workload="${WORKLOAD:-genie-jax-${USER:-user}}"
xpk_args=(--cluster="${CLUSTER}")
[[ -n "${PROJECT:-}" ]] && xpk_args+=(--project="${PROJECT}")
[[ -n "${ZONE:-}" ]] && xpk_args+=(--zone="${ZONE}")
main_flags=(--config="${config}" --workdir="${workdir}" --distributed=yes "$@")
[[ -n "${DATA_DIR:-}" ]] && main_flags+=(--config.data.data_dir="${DATA_DIR}")
repo="$(cd "$(dirname "$0")/.." && pwd)"
# jax[tpu] at the version setup.py pinned, so that pip does not move jax.
install="pip install -q -e . && pip install -q \"jax[tpu]==\$(python -c 'import jax; print(jax.__version__)')\""

run() {  # Prints the command (quoted, as it would be typed), then runs it unless --dry_run.
  printf '%q ' "$@"; echo
  if [[ "${dry_run}" == 0 ]]; then "$@"; fi
}

for step in ${steps//,/ }; do
  case "${step}" in
    create)
      run xpk workload create "${xpk_args[@]}" --workload="${workload}" \
        --tpu-type="${TPU_TYPE:-v5p-64}" --num-slices="${NUM_SLICES:-1}" \
        --base-docker-image="${BASE_IMAGE:-python:3.11-slim}" --script-dir="${repo}" \
        --command="${install} && python -m genie_jax.cli.train$(printf ' %q' "${main_flags[@]}")" ;;
    logs)
      run kubectl logs -f --max-log-requests=64 --prefix \
        --selector="jobset.sigs.k8s.io/jobset-name=${workload}" ;;
    list) run xpk workload list "${xpk_args[@]}" ;;
    delete) run xpk workload delete "${xpk_args[@]}" --workload="${workload}" ;;
    *) echo "unknown step ${step} in --steps=${steps}" >&2; exit 2 ;;
  esac
done
