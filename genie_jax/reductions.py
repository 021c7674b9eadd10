"""argmax, argmin and categorical sampling with jax's results, from plain reductions on CPU.

`jnp.argmax` lowers to one XLA reduction over (value, index) pairs, which XLA:CPU does not
vectorise: over the codes or the vocabulary of every token (the VQ's nearest code, the
masked-token accuracy, each MaskGIT step's sample) it costs several times the max itself
(README "Benchmark"). On CPU the index here is a max (or min) followed by the smallest index
that attains it: two reductions of one operand each, which XLA:CPU vectorises. The result is
jax's own, ties (the first index) and NaN (the first NaN) included. Other backends keep
jax's reduction (`jax.lax.platform_dependent` picks at lowering, so a program compiled
ahead of time for a TPU gets the TPU's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# float32 holds every integer up to 2**24 exactly, so indices reduce as floats (XLA:CPU's
# float reductions are the vectorised ones); longer axes take jax's own reduction.
_MAX_FLOAT_INDEX = 2**24


def _two_pass(reduce, x: jax.Array, axis: int) -> jax.Array:
  # Where XLA fuses x's producer into each pass and computes x twice, it emits the same
  # arithmetic for both (XLA:CPU compiles without fast-math), so each row's extreme is among
  # the values the second pass compares.
  extreme = reduce(x, axis=axis, keepdims=True)
  n = x.shape[axis]
  shape = [1] * x.ndim
  shape[axis] = n
  index = jnp.arange(n, dtype=jnp.float32).reshape(shape)
  # jax puts a row's first NaN first; XLA:CPU's max and min need not propagate NaN, so
  # NaNs are found by themselves: their positions count from -n, below every other index.
  candidate = jnp.where(jnp.isnan(x), index - n, jnp.where(x == extreme, index, n))
  first = jnp.min(candidate, axis=axis)
  return jnp.where(first < 0, first + n, first).astype(jnp.int32)


def _checked(x: jax.Array, axis: int) -> tuple[jax.Array, int]:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"expected a floating-point array; got {x.dtype}")
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"axis {axis} is out of range for an array of shape {x.shape}")
  return x, axis % x.ndim


def _index_reduction(reduce, jax_reduction, x: jax.Array, axis: int) -> jax.Array:
  x, axis = _checked(x, axis)
  theirs = lambda x: jax_reduction(x, axis=axis).astype(jnp.int32)
  if x.shape[axis] > _MAX_FLOAT_INDEX:
    return theirs(x)
  ours = functools.partial(_two_pass, reduce, axis=axis)
  return jax.lax.platform_dependent(x, cpu=ours, default=theirs)


def argmax(x: jax.Array, axis: int = -1) -> jax.Array:
  """jnp.argmax(x, axis) of a floating-point array (int32)."""
  return _index_reduction(jnp.max, jnp.argmax, x, axis)


def argmin(x: jax.Array, axis: int = -1) -> jax.Array:
  """jnp.argmin(x, axis) of a floating-point array (int32)."""
  return _index_reduction(jnp.min, jnp.argmin, x, axis)


def categorical(key: jax.Array, logits: jax.Array, axis: int = -1) -> jax.Array:
  """jax.random.categorical(key, logits, axis): the same draws (int32).

  jax draws Gumbel noise of the logits' shape and dtype and takes the argmax of noise +
  logits; this does the same with `argmax` above.
  """
  logits, axis = _checked(logits, axis)
  return argmax(jax.random.gumbel(key, logits.shape, logits.dtype) + logits, axis)
