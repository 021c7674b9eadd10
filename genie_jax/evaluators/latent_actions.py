"""Latent actions on held-out clips: next-frame prediction PSNR, action codebook use and,
where the data has true actions, how much the latent actions tell about them.

Works for any task with a `predict_next(model, batch)` method returning a dict with 'pred'
and 'target' ((B, T-1, H, W, C) floats in [0, 1]), 'actions' and 'true_actions'
((B, T-1) int32; true -1 where unknown) and the static 'num_actions' (see
genie_jax.tasks.lam.LatentActionTask).

Scalars: psnr (mean over predicted frames), mse, codebook_usage (fraction of the A codes
used on the split), codebook_perplexity, and with true actions nmi (arithmetic-mean
normalised mutual information), accuracy (under the best one-to-one assignment of latent to
true actions) and num_transitions. Images: predictions, and with true actions the confusion
matrix (rows latent, columns true actions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from genie_jax import action_metrics
from genie_jax import metrics as metrics_lib
from genie_jax import model_spec
from genie_jax import sharding
from genie_jax import visualize
from genie_jax.data import input_pipeline
from genie_jax.evaluators import base


class LatentActionEvaluator(base.Evaluator):
  """Streams the evaluation split (or `num_batches` of it) once per run."""

  drop_remainder = False

  def __init__(self, name: str, eval_cfg: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, task, spec: model_spec.ModelSpec):
    super().__init__(name, eval_cfg, config, task, spec)
    self.num_true_actions, self.true_action_names = base.true_actions_of(config.data)
    self._stats = jax.jit(self._batch_stats, out_shardings=self.replicated)
    self._predict = jax.jit(self._predict_next, out_shardings=self.replicated)

  def _predict_next(self, params, model_state, batch):
    with sharding.activation_rules(self.spec.mesh, self.spec.rules):
      return self.task.predict_next(self._model(params, model_state), batch)

  def _batch_stats(self, params, model_state, batch):
    out = self._predict_next(params, model_state, batch)
    valid_B = (batch["episode_id"] >= 0).astype(jnp.float32)
    mse_BT = metrics_lib.frame_mse(out["target"], out["pred"])
    psnr_BT = metrics_lib.psnr_of_mse(mse_BT)
    t = mse_BT.shape[1]
    # Padding rows get the latent action -1, which the host-side counting skips.
    actions_BT = jnp.where(valid_B[:, None] > 0, out["actions"], -1)
    true_BT = jnp.where(valid_B[:, None] > 0, out["true_actions"], -1)
    return dict(psnr=jnp.sum(psnr_BT * valid_B[:, None]),
                mse=jnp.sum(mse_BT * valid_B[:, None]),
                frames=jnp.sum(valid_B) * t, actions=actions_BT, true_actions=true_BT)

  def step_functions(self):
    return dict(stats=(self._stats, ()), predict=(self._predict, ()))

  def run(self, state) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Returns ({metric: value}, {image name: uint8 HWC picture})."""
    sums = dict(psnr=0.0, mse=0.0, frames=0.0)
    latent, true = [], []
    first_batch = None
    num_actions = self.config.model.num_actions
    for local_batch in self._dataset():
      batch = input_pipeline.to_global_batch(local_batch, self.spec.batch_sharding)
      if first_batch is None:
        first_batch = batch
      stats = jax.device_get(self._stats(state["params"], state["model_state"], batch))
      for key in sums:
        sums[key] += float(stats[key])
      latent.append(np.asarray(stats["actions"]).reshape(-1))
      true.append(np.asarray(stats["true_actions"]).reshape(-1))
    if first_batch is None or sums["frames"] == 0:
      raise ValueError(
          f"config.evals.{self.name}: split {self.cfg.split!r} of dataset "
          f"{self.config.data.name!r} gave no clip; generate more validation episodes")
    latent, true = np.concatenate(latent), np.concatenate(true)
    counts = np.bincount(latent[latent >= 0], minlength=num_actions).astype(np.float64)
    probs = counts / max(counts.sum(), 1.0)
    entropy = -np.sum(probs[probs > 0] * np.log(probs[probs > 0]))
    scalars = dict(psnr=sums["psnr"] / sums["frames"], mse=sums["mse"] / sums["frames"],
                   codebook_usage=float(np.mean(counts > 0)),
                   codebook_perplexity=float(np.exp(entropy)), num_frames=sums["frames"])

    shown = jax.device_get(self._predict(state["params"], state["model_state"], first_batch))
    n = min(self.cfg.num_images, shown["pred"].shape[0])
    images = {"predictions": visualize.video_grid([shown["target"][:n], shown["pred"][:n]])}

    known = (latent >= 0) & (true >= 0)
    if self.num_true_actions and np.any(known):
      confusion = action_metrics.confusion_matrix(latent[known], true[known], num_actions,
                                                  self.num_true_actions)
      scalars.update(nmi=action_metrics.normalized_mutual_information(confusion),
                     accuracy=action_metrics.assignment_accuracy(confusion),
                     num_transitions=float(confusion.sum()))
      images["confusion"] = action_metrics.confusion_image(
          confusion, true_names=self.true_action_names or None)
    return scalars, images
