"""Generation: MaskGIT schedule and sampler, cached decoding, compile-once rollouts."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genie_jax.models import layers
from genie_jax.models import maskgit

# --- Re-mask schedule ------------------------------------------------------------------------


@pytest.mark.parametrize("n,steps,expected", [
    # floor(n cos(pi/2 (s+1)/S)), at least 1 until the last step, 0 after it.
    (4, 2, [2, 0]),
    (4, 3, [3, 2, 0]),  # 4 cos(pi/6) = 3.46, 4 cos(pi/3) = 2.0000000000000004.
    (10, 4, [9, 7, 3, 0]),
    (3, 6, [2, 2, 2, 1, 1, 0]),  # 3 cos(5 pi/12) = 0.78 is raised to 1 before the end.
    (1, 3, [1, 1, 0]),
    (5, 1, [0]),
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
      counts[:-1], [max(1, math.floor(n * math.cos(math.pi / 2 * (s + 1) / steps)))
                    for s in range(steps - 1)])


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
  np.testing.assert_array_equal(draws(keys, 0.0, 4), np.broadcast_to(argmax, (20, B, N)))
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
  # Position-dependent certainty: positions with sharp logits should be fixed in step 0.
  sharp = jnp.arange(N) >= N // 2
  logits = jnp.where(sharp[None, :, None], jnp.eye(V)[0] * 50.0, 0.0)
  logits = jnp.broadcast_to(logits, (B, N, V))
  calls = []
  jax.jit(lambda key: maskgit.sample_frame(
      _recording_logits_fn(logits, calls), key, batch_size=B, num_tokens=N, num_steps=4,
      temperature=1.0, noise_anneal=True))(jax.random.key(3))
  jax.effects_barrier()
  kept_after_first = ~calls[1][1]
  n_kept = N - maskgit.num_masked_after(0, 4, N)
  assert n_kept <= N // 2
  # Noise is annealed by (1 - 1/4) * T, far below the 50-nat certainty gap.
  assert np.all(np.asarray(sharp)[np.nonzero(kept_after_first[0])[0]])


# --- Cached decoding in the ST-transformer ----------------------------------------------------


def _transformer(qk_norm=None, max_frames=5):
  return layers.STTransformer(2, 16, 2, num_tokens=4, max_frames=max_frames, qk_norm=qk_norm,
                              rngs=nnx.Rngs(0))


# Jitted: one compilation per shape instead of slow op-by-op execution.
_full = nnx.jit(lambda model, x: model(x))
_prefill = nnx.jit(lambda model, x: model.prefill(x))
_decode = nnx.jit(lambda model, x, cache, position: model.decode_frame(x, cache, position))


@pytest.mark.parametrize("qk_norm", [None, "rmsnorm"])
def test_cached_frame_equals_full_forward(qk_norm):
  model = _transformer(qk_norm)
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
  model = _transformer()
  x = jax.random.normal(jax.random.key(1), (1, 4, 4, 16))
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
