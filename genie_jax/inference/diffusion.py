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

from genie_jax.inference import genie as genie_lib
from genie_jax.models import diffusion as diffusion_lib
from genie_jax.models import dynamics as dynamics_lib
from genie_jax.models import tokenizer as tokenizer_lib


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
                    cached: bool = True, noise_scale: float = 1.0,
                    prompt_actions_BT: jax.Array | None = None) -> jax.Array:
  """Latents of the prompt's p frames followed by one generated frame per action.

  Args:
    dynamics: the model.
    prompt_BTNL: clean latents of the p >= 1 prompt frames.
    actions_BT: int latent actions of the a generated frames: actions_BT[:, i] produces
      generated frame i (frame p + i), as in the MaskGIT rollout.
    rng: key of the initial noise (frame f's from fold_in(rng, f)).
    num_steps: Euler steps per frame.
    cached: keep the window's past keys/values across a frame's steps.
    noise_scale: scale of each frame's starting noise (1: the model's level-1 distribution;
      0: every frame starts from zeros, a deterministic flow).
    prompt_actions_BT: the p - 1 actions between the prompt's frames (the LAM's), when
      p > 1.

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
  if p > 1:
    if prompt_actions_BT is None or prompt_actions_BT.shape != (b, p - 1):
      raise ValueError(f"a prompt of {p} frames needs prompt_actions_BT of shape "
                       f"{(b, p - 1)} (the actions between its frames)")
    taken_BT = taken_BT.at[:, :p - 1].set(prompt_actions_BT.astype(jnp.int32))
  levels = _levels(num_steps)

  def frame(f, z_BTNL):
    start = jnp.maximum(f - (w - 1), 0)
    at = f - start  # The new frame's place in the window.
    window_BTNL = jax.lax.dynamic_slice_in_dim(z_BTNL, start, w, axis=1)
    # The window's first frame has no cause in it, as every clip's first frame in training.
    caused_window_BT = dynamics_lib.caused_by(
        jax.lax.dynamic_slice_in_dim(taken_BT, start, w, axis=1), dynamics.no_action)
    x_BNL = noise_scale * jax.random.normal(jax.random.fold_in(rng, f),
                                            z_BTNL.shape[:1] + z_BTNL.shape[2:])
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


def decode_latent_frames(tokenizer: tokenizer_lib.Tokenizer, z_BTNL: jax.Array) -> jax.Array:
  """video_BTHWC float [0, 1] of latents of any number of frames: frames beyond the causal
  decoder's max_frames are decoded from the window ending at them."""
  t_max = tokenizer.decoder.max_frames
  t = z_BTNL.shape[1]
  decode = lambda z: jnp.clip(tokenizer.decode_latents(z), 0.0, 1.0)
  if t <= t_max:
    return decode(z_BTNL)

  def frame_at(f):
    start = f - (t_max - 1)
    return decode(jax.lax.dynamic_slice_in_dim(z_BTNL, start, t_max, axis=1))[:, -1]

  tail_TBHWC = jax.lax.map(frame_at, jnp.arange(t_max, t))
  return jnp.concatenate([decode(z_BTNL[:, :t_max]), jnp.moveaxis(tail_TBHWC, 0, 1)], axis=1)


def prompt_actions(world, prompt_BTHWC: jax.Array) -> jax.Array | None:
  """The LAM's actions between the prompt's frames; None for a one-frame prompt."""
  return world.lam.infer_actions(prompt_BTHWC) if prompt_BTHWC.shape[1] > 1 else None


def _rollout(world, prompt_BTHWC, actions_BT, rng, *, num_steps, noise_scale, cached):
  z_BTNL = rollout_latents(world.dynamics, world.tokenizer.encode_latents(prompt_BTHWC),
                           actions_BT, rng, num_steps=num_steps, cached=cached,
                           noise_scale=noise_scale,
                           prompt_actions_BT=prompt_actions(world, prompt_BTHWC))
  p = prompt_BTHWC.shape[1]
  generated_BTHWC = decode_latent_frames(world.tokenizer, z_BTNL)[:, p:]
  return jnp.concatenate([tokenizer_lib.to_unit_interval(prompt_BTHWC), generated_BTHWC], 1)


def _play_step(world, z_BTNL, taken_BT, n, action_B, rng, *, num_steps, noise_scale):
  """The next frame of a play session whose buffer holds n frames (the last at n - 1):
  (buffer with it at n, actions with action_B at n - 1, its pixels (B, H, W, C))."""
  taken_BT = jax.lax.dynamic_update_index_in_dim(taken_BT, action_B.astype(jnp.int32), n - 1,
                                                 axis=1)
  w = world.dynamics.transformer.max_frames
  start = jnp.maximum(n - (w - 1), 0)
  window_BTNL = jax.lax.dynamic_slice_in_dim(z_BTNL, start, w, axis=1)
  caused_BT = dynamics_lib.caused_by(
      jax.lax.dynamic_slice_in_dim(taken_BT, start, w, axis=1), world.dynamics.no_action)
  x_BNL = noise_scale * jax.random.normal(rng, z_BTNL.shape[:1] + z_BTNL.shape[2:])
  x_BNL = _denoise_cached(world.dynamics, window_BTNL, caused_BT, n - start, x_BNL,
                          _levels(num_steps))
  z_BTNL = jax.lax.dynamic_update_index_in_dim(z_BTNL, x_BNL, n, axis=1)
  t_max = world.tokenizer.decoder.max_frames
  first = jnp.maximum(n - (t_max - 1), 0)
  frames_BTHWC = jnp.clip(world.tokenizer.decode_latents(
      jax.lax.dynamic_slice_in_dim(z_BTNL, first, t_max, axis=1)), 0.0, 1.0)
  frame_BHWC = jax.lax.dynamic_index_in_dim(frames_BTHWC, n - first, axis=1, keepdims=False)
  return z_BTNL, taken_BT, frame_BHWC


class DiffusionGenie(genie_lib.Generator):
  """A trained diffusion-forcing world model for generation: `rollout` and `start` as
  `genie_jax.inference.genie.Genie`'s, the MaskGIT step count read as Euler steps per frame
  and the temperature as the scale of each frame's starting noise."""

  stage = "diffusion"

  def __init__(self, world: dynamics_lib.WorldModel, *, config=None, step=None):
    super().__init__(world, config=config, step=step)
    self._rollout = self._jit(_rollout, static=("num_steps", "noise_scale", "cached"))
    self._play_step = self._jit(_play_step, static=("num_steps", "noise_scale"))
    self._encode = self._jit(lambda w, v: w.tokenizer.encode_latents(v))

  def rollout(self, prompt_BTHWC, actions_BT, *, rng: jax.Array, num_steps: int = 25,
              temperature: float = 1.0, cached: bool = True) -> jax.Array:
    """Generates one frame per action after the prompt (as `Genie.rollout`).

    Args:
      prompt_BTHWC: uint8 prompt frames, 1 <= T <= `max_prompt_frames`.
      actions_BT: int latent actions in [0, A); actions_BT[:, i] produces generated frame i.
      rng: PRNG key.
      num_steps: Euler steps per frame.
      temperature: scale of each frame's starting noise (1: the trained distribution).
      cached: keep the window's past keys/values across a frame's steps.

    Returns:
      video float32 (B, p + a, H, W, C) in [0, 1]: the prompt's p frames, then the a
      generated frames.
    """
    prompt, actions = self._check_rollout(prompt_BTHWC, actions_BT)
    return self._rollout(self._state, prompt, jnp.asarray(actions), rng,
                         num_steps=int(num_steps), noise_scale=float(temperature),
                         cached=cached)

  def start(self, prompt_BTHWC, *, rng: jax.Array | None = None, num_steps: int = 25,
            temperature: float = 1.0) -> DiffusionPlaySession:
    """An interactive session that generates one frame per `step(action)`."""
    return DiffusionPlaySession(
        self, self._check_video(prompt_BTHWC, "prompt", self.max_prompt_frames),
        rng=jax.random.key(0) if rng is None else rng, num_steps=num_steps,
        temperature=temperature)


class DiffusionPlaySession(genie_lib.Session):
  """Diffusion play (`DiffusionGenie.start`): a buffer of latents and of the actions taken."""

  def __init__(self, genie: DiffusionGenie, prompt_BTHWC: jax.Array, *, rng: jax.Array,
               num_steps: int, temperature: float):
    super().__init__(genie, prompt_BTHWC, rng=rng,
                     length=max(genie.max_frames, genie.tokenizer_frames))
    self._static = dict(num_steps=int(num_steps), noise_scale=float(temperature))
    b, p = prompt_BTHWC.shape[:2]
    prompt_BTNL = genie._encode(genie._state, prompt_BTHWC)  # pylint: disable=protected-access
    self._z_BTNL = jnp.zeros((b, self._length) + prompt_BTNL.shape[2:], jnp.float32).at[
        :, :p].set(prompt_BTNL)
    self._taken_BT = jnp.zeros((b, self._length), jnp.int32)
    if p > 1:
      self._taken_BT = self._taken_BT.at[:, :p - 1].set(genie.infer_actions(prompt_BTHWC))

  def _roll(self):
    self._z_BTNL = jnp.roll(self._z_BTNL, -1, axis=1)
    self._taken_BT = jnp.roll(self._taken_BT, -1, axis=1)

  def _advance(self, action_B, key):
    genie = self._genie
    self._z_BTNL, self._taken_BT, frame_BHWC = genie._play_step(  # pylint: disable=protected-access
        genie._state, self._z_BTNL, self._taken_BT,  # pylint: disable=protected-access
        jnp.int32(self._count), action_B, key, **self._static)
    return frame_BHWC
