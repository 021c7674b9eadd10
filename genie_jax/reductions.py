"""argmax, argmin and categorical sampling with jax's results, from plain reductions.

`jnp.argmax` lowers to one XLA reduction over (value, index) pairs, which XLA:CPU does not
vectorise: over the codes or the vocabulary of every token (the VQ's nearest code, the
masked-token accuracy, each MaskGIT step's sample) it costs several times the max itself
(README "Benchmark"). Here the index is a max (or min) followed by the smallest index that
attains it: two reductions of one operand each, which XLA:CPU vectorises. The result is
jax's own, ties (the first index) and NaN (the first NaN) included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# float32 holds every integer up to 2**24 exactly, so indices reduce as floats (XLA:CPU's
# float reductions are the vectorised ones); longer axes take jax's own reduction.
_MAX_FLOAT_INDEX = 2**24


def _first_index(x: jax.Array, axis: int, extreme: jax.Array) -> jax.Array:
  # jax puts a row's first NaN first; XLA:CPU's max and min need not propagate NaN, so
  # NaNs are found by themselves: their positions count from -n, below every other index.
  n = x.shape[axis]
  shape = [1] * x.ndim
  shape[axis] = n
  index = jnp.arange(n, dtype=jnp.float32).reshape(shape)
  candidate = jnp.where(jnp.isnan(x), index - n, jnp.where(x == extreme, index, n))
  first = jnp.min(candidate, axis=axis)
  return jnp.where(first < 0, first + n, first).astype(jnp.int32)


def _check(x: jax.Array, axis: int) -> tuple[jax.Array, int]:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"expected a floating-point array; got {x.dtype}")
  return x, axis % x.ndim


def argmax(x: jax.Array, axis: int = -1) -> jax.Array:
  """jnp.argmax(x, axis) of a floating-point array (int32)."""
  x, axis = _check(x, axis)
  if x.shape[axis] > _MAX_FLOAT_INDEX:
    return jnp.argmax(x, axis=axis).astype(jnp.int32)
  return _first_index(x, axis, jnp.max(x, axis=axis, keepdims=True))


def argmin(x: jax.Array, axis: int = -1) -> jax.Array:
  """jnp.argmin(x, axis) of a floating-point array (int32)."""
  x, axis = _check(x, axis)
  if x.shape[axis] > _MAX_FLOAT_INDEX:
    return jnp.argmin(x, axis=axis).astype(jnp.int32)
  return _first_index(x, axis, jnp.min(x, axis=axis, keepdims=True))


def categorical(key: jax.Array, logits: jax.Array, axis: int = -1) -> jax.Array:
  """jax.random.categorical(key, logits, axis): the same draws (int32).

  jax draws Gumbel noise of the logits' shape and dtype and takes the argmax of noise +
  logits; this does the same with `argmax` above.
  """
  logits, axis = _check(logits, axis)
  return argmax(jax.random.gumbel(key, logits.shape, logits.dtype) + logits, axis)
