"""MaskGIT iterative decoding of one frame of tokens (Chang et al. 2022; Genie section 2.3).

A frame starts fully masked. Each of the S steps predicts every masked position, samples a
token for each, and keeps the most confident ones; the rest are masked again. The number
still masked after step s follows the cosine schedule floor(N * cos(pi/2 * (s+1)/S)), at
least 1 until the last step and 0 after it, so every step samples at least one position and
the last step samples too (Jafar's off-by-one re-masking and forced argmax on the last step
are impossible here).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from genie_jax import reductions

# (tokens_BN int32, mask_BN bool, True = [MASK]) -> logits_BNV.
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


def _round_out(lo: Fraction, hi: Fraction, bits: int) -> tuple[Fraction, Fraction]:
  """[lo, hi] widened to multiples of 2**-bits, so that the rationals stay small."""
  scale = 1 << bits
  return (Fraction(math.floor(lo * scale), scale), Fraction(math.ceil(hi * scale), scale))


def _atan_bounds(inv_x: int, bits: int) -> tuple[Fraction, Fraction]:
  """Rigorous bounds on atan(1/inv_x), inv_x >= 2, within 2**-bits of it."""
  x2 = Fraction(1, inv_x * inv_x)
  total, power, k = Fraction(0), Fraction(1, inv_x), 0
  # An alternating series with decreasing terms: the first term left out bounds the error.
  while power / (2 * k + 1) >= Fraction(1, 1 << (bits + 2)):
    total += (-1) ** k * power / (2 * k + 1)
    power *= x2
    k += 1
  err = power / (2 * k + 1)
  return _round_out(total - err, total + err, bits + 2)


@functools.lru_cache(maxsize=None)
def _pi_bounds(bits: int) -> tuple[Fraction, Fraction]:
  """Rigorous rational bounds on pi, about 2**-bits apart (Machin's formula)."""
  lo5, hi5 = _atan_bounds(5, bits + 6)
  lo239, hi239 = _atan_bounds(239, bits + 6)
  return 16 * lo5 - 4 * hi239, 16 * hi5 - 4 * lo239


def _cos_bounds(x: Fraction, bits: int) -> tuple[Fraction, Fraction]:
  """Rigorous bounds on cos(x) for 0 <= x <= 2, within about 2**-bits of it."""
  x2 = x * x
  total, term, k = Fraction(0), Fraction(1), 0
  # From its second term on, the series is alternating with decreasing terms while x < 2
  # (x^2 < (2k+1)(2k+2)), so the first term left out bounds the error.
  while k < 2 or abs(term) >= Fraction(1, 1 << (bits + 2)):
    total += term
    k += 1
    term *= -x2 / ((2 * k - 1) * (2 * k))
  return _round_out(total - abs(term), total + abs(term), bits + 2)


@functools.lru_cache(maxsize=4096)
def _schedule_cos_bounds(p: int, q: int, bits: int) -> tuple[Fraction, Fraction]:
  """Rigorous bounds on cos(pi p/q) for 0 <= p/q <= 1/2, about 2**-bits apart."""
  pi_lo, pi_hi = _pi_bounds(bits + 4)
  # cos decreases on [0, pi], so the bounds on the angle swap into bounds on cos.
  lo, _ = _cos_bounds(pi_hi * p / q, bits + 4)
  _, hi = _cos_bounds(pi_lo * p / q, bits + 4)
  return lo, hi


def num_masked_after(step: int, num_steps: int, n: int) -> int:
  """How many of the n tokens are still masked after step `step` (0-based) of `num_steps`.

  max(1, floor(n cos(pi/2 (step+1)/num_steps))) before the last step and 0 at it, floored
  exactly: a float cosine floors exact cases such as 16 cos(pi/3) = 8 to 7.

  Raises:
    ValueError: step is not in [0, num_steps).
  """
  if not 0 <= step < num_steps:
    raise ValueError(f"step={step} is outside [0, num_steps={num_steps})")
  if step == num_steps - 1:
    return 0
  p, q = step + 1, 2 * num_steps  # The angle is pi p/q, in (0, pi/2).
  # The only rational cosine on (0, pi/2) is cos(pi/3) = 1/2 (Niven's theorem); there n
  # cos is exact and may be an integer, which no interval of finite width could settle.
  if 3 * p == q:
    return int(max(1, n // 2))  # int even for numpy n, as the contract says.
  # Elsewhere n cos is irrational, so never an integer: narrowing an interval around it
  # until no integer lies inside decides the floor, however close to one it is.
  bits = 64
  while True:
    lo, hi = (n * c for c in _schedule_cos_bounds(p, q, bits))
    lo, hi = min(lo, hi), max(lo, hi)
    if math.floor(lo) == math.floor(hi):
      return max(1, math.floor(lo))
    bits *= 2


def mask_schedule(num_steps: int, n: int) -> np.ndarray:
  """num_masked_after(s) for every step s, as an int32 table.

  Computed on the host, so the traced sampler uses exactly the counts that
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
      sampled_BN = reductions.categorical(sample_key, logits_BNV)
    else:
      sampled_BN = reductions.argmax(logits_BNV)
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
