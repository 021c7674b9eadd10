"""Stage 1: the ST-ViViT VQ-VAE video tokenizer (Genie section 2.1)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from genie_jax import metrics as metrics_lib
from genie_jax.models import tokenizer as tokenizer_lib
from genie_jax.tasks import base


class TokenizerTask(base.Task):
  """Loss = MSE(pixels) + VQ codebook loss + beta * commitment loss; dead codes restarted.
  Under model.quantizer='kl': MSE(pixels) + kl_weight * KL, no codes."""

  def validate(self) -> None:
    base.check_clip_model(self.config)
    tokenizer_lib.validate_config(self.config.model)

  @property
  def continuous(self) -> bool:
    return tokenizer_lib.quantizer(self.config.model) == "kl"

  def make_model(self, rngs: nnx.Rngs) -> tokenizer_lib.Tokenizer:
    return tokenizer_lib.Tokenizer(self.config.model, rngs=rngs)

  def loss(self, model, batch, rng):
    target_BTHWC = tokenizer_lib.to_unit_interval(batch["video"])
    if self.continuous:
      out = model(target_BTHWC, train=True, rng=rng)
      mse_BT = metrics_lib.frame_mse(out["recon"].astype(jnp.float32), target_BTHWC)
      mse = jnp.mean(mse_BT)
      metrics = dict(mse=mse, psnr=jnp.mean(metrics_lib.psnr_of_mse(mse_BT)),
                     kl_loss=out["kl_loss"], latent_std=out["latent_std"])
      return mse + model.kl_weight * out["kl_loss"], metrics, None
    out = model(target_BTHWC, train=True)
    loss, metrics = base.pixel_vq_loss(out["recon"], target_BTHWC, out)
    return loss, metrics, out["z"]

  def after_update(self, model, aux, rng):
    if self.continuous:
      return {}
    return dict(restarted_codes=model.restart_dead_codes(aux, rng))

  def reconstruct(self, model, batch):
    """'recon' and 'target' (B, T, H, W, C); with codes, 'codes' and 'num_codes'."""
    target_BTHWC = tokenizer_lib.to_unit_interval(batch["video"])
    out = model(target_BTHWC, train=False)
    if self.continuous:
      return dict(recon=out["recon"], target=target_BTHWC)
    return dict(recon=out["recon"], target=target_BTHWC, codes=out["indices_BTN"],
                num_codes=self.config.model.num_codes)

  def visualize(self, model, batch):
    out = self.reconstruct(model, batch)
    return [out["target"], jnp.clip(out["recon"].astype(jnp.float32), 0.0, 1.0)]
