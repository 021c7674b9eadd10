"""genie_jax.reductions gives jax's argmax, argmin and categorical draws."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genie_jax import reductions
from genie_jax import sharding

# Two results from one reduction: XLA's (value, index) reduction.
_PAIR_REDUCTION = re.compile(r"%\S+:2 = stablehlo\.reduce")


def _awkward() -> np.ndarray:
  """An array whose rows, along every axis, tell the first index from any other: ties,
  all -inf, NaNs before and after the max, infinities, -0.0 against 0.0."""
  x = np.random.default_rng(0).normal(size=(40, 6, 33)).astype(np.float32)
  x[0, 0, [3, 20]] = 9.0  # ties along the last axis
  x[0, 1, [4, 30]] = -9.0
  x[[7, 30], 2, 1] = 9.0  # and along the first
  x[9, [1, 4], 2] = -9.0  # and along the middle one
  x[1, 1, :] = -np.inf
  x[2, 2, [9, 5]] = np.nan
  x[2, 3, 32] = np.nan
  x[3, 3, :] = np.nan
  x[[11, 25], 4, 6] = np.nan
  x[4, 4, [30, 7]] = np.inf
  x[4, 5, [30, 7]] = -np.inf
  x[5, 5, :] = 1.0
  x[6, 0, :] = 0.0
  x[6, 0, 8] = -0.0
  return x


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("name", ["argmax", "argmin"])
def test_index_reductions_give_jax_results(name, axis, dtype):
  x = jnp.asarray(_awkward(), dtype)
  ours, theirs = getattr(reductions, name), getattr(jnp, name)
  for fn in (ours, jax.jit(ours, static_argnums=1)):
    got = np.asarray(fn(x, axis))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, theirs(x, axis=axis))


def test_index_reductions_of_a_computed_input():
  a = jnp.asarray(np.random.default_rng(1).normal(size=(512, 300)), jnp.bfloat16)
  fn = lambda a: (a.astype(jnp.float32) * 1.7 + 0.3) / 3.1
  for name in ("argmax", "argmin"):
    both = jax.jit(lambda a: (getattr(reductions, name)(fn(a)),
                              getattr(jnp, name)(fn(a), axis=-1)))
    ours, theirs = both(a)
    np.testing.assert_array_equal(ours, theirs)


def test_a_sharded_batch_is_reduced_where_it_lies():
  """Rows split over devices: each device reduces its own rows, nothing crosses devices."""
  rows = _awkward()[:32]
  mesh = sharding.make_mesh(dict(data=4, fsdp=1, tensor=1), jax.devices()[:4])
  x = jax.device_put(rows, sharding.batch_sharding(mesh, sharding.DEFAULT_RULES))
  for name in ("argmax", "argmin"):
    fn = jax.jit(lambda x: getattr(reductions, name)(x, -1))
    np.testing.assert_array_equal(fn(x), getattr(jnp, name)(rows, axis=-1))
    hlo = fn.lower(x).compile().as_text()
    for collective in ("all-reduce", "all-gather", "collective-permute", "all-to-all"):
      assert collective not in hlo, (name, collective)


def test_cpu_lowers_the_two_passes_and_other_backends_jax_reduction():
  x = jnp.ones((4, 8))
  lower = lambda fn, platform: jax.jit(fn).trace(x).lower(
      lowering_platforms=(platform,)).as_text()
  for fn, plain in ((reductions.argmax, "maximum"), (reductions.argmin, "minimum")):
    assert f"applies stablehlo.{plain}" in lower(fn, "cpu")
    for platform in ("tpu", "cuda"):
      text = lower(fn, platform)
      assert _PAIR_REDUCTION.search(text) and f"applies stablehlo.{plain}" not in text


def test_index_reductions_refuse_integers_and_bad_axes():
  with pytest.raises(TypeError, match="floating-point"):
    reductions.argmax(jnp.arange(4))
  with pytest.raises(ValueError, match="axis 2 is out of range"):
    reductions.argmin(jnp.ones((3, 4)), 2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("axis", [1, -1])
def test_categorical_draws_what_jax_draws(axis, dtype):
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 64, 40)) * 3, dtype)
  for seed in range(4):
    key = jax.random.key(seed)
    np.testing.assert_array_equal(
        jax.jit(reductions.categorical, static_argnums=2)(key, logits, axis),
        jax.random.categorical(key, logits, axis=axis))
