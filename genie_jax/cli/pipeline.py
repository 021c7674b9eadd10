r"""Trains and evaluates a whole Genie: tokenizer, LAM, dynamics; then writes a report.

  python -m genie_jax.cli.pipeline --config=configs/genie.py:runlocal --workdir=workdirs/genie

What it does, and how it resumes: genie_jax/training/pipeline.py. With a failed check of the
report (config.report), it exits non-zero after writing the whole report.
"""

from absl import flags
from ml_collections import config_flags

from genie_jax import cli
from genie_jax.training import pipeline


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", None, "Pipeline config, e.g. configs/genie.py:runlocal.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Root of the stage workdirs and the report.")
  flags.mark_flags_as_required(["config", "workdir"])


def main() -> None:
  pipeline.run_and_check(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  cli.run(define_flags, main)
