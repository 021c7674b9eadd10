"""The shared metric formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genie_jax import metrics
from genie_jax import reductions


def test_psnr_is_per_frame_and_capped():
  a = jnp.zeros((2, 3, 4, 4, 3))
  b = a.at[0].set(0.1)  # Example 0: every pixel off by 0.1 (MSE 0.01, 20 dB); example 1 exact.
  np.testing.assert_allclose(metrics.frame_mse(a, b), [[0.01] * 3, [0.0] * 3], rtol=1e-6)
  np.testing.assert_allclose(metrics.frame_psnr(a, b), [[20.0] * 3, [100.0] * 3], rtol=1e-5)
  np.testing.assert_allclose(metrics.psnr_of_mse(jnp.float32(1.0)), 0.0, atol=1e-6)


def test_masked_correct_counts_the_masked_argmax_hits_only():
  logits = jnp.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # Argmax: 1, 0, 1.
  tokens = jnp.array([1, 1, 1])
  mask = jnp.array([True, True, False])
  np.testing.assert_array_equal(metrics.masked_correct(logits, tokens, mask),
                                [True, False, False])


def _awkward_rows() -> np.ndarray:
  """Rows that tell the first index from any other: ties, all -inf, NaNs, infinities."""
  x = np.random.default_rng(0).normal(size=(40, 6, 33)).astype(np.float32)
  x[0, 0, [3, 20]] = 9.0  # a tie for the max: jax takes the first
  x[0, 1, [4, 30]] = -9.0  # a tie for the min
  x[1, 1, :] = -np.inf
  x[2, 2, [9, 5]] = np.nan  # the first NaN wins, wherever the max is
  x[2, 3, 32] = np.nan  # a NaN after the max
  x[3, 3, :] = np.nan
  x[4, 4, [30, 7]] = np.inf
  x[4, 5, [30, 7]] = -np.inf
  x[5, 5, :] = 1.0
  return x


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("name", ["argmax", "argmin"])
def test_index_reductions_give_jax_results(name, axis):
  x = _awkward_rows()
  ours, theirs = getattr(reductions, name), getattr(jnp, name)
  for fn in (ours, jax.jit(ours, static_argnums=1)):
    got = np.asarray(fn(x, axis))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, theirs(x, axis=axis))
  bf16 = jnp.asarray(x, jnp.bfloat16)
  np.testing.assert_array_equal(ours(bf16, axis), theirs(bf16, axis=axis))


def test_index_reductions_refuse_integers():
  with pytest.raises(TypeError, match="floating-point"):
    reductions.argmax(jnp.arange(4))


@pytest.mark.parametrize("axis", [1, -1])
def test_categorical_draws_what_jax_draws(axis):
  logits = np.random.default_rng(1).normal(size=(3, 64, 40)).astype(np.float32) * 3
  for seed in range(4):
    key = jax.random.key(seed)
    np.testing.assert_array_equal(
        jax.jit(reductions.categorical, static_argnums=2)(key, logits, axis),
        jax.random.categorical(key, logits, axis=axis))
