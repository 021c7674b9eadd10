"""Evaluating a trained workdir from its checkpoint: the model rebuilt from
workdir/config.json, its weights restored (no optimizer), the evaluators of its config.evals.
The command: genie_jax/cli/evaluate.py."""

from __future__ import annotations

import json

import jax
from absl import logging

from genie_jax import config_lib
from genie_jax import evaluators as evaluators_lib
from genie_jax import model_spec
from genie_jax import paths
from genie_jax import sharding
from genie_jax import tasks
from genie_jax import visualize
from genie_jax.training import checkpointing


def apply_eval_settings(config, settings: list[str]) -> None:
  """Sets each 'KEY=VALUE' of `settings` in every config.evals entry that has KEY, typed as
  the value there; raises ValueError naming a setting that no evaluator has."""
  for setting in settings:
    key, sep, value = setting.partition("=")
    holders = [c for c in config.evals.values() if key in c]
    if not sep or not holders:
      raise ValueError(f"--eval_set={setting!r}: expected KEY=VALUE with KEY a setting of "
                       f"an evaluator in config.evals "
                       f"({sorted({k for c in config.evals.values() for k in c})})")
    for eval_cfg in holders:
      eval_cfg[key] = config_lib.typed_like(eval_cfg[key], value)


def evaluate(workdir: str, *, step: int | None = None, num_batches: int | None = None,
             out_dir: str | None = None,
             eval_settings: list[str] | None = None) -> dict[str, float]:
  """Restores `workdir` at `step` and runs its evaluators on this host's devices."""
  if out_dir:
    paths.check_bucket(out_dir, "--out")
  config = config_lib.load_config(workdir)
  with config.unlocked():
    # Evaluate on whatever devices are here, not the training mesh.
    config.mesh = sharding.default_mesh_shape(sharding.rules_of(config))
    if num_batches is not None:
      for eval_cfg in config.evals.values():
        eval_cfg.num_batches = num_batches
    apply_eval_settings(config, eval_settings or [])
  task = tasks.get_task(config)
  config = task.config
  mesh = sharding.mesh_from_config(config)
  spec = model_spec.make_model_spec(task, config, mesh)
  # Built (and so checked: settings, batch size against the devices) before the restore,
  # which can take minutes from Cloud Storage.
  evaluators = evaluators_lib.build_evaluators(config, task, spec)
  for evaluator in evaluators:
    evaluator.check_data()
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint, read_only=True)
  try:
    step, state = ckpt.restore_model(step, spec.abstract)
  finally:
    ckpt.close()

  out_dir = out_dir or paths.join(workdir, "eval")
  results: dict[str, float] = {"step": step}
  for evaluator in evaluators:
    scalars, images = evaluator.run(state)
    results.update({f"{evaluator.name}/{k}": v for k, v in scalars.items()})
    if jax.process_index() == 0:
      for name, image in images.items():
        visualize.save_png(paths.join(out_dir, f"{evaluator.name}_{name}.png"), image)
  if jax.process_index() == 0:
    metrics_file = paths.join(out_dir, "metrics.json")
    paths.write_text(metrics_file, json.dumps(results, indent=2, sort_keys=True))
    logging.info("Wrote %s", metrics_file)
  return results
