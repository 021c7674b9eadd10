"""The shared metric formulas."""

import jax.numpy as jnp
import numpy as np

from genie_jax import metrics


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
