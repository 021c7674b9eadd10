"""Genie inference: tokenize a prompt, generate frames from latent actions, decode, play.

Generation of one frame (Genie section 2.3): the frame's tokens are decoded by MaskGIT
(`genie_jax.models.maskgit`) from the dynamics model, conditioned on the past frames and the
action that causes the new frame. The dynamics model sees at most `max_frames` frames (w):
the new frame and w - 1 before it.

The K/V cache. Temporal attention is causal and a final frame never changes, so each
block's temporal keys/values of past frames are kept (`FrameCache`, w - 1 slots) and each of
the num_steps MaskGIT steps runs only the new frame's tokens against them. When a frame is
final, one more pass over it writes its keys/values into the cache (appended frame by frame;
the prompt's frames in one prefill). Per frame that is num_steps + 1 single-frame passes.
What happens once w - 1 frames are cached depends on the model's temporal positions:
  learned  (Genie's table) a frame's keys depend on its place in the window, and once the
           window slides every place changes: each later frame rebuilds the cache from the
           window's w - 1 past frames, whose first frame, as the first frame of every
           training clip, gets the 'no action' embedding. The output is that of the model
           run on the window, as without a cache.
  rope     (rotary) keys do not depend on where the window starts: the cache rolls, the new
           frame replacing the oldest (after `sink_frames` first frames kept for good, the
           attention sink of streaming models). The cost per frame stays num_steps + 1 passes
           however long the rollout; past the window the keys of the cached frames are the
           ones computed when those frames were new, so the output is the streaming model's,
           not the model run on the window.
Within the window both equal the model run on the frames so far (tests/test_generation.py).
`frame_context` and `prefill_cache` serve either world-model family: the diffusion sampler
(`genie_jax.inference.diffusion`) runs its denoising steps against the same cache.
The tokenizer's decoder, causal in time too, makes the same choice for decoding past its own
window (`decode_frames`): learned positions decode each later frame from the window ending at
it; rotary ones keep a rolling cache of the decoder's keys/values (`stream_decode`).

Everything per frame and per step runs inside one compiled program: a whole rollout is one
jitted call (a fori_loop over frames around a fori_loop over steps), and a PlaySession
compiles its step once (the frame index is traced).

Action convention: `actions_BT[:, i]` produces generated frame i (frame p + i of the video,
p the number of prompt frames), i.e. in the dataset's convention it is the action taken at
frame p + i - 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genie_jax.inference import stages
from genie_jax.models import dynamics as dynamics_lib
from genie_jax.models import maskgit
from genie_jax.models import tokenizer as tokenizer_lib
from genie_jax.visualize import to_uint8


def window_logits_fn(dynamics: dynamics_lib.DynamicsModel, tokens_BTN: jax.Array,
                     actions_BT: jax.Array, f: jax.Array) -> maskgit.LogitsFn:
  """The MaskGIT logits function of frame `f` with no cache: every call runs the model on
  the window of frames f - w + 1 .. f (the reference the cache is tested against).

  Args:
    dynamics: the dynamics model.
    tokens_BTN: the frames so far (frames >= f are ignored); T >= the model's max_frames.
    actions_BT: dataset convention: actions_BT[:, t] was taken at frame t and produced
      frame t+1 (so actions_BT[:, f-1] causes frame f).
    f: index of the frame to generate (traced int allowed), >= 1.

  Returns:
    (tokens_BN, mask_BN) -> logits_BNV of frame f.
  """
  w = dynamics.transformer.max_frames
  start = jnp.maximum(f - (w - 1), 0)
  q = f - start  # Position of frame f in the window.
  window_BTN = jax.lax.dynamic_slice_in_dim(tokens_BTN, start, w, axis=1)
  window_actions_BT = jax.lax.dynamic_slice_in_dim(actions_BT, start, w, axis=1)

  def full_logits(tokens_BN, mask_BN):
    inputs_BTN = jax.lax.dynamic_update_slice_in_dim(window_BTN, tokens_BN[:, None], q, axis=1)
    mask_BTN = (jnp.arange(w) == q)[None, :, None] & mask_BN[:, None, :]
    logits_BTNV = dynamics(inputs_BTN, mask_BTN, window_actions_BT)
    return jax.lax.dynamic_index_in_dim(logits_BTNV, q, axis=1, keepdims=False)
  return full_logits


class FrameCache(NamedTuple):
  """A causal transformer's (the dynamics model's or the tokenizer decoder's) temporal
  keys/values of past frames (see the module docstring).

  kv: per block (k_BNKSE, v_BNKSE), S = max_frames - 1 slots (`STTransformer`'s layout; a
    stand-in model may hold anything its `decode_frame` reads).
  frame_S: the frame index each slot holds; -1 while empty.
  """
  kv: Any
  frame_S: jax.Array


def _ring_slot(max_frames: int, sinks: int, g: jax.Array) -> jax.Array:
  """The cache slot of frame g in a cache of max_frames - 1 slots: its index until the
  cache is full; then the ring after the sink slots."""
  slots = max_frames - 1
  return jnp.where(g < slots, g, sinks + (g - sinks) % (slots - sinks))


def _rolling_context(transformer, sinks: int, cache: FrameCache, g: jax.Array):
  """(kv, valid_S, position) with which frame g attends to a rolling cache of rotary keys,
  the keys rotated to their positions. Rotary angles depend on differences only: positions
  are frame indices counted from the window's start (angles of indices in the millions, in
  float32, would lose the differences), the sink frames just before the oldest ring frame."""
  w = transformer.max_frames
  shift = jnp.maximum(g - (w - 1), 0)
  key_positions_S = jnp.where(jnp.arange(w - 1) < sinks, cache.frame_S, cache.frame_S - shift)
  return (transformer.rotate_cache(cache.kv, key_positions_S), cache.frame_S >= 0, g - shift)


def _slot(dynamics: dynamics_lib.DynamicsModel, g: jax.Array) -> jax.Array:
  """The dynamics cache slot of frame g (the learned-position cache is rebuilt once full)."""
  return _ring_slot(dynamics.transformer.max_frames, getattr(dynamics, "sink_frames", 0), g)


def _prefill(transformer, x_BTMD: jax.Array) -> tuple[jax.Array, FrameCache]:
  """(y_BSMD, the cache holding T <= max_frames - 1 frames) of a transformer's inputs."""
  p = x_BTMD.shape[1]
  slots = transformer.max_frames - 1
  # Slots after the T frames hold zeros until written; causal attention keeps them out of
  # the T frames' keys/values and outputs.
  x_BSMD = jnp.pad(x_BTMD, [(0, 0), (0, slots - p)] + [(0, 0)] * (x_BTMD.ndim - 2))
  y_BSMD, kv = transformer.prefill(x_BSMD)
  return y_BSMD, FrameCache(kv, jnp.where(jnp.arange(slots) < p, jnp.arange(slots), -1))


def prefill_cache(dynamics, frames: jax.Array, actions_BT: jax.Array) -> FrameCache:
  """The cache holding frames 0..T-1 (T <= max_frames - 1) of either world-model family:
  `frames` (B, T, ...) are its frames as it reads them (tokens_BTN, latents_BTNL), entering
  as past context (`embed_context`); actions as `window_logits_fn`."""
  p = frames.shape[1]
  slots = dynamics.transformer.max_frames - 1
  if p > slots:
    raise ValueError(f"a prompt of {p} frames does not fit the dynamics model's window: at "
                     f"most max_frames - 1 = {slots}")
  x_BTMD = dynamics.embed_context(frames, dynamics.frame_actions(actions_BT))
  return _prefill(dynamics.transformer, x_BTMD)[1]


def _attention_context(dynamics, cache: FrameCache, frames: jax.Array,
                       actions_BT: jax.Array, n: jax.Array, g: jax.Array):
  """(kv, valid_S, position) with which frame g, at index n of the buffers, attends to its
  past; rotary keys come rotated to their positions."""
  w = dynamics.transformer.max_frames
  slots_S = jnp.arange(w - 1)
  if dynamics.transformer.temporal_positions == "rope":
    return _rolling_context(dynamics.transformer, getattr(dynamics, "sink_frames", 0), cache,
                            g)

  def appended():
    return cache.kv, slots_S < g, g

  def rebuilt():
    # The window's w - 1 past frames at positions 0..w-2, the new frame at w - 1.
    start = n - (w - 1)
    window = jax.lax.dynamic_slice_in_dim(frames, start, w - 1, axis=1)
    window_actions_BT = jax.lax.dynamic_slice_in_dim(actions_BT, start, w - 1, axis=1)
    rebuilt_cache = prefill_cache(dynamics, window, window_actions_BT)
    return rebuilt_cache.kv, jnp.ones_like(slots_S, bool), jnp.int32(w - 1)

  return jax.lax.cond(g < w, appended, rebuilt)


def frame_context(dynamics, cache: FrameCache, frames: jax.Array, actions_BT: jax.Array,
                  n: jax.Array, g: jax.Array
                  ) -> tuple[Callable[[jax.Array], jax.Array],
                             Callable[[jax.Array], FrameCache]]:
  """How frame g attends to its cached past, for either world-model family.

  Args:
    dynamics: the dynamics model (`embed_context`, `frame_actions`, `transformer`).
    cache: frames 0..g-1 as far as the cache keeps them.
    frames, actions_BT: buffers whose index n is frame g (read by the learned-position
      rebuild); actions_BT[:, n - 1] causes the new frame.
    n, g: the new frame's buffer index and frame index (traced ints; equal in a rollout).

  Returns:
    (run, commit): run(x_B1MD) -> y_B1MD, the transformer's output for the new frame's
    inputs; commit(x_B1MD) -> the cache with frame g, given its final inputs as context.
  """
  kv, valid_S, position = _attention_context(dynamics, cache, frames, actions_BT, n, g)

  def decode(x_B1MD):
    return dynamics.transformer.decode_frame(x_B1MD, kv, position, valid_S)

  def append(x_B1MD):
    _, frame_kv = decode(x_B1MD)
    slot = _slot(dynamics, g)
    return FrameCache(dynamics.transformer.write_cache(cache.kv, frame_kv, slot),
                      cache.frame_S.at[slot].set(g))

  def commit(x_B1MD):
    if dynamics.transformer.temporal_positions == "rope":
      return append(x_B1MD)
    # Learned positions: the cache is rebuilt from the window once it is full.
    return jax.lax.cond(g + 1 < dynamics.transformer.max_frames, append, lambda _: cache,
                        x_B1MD)

  return (lambda x_B1MD: decode(x_B1MD)[0]), commit


def caused_at(actions_BT: jax.Array, n: jax.Array) -> jax.Array:
  """caused_B1: the action that causes the frame at buffer index n (taken at n - 1)."""
  return jax.lax.dynamic_slice_in_dim(actions_BT, n - 1, 1, axis=1).astype(jnp.int32)


def cached_logits_fn(dynamics: dynamics_lib.DynamicsModel, cache: FrameCache,
                     tokens_BTN: jax.Array, actions_BT: jax.Array, n: jax.Array, g: jax.Array
                     ) -> tuple[maskgit.LogitsFn, Callable[[jax.Array], FrameCache]]:
  """The MaskGIT logits function of frame g, and the cache update once it is final
  (arguments: `frame_context`).

  Returns:
    ((tokens_BN, mask_BN) -> logits_BNV, tokens_BN -> the cache with frame g).
  """
  run, commit = frame_context(dynamics, cache, tokens_BTN, actions_BT, n, g)
  caused_B1 = caused_at(actions_BT, n)

  def logits(tokens_BN, mask_BN):
    x_B1MD = dynamics.embed(tokens_BN[:, None], mask_BN[:, None], caused_B1)
    return dynamics.readout(run(x_B1MD))[:, 0]

  return logits, lambda tokens_BN: commit(dynamics.embed_context(tokens_BN[:, None],
                                                                 caused_B1))


def sampling_prior_weight(config: Any) -> float:
  """The prior weight b with which sampling adds b * log(code frequency) to the logits.

  A dynamics model trained with rare codes weighted up (config.rare_token_weight = a: each
  code's cross-entropy weighted by its frequency^-a) predicts each code's probability times
  its weight; b = a takes that back, so that MaskGIT samples from the data's probabilities
  (config.unbias_sampling, default True; configs without the keys give 0).
  """
  if config is None or not config.get("unbias_sampling", True):
    return 0.0
  return float(config.get("rare_token_weight", 0.0))


def _with_prior(world: dynamics_lib.WorldModel, logits_fn, prior_weight: float):
  """logits_fn plus prior_weight * log(code frequency), the frequencies being the
  tokenizer's usage of its codes (kept with its codebook, `vq.VectorQuantizer`)."""
  if not prior_weight:
    return logits_fn
  log_freq_V = jnp.log(jnp.maximum(world.tokenizer.vq.usage[...], 1e-6))
  return lambda tokens_BN, mask_BN: logits_fn(tokens_BN, mask_BN) + prior_weight * log_freq_V


def generate_next(world: dynamics_lib.WorldModel, cache: FrameCache, tokens_BTN: jax.Array,
                  actions_BT: jax.Array, n: jax.Array, g: jax.Array, rng: jax.Array, *,
                  num_steps: int, temperature: float, prior_weight: float = 0.0
                  ) -> tuple[jax.Array, FrameCache]:
  """Frame g's tokens (tokens_BN int32) by MaskGIT with the cache, and the cache with it
  (arguments: `cached_logits_fn`; rng, num_steps, temperature: MaskGIT's; prior_weight:
  `sampling_prior_weight`)."""
  logits_fn, update = cached_logits_fn(world.dynamics, cache, tokens_BTN, actions_BT, n, g)
  b, _, n_tokens = tokens_BTN.shape
  new_BN = maskgit.sample_frame(_with_prior(world, logits_fn, prior_weight), rng,
                                batch_size=b, num_tokens=n_tokens, num_steps=num_steps,
                                temperature=temperature)
  return new_BN, update(new_BN)


def _pixels(tokenizer: tokenizer_lib.Tokenizer, y_BTND: jax.Array) -> jax.Array:
  return jnp.clip(tokenizer.pixels(y_BTND), 0.0, 1.0)


def decode_frame_at(tokenizer: tokenizer_lib.Tokenizer, x_BTND: jax.Array, f: jax.Array
                    ) -> jax.Array:
  """Frame f (float [0, 1], BHWC) decoded from the decoder-window of inputs ending at f
  (decoder inputs: `tokenizer.decoder_input` of tokens, `tokenizer.from_latent` of
  latents)."""
  t = tokenizer.decoder.max_frames
  start = jnp.maximum(f - (t - 1), 0)
  video_BTHWC = _pixels(tokenizer, tokenizer.decoder(
      jax.lax.dynamic_slice_in_dim(x_BTND, start, t, axis=1)))
  return jax.lax.dynamic_index_in_dim(video_BTHWC, f - start, axis=1, keepdims=False)


def streams(tokenizer: tokenizer_lib.Tokenizer) -> bool:
  """Whether the tokenizer's decoder keeps a rolling cache of past frames (rotary temporal
  positions): each frame then decodes in one single-frame pass, however long the video.
  A one-frame decoder has no past to cache: it decodes every frame alone either way."""
  return (tokenizer.decoder.temporal_positions == "rope"
          and tokenizer.decoder.max_frames >= 2)


def decode_next(tokenizer: tokenizer_lib.Tokenizer, cache: FrameCache, x_B1ND: jax.Array,
                g: jax.Array) -> tuple[jax.Array, FrameCache]:
  """Frame g (float [0, 1], BHWC) decoded from its decoder input x_B1ND with a streaming
  decoder's cache of the frames before it (`stream_decode`), and the cache with frame g;
  g may be traced."""
  decoder, sinks = tokenizer.decoder, tokenizer.sink_frames
  kv, valid_S, position = _rolling_context(decoder, sinks, cache, g)
  y_B1ND, frame_kv = decoder.decode_frame(x_B1ND, kv, position, valid_S)
  slot = _ring_slot(decoder.max_frames, sinks, g)
  cache = FrameCache(decoder.write_cache(cache.kv, frame_kv, slot),
                     cache.frame_S.at[slot].set(g))
  return _pixels(tokenizer, y_B1ND)[:, 0], cache


def stream_decode(tokenizer: tokenizer_lib.Tokenizer, x_BTND: jax.Array
                  ) -> tuple[jax.Array, FrameCache]:
  """video_BTHWC float [0, 1] of a streaming decoder (`streams`) from its inputs x_BTND, and
  its cache after the last frame: the first max_frames - 1 frames in one pass, then one
  frame at a time. Within the window this is the decoder run on the clip; past it, the
  streaming model's output."""
  t = x_BTND.shape[1]
  p = min(t, tokenizer.decoder.max_frames - 1)
  y_BSND, cache = _prefill(tokenizer.decoder, x_BTND[:, :p])
  head_BTHWC = _pixels(tokenizer, y_BSND[:, :p])
  if t == p:
    return head_BTHWC, cache

  def body(cache, g):
    frame_BHWC, cache = decode_next(tokenizer, cache, jax.lax.dynamic_slice_in_dim(
        x_BTND, g, 1, axis=1), g)
    return cache, frame_BHWC

  cache, tail_TBHWC = jax.lax.scan(body, cache, jnp.arange(p, t))
  return jnp.concatenate([head_BTHWC, jnp.moveaxis(tail_TBHWC, 0, 1)], axis=1), cache


def decode_inputs(tokenizer: tokenizer_lib.Tokenizer, x_BTND: jax.Array) -> jax.Array:
  """video_BTHWC float [0, 1] of any number of frames from their decoder inputs (see
  `decode_frame_at`). The causal decoder sees at most its max_frames: a streaming decoder
  (`streams`) rolls its cache past them; otherwise frames beyond them are decoded from the
  window ending at them."""
  t_max = tokenizer.decoder.max_frames
  t = x_BTND.shape[1]
  if t <= t_max:
    return _pixels(tokenizer, tokenizer.decoder(x_BTND))
  if streams(tokenizer):
    return stream_decode(tokenizer, x_BTND)[0]
  head_BTHWC = _pixels(tokenizer, tokenizer.decoder(x_BTND[:, :t_max]))
  tail_TBHWC = jax.lax.map(lambda f: decode_frame_at(tokenizer, x_BTND, f),
                           jnp.arange(t_max, t))
  return jnp.concatenate([head_BTHWC, jnp.moveaxis(tail_TBHWC, 0, 1)], axis=1)


def decode_frames(tokenizer: tokenizer_lib.Tokenizer, tokens_BTN: jax.Array) -> jax.Array:
  """video_BTHWC float [0, 1] of any number of frames' tokens (`decode_inputs`)."""
  if tokens_BTN.shape[1] <= tokenizer.decoder.max_frames:
    return tokenizer.decode(tokens_BTN)
  return decode_inputs(tokenizer, tokenizer.decoder_input(tokens_BTN))


def generate_frame(world: dynamics_lib.WorldModel, tokens_BTN: jax.Array,
                   actions_BT: jax.Array, f: jax.Array, rng: jax.Array, *, num_steps: int,
                   temperature: float, prior_weight: float = 0.0) -> jax.Array:
  """Tokens of frame f (tokens_BN int32) by MaskGIT without a cache (`window_logits_fn`)."""
  b, _, n = tokens_BTN.shape
  logits_fn = window_logits_fn(world.dynamics, tokens_BTN, actions_BT, f)
  return maskgit.sample_frame(_with_prior(world, logits_fn, prior_weight), rng, batch_size=b,
                              num_tokens=n, num_steps=num_steps, temperature=temperature)


def _prompt_buffers(world: dynamics_lib.WorldModel, prompt_BTHWC: jax.Array, length: int
                    ) -> tuple[jax.Array, jax.Array]:
  """Token and action buffers of `length` frames holding the prompt; the actions between
  prompt frames are the LAM's."""
  b, p = prompt_BTHWC.shape[:2]
  prompt_tokens_BTN, _ = world.tokenizer.encode(prompt_BTHWC)
  tokens_BTN = jnp.zeros((b, length, prompt_tokens_BTN.shape[2]), jnp.int32).at[:, :p].set(
      prompt_tokens_BTN)
  actions_BT = jnp.zeros((b, length), jnp.int32)
  if p > 1:
    actions_BT = actions_BT.at[:, :p - 1].set(world.lam.infer_actions(prompt_BTHWC))
  return tokens_BTN, actions_BT


def rollout_tokens(world: dynamics_lib.WorldModel, prompt_BTHWC: jax.Array,
                   actions_BT: jax.Array, rng: jax.Array, *, num_steps: int,
                   temperature: float, cached: bool = True, prior_weight: float = 0.0
                   ) -> jax.Array:
  """tokens_BTN of the prompt's p frames followed by one generated frame per action of
  actions_BT (a of them: T = p + a); traceable.
  cached=False runs the model on the whole window at every MaskGIT step (the reference);
  prior_weight: `sampling_prior_weight`."""
  p, a = prompt_BTHWC.shape[1], actions_BT.shape[1]
  w = world.dynamics.transformer.max_frames
  # Buffers of max(p + a, w) frames; the actions: the LAM's between prompt frames, then
  # actions_BT.
  tokens_BTN, buffer_actions_BT = _prompt_buffers(world, prompt_BTHWC, max(p + a, w))
  buffer_actions_BT = buffer_actions_BT.at[:, p - 1:p - 1 + a].set(
      actions_BT.astype(jnp.int32))

  if not cached:
    def body(f, tokens_BTN):
      new_BN = generate_frame(world, tokens_BTN, buffer_actions_BT, f,
                              jax.random.fold_in(rng, f), num_steps=num_steps,
                              temperature=temperature, prior_weight=prior_weight)
      return jax.lax.dynamic_update_slice_in_dim(tokens_BTN, new_BN[:, None], f, axis=1)
    return jax.lax.fori_loop(p, p + a, body, tokens_BTN)[:, :p + a]

  def cached_body(f, carry):
    tokens_BTN, cache = carry
    new_BN, cache = generate_next(world, cache, tokens_BTN, buffer_actions_BT, f, f,
                                  jax.random.fold_in(rng, f), num_steps=num_steps,
                                  temperature=temperature, prior_weight=prior_weight)
    return jax.lax.dynamic_update_slice_in_dim(tokens_BTN, new_BN[:, None], f, axis=1), cache

  cache = prefill_cache(world.dynamics, tokens_BTN[:, :p], buffer_actions_BT[:, :p])
  tokens_BTN, _ = jax.lax.fori_loop(p, p + a, cached_body, (tokens_BTN, cache))
  return tokens_BTN[:, :p + a]


def _rollout(world, prompt_BTHWC, actions_BT, rng, *, num_steps, temperature, cached,
             prior_weight=0.0):
  tokens_BTN = rollout_tokens(world, prompt_BTHWC, actions_BT, rng, num_steps=num_steps,
                              temperature=temperature, cached=cached,
                              prior_weight=prior_weight)
  p = prompt_BTHWC.shape[1]
  generated_BTHWC = decode_frames(world.tokenizer, tokens_BTN)[:, p:]
  return jnp.concatenate([tokenizer_lib.to_unit_interval(prompt_BTHWC), generated_BTHWC], 1)


def _play_start(world, prompt_BTHWC, *, length):
  """Buffers and caches of a play session: (tokens_BTN, actions_BT, (dynamics cache,
  streaming decoder's cache or None))."""
  tokens_BTN, actions_BT = _prompt_buffers(world, prompt_BTHWC, length)
  p = prompt_BTHWC.shape[1]
  decoder_cache = (stream_decode(world.tokenizer,
                                 world.tokenizer.decoder_input(tokens_BTN[:, :p]))[1]
                   if streams(world.tokenizer) else None)
  return tokens_BTN, actions_BT, (prefill_cache(world.dynamics, tokens_BTN[:, :p],
                                                actions_BT[:, :p]), decoder_cache)


def _play_step(world, tokens_BTN, actions_BT, caches, n, g, action_B, rng, *, num_steps,
               temperature, prior_weight=0.0):
  cache, decoder_cache = caches
  actions_BT = jax.lax.dynamic_update_slice_in_dim(actions_BT, action_B[:, None], n - 1,
                                                   axis=1)
  new_BN, cache = generate_next(world, cache, tokens_BTN, actions_BT, n, g, rng,
                                num_steps=num_steps, temperature=temperature,
                                prior_weight=prior_weight)
  tokens_BTN = jax.lax.dynamic_update_slice_in_dim(tokens_BTN, new_BN[:, None], n, axis=1)
  if decoder_cache is None:
    frame_BHWC = decode_frame_at(world.tokenizer, world.tokenizer.decoder_input(tokens_BTN), n)
  else:
    frame_BHWC, decoder_cache = decode_next(
        world.tokenizer, decoder_cache, world.tokenizer.decoder_input(new_BN[:, None]), g)
  return tokens_BTN, actions_BT, (cache, decoder_cache), frame_BHWC


class Generator:
  """What every trained world model shares for generation, whatever its dynamics family:
  the restored WorldModel (tokenizer, LAM, dynamics), host-side checks of prompts and
  actions, and the LAM's actions. `Genie` (MaskGIT) and
  `genie_jax.inference.diffusion.DiffusionGenie` add their rollouts and play sessions.

  Attributes:
    world: the WorldModel (tokenizer, lam, dynamics submodules).
    config: the dynamics stage config (None when built from a module).
    step: the checkpoint step (None when built from a module).
    num_actions: A; actions are ints in [0, A).
    max_frames: frames the dynamics model sees at once (the window of a rollout).
  """

  # The config.stage of the workdirs `from_workdir` restores.
  stage = "dynamics"

  def __init__(self, world: dynamics_lib.WorldModel, *, config: Any = None,
               step: int | None = None):
    self.world = world
    self.config = config
    self.step = step
    self.num_actions = world.dynamics.num_actions
    self.max_frames = world.dynamics.transformer.max_frames
    if self.max_frames < 2:
      raise ValueError(f"the dynamics model has max_frames={self.max_frames}; generation needs "
                       "at least 2 (one past frame and the new one)")
    self.tokenizer_frames = world.tokenizer.decoder.max_frames
    tok = world.tokenizer
    self.frame_shape = (tok.image_size, tok.image_size, tok.channels)
    self._graphdef, self._state = nnx.split(world)
    self._infer_actions = self._jit(lambda w, v: w.lam.infer_actions(v))

  def _jit(self, fn: Callable, static=(), replicated: bool = False):
    """fn(world, *args) jitted with the model's weights as an argument (not constants baked
    into the program). replicated: every output replicated over the weights' mesh, so that
    a play session's buffers and caches keep one sharding from call to call (left to
    propagation, a step's outputs can come out sharded otherwise than the start's, and the
    step would compile again for them)."""
    graphdef = self._graphdef
    sharding = jax.tree.leaves(self._state)[0].sharding if replicated else None
    out = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
           if isinstance(sharding, jax.sharding.NamedSharding) else None)
    return jax.jit(lambda s, *args, **kw: fn(nnx.merge(graphdef, s), *args, **kw),
                   static_argnames=static, out_shardings=out)

  @classmethod
  def from_workdir(cls, dynamics_workdir: str, *, step: int | None = None):
    """Restores a workdir of `cls.stage` (its tokenizer and LAM come with it)."""
    loaded = stages.load_stage(dynamics_workdir, step=step, expect_stage=cls.stage)
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

  def _check_rollout(self, prompt_BTHWC, actions_BT) -> tuple[jax.Array, np.ndarray]:
    prompt = self._check_video(prompt_BTHWC, "prompt", self.max_prompt_frames)
    actions = self.check_actions(actions_BT)
    if actions.ndim != 2 or actions.shape[0] != prompt.shape[0]:
      raise ValueError(f"actions must be (B={prompt.shape[0]}, frames to generate); got "
                       f"{actions.shape}")
    return prompt, actions

  @property
  def step_choices(self) -> tuple[int, ...] | None:
    """The only step counts per frame the model takes, or None (any count >= 1)."""
    return None

  @property
  def default_steps(self) -> int:
    """Steps per frame when none are asked for: the most a model takes, else Genie's 25."""
    return max(self.step_choices) if self.step_choices else 25

  def resolve_steps(self, num_steps: int | None, name: str = "num_steps") -> int:
    """num_steps, or `default_steps` for None; ValueError naming `name` for a count the
    model does not take."""
    num_steps = self.default_steps if num_steps is None else int(num_steps)
    self._check_steps(num_steps, name)
    return num_steps

  def _check_steps(self, num_steps: int, name: str) -> None:
    if num_steps < 1:
      raise ValueError(f"{name}={num_steps}: this model takes at least 1 step per frame")

  @property
  def max_prompt_frames(self) -> int:
    """The longest prompt: it must fit the tokenizer and leave the dynamics window a frame."""
    return min(self.max_frames - 1, self.tokenizer_frames)

  def infer_actions(self, video_BTHWC) -> jax.Array:
    """The LAM's latent actions (B, T-1) int32: [:, t] took frame t to frame t+1."""
    video = self._check_video(video_BTHWC, "video")
    if video.shape[1] < 2:
      raise ValueError(f"infer_actions needs at least 2 frames; got {video.shape[1]}")
    return self._infer_actions(self._state, video)


class Genie(Generator):
  """A trained MaskGIT world model for generation (`Generator`), with token-level access.

  Attributes (besides `Generator`'s):
    prior_weight: `sampling_prior_weight` of the config, which rollouts and play use.
  """

  def __init__(self, world: dynamics_lib.WorldModel, *, config: Any = None,
               step: int | None = None):
    super().__init__(world, config=config, step=step)
    self.prior_weight = sampling_prior_weight(config)
    jit = self._jit
    self._tokenize = jit(lambda w, v: w.tokenizer.encode(v)[0])
    self._detokenize = jit(lambda w, t: decode_frames(w.tokenizer, t))
    self._rollout = jit(_rollout, static=("num_steps", "temperature", "cached", "prior_weight"))
    self._play_start = jit(_play_start, static=("length",), replicated=True)
    self._play_step = jit(_play_step, static=("num_steps", "temperature", "prior_weight"),
                          replicated=True)

  # --- Public API.

  def tokenize(self, video_BTHWC) -> jax.Array:
    """tokens_BTN int32 of a uint8 clip of at most the tokenizer's max_frames."""
    return self._tokenize(self._state, self._check_video(video_BTHWC, "video",
                                                         self.tokenizer_frames))

  def detokenize(self, tokens_BTN) -> jax.Array:
    """video_BTHWC float32 in [0, 1] of tokens_BTN (any number of frames)."""
    return self._detokenize(self._state, jnp.asarray(tokens_BTN, jnp.int32))

  def rollout(self, prompt_BTHWC, actions_BT, *, rng: jax.Array, num_steps: int | None = None,
              temperature: float = 1.0, cached: bool = True) -> jax.Array:
    """Generates one frame per action after the prompt.

    Args:
      prompt_BTHWC: uint8 prompt frames, 1 <= T <= `max_prompt_frames`.
      actions_BT: int latent actions in [0, A); actions_BT[:, i] produces generated frame i.
      rng: PRNG key.
      num_steps: MaskGIT steps per frame (None: `default_steps`, Genie's 25).
      temperature: sampling temperature (Genie: 1.0 for CoinRun, 2.0 main; 0 = argmax).
      cached: use cached temporal keys/values (see module docstring).

    Returns:
      video float32 (B, p + a, H, W, C) in [0, 1]: the prompt's p frames, then the a
      generated frames (one per action).
    """
    prompt, actions = self._check_rollout(prompt_BTHWC, actions_BT)
    return self._rollout(self._state, prompt, jnp.asarray(actions), rng,
                         num_steps=self.resolve_steps(num_steps),
                         temperature=float(temperature), cached=cached,
                         prior_weight=self.prior_weight)

  def start(self, prompt_BTHWC, *, rng: jax.Array | None = None,
            num_steps: int | None = None, temperature: float = 1.0) -> PlaySession:
    """An interactive session that generates one frame per `step(action)`."""
    return PlaySession(self, self._check_video(prompt_BTHWC, "prompt", self.max_prompt_frames),
                       rng=jax.random.key(0) if rng is None else rng,
                       static=dict(num_steps=self.resolve_steps(num_steps),
                                   temperature=float(temperature),
                                   prior_weight=self.prior_weight))


class PlaySession:
  """Frame-by-frame play from a prompt, one compiled step for all frames, whatever the
  family (`Genie.start`, `DiffusionGenie.start`): buffers of the last `length` frames (as
  the family reads them: tokens or latents) and of the actions taken (older frames, which
  no model sees any more, are dropped), the dynamics model's cache and, for a streaming
  decoder, the decoder's. The generator's `_play_start` fills them from the prompt and its
  `_play_step` generates a frame."""

  def __init__(self, genie: Generator, prompt_BTHWC: jax.Array, *, rng: jax.Array,
               static: dict[str, Any]):
    self._genie = genie
    self._rng = rng
    self._static = static
    self._length = max(genie.max_frames, genie.tokenizer_frames)
    self._count = prompt_BTHWC.shape[1]  # Frames held in the buffer.
    self._index = self._count  # Frame index of the next frame.
    self._frames = [np.asarray(prompt_BTHWC)[:, t] for t in range(prompt_BTHWC.shape[1])]
    self._buffer, self._actions_BT, self._caches = genie._play_start(  # pylint: disable=protected-access
        genie._state, prompt_BTHWC, length=self._length)  # pylint: disable=protected-access

  @property
  def frames(self) -> np.ndarray:
    """Every frame so far, prompt included: uint8 (B, T, H, W, C)."""
    return np.stack(self._frames, axis=1)

  def step(self, action) -> np.ndarray:
    """Generates the frame caused by `action` (an int for every example, or ints (B,)).

    Returns:
      The new frame of the first example: uint8 (H, W, C) (all examples: `frames`).
    """
    genie = self._genie
    b = self._frames[0].shape[0]
    action_B = genie.check_actions(np.broadcast_to(np.asarray(action), (b,)))
    if self._count == self._length:
      # Full: drop the oldest frame so that the new one goes into the last slot.
      self._buffer = jnp.roll(self._buffer, -1, axis=1)
      self._actions_BT = jnp.roll(self._actions_BT, -1, axis=1)
      self._count -= 1
    self._rng, key = jax.random.split(self._rng)
    self._buffer, self._actions_BT, self._caches, frame_BHWC = genie._play_step(  # pylint: disable=protected-access
        genie._state, self._buffer, self._actions_BT, self._caches,  # pylint: disable=protected-access
        jnp.int32(self._count), jnp.int32(self._index), jnp.asarray(action_B), key,
        **self._static)
    self._count += 1
    self._index += 1
    self._frames.append(to_uint8(np.asarray(frame_BHWC)))
    return self._frames[-1][0]
