"""Genie inference: tokenize a prompt, generate frames from latent actions, decode, play.

Generation of one frame (Genie section 2.3): the frame's tokens are decoded by MaskGIT
(`genie_jax.models.maskgit`) from the dynamics model, conditioned on the past frames and the
action that causes the new frame. The dynamics model sees at most `max_frames` frames: the
new frame and the last max_frames - 1 before it (a sliding window whose first frame, like the
first frame of every training clip, gets the 'no action' embedding).

Cached decoding: the past frames of the window go through the ST-transformer once per
generated frame (`STTransformer.prefill`), and each of the S MaskGIT steps then runs only
the new frame's tokens, attending in time to the cached keys/values (`decode_frame`). The
cache is rebuilt for every frame rather than appended to, because once the window slides
every past frame changes its temporal position, and with it its keys/values.

Everything per frame and per step runs inside one compiled program: a whole rollout is one
jitted call (a fori_loop over frames around a fori_loop over steps), and a PlaySession
compiles its step once (the frame index is traced).

Action convention: `actions_BA[:, i]` produces generated frame i (frame P + i of the video),
i.e. in the dataset's convention it is the action taken at frame P + i - 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genie_jax import stages
from genie_jax.models import dynamics as dynamics_lib
from genie_jax.models import maskgit
from genie_jax.models import tokenizer as tokenizer_lib
from genie_jax.visualize import to_uint8


def frame_logits_fn(dynamics: dynamics_lib.DynamicsModel, tokens_BLN: jax.Array,
                    actions_BL: jax.Array, f: jax.Array, *, cached: bool = True
                    ) -> maskgit.LogitsFn:
  """The MaskGIT logits function of frame `f` of a token buffer.

  Args:
    dynamics: the dynamics model.
    tokens_BLN: the frames so far (frames >= f are ignored); L >= the model's max_frames.
    actions_BL: dataset convention: actions_BL[:, t] was taken at frame t and produced
      frame t+1 (so actions_BL[:, f-1] causes frame f).
    f: index of the frame to generate (traced int allowed), >= 1.
    cached: run past frames once and only the new frame per call (see module docstring);
      else run the whole window on every call (the reference the cache is tested against).

  Returns:
    (tokens_BN, mask_BN) -> logits_BNV of frame f.
  """
  w = dynamics.transformer.temporal_pos.shape[0]
  start = jnp.maximum(f - (w - 1), 0)
  q = f - start  # Position of frame f in the window.
  window_BWN = jax.lax.dynamic_slice_in_dim(tokens_BLN, start, w, axis=1)
  window_actions_BW = jax.lax.dynamic_slice_in_dim(actions_BL, start, w, axis=1)
  if not cached:
    def full_logits(tokens_BN, mask_BN):
      tokens_BWN = jax.lax.dynamic_update_slice_in_dim(window_BWN, tokens_BN[:, None], q,
                                                       axis=1)
      mask_BWN = (jnp.arange(w) == q)[None, :, None] & mask_BN[:, None, :]
      logits_BWNV = dynamics(tokens_BWN, mask_BWN, window_actions_BW)
      return jax.lax.dynamic_index_in_dim(logits_BWNV, q, axis=1, keepdims=False)
    return full_logits

  caused_BW = dynamics.frame_actions(window_actions_BW)
  # Window slots >= q hold frames not generated yet; decode_frame ignores their cache slots.
  x_BCMD = dynamics.embed(window_BWN[:, :w - 1], jnp.zeros_like(window_BWN[:, :w - 1], bool),
                          caused_BW[:, :w - 1])
  _, cache = dynamics.transformer.prefill(x_BCMD)
  caused_B1 = jax.lax.dynamic_slice_in_dim(caused_BW, q, 1, axis=1)

  def cached_logits(tokens_BN, mask_BN):
    x_B1MD = dynamics.embed(tokens_BN[:, None], mask_BN[:, None], caused_B1)
    y_B1MD, _ = dynamics.transformer.decode_frame(x_B1MD, cache, q)
    return dynamics.readout(y_B1MD)[:, 0]
  return cached_logits


def decode_frame_at(tokenizer: tokenizer_lib.Tokenizer, tokens_BLN: jax.Array, f: jax.Array
                    ) -> jax.Array:
  """Frame f (float [0, 1], BHWC) decoded from the tokenizer-window of tokens ending at f."""
  t = tokenizer.decoder.temporal_pos.shape[0]
  start = jnp.maximum(f - (t - 1), 0)
  video_BTHWC = tokenizer.decode(jax.lax.dynamic_slice_in_dim(tokens_BLN, start, t, axis=1))
  return jax.lax.dynamic_index_in_dim(video_BTHWC, f - start, axis=1, keepdims=False)


def decode_frames(tokenizer: tokenizer_lib.Tokenizer, tokens_BTN: jax.Array) -> jax.Array:
  """video_BTHWC float [0, 1] of any number of frames; the causal decoder sees at most its
  max_frames, so frames beyond that are decoded from the window ending at them."""
  t_max = tokenizer.decoder.temporal_pos.shape[0]
  t = tokens_BTN.shape[1]
  if t <= t_max:
    return tokenizer.decode(tokens_BTN)
  head_BTHWC = tokenizer.decode(tokens_BTN[:, :t_max])
  tail_TBHWC = jax.lax.map(lambda f: decode_frame_at(tokenizer, tokens_BTN, f),
                           jnp.arange(t_max, t))
  return jnp.concatenate([head_BTHWC, jnp.moveaxis(tail_TBHWC, 0, 1)], axis=1)


def generate_frame(world: dynamics_lib.WorldModel, tokens_BLN: jax.Array,
                   actions_BL: jax.Array, f: jax.Array, rng: jax.Array, *, num_steps: int,
                   temperature: float, cached: bool = True) -> jax.Array:
  """Tokens of frame f (tokens_BN int32) by MaskGIT; see `frame_logits_fn` for the args."""
  b, _, n = tokens_BLN.shape
  logits_fn = frame_logits_fn(world.dynamics, tokens_BLN, actions_BL, f, cached=cached)
  return maskgit.sample_frame(logits_fn, rng, batch_size=b, num_tokens=n,
                              num_steps=num_steps, temperature=temperature)


def _prompt_buffers(world: dynamics_lib.WorldModel, prompt_BPHWC: jax.Array, length: int
                    ) -> tuple[jax.Array, jax.Array]:
  """Token and action buffers of `length` frames holding the prompt; the actions between
  prompt frames are the LAM's."""
  b, p = prompt_BPHWC.shape[:2]
  tokens_BPN, _ = world.tokenizer.encode(prompt_BPHWC)
  tokens_BLN = jnp.zeros((b, length, tokens_BPN.shape[2]), jnp.int32).at[:, :p].set(tokens_BPN)
  actions_BL = jnp.zeros((b, length), jnp.int32)
  if p > 1:
    actions_BL = actions_BL.at[:, :p - 1].set(world.lam.infer_actions(prompt_BPHWC))
  return tokens_BLN, actions_BL


def rollout_tokens(world: dynamics_lib.WorldModel, prompt_BPHWC: jax.Array,
                   actions_BA: jax.Array, rng: jax.Array, *, num_steps: int,
                   temperature: float, cached: bool = True) -> jax.Array:
  """tokens_BTN (T = P + A) of the prompt followed by A generated frames; traceable."""
  p, a = prompt_BPHWC.shape[1], actions_BA.shape[1]
  w = world.dynamics.transformer.temporal_pos.shape[0]
  tokens_BLN, actions_BL = _prompt_buffers(world, prompt_BPHWC, max(p + a, w))
  actions_BL = actions_BL.at[:, p - 1:p - 1 + a].set(actions_BA.astype(jnp.int32))

  def body(f, tokens_BLN):
    new_BN = generate_frame(world, tokens_BLN, actions_BL, f, jax.random.fold_in(rng, f),
                            num_steps=num_steps, temperature=temperature, cached=cached)
    return jax.lax.dynamic_update_slice_in_dim(tokens_BLN, new_BN[:, None], f, axis=1)

  return jax.lax.fori_loop(p, p + a, body, tokens_BLN)[:, :p + a]


def _rollout(world, prompt_BPHWC, actions_BA, rng, *, num_steps, temperature, cached):
  tokens_BTN = rollout_tokens(world, prompt_BPHWC, actions_BA, rng, num_steps=num_steps,
                              temperature=temperature, cached=cached)
  p = prompt_BPHWC.shape[1]
  generated_BAHWC = decode_frames(world.tokenizer, tokens_BTN)[:, p:]
  return jnp.concatenate([tokenizer_lib.to_unit_interval(prompt_BPHWC), generated_BAHWC], 1)


def _play_step(world, tokens_BLN, actions_BL, f, action_B, rng, *, num_steps, temperature):
  actions_BL = jax.lax.dynamic_update_slice_in_dim(actions_BL, action_B[:, None], f - 1,
                                                   axis=1)
  new_BN = generate_frame(world, tokens_BLN, actions_BL, f, rng, num_steps=num_steps,
                          temperature=temperature)
  tokens_BLN = jax.lax.dynamic_update_slice_in_dim(tokens_BLN, new_BN[:, None], f, axis=1)
  return tokens_BLN, actions_BL, decode_frame_at(world.tokenizer, tokens_BLN, f)


class Genie:
  """A trained world model for generation: tokenizer, LAM and dynamics model.

  Attributes:
    world: the WorldModel (tokenizer, lam, dynamics submodules).
    config: the dynamics stage config (None when built from a module).
    step: the checkpoint step (None when built from a module).
    num_actions: A; actions are ints in [0, A).
    max_frames: frames the dynamics model sees at once (the window of a rollout).
  """

  def __init__(self, world: dynamics_lib.WorldModel, *, config: Any = None,
               step: int | None = None):
    self.world = world
    self.config = config
    self.step = step
    self.num_actions = world.dynamics.num_actions
    self.max_frames = world.dynamics.transformer.temporal_pos.shape[0]
    if self.max_frames < 2:
      raise ValueError(f"the dynamics model has max_frames={self.max_frames}; generation needs "
                       "at least 2 (one past frame and the new one)")
    self.tokenizer_frames = world.tokenizer.decoder.temporal_pos.shape[0]
    tok = world.tokenizer
    self.frame_shape = (tok.image_size, tok.image_size, tok.channels)
    graphdef, state = nnx.split(world)
    self._state = state

    def jit(fn: Callable, static=()):
      # The model's weights are an argument (not constants baked into the program).
      return jax.jit(lambda s, *args, **kw: fn(nnx.merge(graphdef, s), *args, **kw),
                     static_argnames=static)

    self._tokenize = jit(lambda w, v: w.tokenizer.encode(v)[0])
    self._detokenize = jit(lambda w, t: decode_frames(w.tokenizer, t))
    self._infer_actions = jit(lambda w, v: w.lam.infer_actions(v))
    self._rollout = jit(_rollout, static=("num_steps", "temperature", "cached"))
    self._prompt_buffers = jit(_prompt_buffers, static=("length",))
    self._play_step = jit(_play_step, static=("num_steps", "temperature"))

  @classmethod
  def from_workdir(cls, dynamics_workdir: str, *, step: int | None = None) -> Genie:
    """Restores a dynamics-stage workdir (its tokenizer and LAM come with it)."""
    loaded = stages.load_stage(dynamics_workdir, step=step, expect_stage="dynamics")
    return cls(loaded.model, config=loaded.config, step=loaded.step)

  # --- Checks on host inputs, with messages that say what was expected.

  def _check_video(self, video_BTHWC, name: str, max_frames: int | None = None) -> jax.Array:
    video = jnp.asarray(video_BTHWC)
    if video.dtype != jnp.uint8 or video.ndim != 5 or tuple(video.shape[2:]) != self.frame_shape:
      raise ValueError(f"{name} must be uint8 (B, T, {', '.join(map(str, self.frame_shape))}); "
                       f"got {video.dtype} {video.shape}")
    if max_frames is not None and not 1 <= video.shape[1] <= max_frames:
      raise ValueError(f"{name} has {video.shape[1]} frames; expected 1 to {max_frames}")
    return video

  def check_actions(self, actions) -> np.ndarray:
    """Actions as int32 numpy; ValueError naming the range [0, A) if any is outside."""
    actions = np.asarray(actions)
    if not np.issubdtype(actions.dtype, np.integer):
      raise ValueError(f"actions must be integers in [0, {self.num_actions}); got {actions.dtype}")
    bad = actions[(actions < 0) | (actions >= self.num_actions)]
    if bad.size:
      raise ValueError(f"action {int(bad[0])} is out of range: this model has "
                       f"{self.num_actions} latent actions, [0, {self.num_actions})")
    return actions.astype(np.int32)

  @property
  def max_prompt_frames(self) -> int:
    """The longest prompt: it must fit the tokenizer and leave the dynamics window a frame."""
    return min(self.max_frames - 1, self.tokenizer_frames)

  # --- Public API.

  def tokenize(self, video_BTHWC) -> jax.Array:
    """tokens_BTN int32 of a uint8 clip of at most the tokenizer's max_frames."""
    return self._tokenize(self._state, self._check_video(video_BTHWC, "video",
                                                         self.tokenizer_frames))

  def detokenize(self, tokens_BTN) -> jax.Array:
    """video_BTHWC float32 in [0, 1] of tokens_BTN (any number of frames)."""
    return self._detokenize(self._state, jnp.asarray(tokens_BTN, jnp.int32))

  def infer_actions(self, video_BTHWC) -> jax.Array:
    """The LAM's latent actions (B, T-1) int32: [:, t] took frame t to frame t+1."""
    video = self._check_video(video_BTHWC, "video")
    if video.shape[1] < 2:
      raise ValueError(f"infer_actions needs at least 2 frames; got {video.shape[1]}")
    return self._infer_actions(self._state, video)

  def rollout(self, prompt_BPHWC, actions_BA, *, rng: jax.Array, num_steps: int = 25,
              temperature: float = 1.0, cached: bool = True) -> jax.Array:
    """Generates one frame per action after the prompt.

    Args:
      prompt_BPHWC: uint8 prompt frames, 1 <= P <= `max_prompt_frames`.
      actions_BA: int latent actions in [0, A); actions_BA[:, i] produces generated frame i.
      rng: PRNG key.
      num_steps: MaskGIT steps per frame (Genie: 25).
      temperature: sampling temperature (Genie: 1.0 for CoinRun, 2.0 main; 0 = argmax).
      cached: use cached temporal keys/values (see module docstring).

    Returns:
      video float32 (B, P + A, H, W, C) in [0, 1]: the prompt, then the generated frames.
    """
    prompt = self._check_video(prompt_BPHWC, "prompt", self.max_prompt_frames)
    actions = self.check_actions(actions_BA)
    if actions.ndim != 2 or actions.shape[0] != prompt.shape[0]:
      raise ValueError(f"actions must be (B={prompt.shape[0]}, A); got {actions.shape}")
    return self._rollout(self._state, prompt, jnp.asarray(actions), rng,
                         num_steps=int(num_steps), temperature=float(temperature),
                         cached=cached)

  def start(self, prompt_BPHWC, *, rng: jax.Array | None = None, num_steps: int = 25,
            temperature: float = 1.0) -> PlaySession:
    """An interactive session that generates one frame per `step(action)`."""
    return PlaySession(self, self._check_video(prompt_BPHWC, "prompt", self.max_prompt_frames),
                       rng=jax.random.key(0) if rng is None else rng, num_steps=num_steps,
                       temperature=temperature)


class PlaySession:
  """Frame-by-frame play from a prompt (see `Genie.start`); one compiled step for all frames.

  Holds a buffer of the last max(dynamics, tokenizer) max_frames frames' tokens; older
  frames, which neither model sees any more, are dropped.
  """

  def __init__(self, genie: Genie, prompt_BPHWC: jax.Array, *, rng: jax.Array,
               num_steps: int, temperature: float):
    self._genie = genie
    self._rng = rng
    self._static = dict(num_steps=int(num_steps), temperature=float(temperature))
    self._length = max(genie.max_frames, genie.tokenizer_frames)
    self._tokens_BLN, self._actions_BL = genie._prompt_buffers(  # pylint: disable=protected-access
        genie._state, prompt_BPHWC, length=self._length)  # pylint: disable=protected-access
    self._count = prompt_BPHWC.shape[1]  # Frames held in the buffer.
    self._frames = [np.asarray(prompt_BPHWC)[:, t] for t in range(prompt_BPHWC.shape[1])]

  @property
  def frames(self) -> np.ndarray:
    """Every frame so far, prompt included: uint8 (B, T, H, W, C)."""
    return np.stack(self._frames, axis=1)

  def step(self, action) -> np.ndarray:
    """Generates the frame caused by `action` (an int for every example, or ints (B,)).

    Returns:
      The new frame of the first example: uint8 (H, W, C) (all examples: `frames`).
    """
    b = self._tokens_BLN.shape[0]
    action_B = self._genie.check_actions(np.broadcast_to(np.asarray(action), (b,)))
    if self._count == self._length:
      # Full: drop the oldest frame so that the new one goes into the last slot.
      self._tokens_BLN = jnp.roll(self._tokens_BLN, -1, axis=1)
      self._actions_BL = jnp.roll(self._actions_BL, -1, axis=1)
      self._count -= 1
    self._rng, key = jax.random.split(self._rng)
    self._tokens_BLN, self._actions_BL, frame_BHWC = self._genie._play_step(  # pylint: disable=protected-access
        self._genie._state, self._tokens_BLN, self._actions_BL,  # pylint: disable=protected-access
        jnp.int32(self._count), jnp.asarray(action_B), key, **self._static)
    self._count += 1
    self._frames.append(to_uint8(np.asarray(frame_BHWC)))
    return self._frames[-1][0]

