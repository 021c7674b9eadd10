"""Stage 3, the diffusion family: a diffusion-forcing dynamics model on the latents of a
continuous tokenizer (model.quantizer='kl') and the actions of a LAM, both frozen.

Loss. Each frame of each clip draws its own noise level tau ~ U[0, 1] (Diffusion Forcing)
and its latents are noised to it (`diffusion.noised`). With objective 'velocity' the target
is eps - z and the loss the mean squared error of the prediction, every latent entry and
every level weighted alike (in terms of the clean latents, a weight of 1 / tau^2 on their
squared error: flow matching's usual weighting); with objective 'x0' the target is z and
every entry weighted alike.

Shortcut (config.model.shortcut_steps = K > 0, `genie_jax.models.diffusion`). In
nb = round(B * shortcut_fraction) clips of a batch (at least one), every (B // nb)-th from
the first, one frame i, uniform in {1, ..., T - 1}, learns the shortcut: it draws a step
size d = 2^-s, s uniform in {0, ..., log2 K - 1}, and a level on d's grid (tau = j d,
j uniform in {1, ..., 1/d}, so the step stays in [0, 1]); its target is the mean of the
model's own two velocities at size d / 2 (no gradient): v1 at (z_tau, tau), then v2 at
(z_tau - d/2 v1, tau - d/2), the second pass moving frame i only, so that its past is the
same in both (causal attention: the two passes are frame i's two steps exactly). Every other
frame learns the flow at the finest size 1/K as above. The loss is the mean squared error
over all frames, every entry weighted alike; `shortcut_loss` (the shortcut frames) and
`flow_loss` (the others) are logged apart.

Clean frames (config.clean_frame_fraction = p > 0). A generated frame's past is read clean,
at level 0 exactly (`DiffusionModel.embed_context`), which levels drawn from U[0, 1] never
give; so each frame other than a shortcut frame is, with probability p, left clean at level 0
instead. Clean frames are context only and leave the loss (at level 0 the velocity target
eps - z is not predictable from z): the losses and x0_mse are means over the noised frames.
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


def sample_shortcut_levels(rng: jax.Array, shape: tuple[int, int], shortcut_steps: int
                           ) -> tuple[jax.Array, jax.Array]:
  """(tau_BT, step_BT) of shortcut frames: step sizes d = 2^-step, step uniform in
  [0, log2 K), and levels uniform on d's grid {d, 2d, ..., 1}; independent per frame."""
  step_key, level_key = jax.random.split(rng)
  step_BT = jax.random.randint(step_key, shape, 0, diffusion_lib.step_index(shortcut_steps))
  per_step_BT = 2 ** step_BT  # 1 / d, the grid's points.
  j_BT = 1 + jnp.floor(jax.random.uniform(level_key, shape) * per_step_BT).astype(jnp.int32)
  return (jnp.minimum(j_BT, per_step_BT) / per_step_BT).astype(jnp.float32), step_BT


def shortcut_clips(config_model, batch_size: int) -> int:
  """How many of a batch's clips learn the shortcut (0 for a plain flow model)."""
  if not diffusion_lib.shortcut_steps(config_model):
    return 0
  return max(1, round(batch_size * config_model.shortcut_fraction))


class DiffusionTask(base.Task):
  """Loss: see the module docstring. Config keys (besides the trainer's): tokenizer_workdir,
  tokenizer_step, lam_workdir, lam_step, tokenizer_model, lam_model (`base.Dependency`);
  model: `genie_jax.models.diffusion.default_config`; clean_frame_fraction (module
  docstring; configs saved before the key: 0)."""

  depends_on = (base.Dependency("tokenizer", "tokenizer"), base.Dependency("lam", "lam"))
  trainable = nnx.All(nnx.Param, nnx.PathContains("dynamics"))

  @classmethod
  def derive_config(cls, config, upstream):
    del config
    tokenizer, lam = upstream["tokenizer"], upstream["lam"]
    return {"model.latent_dim": tokenizer.latent_dim,
            "model.tokens_per_frame": (tokenizer.image_size // tokenizer.patch_size) ** 2,
            "model.num_actions": lam.num_actions}

  def __init__(self, config):
    super().__init__(config)
    self.clean_fraction = config.get("clean_frame_fraction", 0.0)

  def validate(self) -> None:
    config = self.config
    if not 0.0 <= self.clean_fraction < 1.0:
      raise ValueError(f"config.clean_frame_fraction={self.clean_fraction} must be in [0, 1)")
    dynamics_task.check_world_model_config(
        config, "kl", "it denoises continuous latents; the MaskGIT stage predicts tokens")
    diffusion_lib.validate_config(config.model)
    if shortcut_clips(config.model, config.batch_size) and config.data.clip_len < 2:
      raise ValueError(f"config.model.shortcut_steps={config.model.shortcut_steps} needs "
                       f"clips of at least 2 frames (config.data.clip_len="
                       f"{config.data.clip_len}): the shortcut frame has a past")

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
    noised latents 'z_tau', 'actions' and the objective's 'target'; for a shortcut model
    also the step-size indices 'step' and the shortcut frames 'shortcut' (bool (B, T)),
    whose targets are `shortcut_target`'s (else both None); 'clean' (bool (B, T)), the
    frames left at level 0 (None without clean_frame_fraction)."""
    level_key, noise_key = jax.random.split(rng)
    z_BTNL, actions_BT = self.latents_and_actions(model, batch["video"])
    b, t = z_BTNL.shape[:2]
    tau_BT = sample_levels(level_key, (b, t))
    step_BT = shortcut_BT = None
    nb = shortcut_clips(self.config.model, b)
    # Every stride-th clip, spread over the batch rather than its first nb: the choice does
    # not depend on the mesh, and where nb divides B and the batch's shard count divides nb,
    # every device computes the shortcut targets of its own clips. Reshapes, not strided
    # slices: XLA partitions a strided scatter with all-gathers.
    stride = b // max(nb, 1)
    pick = lambda x: x[:nb * stride].reshape(nb, stride, *x.shape[1:])[:, 0]
    put = lambda x, part: jnp.concatenate([
        x[:nb * stride].reshape(nb, stride, *x.shape[1:]).at[:, 0].set(part).reshape(
            nb * stride, *x.shape[1:]), x[nb * stride:]])
    if nb:
      frame_key, shortcut_key = jax.random.split(jax.random.fold_in(rng, 2))
      frame_B1 = jax.random.randint(frame_key, (nb, 1), 1, t)
      shortcut_BT = put(jnp.zeros((b, t), bool), jnp.arange(t)[None] == frame_B1)
      tau_sc_BT, step_sc_BT = sample_shortcut_levels(shortcut_key, (b, t),
                                                     model.dynamics.shortcut_steps)
      tau_BT = jnp.where(shortcut_BT, tau_sc_BT, tau_BT)
      step_BT = jnp.where(shortcut_BT, step_sc_BT, model.dynamics.finest_step)
    clean_BT = None
    if self.clean_fraction:
      clean_BT = jax.random.uniform(jax.random.fold_in(rng, 3), (b, t)) < self.clean_fraction
      if nb:
        clean_BT &= ~shortcut_BT
      tau_BT = jnp.where(clean_BT, 0.0, tau_BT)
    eps_BTNL = jax.random.normal(noise_key, z_BTNL.shape, jnp.float32)
    z_tau = diffusion_lib.noised(z_BTNL, eps_BTNL, tau_BT)
    target = eps_BTNL - z_BTNL if model.dynamics.objective == "velocity" else z_BTNL
    if nb:
      picked_shortcut = pick(shortcut_BT)
      shortcut_target = self.shortcut_target(model.dynamics, pick(z_tau), pick(tau_BT),
                                             pick(actions_BT), pick(step_BT), picked_shortcut)
      target = put(target, jnp.where(picked_shortcut[:, :, None, None], shortcut_target,
                                     pick(target)))
    return dict(z=z_BTNL, tau=tau_BT, step=step_BT, shortcut=shortcut_BT, eps=eps_BTNL,
                z_tau=z_tau, actions=actions_BT, target=target, clean=clean_BT)

  @staticmethod
  def shortcut_target(dynamics: diffusion_lib.DiffusionModel, z_tau_BTNL: jax.Array,
                      tau_BT: jax.Array, actions_BT: jax.Array, step_BT: jax.Array,
                      shortcut_BT: jax.Array) -> jax.Array:
    """The velocity one step of size d = 2^-step should take at the shortcut frames: the
    mean of two steps of d/2 by the model itself, the other frames left where they are
    (module docstring), without gradient. Other frames' entries are not targets."""
    half_BT = jnp.where(shortcut_BT, step_BT + 1, step_BT)
    half_d_BT = jnp.where(shortcut_BT, 0.5 ** half_BT, 0.0)
    v1_BTNL = dynamics(z_tau_BTNL, tau_BT, actions_BT, half_BT)
    z_mid_BTNL = z_tau_BTNL - half_d_BT[:, :, None, None] * v1_BTNL
    v2_BTNL = dynamics(z_mid_BTNL, tau_BT - half_d_BT, actions_BT, half_BT)
    return jax.lax.stop_gradient(0.5 * (v1_BTNL + v2_BTNL))

  def loss(self, model, batch, rng):
    ex = self.noised_batch(model, batch, rng)
    prediction_BTNL = model.dynamics(ex["z_tau"], ex["tau"], ex["actions"], ex["step"])
    error_BT = jnp.mean(jnp.square(prediction_BTNL - ex["target"]), axis=(2, 3))
    x0_BTNL = model.dynamics.clean_estimate(prediction_BTNL, ex["z_tau"], ex["tau"])
    x0_error_BT = jnp.mean(jnp.square(x0_BTNL - ex["z"]), axis=(2, 3))
    mean_where = lambda x, m: jnp.sum(jnp.where(m, x, 0.0)) / jnp.maximum(jnp.sum(m), 1)
    noised_BT = None if ex["clean"] is None else ~ex["clean"]
    mean = jnp.mean if noised_BT is None else (lambda x: mean_where(x, noised_BT))
    loss = mean(error_BT)
    if ex["shortcut"] is None:
      return loss, dict(diffusion_loss=loss, x0_mse=mean(x0_error_BT)), None
    # The clean estimate of the flow frames (a shortcut velocity spans a step, not tau).
    shortcut_BT = ex["shortcut"]
    flow_BT = ~shortcut_BT if noised_BT is None else ~shortcut_BT & noised_BT
    return loss, dict(diffusion_loss=loss, x0_mse=mean_where(x0_error_BT, flow_BT),
                      shortcut_loss=mean_where(error_BT, shortcut_BT),
                      flow_loss=mean_where(error_BT, flow_BT)), None

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

