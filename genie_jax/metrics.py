"""Metric formulas shared by the tasks' losses and the evaluators."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from genie_jax import reductions

# A perfect frame would give an infinite PSNR; this MSE floor bounds it.
_MIN_MSE = 1e-10


def psnr_of_mse(mse: jax.Array) -> jax.Array:
  """PSNR in dB of a mean squared error of pixels in [0, 1], bounded by the MSE floor."""
  return -10.0 * jnp.log10(jnp.maximum(mse, _MIN_MSE))


def frame_mse(a_HWC: jax.Array, b_HWC: jax.Array) -> jax.Array:
  """Mean squared error per frame: over the last three axes (H, W, C), any leading axes."""
  return jnp.mean(jnp.square(a_HWC - b_HWC), axis=(-3, -2, -1))


def frame_psnr(a_HWC: jax.Array, b_HWC: jax.Array) -> jax.Array:
  """PSNR per frame (`frame_mse`, then `psnr_of_mse`); averages of it are the reported
  PSNRs (a mean of per-frame PSNRs, not the PSNR of a mean error)."""
  return psnr_of_mse(frame_mse(a_HWC, b_HWC))


def masked_correct(logits_XV: jax.Array, tokens_X: jax.Array, mask_X: jax.Array) -> jax.Array:
  """Where the argmax prediction is the true token among the masked ones (bool, any leading
  axes): the masked-token accuracy's numerator."""
  return (reductions.argmax(logits_XV) == tokens_X) & mask_X
