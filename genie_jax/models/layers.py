"""Building blocks of the ST-transformers: norms, attention, the ST block, patchify.

Arrays carry their axes in their names (letters in `genie_jax/__init__.py`); einsum strings
use the same letters. Every weight matrix names its axes for `genie_jax.sharding`, and block
boundaries constrain activations to ('act_batch', 'act_time', 'act_tokens', 'act_embed').

Why the code looks the way it does (XLA:CPU; each hand-written VJP is checked against plain
autodiff in tests/test_models.py). Each departure from the plain einsum/softmax/autodiff form
spares XLA:CPU passes over memory, copies or transposes:
  * LayerNorm has its own VJP and takes both row statistics in one pass (a two-operand
    reduction, which XLA fuses with its producers; two separate sums cost extra passes).
  * The attention core has its own VJP: it keeps the unnormalised probabilities, divides
    the [S, E] output instead of the [S, S] probabilities, and its backward needs
    rowsum(do * o) on [S, E] rather than rowsum(dP * P) on [S, S].
  * q, k and v are moved once to a head-major layout ([..., K, S, E], S the attended
    axis), so the core's batched matmuls have their batch axes leading.
  * Projections are 2-D matmuls over the flattened token axes (`dense`). Their weight
    gradients then contract one axis, which XLA:CPU does without copies; einsums over
    (b, t, n), or over several kernel axes, make it transpose [tokens, 3D]- and
    [tokens, F]-sized operands (jnp.einsum even orders contracted letters alphabetically,
    "ke" -> "ek").
  * The GELU is recomputed in the backward pass instead of storing its tanh.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import einops
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from genie_jax import sharding

Dtype = Any

_ACT_BTND = ("act_batch", "act_time", "act_tokens", "act_embed")
_ACT_BTNF = ("act_batch", "act_time", "act_tokens", "act_mlp")
# Head-major q/k/v/o of spatial ([B, T, K, N, E]) and temporal ([B, N, K, T, E]) attention.
_ACT_HEADS = {"tokens": ("act_batch", "act_time", "act_heads", "act_tokens", None),
              "time": ("act_batch", "act_tokens", "act_heads", "act_time", None)}
# [B, T, N, K, E] -> head-major, and back.
_TO_HEADS = {"tokens": (0, 1, 3, 2, 4), "time": (0, 2, 3, 1, 4)}
_FROM_HEADS = {"tokens": (0, 1, 3, 2, 4), "time": (0, 3, 1, 2, 4)}

# Standard deviation of learned position tables and embeddings (ViT/BERT practice).
_EMBED_STDDEV = 0.02

NORMS = ("layernorm", "rmsnorm")
ATTENTION_IMPLS = ("xla", "cudnn")
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
REMAT_POLICIES = {
    # Keeps only each block's input: the least memory, one extra forward per block.
    "full": jax.checkpoint_policies.nothing_saveable,
    # Also keeps the projection and feed-forward matmul outputs; recomputes the attention
    # probabilities, which grow with tokens^2 and dominate activation memory.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def param(rngs: nnx.Rngs, init: Callable[..., jax.Array], shape: Sequence[int],
          names: Sequence[str | None], param_dtype: Dtype) -> nnx.Param:
  """A parameter whose axes carry the logical sharding `names`."""
  init = nnx.with_partitioning(init, tuple(names))
  return nnx.Param(init(rngs.params(), tuple(shape), param_dtype))


def _fan_in_init(in_axes: Sequence[int]) -> Callable[..., jax.Array]:
  """LeCun normal over the contracted axes `in_axes` (variance 1 / their product), so
  stacked (e.g. per-head) kernels keep the variance of the equivalent 2-D matrix."""
  def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
    # Every other axis is an output axis: variance_scaling would count the axes named in
    # neither as a convolution's receptive field and divide by them too.
    out_axes = tuple(i for i in range(len(shape)) if i not in in_axes)
    return jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(in_axes), out_axis=out_axes)(
            key, shape, dtype)
  return init


# Below this many rows (a generated frame is 256 rows per clip) the transposed copy of k
# costs more than the dot it speeds up, and no gradient is taken there.
_TALL_MIN_ROWS = 2048


def _matmul_tall_cpu(x2d: jax.Array, k2d: jax.Array) -> jax.Array:
  # x @ k with k [K, N], K > N, against k held transposed: its gradient then comes out of
  # the backward pass as the wide dy^T x ([N, K]) and is transposed after, where XLA:CPU
  # would compute x^T dy ([K, N], a long contraction into few columns) more slowly.
  # The barrier keeps XLA from folding the transposes back into the dots.
  kt = jax.lax.optimization_barrier(k2d.T)
  return jax.lax.dot_general(x2d, kt, (((1,), (1,)), ((), ())))


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
          in_axes: int = 1) -> jax.Array:
  """Contracts the last `in_axes` axes of x with the first ones of kernel (+ bias).

  Computed as one 2-D matmul: x's leading axes are flattened into a token axis, the
  contracted and the output axes into one axis each (see the module docstring). Merging
  axes keeps a sharding only when the sharded axis is the major one of its group, hence
  e.g. the (D, K, 3, E) order of the qkv kernel.
  """
  lead, contracted = x.shape[:x.ndim - in_axes], x.shape[x.ndim - in_axes:]
  out_axes = kernel.shape[in_axes:]
  x2d, k2d = x.reshape(-1, math.prod(contracted)), kernel.reshape(math.prod(contracted), -1)
  if k2d.shape[0] > k2d.shape[1] and x2d.shape[0] >= _TALL_MIN_ROWS:
    y = jax.lax.platform_dependent(x2d, k2d, cpu=_matmul_tall_cpu, default=jnp.matmul)
  else:
    y = x2d @ k2d
  if bias is not None:
    y = y + bias.reshape(-1)
  return y.reshape(*lead, *out_axes)


# --- LayerNorm ----------------------------------------------------------------------------


def _sum_pair(a: jax.Array, b: jax.Array, axes: tuple[int, ...]):
  # A two-operand reduction: XLA computes both sums in one fused pass over the inputs,
  # where two single sums become separate passes with materialised inputs. Only for
  # reductions over the minor (last) axis: over leading axes XLA:CPU runs the two-operand
  # form far slower than two plain sums.
  zero = jnp.zeros((), jnp.float32)
  return jax.lax.reduce((a, b), (zero, zero), lambda x, y: (x[0] + y[0], x[1] + y[1]), axes)


def _layer_norm_fwd(eps, x, scale, bias):
  xf = x.astype(jnp.float32)
  width = x.shape[-1]
  total, total_sq = _sum_pair(xf, xf * xf, (x.ndim - 1,))
  mean = (total / width)[..., None]
  # E[x^2] - E[x]^2, as flax's default LayerNorm; clamped against rounding below zero.
  var = jnp.maximum((total_sq / width)[..., None] - mean * mean, 0.0)
  rstd = jax.lax.rsqrt(var + eps)
  y = (xf - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y, (x, mean, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def layer_norm(eps: float, x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """LayerNorm over the last axis; float32 output whatever the input dtype."""
  return _layer_norm_fwd(eps, x, scale, bias)[0]


def _layer_norm_bwd(eps, res, dy):
  del eps
  x, mean, rstd, scale = res
  width = x.shape[-1]
  xhat = (x.astype(jnp.float32) - mean) * rstd
  g = dy * scale.astype(jnp.float32)
  g_sum, g_xhat_sum = _sum_pair(g, g * xhat, (x.ndim - 1,))
  dx = rstd * (g - (g_sum / width)[..., None] - xhat * (g_xhat_sum / width)[..., None])
  rows = tuple(range(x.ndim - 1))
  dscale, dbias = jnp.sum(dy * xhat, axis=rows), jnp.sum(dy, axis=rows)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class Norm(nnx.Module):
  """LayerNorm or RMSNorm over the last axis, computed in float32, cast to `dtype`.

  Statistics in float32 keep bf16 training stable (as in Jasmine); the scale (and bias)
  are small and stay unnamed, i.e. replicated.
  """

  def __init__(self, features: int, *, kind: str = "layernorm", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, eps: float = 1e-6, rngs: nnx.Rngs):
    del rngs  # Deterministic init; kept for a uniform constructor signature.
    if kind not in NORMS:
      raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")
    self.kind = kind
    self.dtype = dtype
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype)) if kind == "layernorm" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind == "layernorm":
      return layer_norm(self.eps, x, self.scale[...], self.bias[...]).astype(self.dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


# --- Attention ----------------------------------------------------------------------------


def _attention_core_fwd(causal, q, k, v):
  logits = jnp.einsum("...se,...te->...st", q, k, preferred_element_type=jnp.float32)
  if causal:
    s, t = logits.shape[-2:]
    logits = jnp.where(jnp.tril(jnp.ones((s, t), bool)), logits, -jnp.inf)
  # The diagonal is never masked, so every row has a finite maximum.
  unnormalised = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  denominator = jnp.sum(unnormalised, axis=-1, keepdims=True)
  o = jnp.einsum("...st,...te->...se", unnormalised.astype(v.dtype), v,
                 preferred_element_type=jnp.float32)
  o = (o / denominator).astype(q.dtype)
  return o, (q, k, v, unnormalised, denominator, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention_core(causal: bool, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T) v over head-major [..., S, E] arrays (q already scaled).

  All leading axes are batch axes. With `causal`, query s sees keys t <= s only.
  """
  return _attention_core_fwd(causal, q, k, v)[0]


def _attention_core_bwd(causal, res, do):
  del causal  # Masked entries of `unnormalised` are 0, so they get no gradient.
  q, k, v, unnormalised, denominator, o = res
  dtype = q.dtype
  # With P = unnormalised / denominator: dlogits = P * (do v^T - rowsum(do * o)).
  do_scaled = do.astype(jnp.float32) / denominator
  row = jnp.sum(do_scaled * o.astype(jnp.float32), axis=-1, keepdims=True)
  do_scaled = do_scaled.astype(dtype)
  dp = jnp.einsum("...se,...te->...st", do_scaled, v, preferred_element_type=jnp.float32)
  dlogits = (unnormalised * (dp - row)).astype(dtype)
  dq = jnp.einsum("...st,...te->...se", dlogits, k)
  dk = jnp.einsum("...st,...se->...te", dlogits, q)
  dv = jnp.einsum("...st,...se->...te", unnormalised.astype(dtype), do_scaled)
  return dq, dk, dv


attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


TEMPORAL_POSITIONS = ("learned", "rope")
# RoPE wavelengths run from 2*pi to ROPE_BASE * 2*pi positions (RoFormer's base).
ROPE_BASE = 10_000.0
# Token grids are a few dozen cells on a side: wavelengths up to 100 * 2*pi cells keep most
# of the rotary frequencies distinct across the grid instead of nearly constant.
GRID_ROPE_BASE = 100.0


def rope(x: jax.Array, positions: jax.Array, base: float = ROPE_BASE) -> jax.Array:
  """Rotary position embedding: x[..., E] rotated by angles positions[...] * freq (RoFormer).

  `positions` broadcasts against x's leading axes. The dot product of a query rotated at p
  and a key rotated at s depends on p - s only: keys cached under one numbering stay valid
  when the window slides.
  """
  half = x.shape[-1] // 2
  # Positions known at trace time (numpy) give constant cos/sin tables; traced ones (a
  # decoded frame's) are computed on device. XLA fuses the transcendentals into the
  # rotation and evaluates them once per element of x, forward and backward.
  xp = np if isinstance(positions, np.ndarray) else jnp
  # One frequency table for both, so that both paths rotate by the same angles.
  freq = xp.asarray(base ** (-np.arange(half, dtype=np.float32) / np.float32(half)))
  angle = positions.astype(np.float32)[..., None] * freq
  cos, sin = jnp.asarray(xp.cos(angle), x.dtype), jnp.asarray(xp.sin(angle), x.dtype)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def grid_positions(num_tokens: int, rows: int, cols: int) -> np.ndarray:
  """(num_tokens, 2) int (row, col) of each token of a frame whose last rows * cols tokens
  are a row-major grid; leading tokens (a prepended action token) get (0, 0)."""
  lead = num_tokens - rows * cols
  if lead < 0:
    raise ValueError(f"a {rows} x {cols} token grid does not fit in {num_tokens} tokens")
  rc = np.stack(np.divmod(np.arange(rows * cols), cols), axis=-1)
  return np.concatenate([np.zeros((lead, 2), np.int32), rc.astype(np.int32)])


def rope_2d(x: jax.Array, positions_N2: np.ndarray) -> jax.Array:
  """Axial 2-D RoPE on x[..., N, K, E]: the first half of E rotated by the token's row, the
  second by its column, so that a query-key dot product depends on their offset (drow,
  dcol) only: attention can select "the token one cell to the left" at every position
  with the same weights."""
  half = x.shape[-1] // 2
  rows_N1, cols_N1 = positions_N2[:, 0, None], positions_N2[:, 1, None]
  return jnp.concatenate([rope(x[..., :half], rows_N1, GRID_ROPE_BASE),
                          rope(x[..., half:], cols_N1, GRID_ROPE_BASE)], axis=-1)


class Attention(nnx.Module):
  """Multi-head self-attention over one axis of x_BTND: the tokens of a frame or time.

  `over='tokens'` attends among the N tokens of each frame (spatial); `over='time'` attends
  among the T frames at each token position (temporal).

  Args:
    d_model: width D of x.
    num_heads: K; the head width is E = D / K.
    over: 'tokens' or 'time'.
    causal: query t sees keys s <= t only.
    qk_norm: None, 'layernorm' or 'rmsnorm': normalise q and k per head before the dot
      product (ViT-22B; used by the large Genie models against logit growth).
    dtype: compute dtype of matmuls; softmax is computed in float32.
    param_dtype: dtype of the weights.
    implementation: 'xla' (any backend; the layout described in the module docstring) or
      'cudnn' (jax.nn.dot_product_attention's fused kernel; NVIDIA GPUs, bf16/fp16).
    rotary: rotate q and k by their frame index (`rope`; over='time' only).
    grid: over='tokens' only: None, or (rows, cols) of the frame's token grid (its last
      rows * cols tokens, row-major), to rotate q and k by their row and column
      (`rope_2d`).
  """

  def __init__(self, d_model: int, num_heads: int, *, over: str, causal: bool = False,
               qk_norm: str | None = None, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, implementation: str = "xla",
               rotary: bool = False, grid: tuple[int, int] | None = None,
               num_tokens: int = 0, rngs: nnx.Rngs):
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
    if over not in _TO_HEADS:
      raise ValueError(f"Attention over={over!r}; expected one of {sorted(_TO_HEADS)}")
    if qk_norm is not None and qk_norm not in NORMS:
      raise ValueError(f"qk_norm={qk_norm!r}; expected None or one of {NORMS}")
    if implementation not in ATTENTION_IMPLS:
      raise ValueError(f"attention implementation={implementation!r}; expected one of "
                       f"{ATTENTION_IMPLS}")
    if implementation == "cudnn" and jnp.dtype(dtype) not in _CUDNN_DTYPES:
      raise ValueError(f"attention implementation 'cudnn' needs a bfloat16 or float16 compute "
                       f"dtype; got {jnp.dtype(dtype)}")
    head_dim = d_model // num_heads
    if rotary and (over != "time" or head_dim % 2):
      raise ValueError(f"rotary positions need attention over time and an even head width; "
                       f"got over={over!r}, head width {head_dim}")
    if grid is not None and (over != "tokens" or head_dim % 4):
      raise ValueError(f"2-D rotary positions need attention over tokens and a head width "
                       f"divisible by 4; got over={over!r}, head width {head_dim}")
    self.rotary = rotary
    if grid is not None:
      grid_positions(num_tokens, *grid)  # Checks that the grid fits.
    # Static ints, not an array: positions are rebuilt in numpy at trace time.
    self.grid = None if grid is None else (num_tokens, *grid)
    self.over = over
    self.causal = causal
    self.dtype = dtype
    # cuDNN's kernel runs on NVIDIA GPUs only; elsewhere (a GPU-trained model evaluated or
    # played on a CPU, compiled for a TPU) the same attention runs as 'xla': the weights
    # are the same either way.
    self.implementation = implementation if jax.default_backend() == "gpu" else "xla"
    if implementation != self.implementation:
      logging.log_first_n(logging.WARNING, "attention implementation 'cudnn' needs an NVIDIA "
                          "GPU; on %s it runs as 'xla'", 1, jax.default_backend())
    self.scale = head_dim ** -0.5
    # q, k and v share one kernel: one matmul reads x once. Heads come before the q/k/v
    # axis so that the flattened (K 3 E) output axis keeps a 'heads' sharding.
    self.qkv_kernel = param(rngs, _fan_in_init([0]), (d_model, num_heads, 3, head_dim),
                            ("embed", "heads", "qkv", "head_dim"), param_dtype)
    self.qkv_bias = param(rngs, jax.nn.initializers.zeros, (num_heads, 3, head_dim),
                          ("heads", "qkv", "head_dim"), param_dtype)
    self.out_kernel = param(rngs, _fan_in_init([0, 1]), (num_heads, head_dim, d_model),
                            ("heads", "head_dim", "embed"), param_dtype)
    self.out_bias = nnx.Param(jnp.zeros((d_model,), param_dtype))
    if qk_norm is None:
      self.q_norm = self.k_norm = None
    else:
      norm = lambda: Norm(head_dim, kind=qk_norm, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)
      self.q_norm, self.k_norm = norm(), norm()

  def __call__(self, x_BTND: jax.Array) -> jax.Array:
    qkv_BTNKQE = dense(x_BTND.astype(self.dtype), self.qkv_kernel[...].astype(self.dtype),
                       self.qkv_bias[...].astype(self.dtype))
    # jnp.split (not indexing) so that the backward pass concatenates the three gradients
    # in one pass instead of padding and adding them.
    q_BTNKE, k_BTNKE, v_BTNKE = (a[..., 0, :] for a in jnp.split(qkv_BTNKQE, 3, axis=4))
    if self.q_norm is not None:
      q_BTNKE, k_BTNKE = self.q_norm(q_BTNKE), self.k_norm(k_BTNKE)
    if self.rotary:
      positions_T11 = np.arange(x_BTND.shape[1])[:, None, None]
      q_BTNKE, k_BTNKE = rope(q_BTNKE, positions_T11), rope(k_BTNKE, positions_T11)
    if self.grid is not None:
      if x_BTND.shape[2] != self.grid[0]:
        raise ValueError(f"{x_BTND.shape[2]} tokens per frame; the 2-D rotary positions "
                         f"were built for {self.grid[0]}")
      positions_N2 = grid_positions(*self.grid)
      q_BTNKE, k_BTNKE = rope_2d(q_BTNKE, positions_N2), rope_2d(k_BTNKE, positions_N2)
    scale = jnp.asarray(self.scale, self.dtype)
    if self.implementation == "cudnn":
      o_BTNKE = self._cudnn(q_BTNKE * scale, k_BTNKE, v_BTNKE)
    else:
      to_heads = lambda a: sharding.constrain(jnp.transpose(a, _TO_HEADS[self.over]),
                                              _ACT_HEADS[self.over])
      o = attention_core(self.causal, to_heads(q_BTNKE) * scale, to_heads(k_BTNKE),
                         to_heads(v_BTNKE))
      o_BTNKE = jnp.transpose(sharding.constrain(o, _ACT_HEADS[self.over]),
                              _FROM_HEADS[self.over])
    return dense(o_BTNKE, self.out_kernel[...].astype(self.dtype),
                 self.out_bias[...].astype(self.dtype), in_axes=2)

  # --- Cached temporal attention for frame-by-frame generation (see STTransformer.prefill).

  def _project_qkv(self, x_BTND: jax.Array):
    qkv_BTNKQE = dense(x_BTND.astype(self.dtype), self.qkv_kernel[...].astype(self.dtype),
                       self.qkv_bias[...].astype(self.dtype))
    q_BTNKE, k_BTNKE, v_BTNKE = (qkv_BTNKQE[..., i, :] for i in range(3))
    if self.q_norm is not None:
      q_BTNKE, k_BTNKE = self.q_norm(q_BTNKE), self.k_norm(k_BTNKE)
    return q_BTNKE * jnp.asarray(self.scale, self.dtype), k_BTNKE, v_BTNKE

  def call_with_kv(self, x_BTND: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Temporal attention as `__call__` (XLA path), also returning its keys and values.

    Returns:
      (out_BTND, k_BNKSE, v_BNKSE): the output and the head-major keys/values of the T
      frames, which later frames attend to (`attend_cached`); rotary keys before rotation.
    """
    if self.over != "time":
      raise ValueError("call_with_kv caches temporal attention only (over='time')")
    q_BTNKE, k_BTNKE, v_BTNKE = self._project_qkv(x_BTND)
    to_heads = lambda a: jnp.transpose(a, _TO_HEADS["time"])
    k_BNKSE, v_BNKSE = to_heads(k_BTNKE), to_heads(v_BTNKE)
    q_BNKTE, keys_BNKSE = to_heads(q_BTNKE), k_BNKSE
    if self.rotary:
      positions_T = np.arange(x_BTND.shape[1])
      q_BNKTE, keys_BNKSE = rope(q_BNKTE, positions_T), rope(k_BNKSE, positions_T)
    o_BNKTE = attention_core(self.causal, q_BNKTE, keys_BNKSE, v_BNKSE)
    o_BTNKE = jnp.transpose(o_BNKTE, _FROM_HEADS["time"])
    out_BTND = dense(o_BTNKE, self.out_kernel[...].astype(self.dtype),
                     self.out_bias[...].astype(self.dtype), in_axes=2)
    return out_BTND, k_BNKSE, v_BNKSE

  def attend_cached(self, x_B1ND: jax.Array, k_BNKSE: jax.Array, v_BNKSE: jax.Array,
                    valid_S: jax.Array, position: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Temporal attention of one new frame to cached frames and itself.

    Args:
      x_B1ND: the new frame (normed block input).
      k_BNKSE, v_BNKSE: cached keys (rotary: rotated to their positions once per frame,
        `STTransformer.rotate_cache`) and values of S slots.
      valid_S: which slots hold frames the new one sees.
      position: the new frame's temporal position (traced int allowed).

    Returns:
      (out_B1ND, k_BNK1E, v_BNK1E): the output and the new frame's key (rotary: before
      rotation) and value, to be written into the cache once the frame is final.
    """
    if self.over != "time":
      raise ValueError("attend_cached caches temporal attention only (over='time')")
    q_B1NKE, k_B1NKE, v_B1NKE = self._project_qkv(x_B1ND)
    to_heads = lambda a: jnp.transpose(a, _TO_HEADS["time"])
    q_BNK1E, k_BNK1E, v_BNK1E = to_heads(q_B1NKE), to_heads(k_B1NKE), to_heads(v_B1NKE)
    new_key_BNK1E, query_BNK1E = k_BNK1E, q_BNK1E
    if self.rotary:
      position_1 = jnp.reshape(position, (1,))
      new_key_BNK1E, query_BNK1E = rope(k_BNK1E, position_1), rope(q_BNK1E, position_1)
    # The cached and the new keys/values enter as two terms, not one concatenation: that
    # would copy the whole cache at every call.
    cached_BNK1S = jnp.einsum("bnkqe,bnkse->bnkqs", query_BNK1E, k_BNKSE.astype(self.dtype),
                              preferred_element_type=jnp.float32)
    own_BNK11 = jnp.einsum("bnkqe,bnkqe->bnkq", query_BNK1E, new_key_BNK1E,
                           preferred_element_type=jnp.float32)[..., None]
    # The new frame always sees itself (the last column), so no row is fully masked.
    probs = jax.nn.softmax(
        jnp.concatenate([jnp.where(valid_S, cached_BNK1S, -jnp.inf), own_BNK11], -1), axis=-1)
    s = k_BNKSE.shape[3]
    o_BNK1E = (jnp.einsum("bnkqs,bnkse->bnkqe", probs[..., :s].astype(self.dtype),
                          v_BNKSE.astype(self.dtype), preferred_element_type=jnp.float32)
               + probs[..., s:] * v_BNK1E.astype(jnp.float32)).astype(self.dtype)
    o_B1NKE = jnp.transpose(o_BNK1E, _FROM_HEADS["time"])
    out_B1ND = dense(o_B1NKE, self.out_kernel[...].astype(self.dtype),
                     self.out_bias[...].astype(self.dtype), in_axes=2)
    return out_B1ND, k_BNK1E, v_BNK1E

  def _cudnn(self, q_BTNKE, k_BTNKE, v_BTNKE):
    # dot_product_attention wants (batch, sequence, heads, head_dim).
    b, t, n, k, e = q_BTNKE.shape
    if self.over == "tokens":
      to_seq = lambda a: a.reshape(b * t, n, k, e)
      from_seq = lambda a: a.reshape(b, t, n, k, e)
    else:
      to_seq = lambda a: jnp.swapaxes(a, 1, 2).reshape(b * n, t, k, e)
      from_seq = lambda a: jnp.swapaxes(a.reshape(b, n, t, k, e), 1, 2)
    o = jax.nn.dot_product_attention(
        to_seq(q_BTNKE), to_seq(k_BTNKE), to_seq(v_BTNKE), scale=1.0,
        is_causal=self.causal, implementation="cudnn")
    return from_seq(o)


# --- Feed-forward, ST block, ST transformer ----------------------------------------------


# Recomputed in the backward pass: storing tanh(.) would cost a pass over [tokens, F].
_gelu_with_bias = jax.checkpoint(lambda h, bias: jax.nn.gelu(h + bias))


class FeedForward(nnx.Module):
  """x -> GELU(x W1 + b1) W2 + b2 with hidden width F."""

  def __init__(self, d_model: int, hidden: int, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.up_kernel = param(rngs, _fan_in_init([0]), (d_model, hidden), ("embed", "mlp"),
                           param_dtype)
    self.up_bias = nnx.Param(jnp.zeros((hidden,), param_dtype))
    self.down_kernel = param(rngs, _fan_in_init([0]), (hidden, d_model), ("mlp", "embed"),
                             param_dtype)
    self.down_bias = nnx.Param(jnp.zeros((d_model,), param_dtype))

  def __call__(self, x_BTND: jax.Array) -> jax.Array:
    h_BTNF = dense(x_BTND.astype(self.dtype), self.up_kernel[...].astype(self.dtype))
    h_BTNF = _gelu_with_bias(h_BTNF, self.up_bias[...].astype(self.dtype))
    h_BTNF = sharding.constrain(h_BTNF, _ACT_BTNF)
    return dense(h_BTNF, self.down_kernel[...].astype(self.dtype),
                 self.down_bias[...].astype(self.dtype))


# Config keys every ST-transformer model shares (config.model.*), with their defaults; see
# `genie_jax.models.tokenizer.default_config` for their meaning.
TRANSFORMER_DEFAULTS = dict(
    qk_norm=False,
    qk_norm_kind="layernorm",
    dtype="float32",
    param_dtype="float32",
    remat=False,
    remat_policy="full",
    attention_impl="xla",
)


def validate_transformer_config(cfg) -> None:
  """Raises ValueError naming the config.model key when a shared ST-transformer setting
  (width, heads, `TRANSFORMER_DEFAULTS` keys) cannot work."""
  for key in ("d_model", "num_heads", "mlp_ratio"):
    if cfg[key] < 1:
      raise ValueError(f"config.model.{key}={cfg[key]} must be positive")
  if cfg.d_model % cfg.num_heads:
    raise ValueError(f"config.model.num_heads={cfg.num_heads} does not divide "
                     f"config.model.d_model={cfg.d_model}")
  for key, options in (("qk_norm_kind", NORMS), ("remat_policy", tuple(REMAT_POLICIES)),
                       ("attention_impl", ATTENTION_IMPLS)):
    if cfg[key] not in options:
      raise ValueError(f"config.model.{key}={cfg[key]!r}; expected one of {list(options)}")
  for key in ("dtype", "param_dtype"):
    try:
      dtype = jnp.dtype(cfg[key])
    except TypeError as e:
      raise ValueError(f"config.model.{key}={cfg[key]!r} is not a dtype name") from e
    if not jnp.issubdtype(dtype, jnp.floating):
      # Integer weights or activations would take no gradient: the run would not learn.
      raise ValueError(f"config.model.{key}={cfg[key]!r}: expected a floating type, e.g. "
                       "'float32' or 'bfloat16'")
  if cfg.attention_impl == "cudnn" and jnp.dtype(cfg.dtype) not in _CUDNN_DTYPES:
    raise ValueError(f"config.model.attention_impl='cudnn' needs config.model.dtype "
                     f"'bfloat16' or 'float16' (cuDNN's fused attention); got {cfg.dtype!r}")


def temporal_settings(cfg) -> tuple[str, int]:
  """(temporal_positions, sink_frames) of a model config; configs saved before the keys
  existed are Genie's learned positions without sinks."""
  return cfg.get("temporal_positions", "learned"), cfg.get("sink_frames", 0)


def validate_temporal_settings(cfg) -> None:
  """Raises ValueError naming the config.model key when temporal_positions / sink_frames
  cannot work with the config's max_frames and head width."""
  positions, sinks = temporal_settings(cfg)
  if positions not in TEMPORAL_POSITIONS:
    raise ValueError(f"config.model.temporal_positions={positions!r}; expected one of "
                     f"{list(TEMPORAL_POSITIONS)}")
  if positions == "rope" and (cfg.d_model // cfg.num_heads) % 2:
    raise ValueError(f"config.model.temporal_positions='rope' needs an even head width; "
                     f"d_model={cfg.d_model} / num_heads={cfg.num_heads} is odd")
  if sinks and positions != "rope":
    raise ValueError(f"config.model.sink_frames={sinks} needs temporal_positions='rope' (a "
                     f"learned table ties cached keys to their place in the window)")
  if sinks < 0 or (sinks and sinks > cfg.max_frames - 2):
    raise ValueError(f"config.model.sink_frames={sinks} must be in [0, max_frames - 2="
                     f"{cfg.max_frames - 2}]: the cache keeps at least the latest frame")


class STBlock(nnx.Module):
  """Pre-norm ST block: spatial attention, causal temporal attention, one feed-forward.

  x += SpatialAttention(LN(x)); x += TemporalAttention(LN(x)); x += FFN(LN(x)). There is
  deliberately no feed-forward between the two attentions (Genie, App. F / ST-ViViT).
  With `temporal_first` the two attentions swap places, so that within one block a token
  can first read its own place in the past frames and then its neighbours' (what a
  scrolled view asks for: the token one cell over, one frame back).
  """

  def __init__(self, d_model: int, num_heads: int, *, mlp_ratio: int = 4,
               qk_norm: str | None = None, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, attention_impl: str = "xla",
               rotary_time: bool = False, grid: tuple[int, int] | None = None,
               num_tokens: int = 0, temporal_first: bool = False, rngs: nnx.Rngs):
    self.temporal_first = temporal_first
    norm = lambda: Norm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    attention = lambda over, causal, **positions: Attention(
        d_model, num_heads, over=over, causal=causal, qk_norm=qk_norm, dtype=dtype,
        param_dtype=param_dtype, implementation=attention_impl, rngs=rngs, **positions)
    self.spatial_norm = norm()
    self.spatial_attention = attention("tokens", causal=False, grid=grid,
                                       num_tokens=num_tokens)
    self.temporal_norm = norm()
    self.temporal_attention = attention("time", causal=True, rotary=rotary_time)
    self.ffn_norm = norm()
    self.ffn = FeedForward(d_model, mlp_ratio * d_model, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

  def _spatial(self, x_BTND: jax.Array) -> jax.Array:
    return x_BTND + self.spatial_attention(self.spatial_norm(x_BTND))

  def __call__(self, x_BTND: jax.Array) -> jax.Array:
    if not self.temporal_first:
      x_BTND = self._spatial(x_BTND)
    x_BTND = x_BTND + self.temporal_attention(self.temporal_norm(x_BTND))
    if self.temporal_first:
      x_BTND = self._spatial(x_BTND)
    x_BTND = x_BTND + self.ffn(self.ffn_norm(x_BTND))
    return sharding.constrain(x_BTND, _ACT_BTND)

  def call_with_kv(self, x_BTND: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`__call__`, also returning the temporal keys/values k_BNKSE, v_BNKSE of its frames."""
    if not self.temporal_first:
      x_BTND = self._spatial(x_BTND)
    out_BTND, k_BNKSE, v_BNKSE = self.temporal_attention.call_with_kv(
        self.temporal_norm(x_BTND))
    x_BTND = x_BTND + out_BTND
    if self.temporal_first:
      x_BTND = self._spatial(x_BTND)
    x_BTND = x_BTND + self.ffn(self.ffn_norm(x_BTND))
    return x_BTND, k_BNKSE, v_BNKSE

  def decode_frame(self, x_B1ND: jax.Array, k_BNKSE: jax.Array, v_BNKSE: jax.Array,
                   valid_S: jax.Array, position: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The block on one new frame whose past frames' keys/values are cached (arguments:
    `Attention.attend_cached`).

    Returns (x_B1ND, k_BNK1E, v_BNK1E): the output and the frame's temporal key/value.
    """
    if not self.temporal_first:
      x_B1ND = self._spatial(x_B1ND)
    out_B1ND, k_BNK1E, v_BNK1E = self.temporal_attention.attend_cached(
        self.temporal_norm(x_B1ND), k_BNKSE, v_BNKSE, valid_S, position)
    x_B1ND = x_B1ND + out_B1ND
    if self.temporal_first:
      x_B1ND = self._spatial(x_B1ND)
    x_B1ND = x_B1ND + self.ffn(self.ffn_norm(x_B1ND))
    return x_B1ND, k_BNK1E, v_BNK1E


def _block_call(block: STBlock, x_BTND: jax.Array) -> jax.Array:
  return block(x_BTND)


class STTransformer(nnx.Module):
  """Positional encoding (once), `num_layers` ST blocks, final norm: x_BTND -> x_BTND.

  Spatial positions are a learned (N, D) table added once before the first block: frames
  always have N tokens, and a table can fit the 2-D patch grid. Temporal positions
  (`temporal_positions`) are either a learned (max_frames, D) table added with it ('learned',
  Genie's ST-ViViT), or rotary angles on the temporal attention's queries and keys ('rope'),
  under which a frame's cached keys do not depend on where the window starts, so a rollout
  past `max_frames` can keep its cache (`genie_jax.inference.genie`). With `grid`, spatial attention
  also rotates its queries and keys by each token's row and column (`rope_2d`): attention by
  relative offset, which is what a scrolling view or a moving object asks of it; the learned
  table stays, for what depends on the absolute place (the frame's border, a prepended
  token). The residual stream stays in `dtype`.

  Args:
    num_layers: number of ST blocks (0 is allowed: positions and the final norm only).
    d_model, num_heads, mlp_ratio, qk_norm, dtype, param_dtype, attention_impl: see
      `STBlock`.
    num_tokens: N, tokens per frame.
    max_frames: the longest clip (T) the model sees at once.
    temporal_positions: 'learned' or 'rope' (see above).
    grid: None, or (rows, cols) of the token grid, the last rows * cols of the N tokens
      (see above).
    remat: None, 'full' or 'dots' (see `REMAT_POLICIES`): recompute each block in the
      backward pass.
    temporal_first: temporal attention before spatial attention in every block (`STBlock`).
  """

  def __init__(self, num_layers: int, d_model: int, num_heads: int, *, num_tokens: int,
               max_frames: int, mlp_ratio: int = 4, qk_norm: str | None = None,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               attention_impl: str = "xla", temporal_positions: str = "learned",
               grid: tuple[int, int] | None = None, remat: str | None = None,
               temporal_first: bool = False, rngs: nnx.Rngs):
    if remat is not None and remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}; expected None or one of {sorted(REMAT_POLICIES)}")
    if temporal_positions not in TEMPORAL_POSITIONS:
      raise ValueError(f"temporal_positions={temporal_positions!r}; expected one of "
                       f"{TEMPORAL_POSITIONS}")
    self.dtype = dtype
    self.remat = remat
    self.max_frames = max_frames
    self.temporal_positions = temporal_positions
    embed_init = jax.nn.initializers.normal(_EMBED_STDDEV)
    self.spatial_pos = param(rngs, embed_init, (num_tokens, d_model),
                             ("positions", "embed"), param_dtype)
    if temporal_positions == "learned":
      self.temporal_pos = param(rngs, embed_init, (max_frames, d_model),
                                ("positions", "embed"), param_dtype)
    self.blocks = nnx.List([
        STBlock(d_model, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm, dtype=dtype,
                param_dtype=param_dtype, attention_impl=attention_impl,
                rotary_time=temporal_positions == "rope", grid=grid,
                num_tokens=num_tokens, temporal_first=temporal_first, rngs=rngs)
        for _ in range(num_layers)])
    self.final_norm = Norm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def _add_positions(self, x_BTND: jax.Array) -> jax.Array:
    """x plus the spatial (and learned temporal) positions of frames 0..T-1."""
    t = x_BTND.shape[1]
    if t > self.max_frames:
      raise ValueError(f"clip has {t} frames but the model was built for max_frames="
                       f"{self.max_frames}")
    pos_TND = self.spatial_pos[None, :, :]
    if self.temporal_positions == "learned":
      pos_TND = self.temporal_pos[:t, None, :] + pos_TND
    return (x_BTND + pos_TND).astype(self.dtype)

  def __call__(self, x_BTND: jax.Array) -> jax.Array:
    x_BTND = sharding.constrain(self._add_positions(x_BTND), _ACT_BTND)
    block_call = _block_call
    if self.remat is not None:
      block_call = nnx.remat(_block_call, policy=REMAT_POLICIES[self.remat])
    for block in self.blocks:
      x_BTND = block_call(block, x_BTND)
    return self.final_norm(x_BTND)


  # --- Cached decoding: past frames never change, and temporal attention is causal, so each
  # block's temporal keys/values of past frames can be kept while a new frame is generated.

  def prefill(self, x_BTND: jax.Array) -> tuple[jax.Array, KVCache]:
    """`__call__` on T past frames (positions 0..T-1), returning also their cache.

    Returns:
      (y_BTND, cache): cache holds one (k_BNKSE, v_BNKSE) pair per block with S = T slots.
    """
    x_BTND = self._add_positions(x_BTND)
    cache = []
    for block in self.blocks:
      x_BTND, k_BNKSE, v_BNKSE = block.call_with_kv(x_BTND)
      cache.append((k_BNKSE, v_BNKSE))
    return self.final_norm(x_BTND), cache

  def decode_frame(self, x_B1ND: jax.Array, cache: KVCache, position: jax.Array,
                   valid_S: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """One new frame at temporal `position`, attending to the cached frames.

    With the defaults it sees cache slots 0..position-1, which hold the frames at those
    positions, and equals (to rounding) frame `position` of `__call__` on the cached frames
    followed by this one. A rolling cache names the slots it fills (`valid_S`); under rotary
    positions its keys must have been rotated to their positions (`rotate_cache`). Every
    argument may be traced, so one compiled program serves every frame.

    Returns:
      (y_B1ND, frame_kv): the output and the frame's (k_BNK1E, v_BNK1E) per block, for
      `write_cache_slot` once the frame is final.
    """
    slots_S = jnp.arange(cache[0][0].shape[3]) if cache else jnp.zeros((0,), jnp.int32)
    valid_S = slots_S < position if valid_S is None else valid_S
    pos_1ND = self.spatial_pos[None, :, :]
    if self.temporal_positions == "learned":
      pos_1ND = pos_1ND + jax.lax.dynamic_slice_in_dim(self.temporal_pos[...], position, 1,
                                                       axis=0)[:, None, :]
    x_B1ND = (x_B1ND + pos_1ND).astype(self.dtype)
    frame_kv = []
    for block, (k_BNKSE, v_BNKSE) in zip(self.blocks, cache):
      x_B1ND, k_BNK1E, v_BNK1E = block.decode_frame(x_B1ND, k_BNKSE, v_BNKSE, valid_S,
                                                    position)
      frame_kv.append((k_BNK1E, v_BNK1E))
    return self.final_norm(x_B1ND), frame_kv

  def rotate_cache(self, cache: KVCache, positions_S: jax.Array) -> KVCache:
    """The cache with its (unrotated) keys rotated to the slots' temporal positions, for
    `decode_frame`; once per frame, not per MaskGIT step. Learned positions: unchanged."""
    if self.temporal_positions != "rope":
      return cache
    return [(rope(k_BNKSE, positions_S), v_BNKSE) for k_BNKSE, v_BNKSE in cache]

  def write_cache(self, cache: KVCache, frame_kv: KVCache, slot: jax.Array) -> KVCache:
    """`write_cache_slot`: the cache with `decode_frame`'s frame_kv at `slot`."""
    return write_cache_slot(cache, frame_kv, slot)


KVCache = list[tuple[jax.Array, jax.Array]]


def write_cache_slot(cache: KVCache, frame_kv: KVCache, slot: jax.Array) -> KVCache:
  """The cache with one frame's keys/values (from `STTransformer.decode_frame`) at `slot`.

  `slot` must be < S: dynamic_update_slice would clamp a larger one onto the last slot.
  """
  return [(jax.lax.dynamic_update_slice_in_dim(k, k_new.astype(k.dtype), slot, axis=3),
           jax.lax.dynamic_update_slice_in_dim(v, v_new.astype(v.dtype), slot, axis=3))
          for (k, v), (k_new, v_new) in zip(cache, frame_kv)]


def patchify(video_BTHWC: jax.Array, patch_size: int) -> jax.Array:
  """Cuts frames into non-overlapping p x p patches: video_BTHWC -> patches_BTNP.

  Tokens run row-major over the patch grid; a patch's pixels are ordered (row, col, C).
  """
  return einops.rearrange(video_BTHWC, "b t (h p1) (w p2) c -> b t (h w) (p1 p2 c)",
                          p1=patch_size, p2=patch_size)


def unpatchify(patches_BTNP: jax.Array, patch_size: int, height: int, width: int
               ) -> jax.Array:
  """Inverse of `patchify`: patches_BTNP -> video_BTHWC."""
  return einops.rearrange(patches_BTNP, "b t (h w) (p1 p2 c) -> b t (h p1) (w p2) c",
                          h=height // patch_size, w=width // patch_size,
                          p1=patch_size, p2=patch_size)


class Linear(nnx.Module):
  """y = x W + b over the last axis, with logical names for W's (in, out) axes."""

  def __init__(self, in_features: int, out_features: int, *, names: tuple[str, str],
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = param(rngs, _fan_in_init([0]), (in_features, out_features), names,
                        param_dtype)
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                 self.bias[...].astype(self.dtype))
