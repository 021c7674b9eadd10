"""Generation: MaskGIT schedule and sampler, cached decoding, compile-once rollouts."""

import decimal
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from genie_jax.models import layers
from genie_jax.models import maskgit

# --- Re-mask schedule ------------------------------------------------------------------------


def _decimal_pi():
  """pi to the current decimal precision (the series recipe of the `decimal` docs)."""
  decimal.getcontext().prec += 2
  lasts, t, s, n, na, d, da = 0, decimal.Decimal(3), 3, 1, 0, 0, 24
  while s != lasts:
    lasts = s
    n, na = n + na, na + 8
    d, da = d + da, da + 32
    t = (t * n) / d
    s += t
  decimal.getcontext().prec -= 2
  return +s


def _decimal_cos(x):
  """cos(x) to the current decimal precision by its Taylor series."""
  decimal.getcontext().prec += 2
  i, lasts, s, fact, num, sign = 0, 0, decimal.Decimal(1), 1, 1, 1
  while s != lasts:
    lasts = s
    i += 2
    fact *= i * (i - 1)
    num *= x * x
    sign *= -1
    s += num / fact * sign
  decimal.getcontext().prec -= 2
  return +s


@functools.lru_cache(maxsize=None)
def _reference_cos(p, steps):
  """cos(pi/2 p/steps) to 80 digits, by a route independent of maskgit's."""
  with decimal.localcontext() as ctx:
    ctx.prec = 80
    return _decimal_cos(_decimal_pi() / 2 * p / steps)


def _reference_num_masked_after(step, steps, n):
  """The schedule's definition, floored exactly.

  n cos(pi/2 r) for rational r is an integer only where the cosine is rational, i.e. 0, 1/2
  or 1 (Niven); anywhere else it is irrational, and over this grid never within 1e-30 of an
  integer, so 80 digits floor it right. The near-integer values are snapped to the integer,
  and only the rational cosines may be near one.
  """
  if step == steps - 1:
    return 0
  x = n * _reference_cos(step + 1, steps)
  nearest = int(x.to_integral_value(rounding=decimal.ROUND_HALF_EVEN))
  if abs(x - nearest) < decimal.Decimal("1e-30"):
    assert 3 * (step + 1) == 2 * steps, (step, steps, n, x)  # cos(pi/3) = 1/2.
    return max(1, nearest)
  return max(1, math.floor(x))


@pytest.mark.parametrize("n,steps,expected", [
    # floor(n cos(pi/2 (s+1)/S)), at least 1 until the last step, 0 after it.
    (4, 2, [2, 0]),
    (4, 3, [3, 2, 0]),  # 4 cos(pi/6) = 3.46, 4 cos(pi/3) = 2.0000000000000004.
    (10, 4, [9, 7, 3, 0]),
    (3, 6, [2, 2, 2, 1, 1, 0]),  # 3 cos(5 pi/12) = 0.78 is raised to 1 before the end.
    (1, 3, [1, 1, 0]),
    (5, 1, [0]),
    (2, 3, [1, 1, 0]),  # 2 cos(pi/3) = 1 exactly.
    (6, 3, [5, 3, 0]),  # 6 cos(pi/3) = 3 exactly.
])
def test_num_masked_after_exact_values(n, steps, expected):
  assert [maskgit.num_masked_after(s, steps, n) for s in range(steps)] == expected
  np.testing.assert_array_equal(maskgit.mask_schedule(steps, n), expected)


@pytest.mark.parametrize("n,steps", [(256, 25), (16, 8), (64, 25), (7, 25), (1024, 12)])
def test_schedule_is_monotone_and_every_step_samples(n, steps):
  counts = maskgit.mask_schedule(steps, n)
  assert counts[-1] == 0
  assert np.all(np.diff(counts) <= 0)
  before = np.concatenate([[n], counts[:-1]])
  # Every step, the last included, has masked positions to sample.
  assert np.all(before >= 1)
  assert np.all(counts <= before)
  np.testing.assert_array_equal(
      counts, [_reference_num_masked_after(s, steps, n) for s in range(steps)])


def test_num_masked_after_exact_cos_pi_over_3():
  # 26/39 = 2/3, so 16 cos(pi/2 26/39) = 16 cos(pi/3) = 8 exactly; float64 gives 7.999...
  assert maskgit.num_masked_after(25, 39, 16) == 8
  assert maskgit.num_masked_after(1, 3, 4) == 2


def test_reference_schedule_is_exact():
  # The reference itself: exact at cos(pi/3) = 1/2, plain floors on irrational values.
  assert _reference_num_masked_after(25, 39, 16) == 8
  assert _reference_num_masked_after(1, 3, 7) == 3
  assert _reference_num_masked_after(0, 3, 2) == 1  # 2 cos(pi/6) = 1.73.
  assert _reference_num_masked_after(0, 2, 10) == 7  # 10 cos(pi/4) = 7.07.


# Every S up to 40 (S a multiple of 3 puts step 2S/3 - 1 at cos(pi/3) = 1/2, step S/3 - 1 at
# cos(pi/6); S even puts step S/2 - 1 at cos(pi/4)), every step, the last one (cos(pi/2) = 0)
# included, and n from 1 to 48 plus large ones.
_GRID_NS = list(range(1, 49)) + [63, 64, 100, 255, 256, 1000, 1024, 4096, 65536, 10**6 + 2]


@pytest.mark.parametrize("steps", range(1, 41))
def test_num_masked_after_matches_exact_reference(steps):
  for n in _GRID_NS:
    expected = [_reference_num_masked_after(s, steps, n) for s in range(steps)]
    got = [maskgit.num_masked_after(s, steps, n) for s in range(steps)]
    assert got == expected, (n, steps)
    assert all(isinstance(k, int) for k in got)


def test_num_masked_after_rejects_out_of_range_step():
  with pytest.raises(ValueError, match="step=3"):
    maskgit.num_masked_after(3, 3, 10)


# --- Sampler ---------------------------------------------------------------------------------

B, N, V = 2, 12, 7


def _recording_logits_fn(logits_BNV, calls):
  """A logits_fn with fixed logits that records (tokens, mask) of every call."""
  def logits_fn(tokens_BN, mask_BN):
    jax.debug.callback(lambda t, m: calls.append((np.asarray(t), np.asarray(m))),
                       tokens_BN, mask_BN)
    return logits_BNV
  return logits_fn


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.0])
def test_sample_frame_masks_follow_schedule_and_fixed_tokens_never_change(temperature):
  logits = jax.random.normal(jax.random.key(0), (B, N, V)) * 3.0
  steps = 5
  calls = []
  tokens = jax.jit(lambda key: maskgit.sample_frame(
      _recording_logits_fn(logits, calls), key, batch_size=B, num_tokens=N,
      num_steps=steps, temperature=temperature))(jax.random.key(1))
  jax.effects_barrier()
  assert len(calls) == steps
  schedule = maskgit.mask_schedule(steps, N)
  assert calls[0][1].all()
  for s in range(1, steps):
    prev_tokens, prev_mask = calls[s - 1]
    cur_tokens, cur_mask = calls[s]
    np.testing.assert_array_equal(cur_mask.sum(-1), [schedule[s - 1]] * B)
    # Masked positions only shrink; a fixed token keeps its value to the end.
    assert not np.any(cur_mask & ~prev_mask)
    fixed = ~prev_mask
    np.testing.assert_array_equal(cur_tokens[fixed], prev_tokens[fixed])
    np.testing.assert_array_equal(np.asarray(tokens)[~cur_mask], cur_tokens[~cur_mask])
  assert tokens.shape == (B, N) and tokens.dtype == jnp.int32
  assert np.all((np.asarray(tokens) >= 0) & (np.asarray(tokens) < V))
  if temperature == 0.0:
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))


def test_low_temperature_is_argmax_and_last_step_samples():
  logits = jax.random.normal(jax.random.key(0), (B, N, V)) * 3.0
  argmax = np.asarray(jnp.argmax(logits, -1))

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def draws(keys, temperature, num_steps):
    sample = lambda key: maskgit.sample_frame(
        lambda tok, m: logits, key, batch_size=B, num_tokens=N, num_steps=num_steps,
        temperature=temperature)
    return jax.vmap(sample)(keys)
  keys = jax.random.split(jax.random.key(1), 20)
  np.testing.assert_array_equal(draws(keys, 1e-4, 4), np.broadcast_to(argmax, (20, B, N)))
  # At temperature 1 the draws differ from the argmax somewhere; with a single step, this
  # is the last step, which must sample rather than take the argmax.
  one_step = np.asarray(draws(keys, 1.0, 1))
  assert np.any(one_step != argmax)
  # Sampling matches the softmax: the frequency of the argmax is close to its probability.
  probs = np.asarray(jax.nn.softmax(logits, -1))
  p_argmax = np.take_along_axis(probs, argmax[..., None], -1)[..., 0].mean()
  assert abs(np.mean(one_step == argmax) - p_argmax) < 0.1


def test_confident_tokens_are_kept_first():
  # Position-dependent certainty: the positions with sharp logits are the ones fixed in step 0.
  # A flat position's sampled token has log-probability -ln(512), 6.2 nats under a sharp
  # one's (about 0), far beyond the first step's Gumbel noise (annealed to scale T/2).
  codes = 512
  sharp = jnp.arange(N) >= N // 2
  logits = jnp.where(sharp[None, :, None], jnp.eye(codes)[0] * 50.0, 0.0)
  logits = jnp.broadcast_to(logits, (B, N, codes))
  calls = []
  jax.jit(lambda key: maskgit.sample_frame(
      _recording_logits_fn(logits, calls), key, batch_size=B, num_tokens=N, num_steps=2,
      temperature=1.0, noise_anneal=True))(jax.random.key(3))
  jax.effects_barrier()
  kept_after_first = ~calls[1][1]
  n_kept = N - maskgit.num_masked_after(0, 2, N)
  assert 2 <= n_kept <= N // 2
  for row in range(B):
    kept = np.nonzero(kept_after_first[row])[0]
    assert len(kept) == n_kept and np.all(np.asarray(sharp)[kept]), (row, kept)


# --- Cached decoding in the ST-transformer ----------------------------------------------------


def _transformer(qk_norm=None, max_frames=5):
  return layers.STTransformer(2, 16, 2, num_tokens=4, max_frames=max_frames, qk_norm=qk_norm,
                              rngs=nnx.Rngs(0))


# Jitted: one compilation per shape instead of slow op-by-op execution.
_full = nnx.jit(lambda model, x: model(x))
_prefill = nnx.jit(lambda model, x: model.prefill(x))
_decode = nnx.jit(lambda model, x, cache, position: model.decode_frame(x, cache, position))


def test_cached_frame_equals_full_forward():
  model = _transformer(qk_norm="rmsnorm")  # QK-norm on: the cached path must norm k too.
  x = jax.random.normal(jax.random.key(0), (2, 5, 4, 16))
  full = _full(model, x)
  _, exact_cache = _prefill(model, x[:, :4])
  for t in range(5):
    # Four cache slots whatever t: the slots from t on hold junk and must be ignored.
    _, cache = _prefill(model, x[:, :4].at[:, t:].set(50.0))
    y, frame_kv = _decode(model, x[:, t:t + 1], cache, jnp.int32(t))
    np.testing.assert_allclose(y[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
    if t < 4:
      for (k, v), (k_exact, v_exact) in zip(frame_kv, exact_cache):
        np.testing.assert_allclose(k[:, :, :, 0], k_exact[:, :, :, t], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(v[:, :, :, 0], v_exact[:, :, :, t], atol=1e-5, rtol=1e-5)


def test_cache_built_frame_by_frame_equals_prefill():
  model = _transformer(qk_norm="rmsnorm")
  # The shapes of the test above, so that its compiled programs are reused.
  x = jax.random.normal(jax.random.key(1), (2, 5, 4, 16))[:, :4]
  _, cache = _prefill(model, jnp.zeros_like(x))
  outs = []
  write = jax.jit(layers.write_cache_slot)
  for t in range(4):
    y, frame_kv = _decode(model, x[:, t:t + 1], cache, jnp.int32(t))
    cache = write(cache, frame_kv, jnp.int32(t))
    outs.append(y)
  full, full_cache = _prefill(model, x)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)
  for (k, v), (k_full, v_full) in zip(cache, full_cache):
    np.testing.assert_allclose(k, k_full, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(v, v_full, atol=1e-5, rtol=1e-5)


# --- Genie: cached vs full-window logits, compile-once rollouts, play ------------------------

IMAGE, FRAMES, CODES, ACTIONS = 16, 4, 8, 3  # N = (16 / 8)^2 = 4 tokens per frame.


@functools.lru_cache  # Building modules runs op by op: slow on CPU, so build each once.
def _world(conditioning="additive", positions="learned", sinks=0, spatial_rope=False,
           block_order="spatial_first", tokenizer_positions="learned", tokenizer_sinks=0,
           decoder_layers=1):
  from genie_jax.models import dynamics as dynamics_lib  # pylint: disable=g-import-not-at-top
  from genie_jax.models import lam as lam_lib  # pylint: disable=g-import-not-at-top
  from genie_jax.models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  common = dict(image_size=IMAGE, patch_size=8, max_frames=FRAMES, d_model=16, num_heads=2,
                enc_layers=1, dec_layers=1, latent_dim=4)
  tok_cfg = tokenizer_lib.default_config()
  tok_cfg.update(dict(common, num_codes=CODES, temporal_positions=tokenizer_positions,
                      sink_frames=tokenizer_sinks, dec_layers=decoder_layers))
  lam_cfg = lam_lib.default_config()
  lam_cfg.update(dict(common, num_actions=ACTIONS))
  dyn_cfg = dynamics_lib.default_config()
  dyn_cfg.update(dict(num_layers=2, d_model=16, num_heads=2, num_codes=CODES,
                      tokens_per_frame=4, num_actions=ACTIONS, max_frames=FRAMES,
                      action_conditioning=conditioning, temporal_positions=positions,
                      sink_frames=sinks, spatial_rope=spatial_rope, block_order=block_order))
  rngs = nnx.Rngs(0)
  return dynamics_lib.WorldModel(tokenizer_lib.Tokenizer(tok_cfg, rngs=rngs),
                                 lam_lib.LatentActionModel(lam_cfg, rngs=rngs),
                                 dynamics_lib.DynamicsModel(dyn_cfg, rngs=rngs))


def _video(batch, frames, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (batch, frames, IMAGE, IMAGE, 3), dtype=np.uint8)


_CASES = [("additive", "learned", 0, False, "spatial_first"),
          ("prepend", "learned", 0, False, "spatial_first"),
          ("additive", "rope", 0, False, "spatial_first"),
          ("prepend", "rope", 1, False, "spatial_first"),
          ("prepend", "learned", 0, True, "spatial_first"),
          ("additive", "learned", 0, True, "temporal_first"),
          ("additive", "rope", 1, False, "temporal_first")]


@functools.lru_cache
def _cache_steps():
  """Jitted steps of a cache test: the logits of frame f and the cache with frame f."""
  from genie_jax.inference import genie as genie_lib  # pylint: disable=g-import-not-at-top

  @nnx.jit
  def prefill(dynamics, tokens, actions):
    return genie_lib.prefill_cache(dynamics, tokens[:, :1], actions[:, :1])

  @nnx.jit
  def step(dynamics, cache, tokens, actions, f, current, mask):
    logits_fn, update = genie_lib.cached_logits_fn(dynamics, cache, tokens, actions, f, f)
    new = jax.lax.dynamic_index_in_dim(tokens, f, axis=1, keepdims=False)
    return logits_fn(current, mask), update(new)

  @nnx.jit
  def window(dynamics, tokens, actions, f, current, mask):
    return genie_lib.window_logits_fn(dynamics, tokens, actions, f)(current, mask)

  return prefill, step, window


@pytest.mark.parametrize("conditioning,positions,sinks,spatial_rope,block_order", _CASES)
def test_cached_logits_equal_the_model_on_the_window(conditioning, positions, sinks,
                                                     spatial_rope, block_order):
  """Within the window every cache equals the model run on the frames so far; past it, the
  learned-position cache (rebuilt) still does, and the rotary one keeps the latest frames."""
  dynamics = _world(conditioning, positions, sinks, spatial_rope, block_order).dynamics
  prefill, step, window = _cache_steps()
  rng = np.random.default_rng(0)
  length = 9  # Longer than the 4-frame window: frames 4.. slide it.
  tokens = jnp.asarray(rng.integers(0, CODES, (2, length, 4)), jnp.int32)
  actions = jnp.asarray(rng.integers(0, ACTIONS, (2, length)), jnp.int32)
  cache = prefill(dynamics, tokens, actions)
  for f in range(1, length):
    current = jnp.asarray(rng.integers(0, CODES, (2, 4)), jnp.int32)
    mask = jnp.asarray(rng.random((2, 4)) < 0.5)
    cached, next_cache = step(dynamics, cache, tokens, actions, jnp.int32(f), current, mask)
    full = window(dynamics, tokens, actions, jnp.int32(f), current, mask)
    if positions == "learned" or f < FRAMES:
      np.testing.assert_allclose(cached, full, atol=1e-5, rtol=1e-5)
    else:
      assert not np.allclose(cached, full, atol=1e-3)  # The streaming model's, by design.
    if positions == "rope":
      slots = FRAMES - 1
      expected = (set(range(f + 1)) if f < slots else
                  set(range(sinks)) | set(range(f + 1 - (slots - sinks), f + 1)))
      assert set(np.asarray(next_cache.frame_S).tolist()) - {-1} == expected
    # The logits depend on the previous frame (the check is not vacuous).
    moved = step(dynamics, cache, (tokens.at[:, f - 1].add(1)) % CODES, actions, jnp.int32(f),
                 current, mask)[0]
    if positions == "learned" and f >= FRAMES:
      assert not np.allclose(moved, cached, atol=1e-5)
    cache = next_cache


def test_rolling_cache_equals_an_unbounded_cache_masked_to_the_window():
  """The ring (with a sink frame) against a reference that keeps every frame's keys/values
  in its own slot and masks all but the sink and the latest frames: same logits."""
  dynamics = _world("additive", "rope", 1).dynamics
  prefill, step, _ = _cache_steps()
  rng = np.random.default_rng(3)
  length = 11
  tokens = jnp.asarray(rng.integers(0, CODES, (2, length, 4)), jnp.int32)
  actions = jnp.asarray(rng.integers(0, ACTIONS, (2, length)), jnp.int32)
  caused = dynamics.frame_actions(actions)

  def context(g):
    frames = jnp.arange(length)
    visible = (frames < g) & ((frames == 0) | (frames >= g - (FRAMES - 2)))
    return visible, jnp.where(frames == 0, jnp.maximum(g - (FRAMES - 1), 0), frames)

  @nnx.jit
  def reference_cache(dynamics):
    # Keys/values of every frame, each computed seeing the frames the ring held then.
    x = dynamics.embed(tokens, jnp.zeros_like(tokens, bool), caused)
    kv = [(jnp.zeros((2, 4, 2, length, 8)), jnp.zeros((2, 4, 2, length, 8)))] * 2
    for g in range(length):
      visible, positions = context(g)
      _, frame_kv = dynamics.transformer.decode_frame(
          x[:, g:g + 1], dynamics.transformer.rotate_cache(kv, positions), g, visible)
      kv = dynamics.transformer.write_cache(kv, frame_kv, g)
    return kv

  @nnx.jit
  def reference(dynamics, kv, f, current, mask):
    caused_B1 = jax.lax.dynamic_slice_in_dim(caused, f, 1, axis=1)
    visible, positions = context(f)
    y, _ = dynamics.transformer.decode_frame(
        dynamics.embed(current[:, None], mask[:, None], caused_B1),
        dynamics.transformer.rotate_cache(kv, positions), f, visible)
    return dynamics.readout(y)[:, 0]

  kv = reference_cache(dynamics)
  cache = prefill(dynamics, tokens, actions)
  for f in range(1, length):
    current = jnp.asarray(rng.integers(0, CODES, (2, 4)), jnp.int32)
    mask = jnp.asarray(rng.random((2, 4)) < 0.5)
    cached, cache = step(dynamics, cache, tokens, actions, jnp.int32(f), current, mask)
    np.testing.assert_allclose(cached, reference(dynamics, kv, jnp.int32(f), current, mask),
                               atol=1e-5, rtol=1e-5)


def test_rolling_cache_logits_do_not_depend_on_how_long_it_has_run():
  """A play session millions of frames in gives the logits it gave at frame 10: rotary
  angles are taken from positions within the window, not from frame indices."""
  from genie_jax.inference import genie as genie_lib  # pylint: disable=g-import-not-at-top
  dynamics = _world("additive", "rope", 1).dynamics
  prefill, step, _ = _cache_steps()
  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(0, CODES, (2, 11, 4)), jnp.int32)
  actions = jnp.asarray(rng.integers(0, ACTIONS, (2, 11)), jnp.int32)
  cache = prefill(dynamics, tokens, actions)
  for f in range(1, 10):
    _, cache = step(dynamics, cache, tokens, actions, jnp.int32(f), tokens[:, f],
                    jnp.zeros((2, 4), bool))
  current, mask = tokens[:, 10], jnp.asarray(rng.random((2, 4)) < 0.5)

  @nnx.jit
  def logits(dynamics, cache, g):
    return genie_lib.cached_logits_fn(dynamics, cache, tokens, actions, jnp.int32(10),
                                      g)[0](current, mask)

  late = 3_000_000
  sink_S = jnp.arange(cache.frame_S.shape[0]) < 1
  late_cache = cache._replace(frame_S=jnp.where(sink_S, cache.frame_S, cache.frame_S + late))
  np.testing.assert_allclose(logits(dynamics, late_cache, jnp.int32(10 + late)),
                             logits(dynamics, cache, jnp.int32(10)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions,sinks,tokenizer_positions",
                         [("learned", 0, "learned"), ("rope", 1, "learned"),
                          ("rope", 1, "rope")])
def test_rollout_compiles_once_and_matches_play(positions, sinks, tokenizer_positions):
  from genie_jax.inference import genie as genie_lib  # pylint: disable=g-import-not-at-top
  from genie_jax import visualize  # pylint: disable=g-import-not-at-top
  tokenizer_sinks = int(tokenizer_positions == "rope")
  genie = genie_lib.Genie(_world("additive", positions, sinks,
                                 tokenizer_positions=tokenizer_positions,
                                 tokenizer_sinks=tokenizer_sinks))
  prompt = _video(2, 2)
  num = 6  # 2 + 6 = 8 frames: past both 4-frame windows (dynamics and tokenizer decoder).
  actions = np.random.default_rng(1).integers(0, ACTIONS, (2, num))
  video = genie.rollout(prompt, actions, rng=jax.random.key(0), num_steps=3, temperature=0.0)
  other = genie.rollout(prompt, (actions + 1) % ACTIONS, rng=jax.random.key(1), num_steps=3,
                        temperature=0.0)
  # One program for every frame, step and action sequence.
  assert genie._rollout._cache_size() == 1  # pylint: disable=protected-access
  assert video.shape == (2, 2 + num, IMAGE, IMAGE, 3) and other.shape == video.shape
  np.testing.assert_allclose(video[:, :2], prompt / 255.0, atol=1e-6)
  assert float(video.min()) >= 0.0 and float(video.max()) <= 1.0

  # Frame-by-frame play (argmax, so no randomness) generates the same frames, with one
  # compiled step although its buffer fills and starts to roll after frame 4.
  session = genie.start(prompt, num_steps=3, temperature=0.0)
  for i in range(num):
    frame = session.step(actions[:, i])
    assert frame.shape == (IMAGE, IMAGE, 3) and frame.dtype == np.uint8
  assert genie._play_step._cache_size() == 1  # pylint: disable=protected-access
  assert session.frames.shape == (2, 2 + num, IMAGE, IMAGE, 3)
  np.testing.assert_allclose(session.frames.astype(int),
                             visualize.to_uint8(np.asarray(video)).astype(int), atol=1)
  if positions == "learned":
    # Past the window the cache is rebuilt: the rollout is the model's on the window.
    reference = genie.rollout(prompt, actions, rng=jax.random.key(0), num_steps=3,
                              temperature=0.0, cached=False)
    np.testing.assert_allclose(reference, video, atol=1e-5)


@pytest.mark.parametrize("sinks", [0, 1])
def test_streaming_decoder_equals_the_decoder_in_the_window_and_a_masked_reference_past_it(
    sinks):
  """A rotary decoder's rolling cache: frames within the window equal `Tokenizer.decode`;
  past it, a reference that keeps every frame's keys/values in its own slot and masks all
  but the sink and the latest frames gives the same frames, and the cache holds them."""
  from genie_jax.inference import genie as genie_lib  # pylint: disable=g-import-not-at-top
  # Two blocks: with one, a frame's keys/values would not depend on the frames before it.
  tokenizer = _world(tokenizer_positions="rope", tokenizer_sinks=sinks,
                     decoder_layers=2).tokenizer
  length = 10
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, CODES, (2, length, 4)), jnp.int32)
  video, cache = nnx.jit(lambda t, x: genie_lib.stream_decode(t, t.decoder_input(x)))(
      tokenizer, tokens)
  assert video.shape == (2, length, IMAGE, IMAGE, 3)
  np.testing.assert_allclose(video[:, :FRAMES], nnx.jit(lambda t, x: t.decode(x))(
      tokenizer, tokens[:, :FRAMES]), atol=1e-5)
  slots = FRAMES - 1
  assert (set(np.asarray(cache.frame_S).tolist())
          == set(range(sinks)) | set(range(length - (slots - sinks), length)))

  @nnx.jit
  def reference(tokenizer):
    decoder = tokenizer.decoder
    x = tokenizer.decoder_input(tokens)
    shape = (2, 4, 2, length, 8)  # (B, N, K, S, E): every frame in its own slot.
    kv = [(jnp.zeros(shape), jnp.zeros(shape))] * 2
    frames = jnp.arange(length)
    out = []
    for g in range(length):
      shift = max(g - slots, 0)
      visible = (frames < g) & ((frames < sinks) | (frames >= g - (slots - sinks)))
      positions = jnp.where(frames < sinks, frames, frames - shift)
      y, frame_kv = decoder.decode_frame(x[:, g:g + 1], decoder.rotate_cache(kv, positions),
                                         g - shift, visible)
      kv = decoder.write_cache(kv, frame_kv, g)
      out.append(jnp.clip(tokenizer.pixels(y), 0.0, 1.0))
    return jnp.concatenate(out, axis=1)

  expected = reference(tokenizer)
  np.testing.assert_allclose(video, expected, atol=1e-5)
  # Past the window the output is the streaming model's, not the window's (not vacuous).
  window = nnx.jit(lambda t, x: t.decode(x))(tokenizer, tokens[:, length - FRAMES:])
  assert not np.allclose(video[:, -1], window[:, -1], atol=1e-4)


def test_sampling_takes_back_the_rare_code_weighting():
  from genie_jax.inference import genie as genie_lib  # pylint: disable=g-import-not-at-top
  from genie_jax import visualize  # pylint: disable=g-import-not-at-top
  weighted = ml_collections.ConfigDict(dict(rare_token_weight=0.5, unbias_sampling=True))
  assert genie_lib.sampling_prior_weight(weighted) == 0.5
  for config in (None, ml_collections.ConfigDict(dict(rare_token_weight=0.0)),
                 ml_collections.ConfigDict(dict(rare_token_weight=0.5, unbias_sampling=False))):
    assert genie_lib.sampling_prior_weight(config) == 0.0
  prompt, actions = _video(2, 1), np.random.default_rng(2).integers(0, ACTIONS, (2, 3))
  plain_BTN = np.asarray(genie_lib.rollout_tokens(_world(), jnp.asarray(prompt),
                                                  jnp.asarray(actions), jax.random.key(0),
                                                  num_steps=2, temperature=0.0))
  # Skewed code frequencies: a code the plain model does not generate on most tokens.
  common = int(np.setdiff1d(np.arange(CODES), plain_BTN[:, 1:])[0])
  usage_V = np.full(CODES, 0.02 / (CODES - 1), np.float32)
  usage_V[common] = 0.98

  def world_with_usage(logit_shift_V=None):
    # A copy: _world() is cached, and its Variables are shared with every Genie built on it.
    world = nnx.clone(_world())
    world.tokenizer.vq.usage[...] = jnp.asarray(usage_V)
    if logit_shift_V is not None:
      world.dynamics.to_logits.bias[...] += logit_shift_V
    return world

  sample = lambda genie: genie.rollout(prompt, actions, rng=jax.random.key(0), num_steps=2,
                                       temperature=0.0)
  genie = genie_lib.Genie(world_with_usage(), config=weighted)
  video = sample(genie)
  # The same as a model whose logits carry 0.5 * log(frequency) sampled without the prior.
  shifted = genie_lib.Genie(world_with_usage(0.5 * np.log(usage_V)))
  np.testing.assert_allclose(video, sample(shifted), atol=1e-5)
  # It moves the sampled tokens towards the common code.
  weighted_BTN = np.asarray(genie_lib.rollout_tokens(
      world_with_usage(), jnp.asarray(prompt), jnp.asarray(actions), jax.random.key(0),
      num_steps=2, temperature=0.0, prior_weight=0.5))
  assert np.sum(weighted_BTN[:, 1:] == common) > np.sum(plain_BTN[:, 1:] == common) == 0
  # Play samples the same way.
  session = genie.start(prompt, num_steps=2, temperature=0.0)
  for i in range(actions.shape[1]):
    session.step(actions[:, i])
  np.testing.assert_allclose(session.frames.astype(int),
                             visualize.to_uint8(np.asarray(video)).astype(int), atol=1)


def test_genie_rejects_bad_actions_and_prompts():
  from genie_jax.inference import genie as genie_lib  # pylint: disable=g-import-not-at-top
  genie = genie_lib.Genie(_world())
  prompt = _video(1, 1)
  with pytest.raises(ValueError, match=r"action 3 is out of range.*\[0, 3\)"):
    genie.rollout(prompt, np.array([[0, 3]]), rng=jax.random.key(0))
  with pytest.raises(ValueError, match=r"action -1 is out of range"):
    genie.start(prompt).step(-1)
  with pytest.raises(ValueError, match="prompt has 4 frames; expected 1 to 3"):
    genie.rollout(_video(1, 4), np.array([[0]]), rng=jax.random.key(0))
  with pytest.raises(ValueError, match="prompt must be uint8"):
    genie.rollout(prompt / 255.0, np.array([[0]]), rng=jax.random.key(0))
  for steps in (0, -2):
    with pytest.raises(ValueError, match=f"num_steps={steps}: this model takes at least 1"):
      genie.rollout(prompt, np.array([[0]]), rng=jax.random.key(0), num_steps=steps)
    with pytest.raises(ValueError, match=f"num_steps={steps}: this model takes at least 1"):
      genie.start(prompt, num_steps=steps)


# --- End to end: a world model restored from stage workdirs, and the generate CLI ------------


def _save_stage(workdir, config, seed):
  """A stage workdir as the trainer leaves it (config.json + a checkpoint), with random
  weights instead of training (fast)."""
  from genie_jax import config_lib  # pylint: disable=g-import-not-at-top
  from genie_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from genie_jax import sharding  # pylint: disable=g-import-not-at-top
  from genie_jax import tasks  # pylint: disable=g-import-not-at-top
  from genie_jax.training import train_state  # pylint: disable=g-import-not-at-top
  task = tasks.get_task(config)
  spec = train_state.make_state_spec(
      task, config, sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]))
  config_lib.save_config(workdir, task.config)
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint, task.config)
  ckpt.save(2, spec.init(jax.random.key(seed)), force=True)
  ckpt.close()


@pytest.fixture(scope="module")
def dynamics_workdir(tmp_path_factory, tiny_data_dir):
  import data_pipelines  # pylint: disable=g-import-not-at-top
  from configs import dynamics as dynamics_config  # pylint: disable=g-import-not-at-top
  from configs import lam as lam_config  # pylint: disable=g-import-not-at-top
  from configs import tokenizer as tokenizer_config  # pylint: disable=g-import-not-at-top
  from genie_jax import config_lib  # pylint: disable=g-import-not-at-top

  def tiny(config):
    config.data.update(dict(data_dir=tiny_data_dir, image_size=32, clip_len=8,
                            num_train_episodes=1, num_val_episodes=2, episode_len=16))
    config.model.max_frames = 8
    config.checkpoint.async_save = False
    return config

  root = tmp_path_factory.mktemp("genie")
  dirs = {name: str(root / name) for name in ("tok", "lam", "dyn")}
  # The world model's checkpoint holds the tokenizer and the LAM too; of their own workdirs,
  # only config.json is read.
  for name, module in (("tok", tokenizer_config), ("lam", lam_config)):
    config = tiny(module.get_config("size=tiny,runlocal"))
    config.model.image_size = 32
    config_lib.save_config(dirs[name], config)
  config = tiny(dynamics_config.get_config(
      f"size=tiny,runlocal,tokenizer_workdir={dirs['tok']},lam_workdir={dirs['lam']}"))
  data_pipelines.get_builder(config.data, prepare=True)
  _save_stage(dirs["dyn"], config, 3)
  return dirs["dyn"]


def test_genie_from_workdir_rollout_and_generate_cli(dynamics_workdir, tmp_path):
  from genie_jax.inference import generate  # pylint: disable=g-import-not-at-top
  from genie_jax.inference import genie as genie_lib  # pylint: disable=g-import-not-at-top
  genie = genie_lib.Genie.from_workdir(dynamics_workdir)
  assert genie.step == 2 and genie.max_frames == 8
  video = np.asarray(np.random.default_rng(0).integers(0, 256, (1, 3, 32, 32, 3)), np.uint8)
  tokens = genie.tokenize(video)
  assert tokens.shape == (1, 3, 16)
  assert genie.detokenize(tokens).shape == (1, 3, 32, 32, 3)
  assert genie.infer_actions(video).shape == (1, 2)
  # Restored weights carry their mesh: a play session's steps still share one program.
  session = genie.start(video[:, :1], num_steps=1)
  for action in range(3):
    session.step(action)
  assert genie._play_step._cache_size() == 1  # pylint: disable=protected-access

  out = str(tmp_path / "gen")
  os.makedirs(out)
  for stale in ("video_2.gif", "video_2.mp4", "video_10.gif"):  # an earlier, larger run's
    open(os.path.join(out, stale), "wb").close()
  for kept in ("notes.txt", "video_holiday.mp4"):  # not generate's
    open(os.path.join(out, kept), "wb").close()
  with open(os.path.join(out, "actions.json"), "w") as f:  # The earlier run's own.
    json.dump(dict(workdir=dynamics_workdir, action_ids=[[0]] * 11, num_steps=2), f)
  result = generate.generate(dynamics_workdir, num_frames=3, actions="inferred", num_steps=2,
                             num_videos=2, out_dir=out, scale=1)
  assert result["video"].shape == (2, 4, 32, 32, 3)
  assert result["actions"].shape == (2, 3)
  assert os.path.exists(os.path.join(out, "video_1.gif"))
  assert sorted(n for n in os.listdir(out) if n.startswith("video_")) == sorted(
      [os.path.basename(f) for f in result["files"] if "video_" in f] + ["video_holiday.mp4"])
  assert os.path.exists(os.path.join(out, "notes.txt"))
  with pytest.raises(ValueError, match=r"out of range.*\[0, 6\)"):
    generate.generate(dynamics_workdir, actions="0,6", num_steps=1, num_videos=1, out_dir=out)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    generate.generate(str(tmp_path / "nowhere"))


def test_generate_and_evaluate_refuse_bad_settings_before_the_work(dynamics_workdir, tmp_path,
                                                                    monkeypatch):
  from genie_jax.inference import evaluate  # pylint: disable=g-import-not-at-top
  from genie_jax.inference import generate  # pylint: disable=g-import-not-at-top
  from genie_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "gen")
  with pytest.raises(ValueError, match="--num_videos=0 must be at least 1"):
    generate.generate(dynamics_workdir, num_videos=0, out_dir=out)
  # 4 validation clips of 8 frames.
  with pytest.raises(ValueError, match="--num_videos=5: the validation split"):
    generate.generate(dynamics_workdir, num_steps=1, num_videos=5, out_dir=out)
  assert not os.path.exists(out)
  with pytest.raises(ValueError, match="--scale=0 must be at least 1"):
    generate.generate(dynamics_workdir, num_steps=1, num_videos=1, out_dir=out, scale=0)
  # A folder whose files of generate's names generate did not write is left alone.
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "video_5.mp4").write_bytes(b"a holiday")
  (mine / "actions.json").write_text("[]")
  with pytest.raises(ValueError, match=r"mine holds actions.json, video_5.mp4, not written by "
                                       r"genie_jax.cli.generate"):
    generate.generate(dynamics_workdir, num_steps=1, num_videos=1, out_dir=str(mine))
  assert sorted(os.listdir(mine)) == ["actions.json", "video_5.mp4"]
  assert (mine / "video_5.mp4").read_bytes() == b"a holiday"

  def no_restore(*args, **kwargs):
    raise AssertionError("the checkpoint was read before the settings were checked")
  monkeypatch.setattr(checkpointing.Checkpointer, "restore_model", no_restore)
  with pytest.raises(ValueError, match=r"config.evals.controllability.dt=0 must be in"):
    evaluate.evaluate(dynamics_workdir, eval_settings=["dt=0"], out_dir=str(tmp_path / "ev"))
