"""Reconstruction quality on held-out clips: PSNR, SSIM, MSE, codebook usage and, for
per-patch codes, code stability.

code_stability: of the tokens whose patch is pixel for pixel the same as in the frame before,
the fraction that kept its code. The dynamics model predicts codes, so a tokenizer that gives
unchanged content a new code makes even "nothing happened here" a guess, and caps the
masked-token accuracy any dynamics model can reach on its codes.

Works for any task with a `reconstruct(model, batch)` method returning a dict with
'recon' and 'target' (B, T, H, W, C floats in [0, 1]), 'codes' (integer code indices) and the
static 'num_codes'.
"""

from __future__ import annotations

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from genie_jax import metrics as metrics_lib
from genie_jax import model_spec
from genie_jax import sharding
from genie_jax import visualize
from genie_jax.data import input_pipeline
from genie_jax.evaluators import base
from genie_jax.models import layers


def code_stability_counts(codes_BTN: jax.Array, video_BTHWC: jax.Array
                          ) -> tuple[jax.Array, jax.Array]:
  """(kept, static): how many tokens of frames 1.. have a patch equal to the one before it
  (static), and how many of those kept their code (kept). Codes run row-major over the patch
  grid, as `layers.patchify` cuts it."""
  b, t, n = codes_BTN.shape
  h, w = video_BTHWC.shape[2:4]
  patch = int(round((h * w / n) ** 0.5))
  if (h // patch) * (w // patch) != n or h % patch or w % patch:
    raise ValueError(f"{n} codes per frame do not tile {h}x{w} frames with square patches")
  patches_BTNP = layers.patchify(video_BTHWC, patch)
  static_BTN = jnp.all(patches_BTNP[:, 1:] == patches_BTNP[:, :-1], axis=-1)
  kept_BTN = static_BTN & (codes_BTN[:, 1:] == codes_BTN[:, :-1])
  return jnp.sum(kept_BTN, dtype=jnp.float32), jnp.sum(static_BTN, dtype=jnp.float32)


class ReconstructionEvaluator(base.Evaluator):
  """Streams the whole evaluation split (or `num_batches` of it) once per run."""

  def __init__(self, name: str, eval_cfg: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, task, spec: model_spec.ModelSpec):
    super().__init__(name, eval_cfg, config, task, spec)
    self._stats = jax.jit(self._batch_stats, out_shardings=self.replicated)
    self._predict = jax.jit(self._reconstruct, out_shardings=self.replicated)

  def _reconstruct(self, params, model_state, batch):
    with sharding.activation_rules(self.spec.mesh, self.spec.rules):
      return self.task.reconstruct(self._model(params, model_state), batch)

  def _batch_stats(self, params, model_state, batch):
    out = self._reconstruct(params, model_state, batch)
    recon_BTHWC = jnp.clip(out["recon"].astype(jnp.float32), 0.0, 1.0)
    target_BTHWC = out["target"].astype(jnp.float32)
    b, t, h, w, c = recon_BTHWC.shape
    # dm-pix works on batches of images (I = B*T): fold time into the batch.
    target_IHWC, recon_IHWC = (x.reshape(b * t, h, w, c) for x in (target_BTHWC, recon_BTHWC))
    ssim_BT = pix.ssim(target_IHWC, recon_IHWC).reshape(b, t)
    mse_BT = metrics_lib.frame_mse(target_BTHWC, recon_BTHWC)
    psnr_BT = metrics_lib.psnr_of_mse(mse_BT)
    stats = dict(psnr=jnp.sum(psnr_BT), ssim=jnp.sum(ssim_BT), mse=jnp.sum(mse_BT),
                 frames=jnp.float32(b * t))
    if "codes" not in out:  # Continuous latents.
      return stats
    stats["code_counts"] = jnp.bincount(out["codes"].reshape(-1), length=out["num_codes"])
    if out["codes"].ndim == 3 and t > 1:  # Per-patch codes (B, T, N).
      stats["kept_codes"], stats["static_tokens"] = code_stability_counts(
          out["codes"], target_BTHWC)
    return stats

  def step_functions(self):
    return dict(stats=(self._stats, ()), predict=(self._predict, ()))

  def run(self, state) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Returns ({metric: value}, {image name: uint8 HWC grid})."""
    totals = None
    first_batch = None
    for local_batch in self._dataset():
      batch = input_pipeline.to_global_batch(local_batch, self.spec.batch_sharding)
      if first_batch is None:
        first_batch = batch
      stats = self._stats(state["params"], state["model_state"], batch)
      totals = stats if totals is None else jax.tree.map(jnp.add, totals, stats)
    if totals is None:
      raise ValueError(
          f"config.evals.{self.name}: split {self.cfg.split!r} of dataset "
          f"{self.config.data.name!r} gave no batch of {self.batch_size} clips; lower "
          f"config.evals.{self.name}.batch_size or generate more validation episodes")
    totals = jax.device_get(totals)
    frames = max(float(totals["frames"]), 1.0)
    scalars = dict(psnr=float(totals["psnr"]) / frames, ssim=float(totals["ssim"]) / frames,
                   mse=float(totals["mse"]) / frames, num_frames=frames)
    if "code_counts" in totals:
      counts = np.asarray(totals["code_counts"], np.float64)
      probs = counts / max(counts.sum(), 1.0)
      entropy = -np.sum(probs[probs > 0] * np.log(probs[probs > 0]))
      scalars.update(codebook_usage=float(np.mean(counts > 0)),
                     codebook_perplexity=float(np.exp(entropy)))
    if float(totals.get("static_tokens", 0.0)) > 0:
      scalars["code_stability"] = float(totals["kept_codes"]) / float(totals["static_tokens"])
    shown = jax.device_get(self._predict(state["params"], state["model_state"], first_batch))
    n = min(self.cfg.num_images, shown["recon"].shape[0])
    grid = visualize.video_grid([shown["target"][:n], shown["recon"][:n]])
    return scalars, {"reconstructions": grid}
