"""A model's variables as shapes and shardings on a mesh, with no optimizer: what restoring
weights for inference needs, and what the train state (genie_jax/training/train_state.py) builds on.

Layout (plain dicts of nnx.State, as the train state and its checkpoints hold them):
  params       the model's trainable variables (`Task.trainable`, by default every nnx.Param)
  model_state  its other variables (e.g. codebook usage, frozen pretrained weights)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from genie_jax import sharding
from genie_jax.tasks.base import Task

MODEL_KEYS = ("params", "model_state")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything needed to restore, shard and run a model.

  `shardings` and `abstract` (jax.ShapeDtypeStruct leaves with their shardings) hold at least
  MODEL_KEYS; a train state's spec (train_state.StateSpec) adds 'step' and 'opt_state'.
  """
  graphdef: Any
  mesh: Mesh
  rules: tuple
  shardings: dict[str, Any]
  abstract: dict[str, Any]
  trainable: Any  # nnx filter of the variables in 'params'.

  @property
  def batch_sharding(self) -> NamedSharding:
    return sharding.batch_sharding(self.mesh, self.rules)

  def model(self, state: dict[str, Any]) -> nnx.Module:
    """The module of a state's (or a restored model's) 'params' and 'model_state'."""
    return nnx.merge(self.graphdef, state["params"], state["model_state"], copy=True)

  def split(self, model: nnx.Module) -> tuple[nnx.State, nnx.State]:
    """(params, model_state) of `model`: its trainable variables and all the others."""
    _, params, model_state = nnx.split(model, self.trainable, ...)
    return params, model_state


def _fit(shape_tree: Any, sharding_tree: Any) -> Any:
  return jax.tree.map(lambda x, s: sharding.fit_spec_to_shape(s, x.shape), shape_tree,
                      sharding_tree)


def abstract_model(task: Task) -> tuple[Any, dict[str, Any]]:
  """(graphdef, {'params', 'model_state'} as shapes) of the task's model; nothing allocated."""
  def create():
    graphdef, params, model_state = nnx.split(task.make_model(nnx.Rngs(0)), task.trainable,
                                              ...)
    return graphdef, dict(params=params, model_state=model_state)
  return nnx.eval_shape(create)


def make_model_spec(task: Task, config: ml_collections.ConfigDict, mesh: Mesh, *,
                    check_split: bool = True) -> ModelSpec:
  """Shapes and shardings of the task's model on `mesh`, by config.sharding.rules. With
  `check_split`, a mesh axis that would split none of the weights it is meant to is refused
  (`sharding.check_split`); restoring onto a mesh chosen for another model (an earlier
  stage onto a later stage's mesh) skips it, and replicates what an axis does not divide."""
  rules = sharding.rules_of(config)
  graphdef, shapes = abstract_model(task)
  if check_split:
    sharding.check_split(shapes, mesh, rules)
  shardings = {k: _fit(shapes[k], sharding.state_shardings(shapes[k], mesh, rules))
               for k in MODEL_KEYS}
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return ModelSpec(graphdef=graphdef, mesh=mesh, rules=rules, shardings=shardings,
                   abstract=abstract, trainable=task.trainable)
