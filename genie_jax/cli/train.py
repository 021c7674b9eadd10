r"""Trains one genie_jax stage.

  python -m genie_jax.cli.train --config=configs/tokenizer.py:runlocal --workdir=workdirs/tok \
      --config.total_steps=2000

Running the same command again resumes from the latest checkpoint in --workdir.

Several processes (one per host, or per GPU under SLURM) run the same command; see
genie_jax/distributed.py for --distributed/--coordinator_address/--num_processes/--process_id
and launch/ for recipes.
"""

from absl import flags
from absl import logging
from ml_collections import config_flags

from genie_jax import cli
from genie_jax.training import trainer


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", None, "Config file, optionally with ':args' (e.g. configs/tokenizer.py:runlocal).",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and images go.")
  flags.mark_flags_as_required(["config", "workdir"])


def main() -> None:
  logging.info("Config:\n%s", flags.FLAGS.config)
  trainer.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  cli.run(define_flags, main)
