"""What a training stage is: a model factory, a loss, and how to look at the model.

The shared trainer (genie_jax/training/trainer.py) owns everything else: mesh, input,
sharding, optimizer, checkpoints, logging and the loop, and the stages a task builds on (`depends_on`): their
configs are read and its sizes derived before the task is built (`tasks.resolve_config`), and
their weights grafted into its first train state (`stages.init_from_dependencies`). Adding a
stage means adding one Task subclass, registering it in genie_jax/tasks/__init__.py and
writing one config.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from genie_jax import metrics as metrics_lib

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Dependency:
  """A trained stage that a task builds on, held in its model as the submodule `name`.

  The dependent stage's config names it by three keys: `<name>_workdir` (where it was
  trained), `<name>_step` (its checkpoint; 0: the latest) and `<name>_model` (its model
  config; left empty, `tasks.resolve_config` fills it in, and config.json saves it, so that a
  trained workdir rebuilds every model by itself).
  """
  name: str
  stage: str  # The config.stage its workdir must hold.

  @property
  def workdir_key(self) -> str:
    return f"{self.name}_workdir"

  @property
  def step_key(self) -> str:
    return f"{self.name}_step"

  @property
  def model_key(self) -> str:
    return f"{self.name}_model"


class Task(abc.ABC):
  """One training stage. Methods that take a model run inside jit.

  `trainable` is the nnx filter of the variables the optimizer updates (the train state's
  'params'); every other variable, frozen pretrained weights included, lives in
  'model_state' and gets no gradient and no optimizer state.
  """

  trainable: Any = nnx.Param
  depends_on: tuple[Dependency, ...] = ()

  @classmethod
  def derive_config(cls, config: ml_collections.ConfigDict,
                    upstream: Mapping[str, ml_collections.ConfigDict]) -> dict[str, Any]:
    """What the config takes from the model configs of the stages it builds on.

    A pure function: {dotted config key: value} from `upstream` ({dependency name: its model
    config}) and `config`. A key left 0 in the config takes the value; any other value must
    equal it (`tasks.resolve_config`).
    """
    del config, upstream
    return {}

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def validate(self) -> None:
    """Raises ValueError naming the config key when the config cannot work for this task.

    Runs before any data is read or anything is compiled.
    """

  @abc.abstractmethod
  def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model from `self.config.model`; every weight carries logical axis names."""

  @abc.abstractmethod
  def loss(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics, Any]:
    """Training loss on a global batch.

    The model may update its non-parameter state (e.g. codebook usage); the trainer keeps it.

    Returns:
      (scalar loss, scalar metrics, aux passed to `after_update`).
    """

  def after_update(self, model: nnx.Module, aux: Any, rng: jax.Array) -> Metrics:
    """Runs on the updated model inside the train step (e.g. dead-code restart)."""
    del model, aux, rng
    return {}

  def visualize(self, model: nnx.Module, batch: Batch) -> list[jax.Array]:
    """Rows of videos to look at during training, e.g. [originals, reconstructions]; each
    (B, T, H, W, C) floats in [0, 1]. Shown as one grid and one side-by-side GIF."""
    del model, batch
    return []


def pixel_vq_loss(pred_BTHWC: jax.Array, target_BTHWC: jax.Array, vq_out: dict[str, jax.Array]
                  ) -> tuple[jax.Array, Metrics]:
  """MSE(pixels) + VQ loss, the loss of the VQ-VAE stages (tokenizer, LAM), and its metrics.

  `vq_out` holds the quantiser's 'vq_loss', 'codebook_loss', 'commitment_loss', 'usage' and
  'perplexity'. PSNR is the mean of per-frame PSNRs, as the evaluators report it.
  """
  mse_BT = metrics_lib.frame_mse(pred_BTHWC.astype(jnp.float32), target_BTHWC)
  mse = jnp.mean(mse_BT)
  psnr = jnp.mean(metrics_lib.psnr_of_mse(mse_BT))
  metrics = dict(mse=mse, psnr=psnr, vq_loss=vq_out["vq_loss"],
                 codebook_loss=vq_out["codebook_loss"],
                 commitment_loss=vq_out["commitment_loss"], codebook_usage=vq_out["usage"],
                 codebook_perplexity=vq_out["perplexity"])
  return mse + vq_out["vq_loss"], metrics


def check_clip_model(config: ml_collections.ConfigDict) -> None:
  """The checks every pixel model's task makes: config.model's frame size equals the data's,
  and its temporal positions cover the clips."""
  model, data = config.model, config.data
  if model.image_size != data.image_size:
    raise ValueError(
        f"config.model.image_size={model.image_size} differs from "
        f"config.data.image_size={data.image_size}; set both to the dataset's frame size")
  if data.clip_len > model.max_frames:
    raise ValueError(
        f"config.data.clip_len={data.clip_len} exceeds config.model.max_frames="
        f"{model.max_frames} (the temporal position table); raise max_frames")
