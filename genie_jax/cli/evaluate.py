r"""Evaluates a trained workdir from its checkpoint.

  python -m genie_jax.cli.evaluate --workdir=workdirs/tok [--step=N] [--num_batches=N]
  python -m genie_jax.cli.evaluate --workdir=workdirs/dyn --eval_set=temperature=0.5 \
      --out=workdirs/dyn/eval_t05            # other evaluator settings, another folder

The model is rebuilt from workdir/config.json; the evaluators are those of its config.evals.
Writes workdir/eval/metrics.json (and one PNG per evaluator picture) and prints the metrics.
"""

import json

from absl import flags

from genie_jax import cli
from genie_jax.inference import evaluate


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A workdir written by genie_jax.cli.train.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
  flags.DEFINE_integer("num_batches", None,
                       "Evaluate this many batches per evaluator (default: config).")
  flags.DEFINE_string("out", None, "Output folder; default: <workdir>/eval.")
  flags.DEFINE_multi_string("eval_set", [], "KEY=VALUE: set an evaluator setting (e.g. "
                            "temperature=0.5) in every evaluator of config.evals that has "
                            "the key; repeatable.")
  flags.mark_flags_as_required(["workdir"])


def main() -> None:
  f = flags.FLAGS
  results = evaluate.evaluate(f.workdir, step=f.step, num_batches=f.num_batches,
                              out_dir=f.out, eval_settings=f.eval_set)
  print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
  cli.run(define_flags, main)
