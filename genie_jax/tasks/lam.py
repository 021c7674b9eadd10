"""Stage 2: the latent action model (Genie section 2.1)."""

from __future__ import annotations

import jax.numpy as jnp

from genie_jax.models import lam as lam_lib
from genie_jax.models import tokenizer as tokenizer_lib
from genie_jax.tasks import base


class LatentActionTask(base.Task):
  """Loss = MSE(predicted frames 2..T) + VQ codebook loss + beta * commitment loss; dead
  action codes restarted."""

  def validate(self) -> None:
    base.check_clip_model(self.config)
    model, data = self.config.model, self.config.data
    if data.clip_len < 2:
      raise ValueError(f"config.data.clip_len={data.clip_len}: a latent action needs clips "
                       f"of at least 2 frames")
    lam_lib.validate_config(model)

  def make_model(self, rngs):
    return lam_lib.LatentActionModel(self.config.model, rngs=rngs)

  def loss(self, model, batch, rng):
    del rng
    target_BTHWC = tokenizer_lib.to_unit_interval(batch["video"])[:, 1:]
    out = model(batch["video"], train=True)
    loss, metrics = base.pixel_vq_loss(out["pred"], target_BTHWC, out)
    return loss, metrics, out["z"]

  def after_update(self, model, aux, rng):
    return dict(restarted_codes=model.restart_dead_codes(aux, rng))

  def predict_next(self, model, batch):
    """Latent actions of the batch's clips and the frames predicted from them.

    Returns:
      'pred' (clipped to [0, 1]) and 'target': (B, T-1, H, W, C) float32, frames 2..T;
      'actions': (B, T-1) int32 latent actions; 'true_actions': (B, T-1) int32, the
      dataset's actions of the same transitions (-1 where unknown); the static
      'num_actions'.
    """
    out = model(batch["video"], train=False)
    return dict(pred=jnp.clip(out["pred"], 0.0, 1.0),
                target=tokenizer_lib.to_unit_interval(batch["video"])[:, 1:],
                actions=out["actions"], true_actions=batch["actions"][:, :-1],
                num_actions=self.config.model.num_actions)

  def visualize(self, model, batch):
    out = self.predict_next(model, batch)
    return [out["target"], out["pred"]]
