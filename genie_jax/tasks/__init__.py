"""Registry of training stages (`config.stage` picks one) and what links them: each task
declares the stages it builds on (`Task.depends_on`), and `resolve_config` fills in what a
config takes from them before the task is built."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping, Sequence

import ml_collections

from genie_jax import config_lib
from genie_jax import paths
from genie_jax.tasks.base import Dependency
from genie_jax.tasks.base import Task

# stage name -> "module:Class"; imported lazily so a stage's dependencies load only when used.
_TASKS = {
    "tokenizer": "genie_jax.tasks.tokenizer:TokenizerTask",
    "lam": "genie_jax.tasks.lam:LatentActionTask",
    "dynamics": "genie_jax.tasks.dynamics:DynamicsTask",
    "diffusion": "genie_jax.tasks.diffusion:DiffusionTask",
}


def task_class(stage: str) -> type[Task]:
  """The Task subclass of a stage name; ValueError naming config.stage if unknown."""
  if stage not in _TASKS:
    raise ValueError(f"config.stage={stage!r} is not a known stage; choose one of {sorted(_TASKS)}")
  module_name, class_name = _TASKS[stage].split(":")
  return getattr(importlib.import_module(module_name), class_name)


def stage_order(stages: Mapping[str, str]) -> list[str]:
  """The names of `stages` ({name: its config.stage}) with every stage after the ones it
  builds on (in the given order where the graph leaves it free).

  Raises:
    ValueError: when a stage builds on a name that is not in `stages`, or on itself through
      others.
  """
  order: list[str] = []
  visiting: list[str] = []

  def visit(name):
    if name in order:
      return
    if name in visiting:
      raise ValueError(f"stages {' -> '.join(visiting + [name])} build on each other")
    visiting.append(name)
    for dep in task_class(stages[name]).depends_on:
      if dep.name not in stages:
        raise ValueError(f"stage {name!r} builds on a {dep.name!r} stage, which is not among "
                         f"{sorted(stages)}")
      visit(dep.name)
    visiting.pop()
    order.append(name)

  for name in stages:
    visit(name)
  return order


def _read_upstream(config: ml_collections.ConfigDict, dep: Dependency
                   ) -> ml_collections.ConfigDict:
  """The model config of the stage trained in config.<dep.workdir_key>."""
  key = dep.workdir_key
  workdir = config.get(key, "")
  if not workdir:
    raise ValueError(f"config.{key} is empty; set it to the workdir of a trained {dep.stage} "
                     f"stage")
  if not paths.path(workdir).is_dir():
    paths.check_bucket(workdir, f"config.{key}")
    raise ValueError(f"config.{key}={workdir!r} does not exist; train the {dep.stage} stage "
                     f"there first")
  try:
    stage_config = config_lib.load_config(workdir)
  except FileNotFoundError as e:
    raise ValueError(f"config.{key}={workdir!r} holds no config.json: {e}") from e
  if stage_config.stage != dep.stage:
    raise ValueError(f"config.{key}={workdir!r} holds a {stage_config.stage!r} stage, not a "
                     f"{dep.stage!r} stage")
  return stage_config.model


def resolve_config(config: ml_collections.ConfigDict,
                   upstream: Mapping[str, ml_collections.ConfigDict] | None = None
                   ) -> ml_collections.ConfigDict:
  """A copy of `config` with what it takes from the stages it builds on filled in (locked
  if `config` is); `config` itself is not changed.

  For each dependency, its model config comes from config.<name>_model where that is filled
  in (a trained workdir's config.json), else from `upstream[name]` (the pipeline's config of
  a stage not trained yet), else from config.<name>_workdir's config.json. Then the task's
  `derive_config` gives the sizes it takes from them.

  Raises:
    ValueError: naming the config key: a stage workdir that is missing, holds no config or
      another stage; a derived key set to another value than the stages give.
  """
  cls = task_class(config.stage)
  resolved = copy.deepcopy(config)
  if not cls.depends_on:
    return resolved
  models = {}
  with resolved.unlocked():
    for dep in cls.depends_on:
      model = config.get(dep.model_key)
      if not model:
        model = (upstream or {}).get(dep.name) or _read_upstream(config, dep)
        resolved[dep.model_key] = ml_collections.ConfigDict(model.to_dict())
      models[dep.name] = resolved[dep.model_key]
    for key, value in cls.derive_config(resolved, models).items():
      parent, _, leaf = key.rpartition(".")
      holder = resolved[parent] if parent else resolved
      if holder[leaf] == 0:
        holder[leaf] = value
      elif holder[leaf] != value:
        sources = ", ".join(f"config.{d.workdir_key}={config.get(d.workdir_key)!r}"
                            for d in cls.depends_on)
        raise ValueError(f"config.{key}={holder[leaf]} differs from {value}, which the "
                         f"stages it builds on give ({sources}); leave it 0 to take it "
                         f"from there")
  return resolved


def derived_keys(stages: Sequence[str] = tuple(_TASKS)) -> tuple[str, ...]:
  """The config keys that `resolve_config` fills in from other stages, over `stages`."""
  return tuple(dict.fromkeys(dep.model_key for stage in stages
                             for dep in task_class(stage).depends_on))


def get_task(config: ml_collections.ConfigDict,
             upstream: Mapping[str, ml_collections.ConfigDict] | None = None) -> Task:
  """The validated task of `config.stage`, built on `resolve_config(config, upstream)`
  (`task.config`; `config` itself is not changed)."""
  task = task_class(config.stage)(resolve_config(config, upstream))
  task.validate()
  return task


__all__ = ["Dependency", "Task", "derived_keys", "get_task", "resolve_config", "stage_order",
           "task_class"]
