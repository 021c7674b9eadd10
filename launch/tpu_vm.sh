#!/usr/bin/env bash
# Trains on a Cloud TPU VM pod slice: create it, copy the code, run on every worker, tail the
# logs, delete it.
#
#   launch/tpu_vm.sh [--dry_run] [--steps=create,copy,run,delete] CONFIG WORKDIR [FLAGS...]
#   launch/tpu_vm.sh configs/tokenizer.py:data=coinrun /mnt/shared/tok_cr --config.total_steps=20000
#   launch/tpu_vm.sh --steps=logs CONFIG WORKDIR      # re-attach to the log of worker 0
#
# Steps (default create,copy,run,delete; also: logs):
#   create  gcloud compute tpus tpu-vm create $TPU_NAME (--accelerator-type, --version)
#   copy    git archive of HEAD, scp'd to every worker (--worker=all), unpacked, pip install -e .;
#           with DATA_BUCKET set, also installs gcsfuse and mounts gs://DATA_BUCKET at
#           /gcs/DATA_BUCKET on every worker
#   run     on every worker (--worker=all): python -m genie_jax.cli.train --config=CONFIG
#           --workdir=WORKDIR --distributed=yes FLAGS..., output tee'd to ~/genie_train.log and
#           streamed here. JAX finds the pod's coordinator and process ids itself.
#   logs    tail -f ~/genie_train.log on worker 0
#   delete  gcloud compute tpus tpu-vm delete $TPU_NAME --quiet
# Flags passed to genie_jax.cli.train: --config=CONFIG --workdir=WORKDIR --distributed=yes FLAGS...
# Environment: TPU_NAME (default genie-jax), ZONE (default us-central2-b), ACCELERATOR_TYPE
#   (default v4-32), RUNTIME_VERSION (default tpu-ubuntu2204-base), PROJECT (default: gcloud's),
#   DATA_DIR (optional: passed as --config.data.data_dir), DATA_BUCKET (optional: a bucket
#   mounted with gcsfuse; DATA_DIR then defaults to /gcs/DATA_BUCKET/data). gcloud must be
#   logged in.
# WORKDIR may be a gs:// URL (every worker writes its checkpoint shards there; process 0 the
#   config, metrics and images) or a directory every worker sees at the same path. DATA_DIR
#   must be a local or mounted path (datasets are read through local file handles): the
#   DATA_BUCKET mount, or a shared file system; process 0 generates a missing dataset there.
# --dry_run prints the commands instead of running them.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
dry_run=0
steps="create,copy,run,delete"
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

name="${TPU_NAME:-genie-jax}"
zone="${ZONE:-us-central2-b}"
gcloud_args=(--zone="${zone}")
[[ -n "${PROJECT:-}" ]] && gcloud_args+=(--project="${PROJECT}")
main_flags=(--config="${config}" --workdir="${workdir}" --distributed=yes "$@")
data_dir="${DATA_DIR:-}"
[[ -z "${data_dir}" && -n "${DATA_BUCKET:-}" ]] && data_dir="/gcs/${DATA_BUCKET}/data"
[[ -n "${data_dir}" ]] && main_flags+=(--config.data.data_dir="${data_dir}")

run() {  # Prints the command (quoted, as it would be typed), then runs it unless --dry_run.
  printf '%q ' "$@"; echo
  if [[ "${dry_run}" == 0 ]]; then "$@"; fi
}
on_workers() {  # ssh COMMAND on WORKERS (all, or 0).
  run gcloud compute tpus tpu-vm ssh "${name}" "${gcloud_args[@]}" --worker="$1" --command="$2"
}

# jax[tpu] at the version setup.py pinned, so that pip does not move jax.
install="pip install -q -e . && pip install -q \"jax[tpu]==\$(python -c 'import jax; print(jax.__version__)')\""
# Cloud Storage FUSE from Google's apt repository, then the bucket at /gcs/DATA_BUCKET.
mount_bucket="curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | \
sudo gpg --batch --yes --dearmor -o /usr/share/keyrings/cloud.google.gpg && \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt \
gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && \
sudo apt-get update -q && sudo apt-get install -y -q gcsfuse && \
sudo mkdir -p /gcs/${DATA_BUCKET:-} && sudo chown \$(id -u):\$(id -g) /gcs/${DATA_BUCKET:-} && \
(mountpoint -q /gcs/${DATA_BUCKET:-} || gcsfuse --implicit-dirs ${DATA_BUCKET:-} /gcs/${DATA_BUCKET:-})"
main_cmd="cd ~/genie_jax && python -m genie_jax.cli.train$(printf ' %q' "${main_flags[@]}")"
for step in ${steps//,/ }; do
  case "${step}" in
    create)
      run gcloud compute tpus tpu-vm create "${name}" "${gcloud_args[@]}" \
        --accelerator-type="${ACCELERATOR_TYPE:-v4-32}" \
        --version="${RUNTIME_VERSION:-tpu-ubuntu2204-base}" ;;
    copy)
      run git archive --format=tar.gz --output=/tmp/genie_jax.tar.gz HEAD
      run gcloud compute tpus tpu-vm scp /tmp/genie_jax.tar.gz "${name}:~/" \
        "${gcloud_args[@]}" --worker=all
      on_workers all "mkdir -p ~/genie_jax && tar xzf ~/genie_jax.tar.gz -C ~/genie_jax && \
cd ~/genie_jax && ${install}"
      if [[ -n "${DATA_BUCKET:-}" ]]; then
        on_workers all "${mount_bucket}"
      fi ;;
    run) on_workers all "set -o pipefail; ${main_cmd} 2>&1 | tee -a ~/genie_train.log" ;;
    logs) on_workers 0 "tail -n 200 -f ~/genie_train.log" ;;
    delete) run gcloud compute tpus tpu-vm delete "${name}" "${gcloud_args[@]}" --quiet ;;
    *) echo "unknown step ${step} in --steps=${steps}" >&2; exit 2 ;;
  esac
done
