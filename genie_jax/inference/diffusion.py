"""Rollouts of the diffusion-forcing dynamics model (genie_jax/models/diffusion.py): frame by
frame, each new frame's latents from noise (level 1) to clean (level 0) in `num_steps` Euler
steps of the flow (steps of size 1 / num_steps; a shortcut model is told the size), its past
clean.

The cached sampler keeps the past frames' temporal keys/values in the MaskGIT sampler's
cache (`genie_jax.inference.genie.FrameCache`): each denoising step is a single-frame pass
against it, and a finished frame is appended by one more pass at level 0, so a frame costs
num_steps + 1 single-frame passes. Past the model's window the cache behaves as the MaskGIT
one: rebuilt from the window under learned temporal positions (the output of the model run
on the window), rolled under rotary ones (after `sink_frames` kept for good), at a cost per
frame that does not grow with the rollout. The uncached sampler runs the whole window at every
step (the reference the cache is tested against). Both are one compiled program for every
frame.
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
    prompt_BTNL: clean latents of the p >= 1 prompt frames (p < the model's max_frames).
    actions_BT: int latent actions of the a generated frames: actions_BT[:, i] produces
      generated frame i (frame p + i), as in the MaskGIT rollout.
    rng: key of the initial noise (frame f's from fold_in(rng, f)).
    num_steps: Euler steps per frame (`DiffusionModel.check_num_steps`).
    cached: keep the past frames' keys/values (module docstring).
    noise_scale: scale of each frame's starting noise (1: the model's level-1 distribution;
      0: every frame starts from zeros, a deterministic flow).
    prompt_actions_BT: the p - 1 actions between the prompt's frames (the LAM's), when
      p > 1.

  Returns:
    z_BTNL, float32, (B, p + a, N, L).
  """
  dynamics.check_num_steps(num_steps)
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
  noise = lambda f: noise_scale * jax.random.normal(jax.random.fold_in(rng, f),
                                                    z_BTNL.shape[:1] + z_BTNL.shape[2:])
  put = lambda z_BTNL, x_BNL, f: jax.lax.dynamic_update_index_in_dim(z_BTNL, x_BNL, f, axis=1)

  if not cached:
    def frame(f, z_BTNL):
      return put(z_BTNL, _denoise_uncached(dynamics, z_BTNL, taken_BT, f, noise(f),
                                           num_steps), f)
    return jax.lax.fori_loop(p, p + a, frame, z_BTNL)[:, :p + a]

  def cached_frame(f, carry):
    z_BTNL, cache = carry
    x_BNL, cache = generate_next(dynamics, cache, z_BTNL, taken_BT, f, f, noise(f),
                                 num_steps=num_steps)
    return put(z_BTNL, x_BNL, f), cache

  cache = genie_lib.prefill_cache(dynamics, z_BTNL[:, :p], taken_BT[:, :p])
  z_BTNL, _ = jax.lax.fori_loop(p, p + a, cached_frame, (z_BTNL, cache))
  return z_BTNL[:, :p + a]


def _denoise(dynamics, predict, x_BNL, num_steps):
  """x_BNL (the new frame's starting noise) taken from level 1 to 0 in num_steps Euler steps
  of size 1 / num_steps, predict(x_BNL, tau, step_B1) giving the model's prediction."""
  levels = _levels(num_steps)
  step_B1 = jnp.full((x_BNL.shape[0], 1), diffusion_lib.step_index(num_steps), jnp.int32)

  def step(k, x_BNL):
    tau, tau_next = levels[k], levels[k + 1]
    return _step(dynamics, predict(x_BNL, tau, step_B1), x_BNL, tau, tau_next)

  return jax.lax.fori_loop(0, num_steps, step, x_BNL)


def _denoise_uncached(dynamics, z_BTNL, taken_BT, f, x_BNL, num_steps):
  """Frame f from x_BNL, the model run on the whole window ending at f at every step."""
  b, w = z_BTNL.shape[0], dynamics.transformer.max_frames
  start = jnp.maximum(f - (w - 1), 0)
  at = f - start  # The new frame's place in the window.
  window_BTNL = jax.lax.dynamic_slice_in_dim(z_BTNL, start, w, axis=1)
  # The window's first frame has no cause in it, as every clip's first frame in training.
  caused_BT = dynamics.frame_actions(jax.lax.dynamic_slice_in_dim(taken_BT, start, w, axis=1))

  def predict(x_BNL, tau, step_B1):
    inputs_BTNL = jax.lax.dynamic_update_index_in_dim(window_BTNL, x_BNL, at, axis=1)
    # The past clean; frames after the new one are never attended to (causal).
    is_new_1T = jnp.arange(w)[None] == at
    tau_BT = jnp.where(is_new_1T, tau, 0.0) * jnp.ones((b, 1))
    step_BT = jnp.where(is_new_1T, step_B1, dynamics.finest_step)
    x_BTMD = dynamics.embed(inputs_BTNL, tau_BT, caused_BT, step_BT)
    prediction_BTNL = dynamics.readout(dynamics.transformer(x_BTMD))
    return jax.lax.dynamic_index_in_dim(prediction_BTNL, at, axis=1, keepdims=False)

  return _denoise(dynamics, predict, x_BNL, num_steps)


def generate_next(dynamics: diffusion_lib.DiffusionModel, cache: genie_lib.FrameCache,
                  z_BTNL: jax.Array, taken_BT: jax.Array, n: jax.Array, g: jax.Array,
                  x_BNL: jax.Array, *, num_steps: int
                  ) -> tuple[jax.Array, genie_lib.FrameCache]:
  """Frame g's latents from its starting noise x_BNL with the cache, and the cache with it
  (n: its index in the buffers z_BTNL / taken_BT; `genie_lib.frame_context`)."""
  run, commit = genie_lib.frame_context(dynamics, cache, z_BTNL, taken_BT, n, g)
  caused_B1 = genie_lib.caused_at(taken_BT, n)

  def predict(x_BNL, tau, step_B1):
    x_B1MD = dynamics.embed(x_BNL[:, None], jnp.full(step_B1.shape, tau), caused_B1, step_B1)
    return dynamics.readout(run(x_B1MD))[:, 0]

  x_BNL = _denoise(dynamics, predict, x_BNL, num_steps)
  return x_BNL, commit(dynamics.embed_context(x_BNL[:, None], caused_B1))


def decode_latent_frames(tokenizer: tokenizer_lib.Tokenizer, z_BTNL: jax.Array) -> jax.Array:
  """video_BTHWC float [0, 1] of latents of any number of frames (`genie_lib.decode_inputs`:
  a streaming decoder rolls its cache past its window)."""
  return genie_lib.decode_inputs(tokenizer, tokenizer.from_latent(z_BTNL))


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


def _play_start(world, prompt_BTHWC, *, length):
  """Buffers and caches of a play session: (z_BTNL, taken_BT, (dynamics cache, streaming
  decoder's cache or None))."""
  b, p = prompt_BTHWC.shape[:2]
  prompt_BTNL = world.tokenizer.encode_latents(prompt_BTHWC)
  z_BTNL = jnp.zeros((b, length) + prompt_BTNL.shape[2:], jnp.float32).at[:, :p].set(
      prompt_BTNL)
  taken_BT = jnp.zeros((b, length), jnp.int32)
  if p > 1:
    taken_BT = taken_BT.at[:, :p - 1].set(world.lam.infer_actions(prompt_BTHWC))
  decoder_cache = (genie_lib.stream_decode(world.tokenizer,
                                           world.tokenizer.from_latent(prompt_BTNL))[1]
                   if genie_lib.streams(world.tokenizer) else None)
  return z_BTNL, taken_BT, (genie_lib.prefill_cache(world.dynamics, prompt_BTNL,
                                                    taken_BT[:, :p]), decoder_cache)


def _play_step(world, z_BTNL, taken_BT, caches, n, g, action_B, rng, *, num_steps,
               noise_scale):
  """The frame at buffer index n (frame g) caused by action_B: (buffers and caches with it,
  its pixels (B, H, W, C))."""
  cache, decoder_cache = caches
  taken_BT = jax.lax.dynamic_update_index_in_dim(taken_BT, action_B.astype(jnp.int32), n - 1,
                                                 axis=1)
  x_BNL = noise_scale * jax.random.normal(rng, z_BTNL.shape[:1] + z_BTNL.shape[2:])
  x_BNL, cache = generate_next(world.dynamics, cache, z_BTNL, taken_BT, n, g, x_BNL,
                               num_steps=num_steps)
  z_BTNL = jax.lax.dynamic_update_index_in_dim(z_BTNL, x_BNL, n, axis=1)
  tokenizer = world.tokenizer
  if decoder_cache is None:
    frame_BHWC = genie_lib.decode_frame_at(tokenizer, tokenizer.from_latent(z_BTNL), n)
  else:
    frame_BHWC, decoder_cache = genie_lib.decode_next(
        tokenizer, decoder_cache, tokenizer.from_latent(x_BNL[:, None]), g)
  return z_BTNL, taken_BT, (cache, decoder_cache), frame_BHWC


class DiffusionGenie(genie_lib.Generator):
  """A trained diffusion-forcing world model for generation: `rollout` and `start` as
  `genie_jax.inference.genie.Genie`'s, the MaskGIT step count read as Euler steps per frame
  and the temperature as the scale of each frame's starting noise."""

  stage = "diffusion"

  def __init__(self, world: dynamics_lib.WorldModel, *, config=None, step=None):
    super().__init__(world, config=config, step=step)
    self._rollout = self._jit(_rollout, static=("num_steps", "noise_scale", "cached"))
    self._play_start = self._jit(_play_start, static=("length",), replicated=True)
    self._play_step = self._jit(_play_step, static=("num_steps", "noise_scale"),
                                replicated=True)

  @property
  def step_choices(self) -> tuple[int, ...] | None:
    """A shortcut model's step counts 1, 2, 4, ..., K; None for a plain flow model."""
    k = self.world.dynamics.shortcut_steps
    return tuple(2 ** i for i in range(diffusion_lib.step_index(k) + 1)) if k else None

  def _check_steps(self, num_steps: int, name: str) -> None:
    diffusion_lib.check_num_steps(num_steps, self.world.dynamics.shortcut_steps, name)

  def rollout(self, prompt_BTHWC, actions_BT, *, rng: jax.Array, num_steps: int | None = None,
              temperature: float = 1.0, cached: bool = True) -> jax.Array:
    """Generates one frame per action after the prompt (as `Genie.rollout`).

    Args:
      prompt_BTHWC: uint8 prompt frames, 1 <= T <= `max_prompt_frames`.
      actions_BT: int latent actions in [0, A); actions_BT[:, i] produces generated frame i.
      rng: PRNG key.
      num_steps: Euler steps per frame (a shortcut model: 1, 2, 4, ... up to its K);
        default `default_steps`.
      temperature: scale of each frame's starting noise (1: the trained distribution).
      cached: keep the past frames' keys/values (module docstring).

    Returns:
      video float32 (B, p + a, H, W, C) in [0, 1]: the prompt's p frames, then the a
      generated frames.
    """
    prompt, actions = self._check_rollout(prompt_BTHWC, actions_BT)
    return self._rollout(self._state, prompt, jnp.asarray(actions), rng,
                         num_steps=self.resolve_steps(num_steps), noise_scale=float(temperature),
                         cached=cached)

  def start(self, prompt_BTHWC, *, rng: jax.Array | None = None,
            num_steps: int | None = None, temperature: float = 1.0) -> genie_lib.PlaySession:
    """An interactive session that generates one frame per `step(action)` (num_steps: as
    `rollout`)."""
    return genie_lib.PlaySession(
        self, self._check_video(prompt_BTHWC, "prompt", self.max_prompt_frames),
        rng=jax.random.key(0) if rng is None else rng,
        static=dict(num_steps=self.resolve_steps(num_steps), noise_scale=float(temperature)))
