"""Rollouts of the diffusion-forcing dynamics model (genie_jax/models/diffusion.py): frame by
frame, each new frame's latents from noise (level 1) to clean (level 0) in `num_steps` Euler
steps of the flow, its past clean.

The cached sampler runs the window's past frames once per generated frame and keeps their
temporal keys/values for the frame's denoising steps, each a single-frame pass; the
uncached one runs the whole window at every step (the reference it is tested against). Both
are one compiled program for every frame (fixed-length windows, masked where the past is
shorter than the window).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from genie_jax.models import diffusion as diffusion_lib
from genie_jax.models import dynamics as dynamics_lib


def _levels(num_steps: int) -> jax.Array:
  """The num_steps + 1 levels 1, ..., 0 of the Euler steps."""
  return jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)


def _step(dynamics: diffusion_lib.DiffusionModel, prediction_BNL: jax.Array, x_BNL: jax.Array,
          tau: jax.Array, tau_next: jax.Array) -> jax.Array:
  """One Euler step of dz/dtau = velocity from level tau to tau_next."""
  b = x_BNL.shape[0]
  tau_B1 = jnp.full((b, 1), tau)
  v_BNL = dynamics.velocity(prediction_BNL[:, None], x_BNL[:, None], tau_B1)[:, 0]
  return x_BNL + (tau_next - tau) * v_BNL


def rollout_latents(dynamics: diffusion_lib.DiffusionModel, prompt_BTNL: jax.Array,
                    actions_BT: jax.Array, rng: jax.Array, *, num_steps: int,
                    cached: bool = True) -> jax.Array:
  """Latents of the prompt's p frames followed by one generated frame per action.

  Args:
    dynamics: the model.
    prompt_BTNL: clean latents of the p >= 1 prompt frames.
    actions_BT: int latent actions of the a generated frames: actions_BT[:, i] produces
      generated frame i (frame p + i), as in the MaskGIT rollout.
    rng: key of the initial noise (frame f's from fold_in(rng, f)).
    num_steps: Euler steps per frame.
    cached: keep the window's past keys/values across a frame's steps.

  Returns:
    z_BTNL, float32, (B, p + a, N, L).
  """
  b, p = prompt_BTNL.shape[:2]
  a = actions_BT.shape[1]
  w = dynamics.transformer.max_frames
  # Long enough for a whole window at every frame; frames past p + a are never read as past.
  length = max(p + a, w)
  z_BTNL = jnp.zeros((b, length) + prompt_BTNL.shape[2:], jnp.float32)
  z_BTNL = z_BTNL.at[:, :p].set(prompt_BTNL.astype(jnp.float32))
  taken_BT = jnp.zeros((b, length), jnp.int32).at[:, p - 1:p - 1 + a].set(
      actions_BT.astype(jnp.int32))
  caused_BT = dynamics_lib.caused_by(taken_BT, dynamics.no_action)
  levels = _levels(num_steps)

  def frame(f, z_BTNL):
    start = jnp.maximum(f - (w - 1), 0)
    at = f - start  # The new frame's place in the window.
    window_BTNL = jax.lax.dynamic_slice_in_dim(z_BTNL, start, w, axis=1)
    caused_window_BT = jax.lax.dynamic_slice_in_dim(caused_BT, start, w, axis=1)
    x_BNL = jax.random.normal(jax.random.fold_in(rng, f), z_BTNL.shape[:1] + z_BTNL.shape[2:])
    if cached:
      x_BNL = _denoise_cached(dynamics, window_BTNL, caused_window_BT, at, x_BNL, levels)
    else:
      x_BNL = _denoise_uncached(dynamics, window_BTNL, caused_window_BT, at, x_BNL, levels)
    return jax.lax.dynamic_update_index_in_dim(z_BTNL, x_BNL, f, axis=1)

  z_BTNL = jax.lax.fori_loop(p, p + a, frame, z_BTNL)
  return z_BTNL[:, :p + a]


def _denoise_uncached(dynamics, window_BTNL, caused_BT, at, x_BNL, levels):
  b, w = window_BTNL.shape[:2]

  def step(k, x_BNL):
    tau, tau_next = levels[k], levels[k + 1]
    inputs_BTNL = jax.lax.dynamic_update_index_in_dim(window_BTNL, x_BNL, at, axis=1)
    # The past clean; frames after the new one are never attended to (causal).
    tau_BT = jnp.where(jnp.arange(w)[None] == at, tau, 0.0) * jnp.ones((b, 1))
    x_BTMD = dynamics.embed(inputs_BTNL, tau_BT, caused_BT)
    prediction_BTNL = dynamics.readout(dynamics.transformer(x_BTMD))
    prediction_BNL = jax.lax.dynamic_index_in_dim(prediction_BTNL, at, axis=1, keepdims=False)
    return _step(dynamics, prediction_BNL, x_BNL, tau, tau_next)

  return jax.lax.fori_loop(0, levels.shape[0] - 1, step, x_BNL)


def _denoise_cached(dynamics, window_BTNL, caused_BT, at, x_BNL, levels):
  b, w = window_BTNL.shape[:2]
  # The past frames' keys/values at level 0, positions 0..w-2; slots from `at` on are not
  # the new frame's past and are masked out.
  past_BTMD = dynamics.embed(window_BTNL[:, :w - 1], jnp.zeros((b, w - 1)),
                             caused_BT[:, :w - 1])
  _, cache = dynamics.transformer.prefill(past_BTMD)
  cache = dynamics.transformer.rotate_cache(cache, jnp.arange(w - 1))
  valid_S = jnp.arange(w - 1) < at
  caused_B1 = jax.lax.dynamic_slice_in_dim(caused_BT, at, 1, axis=1)

  def step(k, x_BNL):
    tau, tau_next = levels[k], levels[k + 1]
    x_B1MD = dynamics.embed(x_BNL[:, None], jnp.full((b, 1), tau), caused_B1)
    y_B1MD, _ = dynamics.transformer.decode_frame(x_B1MD, cache, at, valid_S)
    prediction_BNL = dynamics.readout(y_B1MD)[:, 0]
    return _step(dynamics, prediction_BNL, x_BNL, tau, tau_next)

  return jax.lax.fori_loop(0, levels.shape[0] - 1, step, x_BNL)
