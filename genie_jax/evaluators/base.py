"""What every evaluator shares: its settings, the evaluation batch, the split, the model."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from flax import nnx

import data_pipelines
from genie_jax import model_spec
from genie_jax import sharding
from genie_jax.data import input_pipeline


class Evaluator:
  """Base of the evaluators: checks the batch size against the mesh and processes, streams
  `num_batches` of the split (all of it when 0) and merges the model from a state.

  Subclasses jit their per-batch functions in __init__ (outputs `self.replicated`) and
  implement `run(state) -> (scalars, images)`, called on every process.
  """

  # False: the last batch is filled with padding rows (episode_id -1) so that no clip is
  # dropped; the subclass must then skip those rows.
  drop_remainder = True

  def __init__(self, name: str, eval_cfg: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, task, spec: model_spec.ModelSpec):
    self.name = name
    self.cfg = eval_cfg
    self.config = config
    self.task = task
    self.spec = spec
    self.batch_size = eval_cfg.batch_size or config.batch_size
    dp = sharding.data_parallel_size(spec.mesh, spec.rules)
    if self.batch_size % dp or self.batch_size % jax.process_count():
      raise ValueError(
          f"config.evals.{name}.batch_size={self.batch_size} must be divisible by the "
          f"data-parallel size {dp} and the {jax.process_count()} processes")
    input_pipeline.check_process_rows(spec.batch_sharding, self.batch_size,
                                      f"config.evals.{name}.batch_size")
    self.replicated = sharding.replicated(spec.mesh)

  def check_data(self) -> None:
    """Raises ValueError, naming config.evals.<name>, when the split cannot give a batch
    (a split the dataset lacks, no clip, fewer clips than a batch where the remainder is
    dropped). Reads no record: for the trainer to call before the first step."""
    where = f"config.evals.{self.name}"
    try:
      clips = input_pipeline.num_eval_clips(self.config.data, self.cfg.split)
    except input_pipeline.UnknownSplitError as e:
      raise ValueError(f"{where}.split={self.cfg.split!r}: {e}") from e
    if self.drop_remainder and clips < self.batch_size:
      size = (f"{where}.batch_size={self.batch_size}" if self.cfg.batch_size else
              f"config.batch_size={self.batch_size} ({where}.batch_size=0)")
      raise ValueError(f"{size}: split {self.cfg.split!r} has {clips} clips of "
                       f"{self.config.data.clip_len} frames, less than one batch")

  def _dataset(self):
    return input_pipeline.make_eval_dataset(
        self.config.data, self.cfg.split, global_batch_size=self.batch_size,
        num_batches=self.cfg.num_batches or None, drop_remainder=self.drop_remainder)

  def _model(self, params, model_state) -> nnx.Module:
    return nnx.merge(self.spec.graphdef, params, model_state, copy=True)

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """One global evaluation batch (as `input_pipeline.to_global_batch` makes it), as
    shapes with the batch sharding."""
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.spec.batch_sharding)
            for k, (shape, dtype) in input_pipeline.batch_shapes(
                self.config.data, self.batch_size, evaluation=True).items()}

  def step_functions(self) -> dict[str, tuple[Any, tuple]]:
    """{name: (jitted per-batch function, its arguments after (params, model_state,
    batch) as shapes)}: what `lower` compiles ahead of time (genie_jax.cli.aot)."""
    return {}

  def lower(self, abstract_state: dict[str, Any]) -> dict[str, jax.stages.Lowered]:
    """Each per-batch function lowered for the spec's mesh, from shapes only."""
    batch = self.abstract_batch()
    return {name: fn.lower(abstract_state["params"], abstract_state["model_state"], batch,
                           *extra)
            for name, (fn, extra) in self.step_functions().items()}


def true_actions_of(data_config: ml_collections.ConfigDict) -> tuple[int, list[str]]:
  """(number of true actions, their names) of a dataset; (0, []) when it records none
  (video_folder), which turns off the metrics against true actions."""
  builder = data_pipelines.make_builder(data_config)
  return int(getattr(builder, "NUM_ACTIONS", 0)), list(getattr(builder, "ACTION_NAMES", ()))
