"""Registry of training stages; `config.stage` picks one."""

from __future__ import annotations

import importlib

import ml_collections

from genie_jax.tasks.base import Task

# stage name -> "module:Class"; imported lazily so a stage's dependencies load only when used.
_TASKS = {
    "tokenizer": "genie_jax.tasks.tokenizer:TokenizerTask",
    "lam": "genie_jax.tasks.lam:LatentActionTask",
    "dynamics": "genie_jax.tasks.dynamics:DynamicsTask",
}


def get_task(config: ml_collections.ConfigDict) -> Task:
  """Instantiates and validates the task named by `config.stage`."""
  stage = config.stage
  if stage not in _TASKS:
    raise ValueError(f"config.stage={stage!r} is not a known stage; choose one of {sorted(_TASKS)}")
  module_name, class_name = _TASKS[stage].split(":")
  task = getattr(importlib.import_module(module_name), class_name)(config)
  task.validate()
  return task


__all__ = ["Task", "get_task"]
