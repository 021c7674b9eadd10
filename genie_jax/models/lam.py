"""Latent action model, LAM (Genie stage 2, section 2.1).

Encoder: video_BTHWC -> patches -> Linear P->D -> causal ST-transformer -> the change of
the N tokens from frame t to frame t+1, flattened -> Linear N*D->L -> z_BTL, one continuous
latent per transition t -> t+1 -> VQ with A codes -> actions_BT. The tokens of frame t+1 see
frames 1..t+1 (temporal attention is causal): they can see what changed, which is their job.
All N tokens feed the latent, each through its own weights, because an action shows in a few
patches (where the agent is) and is lost in a mean over patches, or in a learned per-frame
action token, which can settle on what every frame shares (its time position).

Decoder: the patch embeddings of frames 1..T-1, the quantised action of transition t (Linear
L->D) added to every token of frame t -> causal ST-transformer -> Linear D->P -> frame t+1.
The prediction of frame t+1 depends on frames 1..t and actions 1..t only.

Why the decoder sees only the last `decoder_context_frames` frames (default 1). Genie's
decoder sees all of x_1..x_t. With a policy that repeats actions (Genie's random agents and
the built-in world's sticky policy) the past frames already tell the decoder which action is
being taken, so it learns to predict the next frame from them and the latent action carries
nothing: the known failure of this model. Given frame t alone, the only source of what
happens next is the latent action, so the encoder has to put the transition into it. The
cost: things that move on their own (balls) cannot be extrapolated from one frame, so their
motion competes for the A codes with the agent's action. 0 restores Genie's full causal
context.

Why the decoder predicts a residual (`predict_residual`, default True): frame t+1 is mostly
frame t; predicting x_{t+1} - x_t spares the decoder copying the frame through a bottleneck
of patch-16 tokens, and leaves it the change, which is what the action explains.

Why a quantiser warm-up (`vq_warmup_steps`, default 0 = Genie). A decoder fed random codes
learns to ignore them before the encoder has anything to put in them, and then the encoder
gets no gradient, and a CPU-sized LAM stays at chance (README, "The whole Genie"). Fed the
continuous latent instead, encoder and decoder learn together from the first step; the
codebook then starts from k-means of the latents, so every code sits on a cluster of real
transitions.

Why rotary row/column angles in spatial attention (`spatial_rope`, default False = Genie).
When the agent moves, the camera scrolls: the decoder must copy every patch from its
neighbour in the latent's direction. With a table of absolute places it learns "the token
one over" for each place separately and slowly, so knowing the direction lowers its loss
far less than it could, the encoder gets little gradient to tell the directions apart, and
whether two moves share a latent is down to the seed. Attention by relative offset learns
the copy once for every place.

Training loss: mean((pred - frames 2..T)**2) + out['vq_loss'].
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from genie_jax.models import layers
from genie_jax.models import tokenizer as tokenizer_lib
from genie_jax.models import vq


def default_config() -> ml_collections.ConfigDict:
  """config.model for the LAM; defaults are Genie App. F (CoinRun) shapes.

  Keys:
    image_size, patch_size, channels, max_frames, d_model, num_heads, mlp_ratio,
    enc_layers, dec_layers, latent_dim, commitment_beta, vq_normalize, code_usage_decay,
    dead_code_threshold, qk_norm, qk_norm_kind, dtype, param_dtype, remat, remat_policy,
    attention_impl: as in `genie_jax.models.tokenizer.default_config`.
    num_actions: A, the latent-action codebook size.
    decoder_context_frames: how many of the latest frames (t, t-1, ...) the decoder sees
      when predicting frame t+1; 0 means all of frames 1..t, as in Genie. See the module
      docstring for why the default is 1.
    predict_residual: the decoder predicts frame t+1 - frame t (see the module docstring).
    vq_warmup_steps: training steps during which the decoder gets the continuous latent
      instead of its code (no VQ loss); at the end the codebook is set by k-means of that
      step's latents. 0: quantised from the first step, as in Genie. See the module
      docstring.
    spatial_rope: also rotate the spatial attention's queries and keys of encoder and
      decoder by each token's row and column (2-D RoPE, `genie_jax.models.layers.rope_2d`);
      needs a head width divisible by 4. See the module docstring.
  """
  # App. F gives the LAM the tokenizer's shapes except patch 16 and 6 codes: start from
  # the tokenizer's keys, its codebook size replaced by the action vocabulary.
  shared = tokenizer_lib.default_config().to_dict()
  del shared["num_codes"], shared["encoder_context"]
  cfg = ml_collections.ConfigDict(dict(
      shared, patch_size=16, num_actions=6, decoder_context_frames=1, predict_residual=True,
      vq_warmup_steps=0, spatial_rope=False))
  cfg.lock()
  return cfg


# Tokenizer keys the LAM's config carries but its model does not implement, with the one
# value it behaves as: another value would be saved in config.json and silently not used.
_TOKENIZER_ONLY = {"temporal_positions": "learned", "sink_frames": 0,
                   "code_restart_sampling": "uniform", "quantizer": "vq", "kl_weight": 1e-4}


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError, naming the config.model key, for a config the model cannot use."""
  # The shared keys mean what they mean for the tokenizer; num_codes is num_actions here.
  shared = {k: v for k, v in cfg.items()
            if k not in ("num_actions", "decoder_context_frames", "predict_residual",
                         "vq_warmup_steps", "spatial_rope")}
  tokenizer_lib.validate_config(ml_collections.ConfigDict(dict(shared, num_codes=1)))
  if cfg.num_actions < 2:
    raise ValueError(f"config.model.num_actions={cfg.num_actions} must be at least 2: one "
                     f"code carries no information")
  if not 0 <= cfg.decoder_context_frames <= cfg.max_frames:
    raise ValueError(f"config.model.decoder_context_frames={cfg.decoder_context_frames} "
                     f"must be in [0, config.model.max_frames={cfg.max_frames}]")
  if cfg.vq_warmup_steps < 0:
    raise ValueError(f"config.model.vq_warmup_steps={cfg.vq_warmup_steps} must be >= 0")
  if cfg.max_frames < 2:
    raise ValueError(f"config.model.max_frames={cfg.max_frames} must be at least 2: a "
                     f"latent action needs a transition")
  for key, only in _TOKENIZER_ONLY.items():
    if cfg.get(key, only) != only:
      raise ValueError(f"config.model.{key}={cfg[key]!r}: the LAM has only {only!r} (the key "
                       f"comes with the tokenizer's settings; it is the tokenizer's option)")
  if cfg.get("spatial_rope", False) and (cfg.d_model // cfg.num_heads) % 4:
    raise ValueError(f"config.model.spatial_rope needs a head width divisible by 4; "
                     f"d_model={cfg.d_model} / num_heads={cfg.num_heads} is not")


def _last_frames(x_BTND: jax.Array, k: int) -> jax.Array:
  """Windows of the k latest frames ending at each frame: x_BTND -> x_ISND, I = B*T, S = k.

  Windows that would start before the clip are left-padded with zeros (no frame), so every
  window is causal and as long as every other.
  """
  b, t, n, d = x_BTND.shape
  padded_BTND = jnp.pad(x_BTND, ((0, 0), (k - 1, 0), (0, 0), (0, 0)))
  x_BTSND = jnp.stack([padded_BTND[:, j:j + t] for j in range(k)], axis=2)
  return x_BTSND.reshape(b * t, k, n, d)


def in_windows(infer: Callable[[jax.Array], jax.Array], video_BTHWC: jax.Array,
               window: int) -> jax.Array:
  """Actions (B, T-1) of a clip longer than the `window` frames a LAM's positions cover.

  The clip is cut into windows of `window` frames overlapping by one frame (the last window
  is moved back to end at the clip's end); each transition's action is taken from the first
  window that holds both of its frames. `infer` maps a clip of <= window frames to its
  (B, frames - 1) actions.
  """
  t = video_BTHWC.shape[1]
  if t <= window:
    return infer(video_BTHWC)
  pieces = []
  for first in range(0, t - 1, window - 1):
    start = min(first, t - window)
    # Transitions start .. start + window - 2; the earlier ones came from the last window.
    pieces.append(infer(video_BTHWC[:, start:start + window])[:, first - start:])
  return jnp.concatenate(pieces, axis=1)


class WarmupCounter(nnx.Variable):
  """Quantiser warm-up steps left (see `vq_warmup_steps`): > 0 while warming up, 0 in the
  step that ends it, -1 after. Model state (checkpointed, never optimised)."""


class LatentActionModel(nnx.Module):
  """Encoder + action VQ + decoder; config keys: see `default_config`."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    validate_config(cfg)
    qk_norm = cfg.qk_norm_kind if cfg.qk_norm else None
    remat = cfg.remat_policy if cfg.remat else None
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.image_size = cfg.image_size
    self.patch_size = cfg.patch_size
    self.channels = cfg.channels
    self.decoder_context_frames = cfg.decoder_context_frames
    self.predict_residual = cfg.predict_residual
    patch_dim = cfg.patch_size ** 2 * cfg.channels
    side = cfg.image_size // cfg.patch_size
    n = side ** 2
    d = cfg.d_model
    # Configs saved before the key existed had no spatial rope.
    grid = (side, side) if cfg.get("spatial_rope", False) else None
    transformer = lambda num_layers, num_tokens: layers.STTransformer(
        num_layers, d, cfg.num_heads, num_tokens=num_tokens, max_frames=cfg.max_frames,
        mlp_ratio=cfg.mlp_ratio, qk_norm=qk_norm, dtype=dtype, param_dtype=param_dtype,
        attention_impl=cfg.attention_impl, grid=grid, remat=remat, rngs=rngs)
    linear = lambda n_in, n_out, names: layers.Linear(
        n_in, n_out, names=names, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.enc_patch_embed = linear(patch_dim, d, ("patch", "embed"))
    self.encoder = transformer(cfg.enc_layers, n)
    self.to_latent = linear(n * d, cfg.latent_dim, ("embed", "latent"))
    self.vq = vq.VectorQuantizer(
        cfg.num_actions, cfg.latent_dim, commitment_beta=cfg.commitment_beta,
        normalize=cfg.vq_normalize, usage_decay=cfg.code_usage_decay,
        dead_code_threshold=cfg.dead_code_threshold, param_dtype=param_dtype, rngs=rngs)
    # Static: without a warm-up the train step neither counts it down nor runs k-means.
    self.vq_warmup = cfg.vq_warmup_steps > 0
    self.warmup_left = WarmupCounter(jnp.asarray(cfg.vq_warmup_steps or -1, jnp.int32))
    self.dec_patch_embed = linear(patch_dim, d, ("patch", "embed"))
    self.action_embed = linear(cfg.latent_dim, d, ("latent", "embed"))
    self.decoder = transformer(cfg.dec_layers, n)
    self.to_pixels = linear(d, patch_dim, ("embed", "patch"))
    if self.predict_residual:
      # The residual starts at zero, so training starts from "copy frame t" (the best
      # action-free guess for most pixels) instead of frame t plus unit-variance noise,
      # which the decoder would first have to unlearn.
      self.to_pixels.kernel[...] = jnp.zeros_like(self.to_pixels.kernel[...])

  @property
  def num_actions(self) -> int:
    """A, the number of latent actions."""
    return self.vq.num_codes

  @property
  def action_codebook(self) -> jax.Array:
    """The latent-action codes as matched and decoded: (A, L) float32."""
    return self.vq.codes()

  def _patches(self, video_BTHWC: jax.Array) -> jax.Array:
    expected = (self.image_size, self.image_size, self.channels)
    if video_BTHWC.ndim != 5 or tuple(video_BTHWC.shape[2:]) != expected:
      raise ValueError(f"video must be (B, T, {', '.join(map(str, expected))}) for "
                       f"config.model image_size={self.image_size}, "
                       f"channels={self.channels}; got {video_BTHWC.shape}")
    # Centred pixels give the patch embeddings zero-mean inputs.
    x_BTHWC = tokenizer_lib.to_unit_interval(video_BTHWC) * 2.0 - 1.0
    return layers.patchify(x_BTHWC, self.patch_size)

  def encode_latents(self, video_BTHWC: jax.Array) -> jax.Array:
    """Continuous latent actions z_BTL (float32) of the T-1 transitions of a clip."""
    if video_BTHWC.shape[1] < 2:
      raise ValueError(f"a clip needs at least 2 frames for a latent action; got "
                       f"{video_BTHWC.shape}")
    x_BTND = self.encoder(self.enc_patch_embed(self._patches(video_BTHWC)))
    b, t, n, d = x_BTND.shape
    # Frame t+1 (index t+1 - 1) names transition t -> t+1.
    # The change of each token from frame t to frame t+1: what the frames share (the static
    # scene, the positional encoding) cancels, so latents differ by what happened, not by
    # where; frame t+1's tokens alone are dominated by what every frame shows.
    change_BTND = x_BTND[:, 1:] - x_BTND[:, :-1]
    return self.to_latent(change_BTND.reshape(b, t - 1, n * d)).astype(jnp.float32)

  def decode(self, frames_BTHWC: jax.Array, zq_BTL: jax.Array) -> jax.Array:
    """Predicts frames 2..T+1 from frames 1..T and the quantised actions of transitions
    1..T (zq_BTL[:, t] = action taken at frame t): float32 in [0, 1] scale, unclipped."""
    patches_BTNP = self._patches(frames_BTHWC)
    b, t, n, _ = patches_BTNP.shape
    x_BTND = self.dec_patch_embed(patches_BTNP)
    a_BT1D = self.action_embed(zq_BTL)[:, :, None, :]
    k = self.decoder_context_frames
    if k == 0:
      x_BTND = self.decoder(x_BTND + a_BT1D.astype(x_BTND.dtype))
    else:
      # The action joins the last frame of each window, i.e. frame t for target t+1.
      a_I1ND = a_BT1D.reshape(b * t, 1, 1, -1).astype(x_BTND.dtype)
      x_ISND = _last_frames(x_BTND, k)
      x_ISND = x_ISND.at[:, -1:].add(a_I1ND)
      x_BTND = self.decoder(x_ISND)[:, -1].reshape(b, t, n, -1)
    delta_BTNP = self.to_pixels(x_BTND).astype(jnp.float32)
    out_BTHWC = layers.unpatchify(delta_BTNP, self.patch_size, self.image_size,
                                  self.image_size)
    if self.predict_residual:
      # Residual in the centred [-1, 1] scale: half of it in [0, 1] scale.
      return tokenizer_lib.to_unit_interval(frames_BTHWC) + 0.5 * out_BTHWC
    return (out_BTHWC + 1.0) * 0.5

  def predict(self, frames_BTHWC: jax.Array, actions_BT: jax.Array) -> jax.Array:
    """Predicts frames 2..T+1 from frames 1..T and latent action indices actions_BT (int,
    in [0, A)): float32 in [0, 1] scale, unclipped."""
    return self.decode(frames_BTHWC, self.vq.lookup(actions_BT))

  def infer_actions(self, video_BTHWC: jax.Array) -> jax.Array:
    """Latent actions of a clip: (B, T-1) int32 in [0, A); [:, t] is the action of the
    transition frame t -> frame t+1. uint8 or [0, 1] float video, of any length (clips longer
    than max_frames are read in windows, see `in_windows`). Leaves the usage EMA alone."""
    window = self.encoder.max_frames
    return in_windows(self._infer_window, video_BTHWC, window)

  def _infer_window(self, video_BTHWC: jax.Array) -> jax.Array:
    _, actions_BT, _ = self.vq(self.encode_latents(video_BTHWC), train=False)
    return actions_BT

  def __call__(self, video_BTHWC: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """Infers the latent actions of a clip and predicts its frames 2..T from them.

    Args:
      video_BTHWC: uint8 in [0, 255] or float in [0, 1], T >= 2.
      train: update the codebook usage EMA.

    Returns:
      'pred': float32 (B, T-1, H, W, C) in [0, 1] scale (unclipped) predicting frames 2..T;
      'actions': int32 (B, T-1), action of transition t -> t+1; 'z': z_BTL float32 latents
      before quantisation (candidates for `restart_dead_codes`); 'vq_loss' (codebook +
      beta * commitment), 'codebook_loss', 'commitment_loss', 'perplexity', 'usage': see
      `VectorQuantizer`.
    """
    z_BTL = self.encode_latents(video_BTHWC)
    bypass = False
    if train and self.vq_warmup:
      bypass = self.warmup_left[...] > 0
      self.warmup_left[...] = jnp.maximum(self.warmup_left[...] - 1, -1)
    zq_BTL, actions_BT, aux = self.vq(z_BTL, train=train, bypass=bypass)
    out = {
        "pred": self.decode(video_BTHWC[:, :-1], zq_BTL),
        "actions": actions_BT,
        "z": z_BTL,
        "vq_loss": aux.pop("loss"),
    }
    out.update(aux)
    return out

  def restart_dead_codes(self, z_BTL: jax.Array, key: jax.Array) -> jax.Array:
    """Restarts dead action codes from this batch's latents `z`; returns how many. At the
    end of the quantiser warm-up, sets the whole codebook by k-means of `z` instead."""
    if not self.vq_warmup:
      return self.vq.restart_dead_codes(z_BTL, key)
    kmeans_key, restart_key = jax.random.split(key)
    ending = self.warmup_left[...] == 0
    warming = self.warmup_left[...] > 0
    # Restarts while warming up are harmless (no code is used, and k-means replaces them all
    # at the end) and not worth counting.
    restarted = self.vq.restart_dead_codes(z_BTL, restart_key)
    self.vq.init_from_kmeans(z_BTL, kmeans_key, where=ending)
    return jnp.where(ending | warming, 0, restarted)
