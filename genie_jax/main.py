r"""Trains one genie_jax stage.

  python -m genie_jax.main --config=configs/tokenizer.py:runlocal --workdir=workdirs/tok \
      --config.total_steps=2000

Running the same command again resumes from the latest checkpoint in --workdir.

Several processes (one per host, or per GPU under SLURM) run the same command; see
genie_jax/distributed.py for --distributed/--coordinator_address/--num_processes/--process_id
and launch/ for recipes.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from genie_jax import allocator
from genie_jax import distributed
from genie_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':args' (e.g. configs/tokenizer.py:runlocal).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and images go.")
flags.mark_flags_as_required(["config", "workdir"])
distributed.define_flags()
allocator.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Before any JAX computation: every process must join the job first.
  distributed.initialize_from_flags()
  logging.info("Config:\n%s", _CONFIG.value)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(allocator.entry_point(main))
