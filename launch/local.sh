#!/usr/bin/env bash
# Trains one stage on this machine, then evaluates the result.
#
#   launch/local.sh CONFIG WORKDIR [--config.key=value ...]
#   launch/local.sh configs/tokenizer.py:runlocal workdirs/tokenizer
#   launch/local.sh configs/tokenizer.py:data=coinrun,runlocal workdirs/tok_coinrun \
#       --config.total_steps=2000
#
# Flags passed to genie_jax.cli.train: --config=CONFIG --workdir=WORKDIR and every extra argument.
# Environment: PYTHON (default: python). Re-running the same command resumes from the latest
# checkpoint; the evaluation writes WORKDIR/eval/metrics.json and a PNG of reconstructions.
set -euo pipefail

if [[ $# -lt 2 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
config="$1"
workdir="$2"
shift 2
python="${PYTHON:-python}"

"${python}" -m genie_jax.cli.train --config="${config}" --workdir="${workdir}" "$@"
"${python}" -m genie_jax.cli.evaluate --workdir="${workdir}"
