"""Building blocks of the ST-transformers: attention, the ST block, patchify.

Arrays carry their axes in their names (letters in `genie_jax/__init__.py`); einsum strings
use the same letters. Every weight matrix names its axes for `genie_jax.sharding`, and block
boundaries constrain activations to ('batch', 'time', 'tokens', 'act_embed').
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from genie_jax import sharding

Dtype = Any

_ACT_BTND = ("batch", "time", "tokens", "act_embed")
_ACT_BTNKE = ("batch", "time", "tokens", "act_heads", None)
_ACT_BTNF = ("batch", "time", "tokens", "act_mlp")

# Standard deviation of learned position tables and embeddings (ViT/BERT practice).
_EMBED_STDDEV = 0.02

QK_NORMS = (None, "layernorm", "rmsnorm")
ATTENTION_IMPLS = ("xla", "cudnn")
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
  # LeCun normal over the contracted axes, so stacked (e.g. per-head) kernels keep the
  # variance of the equivalent 2-D matrix.
  return jax.nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=tuple(in_axes), out_axis=())


class Norm(nnx.Module):
  """LayerNorm or RMSNorm over the last axis, computed in float32, cast to `dtype`.

  Statistics in float32 keep bf16 training stable (as in Jasmine); the scale (and bias)
  are small and stay unnamed, i.e. replicated.
  """

  def __init__(self, features: int, *, kind: str = "layernorm", dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, eps: float = 1e-6, rngs: nnx.Rngs):
    if kind not in ("layernorm", "rmsnorm"):
      raise ValueError(f"unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'")
    self.kind = kind
    self.dtype = dtype
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype)) if kind == "layernorm" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    x = x * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      x = x + self.bias[...].astype(jnp.float32)
    return x.astype(self.dtype)


class Attention(nnx.Module):
  """Multi-head self-attention over one axis of x_BTND: the tokens of a frame or time.

  `over='tokens'` attends among the N tokens of each frame (spatial); `over='time'` attends
  among the T frames at each token position (temporal). The attended axis is chosen through
  the einsum strings rather than by transposing x, so XLA picks the layouts.

  Args:
    d_model: width D of x.
    num_heads: K; the head width is E = D / K.
    over: 'tokens' or 'time'.
    causal: query t sees keys s <= t only.
    qk_norm: None, 'layernorm' or 'rmsnorm': normalise q and k per head before the dot
      product (ViT-22B; used by the large Genie models against logit growth).
    dtype: compute dtype of matmuls; softmax is computed in float32.
    param_dtype: dtype of the weights.
    implementation: 'xla' (einsum + softmax, portable and fast on CPU) or 'cudnn'
      (jax.nn.dot_product_attention's fused kernel; NVIDIA GPUs with bf16/fp16 only).
  """

  def __init__(self, d_model: int, num_heads: int, *, over: str, causal: bool = False,
               qk_norm: str | None = None, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, implementation: str = "xla",
               rngs: nnx.Rngs):
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
    if over not in ("tokens", "time"):
      raise ValueError(f"Attention over={over!r}; expected 'tokens' or 'time'")
    if qk_norm not in QK_NORMS:
      raise ValueError(f"qk_norm={qk_norm!r}; expected one of {QK_NORMS}")
    if implementation not in ATTENTION_IMPLS:
      raise ValueError(f"attention implementation={implementation!r}; expected one of "
                       f"{ATTENTION_IMPLS}")
    head_dim = d_model // num_heads
    self.over = over
    self.causal = causal
    self.dtype = dtype
    self.implementation = implementation
    self.scale = head_dim ** -0.5
    # q, k and v share one kernel: one matmul reads x once.
    self.qkv_kernel = param(rngs, _fan_in_init([0]), (d_model, 3, num_heads, head_dim),
                            ("embed", "qkv", "heads", "head_dim"), param_dtype)
    self.qkv_bias = param(rngs, jax.nn.initializers.zeros, (3, num_heads, head_dim),
                          ("qkv", "heads", "head_dim"), param_dtype)
    self.out_kernel = param(rngs, _fan_in_init([0, 1]), (num_heads, head_dim, d_model),
                            ("heads", "head_dim", "embed"), param_dtype)
    self.out_bias = nnx.Param(jnp.zeros((d_model,), param_dtype))
    if qk_norm is None:
      self.q_norm = self.k_norm = None
    else:
      self.q_norm = Norm(head_dim, kind=qk_norm, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)
      self.k_norm = Norm(head_dim, kind=qk_norm, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)

  def __call__(self, x_BTND: jax.Array) -> jax.Array:
    x_BTND = x_BTND.astype(self.dtype)
    qkv_BTNQKE = jnp.einsum("btnd,dqke->btnqke", x_BTND,
                            self.qkv_kernel[...].astype(self.dtype))
    qkv_BTNQKE = qkv_BTNQKE + self.qkv_bias[...].astype(self.dtype)
    q_BTNKE, k_BTNKE, v_BTNKE = (qkv_BTNQKE[:, :, :, i] for i in range(3))
    if self.q_norm is not None:
      q_BTNKE, k_BTNKE = self.q_norm(q_BTNKE), self.k_norm(k_BTNKE)
    q_BTNKE = sharding.constrain(q_BTNKE, _ACT_BTNKE)
    if self.implementation == "cudnn":
      o_BTNKE = self._cudnn(q_BTNKE, k_BTNKE, v_BTNKE)
    else:
      o_BTNKE = self._xla(q_BTNKE, k_BTNKE, v_BTNKE)
    o_BTNKE = sharding.constrain(o_BTNKE, _ACT_BTNKE)
    y_BTND = jnp.einsum("btnke,ked->btnd", o_BTNKE, self.out_kernel[...].astype(self.dtype))
    return y_BTND + self.out_bias[...].astype(self.dtype)

  def _xla(self, q_BTNKE, k_BTNKE, v_BTNKE):
    if self.over == "tokens":
      logits = jnp.einsum("btnke,btmke->btknm", q_BTNKE, k_BTNKE,
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("btnke,bsnke->bnkts", q_BTNKE, k_BTNKE,
                          preferred_element_type=jnp.float32)
    logits = logits * self.scale
    if self.causal:
      q_len, k_len = logits.shape[-2:]
      mask = jnp.tril(jnp.ones((q_len, k_len), bool))
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    if self.over == "tokens":
      return jnp.einsum("btknm,btmke->btnke", probs, v_BTNKE)
    return jnp.einsum("bnkts,bsnke->btnke", probs, v_BTNKE)

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
        to_seq(q_BTNKE), to_seq(k_BTNKE), to_seq(v_BTNKE), scale=self.scale,
        is_causal=self.causal, implementation="cudnn")
    return from_seq(o)


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
    x_BTND = x_BTND.astype(self.dtype)
    h_BTNF = jnp.einsum("btnd,df->btnf", x_BTND, self.up_kernel[...].astype(self.dtype))
    h_BTNF = jax.nn.gelu(h_BTNF + self.up_bias[...].astype(self.dtype))
    h_BTNF = sharding.constrain(h_BTNF, _ACT_BTNF)
    y_BTND = jnp.einsum("btnf,fd->btnd", h_BTNF, self.down_kernel[...].astype(self.dtype))
    return y_BTND + self.down_bias[...].astype(self.dtype)


class STBlock(nnx.Module):
  """Pre-norm ST block: spatial attention, causal temporal attention, one feed-forward.

  x += SpatialAttention(LN(x)); x += TemporalAttention(LN(x)); x += FFN(LN(x)). There is
  deliberately no feed-forward between the two attentions (Genie, App. F / ST-ViViT).
  """

  def __init__(self, d_model: int, num_heads: int, *, mlp_ratio: int = 4,
               qk_norm: str | None = None, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, attention_impl: str = "xla",
               rngs: nnx.Rngs):
    norm = lambda: Norm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    attention = lambda over, causal: Attention(
        d_model, num_heads, over=over, causal=causal, qk_norm=qk_norm, dtype=dtype,
        param_dtype=param_dtype, implementation=attention_impl, rngs=rngs)
    self.spatial_norm = norm()
    self.spatial_attention = attention("tokens", causal=False)
    self.temporal_norm = norm()
    self.temporal_attention = attention("time", causal=True)
    self.ffn_norm = norm()
    self.ffn = FeedForward(d_model, mlp_ratio * d_model, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_BTND: jax.Array) -> jax.Array:
    x_BTND = x_BTND + self.spatial_attention(self.spatial_norm(x_BTND))
    x_BTND = x_BTND + self.temporal_attention(self.temporal_norm(x_BTND))
    x_BTND = x_BTND + self.ffn(self.ffn_norm(x_BTND))
    return sharding.constrain(x_BTND, _ACT_BTND)


def _block_call(block: STBlock, x_BTND: jax.Array) -> jax.Array:
  return block(x_BTND)


class STTransformer(nnx.Module):
  """Positional encoding (once), `num_layers` ST blocks, final norm: x_BTND -> x_BTND.

  Positions are two learned tables, spatial (N, D) and temporal (max_frames, D), summed and
  added once before the first block. Learned rather than sinusoidal: clips never exceed
  `max_frames` and frames always have N tokens, so the extrapolation of sinusoids buys
  nothing, while learned tables cost (N + T) * D parameters and can fit the 2-D patch grid.
  The activations stay in `dtype`; the residual stream is not upcast.

  Args:
    num_layers: number of ST blocks (0 is allowed: positions and the final norm only).
    d_model, num_heads, mlp_ratio, qk_norm, dtype, param_dtype, attention_impl: see
      `STBlock`.
    num_tokens: N, tokens per frame.
    max_frames: the longest clip (T) the temporal table covers.
    remat: None, 'full' or 'dots' (see `REMAT_POLICIES`): recompute each block in the
      backward pass.
  """

  def __init__(self, num_layers: int, d_model: int, num_heads: int, *, num_tokens: int,
               max_frames: int, mlp_ratio: int = 4, qk_norm: str | None = None,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               attention_impl: str = "xla", remat: str | None = None, rngs: nnx.Rngs):
    if remat is not None and remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}; expected None or one of {sorted(REMAT_POLICIES)}")
    self.dtype = dtype
    self.remat = remat
    embed_init = jax.nn.initializers.normal(_EMBED_STDDEV)
    self.spatial_pos = param(rngs, embed_init, (num_tokens, d_model),
                             ("positions", "embed"), param_dtype)
    self.temporal_pos = param(rngs, embed_init, (max_frames, d_model),
                              ("positions", "embed"), param_dtype)
    self.blocks = nnx.List([
        STBlock(d_model, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm, dtype=dtype,
                param_dtype=param_dtype, attention_impl=attention_impl, rngs=rngs)
        for _ in range(num_layers)])
    self.final_norm = Norm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_BTND: jax.Array) -> jax.Array:
    t = x_BTND.shape[1]
    max_frames = self.temporal_pos.shape[0]
    if t > max_frames:
      raise ValueError(f"clip has {t} frames but the model was built for max_frames="
                       f"{max_frames}")
    pos_TND = self.temporal_pos[:t, None, :] + self.spatial_pos[None, :, :]
    x_BTND = (x_BTND + pos_TND).astype(self.dtype)
    x_BTND = sharding.constrain(x_BTND, _ACT_BTND)
    block_call = _block_call
    if self.remat is not None:
      block_call = nnx.remat(_block_call, policy=REMAT_POLICIES[self.remat])
    for block in self.blocks:
      x_BTND = block_call(block, x_BTND)
    return self.final_norm(x_BTND)


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
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return y + self.bias[...].astype(self.dtype)
