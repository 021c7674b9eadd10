"""MaskGIT iterative decoding of one frame of tokens (Chang et al. 2022; Genie section 2.3).

A frame starts fully masked. Each of the S steps predicts every masked position, samples a
token for each, and keeps the most confident ones; the rest are masked again. The number
still masked after step s follows the cosine schedule floor(N * cos(pi/2 * (s+1)/S)), at
least 1 until the last step and 0 after it, so every step samples at least one position and
the last step samples too (Jafar's off-by-one re-masking and forced argmax on the last step
are impossible here).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# (tokens_BN int32, mask_BN bool, True = [MASK]) -> logits_BNV.
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


def num_masked_after(step: int, num_steps: int, n: int) -> int:
  """How many of the n tokens are still masked after step `step` (0-based) of `num_steps`."""
  if not 0 <= step < num_steps:
    raise ValueError(f"step={step} is outside [0, num_steps={num_steps})")
  if step == num_steps - 1:
    return 0
  return max(1, math.floor(n * math.cos(math.pi / 2 * (step + 1) / num_steps)))


def mask_schedule(num_steps: int, n: int) -> np.ndarray:
  """num_masked_after(s) for every step s, as an int32 table.

  Computed on the host in float64, so the traced sampler uses exactly the counts that
  `num_masked_after` documents (a float32 cosine would round some floors differently).
  """
  if num_steps < 1 or n < 1:
    raise ValueError(f"need num_steps >= 1 and n >= 1; got num_steps={num_steps}, n={n}")
  return np.array([num_masked_after(s, num_steps, n) for s in range(num_steps)], np.int32)


def sample_frame(logits_fn: LogitsFn, rng: jax.Array, *, batch_size: int, num_tokens: int,
                 num_steps: int, temperature: float, noise_anneal: bool = True) -> jax.Array:
  """Decodes one frame of tokens with MaskGIT; traceable (one lax.fori_loop over the steps).

  Args:
    logits_fn: predicts logits_BNV for every position from the current tokens and mask.
    rng: PRNG key.
    batch_size, num_tokens: B and N.
    num_steps: S decoding steps.
    temperature: softmax temperature of the sampling; 0 picks the argmax (and adds no
      confidence noise).
    noise_anneal: scale the Gumbel noise on the confidences by (1 - (s+1)/S), as MaskGIT
      does; else keep it at full strength.

  Returns:
    tokens_BN int32, every position filled.
  """
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0")
  schedule = jnp.asarray(mask_schedule(num_steps, num_tokens))

  def step(s, carry):
    tokens_BN, mask_BN, key = carry
    key, sample_key, noise_key = jax.random.split(key, 3)
    logits_BNV = logits_fn(tokens_BN, mask_BN).astype(jnp.float32)
    if temperature > 0:
      logits_BNV = logits_BNV / temperature
      sampled_BN = jax.random.categorical(sample_key, logits_BNV, axis=-1)
    else:
      sampled_BN = jnp.argmax(logits_BNV, axis=-1)
    log_probs_BNV = jax.nn.log_softmax(logits_BNV, axis=-1)
    confidence_BN = jnp.take_along_axis(log_probs_BNV, sampled_BN[..., None], axis=-1)[..., 0]
    if temperature > 0:
      anneal = 1.0 - (s + 1) / num_steps if noise_anneal else 1.0
      gumbel_BN = jax.random.gumbel(noise_key, confidence_BN.shape)
      confidence_BN = confidence_BN + anneal * temperature * gumbel_BN
    # Fixed tokens are never re-masked: the schedule never asks for more masked positions
    # than there are masked ones now.
    confidence_BN = jnp.where(mask_BN, confidence_BN, jnp.inf)
    tokens_BN = jnp.where(mask_BN, sampled_BN.astype(jnp.int32), tokens_BN)
    # Exactly schedule[s] positions stay masked: the least confident ones (rank, not a
    # threshold, so that ties cannot change the count).
    rank_BN = jnp.argsort(jnp.argsort(confidence_BN, axis=-1), axis=-1)
    mask_BN = rank_BN < schedule[s]
    return tokens_BN, mask_BN, key

  tokens_BN = jnp.zeros((batch_size, num_tokens), jnp.int32)
  mask_BN = jnp.ones((batch_size, num_tokens), bool)
  tokens_BN, _, _ = jax.lax.fori_loop(0, num_steps, step, (tokens_BN, mask_BN, rng))
  return tokens_BN
