"""Stage 3, the diffusion family: a diffusion-forcing dynamics model on the latents of a
continuous tokenizer (model.quantizer='kl') and the actions of a LAM, both frozen.

Loss. Each frame of each clip draws its own noise level tau ~ U[0, 1] (Diffusion Forcing)
and its latents are noised to it (`diffusion.noised`). With objective 'velocity' the target
is eps - z and the loss the mean squared error of the prediction, every latent entry and
every level weighted alike (in terms of the clean latents, a weight of 1 / tau^2 on their
squared error: flow matching's usual weighting); with objective 'x0' the target is z and
every entry weighted alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from genie_jax.models import diffusion as diffusion_lib
from genie_jax.models import dynamics as dynamics_lib
from genie_jax.models import lam as lam_lib
from genie_jax.models import tokenizer as tokenizer_lib
from genie_jax.tasks import base
from genie_jax.tasks import dynamics as dynamics_task


def sample_levels(rng: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """Training noise levels tau_BT: independent per frame, uniform in [0, 1]."""
  return jax.random.uniform(rng, shape, jnp.float32)


class DiffusionTask(base.Task):
  """Loss: see the module docstring. Config keys (besides the trainer's): tokenizer_workdir,
  tokenizer_step, lam_workdir, lam_step, tokenizer_model, lam_model (`base.Dependency`);
  model: `genie_jax.models.diffusion.default_config`."""

  depends_on = (base.Dependency("tokenizer", "tokenizer"), base.Dependency("lam", "lam"))
  trainable = nnx.All(nnx.Param, nnx.PathContains("dynamics"))

  @classmethod
  def derive_config(cls, config, upstream):
    del config
    tokenizer, lam = upstream["tokenizer"], upstream["lam"]
    return {"model.latent_dim": tokenizer.latent_dim,
            "model.tokens_per_frame": (tokenizer.image_size // tokenizer.patch_size) ** 2,
            "model.num_actions": lam.num_actions}

  def validate(self) -> None:
    config = self.config
    dynamics_task.check_world_model_config(
        config, "kl", "it denoises continuous latents; the MaskGIT stage predicts tokens")
    diffusion_lib.validate_config(config.model)

  def make_model(self, rngs):
    return dynamics_lib.WorldModel(
        tokenizer=tokenizer_lib.Tokenizer(self.config.tokenizer_model, rngs=rngs),
        lam=lam_lib.LatentActionModel(self.config.lam_model, rngs=rngs),
        dynamics=diffusion_lib.DiffusionModel(self.config.model, rngs=rngs))

  def latents_and_actions(self, model: dynamics_lib.WorldModel, video_BTHWC: jax.Array
                          ) -> tuple[jax.Array, jax.Array]:
    """The tokenizer's latents z_BTNL and the LAM's actions_BT (dataset convention: [:, t]
    caused frame t+1; the last column is 0 and unused) of a clip; no gradient into either."""
    z_BTNL = model.tokenizer.encode_latents(video_BTHWC)
    actions_BT = jnp.pad(model.lam.infer_actions(video_BTHWC), ((0, 0), (0, 1)))
    return jax.lax.stop_gradient(z_BTNL), jax.lax.stop_gradient(actions_BT)

  def noised_batch(self, model: dynamics_lib.WorldModel, batch, rng: jax.Array
                   ) -> dict[str, jax.Array]:
    """The training example of a batch: clean latents 'z', levels 'tau', noise 'eps', the
    noised latents 'z_tau', 'actions' and the objective's 'target'."""
    level_key, noise_key = jax.random.split(rng)
    z_BTNL, actions_BT = self.latents_and_actions(model, batch["video"])
    tau_BT = sample_levels(level_key, z_BTNL.shape[:2])
    eps_BTNL = jax.random.normal(noise_key, z_BTNL.shape, jnp.float32)
    target = eps_BTNL - z_BTNL if model.dynamics.objective == "velocity" else z_BTNL
    return dict(z=z_BTNL, tau=tau_BT, eps=eps_BTNL,
                z_tau=diffusion_lib.noised(z_BTNL, eps_BTNL, tau_BT), actions=actions_BT,
                target=target)

  def loss(self, model, batch, rng):
    ex = self.noised_batch(model, batch, rng)
    prediction_BTNL = model.dynamics(ex["z_tau"], ex["tau"], ex["actions"])
    loss = jnp.mean(jnp.square(prediction_BTNL - ex["target"]))
    x0_BTNL = model.dynamics.clean_estimate(prediction_BTNL, ex["z_tau"], ex["tau"])
    metrics = dict(diffusion_loss=loss, x0_mse=jnp.mean(jnp.square(x0_BTNL - ex["z"])))
    return loss, metrics, None

  def visualize(self, model, batch):
    """Rows: the clip, its tokenizer reconstruction, and the one-step clean estimate of
    every frame noised to level 0.5 (the past noised too)."""
    z_BTNL, actions_BT = self.latents_and_actions(model, batch["video"])
    tau_BT = jnp.full(z_BTNL.shape[:2], 0.5, jnp.float32)
    eps_BTNL = jax.random.normal(jax.random.key(0), z_BTNL.shape, jnp.float32)
    z_tau = diffusion_lib.noised(z_BTNL, eps_BTNL, tau_BT)
    x0_BTNL = model.dynamics.clean_estimate(model.dynamics(z_tau, tau_BT, actions_BT), z_tau,
                                            tau_BT)
    decode = lambda z: jnp.clip(model.tokenizer.decode_latents(z), 0.0, 1.0)
    return [tokenizer_lib.to_unit_interval(batch["video"]), decode(z_BTNL), decode(x0_BTNL)]

