"""Restoring a trained stage from its workdir, for later stages, generation and play.

The model is rebuilt from the config saved beside the checkpoint (workdir/config.json), never
from the caller's flags, and only its weights and state are read from the checkpoint: no
optimizer is built, and no optimizer state or data iterator is read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from absl import logging
from flax import nnx

from genie_jax import config_lib
from genie_jax import model_spec
from genie_jax import paths
from genie_jax import sharding
from genie_jax import tasks
from genie_jax.training import checkpointing


@dataclasses.dataclass(frozen=True)
class LoadedStage:
  """A trained stage.

  Attributes:
    config: the (locked) config it was trained with, from workdir/config.json.
    task: its Task, built from `config`.
    spec: the ModelSpec of `config` on the mesh it was loaded onto.
    model: the nnx module with the restored weights.
    step: the checkpoint step restored.
  """
  config: ml_collections.ConfigDict
  task: tasks.Task
  spec: model_spec.ModelSpec
  model: nnx.Module
  step: int


def default_mesh(rules: sharding.Rules = sharding.DEFAULT_RULES) -> jax.sharding.Mesh:
  """All local devices on the first axis a batch is split over: weights replicated, batches
  split."""
  return sharding.make_mesh(sharding.default_mesh_shape(rules), jax.local_devices())


def load_stage(workdir: str, *, step: int | None = None, mesh: jax.sharding.Mesh | None = None,
               expect_stage: str | None = None) -> LoadedStage:
  """Rebuilds the model trained in `workdir` and restores its weights.

  Args:
    workdir: a workdir written by the trainer (config.json and checkpoints/).
    step: checkpoint step; default (None) the latest.
    mesh: restore onto this mesh, sharded by the stage's own logical-axis rules; default
      `default_mesh()`.
    expect_stage: if given, the workdir's config.stage must be this.

  Raises:
    FileNotFoundError: naming the workdir when it, its config.json or a checkpoint (of
      `step`) is missing.
    ValueError: naming the workdir when its stage is not `expect_stage`, or the bucket of a
      gs:// workdir that does not exist.
  """
  if not paths.path(workdir).is_dir():
    paths.check_bucket(workdir, "workdir")
    raise FileNotFoundError(f"workdir {workdir!r} does not exist (train that stage there first)")
  config = config_lib.load_config(workdir)
  if expect_stage is not None and config.stage != expect_stage:
    raise ValueError(f"workdir {workdir!r} holds a {config.stage!r} stage "
                     f"(config.stage in its config.json), not the {expect_stage!r} stage expected")
  task = tasks.get_task(config)
  config = task.config
  spec = model_spec.make_model_spec(
      task, config, mesh or default_mesh(sharding.rules_of(config)), check_split=False)
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint, read_only=True)
  try:
    available = ckpt.all_steps()
    if not available:
      raise FileNotFoundError(f"workdir {workdir!r} has no checkpoint in {ckpt.directory}")
    if step is not None and step not in available:
      raise FileNotFoundError(f"workdir {workdir!r} has no checkpoint of step {step}; it has "
                              f"steps {sorted(available)}")
    step, restored = ckpt.restore_model(step, spec.abstract)
  finally:
    ckpt.close()
  model = spec.model(restored)
  return LoadedStage(config=config, task=task, spec=spec, model=model, step=step)


def graft(state: dict[str, Any], spec: model_spec.ModelSpec, path: str,
          source: nnx.Module) -> dict[str, Any]:
  """Copies every variable of `source` into the submodule `path` of the state's model.

  `source` must have the submodule's structure (e.g. the model of a `load_stage` of an
  earlier stage); `spec` is the train state's (a `train_state.StateSpec`). Trainable and frozen variables land where `spec.trainable` puts them, with
  the shardings of `spec`; the optimizer state is kept as is.

  Args:
    state: a train state of `spec`.
    spec: its StateSpec.
    path: attribute name of the submodule in the model, e.g. 'tokenizer'.
    source: the module whose weights to copy.
  """
  model = spec.model(state)
  nnx.update(getattr(model, path), nnx.state(source))
  params, model_state = spec.split(model)
  return dict(state,
              params=jax.device_put(params, spec.shardings["params"]),
              model_state=jax.device_put(model_state, spec.shardings["model_state"]))


def init_from_dependencies(task: tasks.Task, state: dict[str, Any], spec: model_spec.ModelSpec
                           ) -> dict[str, Any]:
  """A fresh train state with the weights of every stage the task builds on
  (`task.depends_on`) grafted in, each restored from its workdir at its configured step
  onto the state's mesh.

  The trainer calls this on a fresh start only, never on resume (the checkpoint then holds
  them).
  """
  for dep in task.depends_on:
    workdir = task.config[dep.workdir_key]
    loaded = load_stage(workdir, step=task.config.get(dep.step_key) or None, mesh=spec.mesh,
                        expect_stage=dep.stage)
    state = graft(state, spec, dep.name, loaded.model)
    logging.info("Initialised %s from %s, step %d", dep.name, workdir, loaded.step)
  return state
