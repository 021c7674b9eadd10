"""Diffusion-forcing dynamics model on a continuous tokenizer's latents.

z_BTNL (each frame noised to its own level tau_BT) + latent actions + the levels ->
embeddings -> causal ST-transformer -> prediction_BTNL: the velocity eps - z (objective
'velocity') or the clean latents z (objective 'x0') of every frame.

Noise (flow matching, rectified path): a frame's latents at level tau in [0, 1] are
z_tau = (1 - tau) * z + tau * eps with eps ~ N(0, 1), clean at 0 and pure noise at 1. Each
frame has its own level (Diffusion Forcing), so in training a frame's past is anywhere from
clean to noise, and in sampling the past is clean while the new frame goes from 1 to 0.

Few-step sampling (`shortcut_steps` K > 0, a shortcut model): the model is also conditioned
on the step size d in {1, 1/2, ..., 1/K} it will be asked to take (index log2(1/d), `step_BT`),
and learns, besides the flow at the finest size 1/K, that one step of size d lands where two
steps of d/2 do (`genie_jax.tasks.diffusion`); a sampler may then take 1, 2, 4, ... or K
steps per frame. Clean past frames are read at the finest size.

Actions enter exactly as in the MaskGIT stage (`genie_jax.models.dynamics`): frame t is
conditioned on the action that caused it (`dynamics.caused_by`), added to every token of the
frame ('additive') or held by a token in front of the frame's N tokens ('prepend'); so is
the frame's noise level. With causal temporal attention the prediction for frame t depends on
frames <= t, their levels and the actions that caused them only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from genie_jax import sharding
from genie_jax.models import dynamics as dynamics_lib
from genie_jax.models import layers

OBJECTIVES = ("velocity", "x0")

_ACT_BTNL = ("act_batch", "act_time", "act_tokens", None)
# The latent tokens enter at about unit scale (a LeCun-initialised projection of latents of
# about unit variance); the action and step embeddings added to them start at that scale too,
# not at the 0.02 of a token embedding, which the tokens would drown.
_EMBED_STDDEV = 1.0
# Sinusoidal features of the noise level (half sines, half cosines).
_LEVEL_FEATURES = 64


def default_config() -> ml_collections.ConfigDict:
  """config.model of the diffusion dynamics model; the transformer keys as in
  `genie_jax.models.dynamics.default_config`.

  Keys besides those:
    latent_dim: L, the tokenizer's latent width (0: from the tokenizer workdir).
    objective: 'velocity' (predict eps - z) or 'x0' (predict z); see the task for the loss.
    shortcut_steps: K, 0 (a plain flow model) or a power of two >= 2: the finest of the step
      sizes 1, 1/2, ..., 1/K the model is conditioned on (module docstring); needs
      objective 'velocity'.
    shortcut_fraction: the share of each batch's clips with a frame trained on the
      shortcut's self-consistency target (at least one clip; `genie_jax.tasks.diffusion`).
  """
  cfg = ml_collections.ConfigDict(dict(latent_dim=0, objective="velocity", shortcut_steps=0,
                                       shortcut_fraction=0.25,
                                       **dynamics_lib.WORLD_MODEL_DEFAULTS))
  cfg.lock()
  return cfg


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError, naming the config.model key, for a config the model cannot use."""
  dynamics_lib.validate_world_model_config(cfg, ("latent_dim",))
  if cfg.objective not in OBJECTIVES:
    raise ValueError(f"config.model.objective={cfg.objective!r}; expected one of "
                     f"{list(OBJECTIVES)}")
  k = shortcut_steps(cfg)
  if k < 0 or k == 1 or (k and k & (k - 1)):
    raise ValueError(f"config.model.shortcut_steps={k} must be 0 or a power of two >= 2")
  if k and cfg.objective != "velocity":
    raise ValueError(f"config.model.shortcut_steps={k} needs config.model.objective="
                     f"'velocity'; got {cfg.objective!r}")
  if k and not 0.0 < cfg.shortcut_fraction < 1.0:
    raise ValueError(f"config.model.shortcut_fraction={cfg.shortcut_fraction} must be in "
                     "(0, 1)")


def shortcut_steps(cfg: ml_collections.ConfigDict) -> int:
  """K of a config (configs saved before the key: 0)."""
  return int(cfg.get("shortcut_steps", 0))


def check_num_steps(num_steps: int, shortcut: int, what: str = "denoising steps per frame"
                    ) -> None:
  """ValueError unless a sampler may take num_steps steps per frame of a model with
  shortcut_steps=`shortcut`: any count >= 1 for a plain flow model, 1, 2, 4, ... up to K
  for a shortcut model; `what` names the setting."""
  if num_steps < 1 or (shortcut and (num_steps > shortcut or num_steps & (num_steps - 1))):
    allowed = (f"a power of two up to config.model.shortcut_steps={shortcut}" if shortcut
               else "at least 1")
    raise ValueError(f"{what}={num_steps}: this model takes {allowed}")


def step_index(num_steps: int) -> int:
  """The step-size index log2(num_steps) of steps of size 1 / num_steps."""
  return int(num_steps).bit_length() - 1


def level_features(tau_BT: jax.Array) -> jax.Array:
  """Sinusoidal features (B, T, 64) of noise levels in [0, 1], at frequencies from 1 to
  1000 cycles over the unit interval."""
  half = _LEVEL_FEATURES // 2
  freqs = jnp.exp(jnp.linspace(0.0, math.log(1000.0), half)) * (2 * math.pi)
  angles = tau_BT[..., None].astype(jnp.float32) * freqs
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def noised(z_BTNL: jax.Array, eps_BTNL: jax.Array, tau_BT: jax.Array) -> jax.Array:
  """z_tau = (1 - tau) z + tau eps, each frame at its own level."""
  tau = tau_BT[:, :, None, None]
  return (1.0 - tau) * z_BTNL + tau * eps_BTNL


class DiffusionModel(nnx.Module):
  """Denoises every frame of a clip at its own noise level, conditioned on latent actions;
  config keys: `default_config`."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    validate_config(cfg)
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.num_actions = cfg.num_actions
    self.tokens_per_frame = cfg.tokens_per_frame
    self.latent_dim = cfg.latent_dim
    self.objective = cfg.objective
    self.shortcut_steps = shortcut_steps(cfg)
    self.prepend = cfg.action_conditioning == "prepend"
    self.dtype = dtype
    positions, self.sink_frames = layers.temporal_settings(cfg)
    d = cfg.d_model
    linear = lambda n_in, n_out, names: layers.Linear(
        n_in, n_out, names=names, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.from_latent = linear(cfg.latent_dim, d, ("latent", "embed"))
    self.level_embed = linear(_LEVEL_FEATURES, d, ("positions", "embed"))
    # A actions + 'no action' (index A), which frame 0 gets.
    self.action_embed = layers.param(rngs, jax.nn.initializers.normal(_EMBED_STDDEV),
                                     (cfg.num_actions + 1, d), ("vocab", "embed"), param_dtype)
    if self.shortcut_steps:
      # Step sizes 1, 1/2, ..., 1/K by index log2(1/d).
      self.step_embed = layers.param(
          rngs, jax.nn.initializers.normal(_EMBED_STDDEV),
          (step_index(self.shortcut_steps) + 1, d), ("vocab", "embed"), param_dtype)
    self.transformer = layers.STTransformer(
        cfg.num_layers, d, cfg.num_heads,
        num_tokens=cfg.tokens_per_frame + int(self.prepend), max_frames=cfg.max_frames,
        mlp_ratio=cfg.mlp_ratio, qk_norm=cfg.qk_norm_kind if cfg.qk_norm else None,
        dtype=dtype, param_dtype=param_dtype, attention_impl=cfg.attention_impl,
        temporal_positions=positions, grid=dynamics_lib.token_grid(cfg),
        remat=cfg.remat_policy if cfg.remat else None,
        temporal_first=cfg.block_order == "temporal_first", rngs=rngs)
    self.to_latent = linear(d, cfg.latent_dim, ("embed", "latent"))

  @property
  def no_action(self) -> int:
    """Index of the 'no action' embedding (= A), which frame 0 gets."""
    return self.num_actions

  def frame_actions(self, actions_BT: jax.Array) -> jax.Array:
    """The action that caused each frame (`dynamics.caused_by`)."""
    return dynamics_lib.caused_by(actions_BT, self.no_action)

  @property
  def finest_step(self) -> int:
    """The step-size index of the finest size 1/K, at which the flow is learnt and clean
    past frames are read (0 for a plain flow model, which ignores it)."""
    return step_index(max(self.shortcut_steps, 1))

  def check_num_steps(self, num_steps: int) -> None:
    """`check_num_steps` for this model."""
    check_num_steps(num_steps, self.shortcut_steps)

  def embed(self, z_BTNL: jax.Array, tau_BT: jax.Array, caused_BT: jax.Array,
            step_BT: jax.Array | None = None) -> jax.Array:
    """Transformer input x_BTMD (M = N, or N + 1 with 'prepend': the frame's token first).

    Args:
      z_BTNL: the frames' latents, each at its noise level.
      tau_BT: float noise levels in [0, 1].
      caused_BT: int, the action that caused each frame (`dynamics.caused_by`), in [0, A].
      step_BT: a shortcut model's int step-size indices (`step_index`); None: the finest.
        Ignored by a plain flow model.
    """
    n, l = self.tokens_per_frame, self.latent_dim
    if z_BTNL.ndim != 4 or z_BTNL.shape[2:] != (n, l):
      raise ValueError(f"latents must be (B, T, {n}, {l}) for config.model tokens_per_frame"
                       f"={n}, latent_dim={l}; got {z_BTNL.shape}")
    if tau_BT.shape != z_BTNL.shape[:2] or caused_BT.shape != z_BTNL.shape[:2]:
      raise ValueError(f"levels {tau_BT.shape} and actions {caused_BT.shape} must match the "
                       f"latents' (B, T) {z_BTNL.shape[:2]}")
    x_BTND = self.from_latent(z_BTNL.astype(self.dtype))
    frame_BTD = (jnp.take(self.action_embed[...], caused_BT, axis=0).astype(self.dtype)
                 + self.level_embed(level_features(tau_BT)).astype(self.dtype))
    if self.shortcut_steps:
      if step_BT is None:
        step_BT = jnp.full(tau_BT.shape, self.finest_step, jnp.int32)
      frame_BTD = frame_BTD + jnp.take(self.step_embed[...], step_BT, axis=0).astype(self.dtype)
    frame_BT1D = frame_BTD[:, :, None]
    if self.prepend:
      return jnp.concatenate([frame_BT1D, x_BTND], axis=2)
    return x_BTND + frame_BT1D

  def embed_context(self, z_BTNL: jax.Array, caused_BT: jax.Array) -> jax.Array:
    """`embed` of clean frames (level 0, the finest step size), as a generated frame's past
    reads them."""
    return self.embed(z_BTNL, jnp.zeros(z_BTNL.shape[:2], jnp.float32), caused_BT)

  def readout(self, y_BTMD: jax.Array) -> jax.Array:
    """float32 prediction_BTNL of the N real tokens from transformer outputs y_BTMD."""
    if self.prepend:
      y_BTMD = y_BTMD[:, :, 1:]
    return sharding.constrain(self.to_latent(y_BTMD).astype(jnp.float32), _ACT_BTNL)

  def __call__(self, z_BTNL: jax.Array, tau_BT: jax.Array, actions_BT: jax.Array,
               step_BT: jax.Array | None = None) -> jax.Array:
    """The objective's prediction for every frame: float32 prediction_BTNL.

    Args:
      z_BTNL: latents, frame t noised to level tau_BT[:, t] (`noised`).
      tau_BT: noise levels in [0, 1].
      actions_BT: int latent actions in [0, A); actions_BT[:, t] was taken at frame t and
        produced frame t+1 (the last column is unused).
      step_BT: a shortcut model's step-size indices (see `embed`).
    """
    x_BTMD = self.embed(z_BTNL, tau_BT, self.frame_actions(actions_BT), step_BT)
    return self.readout(self.transformer(x_BTMD))

  def clean_estimate(self, prediction_BTNL: jax.Array, z_BTNL: jax.Array, tau_BT: jax.Array
                     ) -> jax.Array:
    """The clean latents the prediction implies: x0 itself, or z_tau - tau * velocity."""
    if self.objective == "x0":
      return prediction_BTNL
    return z_BTNL - tau_BT[:, :, None, None] * prediction_BTNL

  def velocity(self, prediction_BTNL: jax.Array, z_BTNL: jax.Array, tau_BT: jax.Array
               ) -> jax.Array:
    """d z_tau / d tau that the prediction implies (what a sampler integrates): the velocity
    itself, or (z_tau - x0) / tau for an x0 prediction (tau floored at 1e-3)."""
    if self.objective == "velocity":
      return prediction_BTNL
    tau = jnp.maximum(tau_BT[:, :, None, None], 1e-3)
    return (z_BTNL - prediction_BTNL) / tau
