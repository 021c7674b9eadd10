"""Restoring a trained stage from its workdir, for later stages, generation and play.

The model is rebuilt from the config saved beside the checkpoint (workdir/config.json), never
from the caller's flags, and only its weights and state are read from the checkpoint (no
optimizer state, no data iterator).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from flax import nnx

from genie_jax import checkpointing
from genie_jax import paths
from genie_jax import sharding
from genie_jax import tasks
from genie_jax import train_state


@dataclasses.dataclass(frozen=True)
class LoadedStage:
  """A trained stage.

  Attributes:
    config: the (locked) config it was trained with, from workdir/config.json.
    task: its Task, built from `config`.
    spec: the StateSpec of `config` on the mesh it was loaded onto.
    model: the nnx module with the restored weights.
    step: the checkpoint step restored.
  """
  config: ml_collections.ConfigDict
  task: tasks.Task
  spec: train_state.StateSpec
  model: nnx.Module
  step: int


def default_mesh() -> jax.sharding.Mesh:
  """All local devices on the data axis: weights replicated, batches split."""
  return sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.local_devices())


def load_stage(workdir: str, *, step: int | None = None, mesh: jax.sharding.Mesh | None = None,
               expect_stage: str | None = None) -> LoadedStage:
  """Rebuilds the model trained in `workdir` and restores its weights.

  Args:
    workdir: a workdir written by genie_jax.train (config.json and checkpoints/).
    step: checkpoint step; default (None) the latest.
    mesh: restore onto this mesh, sharded by the stage's own logical-axis rules; default
      `default_mesh()`.
    expect_stage: if given, the workdir's config.stage must be this.

  Raises:
    FileNotFoundError: naming the workdir when it, its config.json or a checkpoint (of
      `step`) is missing.
    ValueError: naming the workdir when its stage is not `expect_stage`.
  """
  if not paths.path(workdir).is_dir():
    raise FileNotFoundError(f"workdir {workdir!r} does not exist (train that stage there first)")
  config = checkpointing.load_config(workdir)
  if expect_stage is not None and config.stage != expect_stage:
    raise ValueError(f"workdir {workdir!r} holds a {config.stage!r} stage "
                     f"(config.stage in its config.json), not the {expect_stage!r} stage expected")
  task = tasks.get_task(config)
  spec = train_state.make_state_spec(task, config, mesh or default_mesh())
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint, read_only=True)
  try:
    available = ckpt.all_steps()
    if not available:
      raise FileNotFoundError(f"workdir {workdir!r} has no checkpoint in {ckpt.directory}")
    if step is not None and step not in available:
      raise FileNotFoundError(f"workdir {workdir!r} has no checkpoint of step {step}; it has "
                              f"steps {sorted(available)}")
    abstract = {k: spec.abstract[k] for k in ("params", "model_state")}
    step, restored = ckpt.restore_model(step, abstract)
  finally:
    ckpt.close()
  model = spec.model(restored)
  return LoadedStage(config=config, task=task, spec=spec, model=model, step=step)


def graft(state: dict[str, Any], spec: train_state.StateSpec, path: str,
          source: nnx.Module) -> dict[str, Any]:
  """Copies every variable of `source` into the submodule `path` of the state's model.

  `source` must have the submodule's structure (e.g. the model of a `load_stage` of an
  earlier stage). Trainable and frozen variables land where `spec.trainable` puts them, with
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
