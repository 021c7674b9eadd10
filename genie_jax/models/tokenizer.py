"""ST-ViViT VQ-VAE video tokenizer (Genie stage 1), or its continuous twin (`quantizer='kl'`).

video_BTHWC -> patches_BTNP -> Linear P->D -> encoder ST-transformer (ends in a norm)
-> Linear D->L -> z_BTNL -> VQ -> zq_BTNL -> Linear L->D -> decoder ST-transformer
-> Linear D->P -> unpatchify -> recon_BTHWC.

Both ST-transformers are causal in time, so the tokens of frame t depend on frames 1..t only
and frame t decodes from the tokens of frames 1..t only. Training loss (Genie):
mean((recon - to_unit_interval(video))**2) + out['vq_loss'].

What a token may depend on is `encoder_context`. 'clip' is Genie's: the encoder attends
over the frame and the past frames, so a patch's code may depend on where it is and on what
came before. A dynamics model predicts codes, not pixels, so every such dependence is one
more thing to predict: content that merely moved or stayed may change its code. 'frame'
keeps spatial context and drops the past; 'patch' makes a code a function of its patch's
pixels alone (a per-patch feed-forward encoder, no positions), so the same content is the
same token wherever and whenever it appears. The decoder always sees the clip.

`quantizer` 'kl' replaces the VQ bottleneck with a Gaussian per latent, as a VAE's: the
encoder gives a mean and a log-variance, training decodes a sample and adds kl_weight times
its KL divergence from N(0, 1) (which keeps the latents near unit scale, where a diffusion
model's noise is), and the latent of a clip (`encode_latents`) is the mean. Such a tokenizer
has no tokens; the diffusion dynamics stage works on its latents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from genie_jax.models import layers
from genie_jax.models import vq


def default_config() -> ml_collections.ConfigDict:
  """config.model for the tokenizer; defaults are Genie App. F (CoinRun) shapes.

  Keys:
    image_size: frame height = width in pixels.
    patch_size: side p of the square patches; N = (image_size / p)^2 tokens per frame.
    channels: C, colour channels of the frames.
    max_frames: the longest clip T the model sees at once (a longer video is decoded as
      `temporal_positions` says).
    d_model: D, width of both ST-transformers.
    num_heads: K attention heads (D must divide by K).
    mlp_ratio: feed-forward width F = mlp_ratio * D.
    enc_layers, dec_layers: ST blocks in the encoder and the decoder (with
      encoder_context='patch', enc_layers residual feed-forward blocks).
    encoder_context: what a token's code may depend on (see the module docstring):
      'clip' (Genie: the patch, its frame and the past frames), 'frame' (the patch and its
      frame) or 'patch' (the patch's pixels alone).
    latent_dim: L, width of a latent / codebook entry.
    num_codes: V, codebook size.
    commitment_beta: weight of the VQ commitment loss.
    vq_normalize: match latents to codes by cosine similarity (l2-normalised) instead of
      squared L2 distance.
    code_usage_decay: decay of the per-code usage EMA (dead-code detection).
    dead_code_threshold: a code is dead when its usage EMA is below this fraction of 1/V.
    code_restart_sampling: which latents dead codes restart on: 'uniform' or 'distance'
      (far from every code more likely; see `vq.VectorQuantizer`).
    quantizer: 'vq' (Genie: discrete tokens) or 'kl' (continuous latents; the module
      docstring). num_codes and the code keys are unused under 'kl'.
    kl_weight: weight of the KL term under 'kl'.
    qk_norm: normalise q and k per head before their dot product, as the large Genie models
      do against growing attention logits.
    qk_norm_kind: 'layernorm' (ViT-22B) or 'rmsnorm', when qk_norm.
    dtype: compute dtype ('float32' or 'bfloat16'); norms, softmax, VQ and the output
      pixels stay float32.
    param_dtype: dtype of the parameters (keep 'float32').
    remat: recompute each ST block in the backward pass (less memory, more compute).
    remat_policy: 'full' keeps only block inputs; 'dots' also keeps the outputs of the
      projection and feed-forward matmuls and recomputes the attention probabilities.
    attention_impl: 'xla' (any backend) or 'cudnn' (NVIDIA GPU, bf16, fused kernel).
    temporal_positions: 'learned' (Genie: a table added to the tokens) or 'rope' (rotary
      angles in temporal attention), in the encoder and the decoder. Decides what decoding
      past max_frames does (`genie_jax.inference.genie.decode_frames`): under 'learned' each later
      frame is decoded from a pass over the max_frames frames ending at it (the output the
      model was trained for); under 'rope' the decoder's keys/values of past frames are
      kept and roll, one single-frame pass per frame, and the keys of cached frames are the
      ones computed when those frames were new (the streaming model's output, not the
      model run on the window).
    sink_frames: under 'rope', how many first frames the decoder's rolling cache keeps for
      good (as `genie_jax.models.dynamics.default_config`'s).
  """
  cfg = ml_collections.ConfigDict(dict(
      image_size=64,
      patch_size=4,
      channels=3,
      max_frames=16,
      d_model=512,
      num_heads=8,
      mlp_ratio=4,
      enc_layers=8,
      dec_layers=8,
      encoder_context="clip",
      latent_dim=32,
      num_codes=1024,
      commitment_beta=0.25,
      vq_normalize=False,
      code_usage_decay=0.99,
      dead_code_threshold=0.1,
      code_restart_sampling="uniform",
      quantizer="vq",
      kl_weight=1e-4,
      temporal_positions="learned",
      sink_frames=0,
      **layers.TRANSFORMER_DEFAULTS,
  ))
  cfg.lock()
  return cfg


ENCODER_CONTEXTS = ("clip", "frame", "patch")
QUANTIZERS = ("vq", "kl")


def quantizer(cfg: ml_collections.ConfigDict) -> str:
  """cfg.quantizer; 'vq' in configs saved before the key existed."""
  return cfg.get("quantizer", "vq")


def encoder_context(cfg: ml_collections.ConfigDict) -> str:
  """cfg.encoder_context; 'clip' in configs saved before the key existed."""
  return cfg.get("encoder_context", "clip")


class PatchEncoder(nnx.Module):
  """Residual feed-forward blocks and a final norm applied to each token alone: x_BTND ->
  x_BTND with no positions and no attention, so equal patches get equal outputs."""

  def __init__(self, num_layers: int, d_model: int, *, mlp_ratio: int, dtype, param_dtype,
               rngs: nnx.Rngs):
    norm = lambda: layers.Norm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norms = nnx.List([norm() for _ in range(num_layers)])
    self.ffws = nnx.List([
        layers.FeedForward(d_model, mlp_ratio * d_model, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs) for _ in range(num_layers)])
    self.final_norm = norm()

  def __call__(self, x_BTND: jax.Array) -> jax.Array:
    for norm, ffw in zip(self.norms, self.ffws):
      x_BTND = x_BTND + ffw(norm(x_BTND))
    return self.final_norm(x_BTND)


def to_unit_interval(video: jax.Array) -> jax.Array:
  """Pixels as float32 in [0, 1]: uint8 video is divided by 255, floats pass through."""
  if jnp.issubdtype(video.dtype, jnp.integer):
    return video.astype(jnp.float32) / 255.0
  return video.astype(jnp.float32)


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError, naming the config.model key, for a config the model cannot use."""
  layers.validate_transformer_config(cfg)
  for key in ("image_size", "patch_size", "channels", "max_frames", "latent_dim", "num_codes"):
    if cfg[key] < 1:
      raise ValueError(f"config.model.{key}={cfg[key]} must be positive")
  layers.validate_temporal_settings(cfg)
  for key in ("enc_layers", "dec_layers"):
    if cfg[key] < 0:
      raise ValueError(f"config.model.{key}={cfg[key]} must not be negative")
  if cfg.image_size % cfg.patch_size:
    raise ValueError(f"config.model.patch_size={cfg.patch_size} does not divide "
                     f"config.model.image_size={cfg.image_size}")
  if encoder_context(cfg) not in ENCODER_CONTEXTS:
    raise ValueError(f"config.model.encoder_context={cfg.encoder_context!r}; expected one of "
                     f"{list(ENCODER_CONTEXTS)}")
  if not 0.0 <= cfg.code_usage_decay < 1.0:
    raise ValueError(f"config.model.code_usage_decay={cfg.code_usage_decay} must be in [0, 1)")
  if cfg.get("code_restart_sampling", "uniform") not in vq.RESTART_SAMPLINGS:
    raise ValueError(f"config.model.code_restart_sampling={cfg.code_restart_sampling!r}; "
                     "expected 'uniform' or 'distance'")
  if quantizer(cfg) not in QUANTIZERS:
    raise ValueError(f"config.model.quantizer={cfg.quantizer!r}; expected one of "
                     f"{list(QUANTIZERS)}")
  if quantizer(cfg) == "kl" and cfg.kl_weight < 0:
    raise ValueError(f"config.model.kl_weight={cfg.kl_weight} must not be negative")


class Tokenizer(nnx.Module):
  """ST-ViViT VQ-VAE: video <-> tokens_BTN (or, under quantizer='kl', video <-> continuous
  latents z_BTNL). Config keys: see `default_config`."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    validate_config(cfg)
    qk_norm = cfg.qk_norm_kind if cfg.qk_norm else None
    remat = cfg.remat_policy if cfg.remat else None
    attention_impl = cfg.attention_impl
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    positions, self.sink_frames = layers.temporal_settings(cfg)
    self.image_size = cfg.image_size
    self.patch_size = cfg.patch_size
    self.channels = cfg.channels
    patch_dim = cfg.patch_size ** 2 * cfg.channels
    d = cfg.d_model
    transformer = lambda num_layers: layers.STTransformer(
        num_layers, d, cfg.num_heads, num_tokens=self.tokens_per_frame,
        max_frames=cfg.max_frames, mlp_ratio=cfg.mlp_ratio, qk_norm=qk_norm, dtype=dtype,
        param_dtype=param_dtype, attention_impl=attention_impl,
        temporal_positions=positions, remat=remat, rngs=rngs)
    linear = lambda n_in, n_out, names: layers.Linear(
        n_in, n_out, names=names, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embed = linear(patch_dim, d, ("patch", "embed"))
    self.encoder_context = encoder_context(cfg)
    if self.encoder_context == "patch":
      self.encoder = PatchEncoder(cfg.enc_layers, d, mlp_ratio=cfg.mlp_ratio, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    else:
      self.encoder = transformer(cfg.enc_layers)
    self.quantizer = quantizer(cfg)
    self.latent_dim = cfg.latent_dim
    if self.quantizer == "vq":
      self.to_latent = linear(d, cfg.latent_dim, ("embed", "latent"))
      self.vq = vq.VectorQuantizer(
          cfg.num_codes, cfg.latent_dim, commitment_beta=cfg.commitment_beta,
          normalize=cfg.vq_normalize, usage_decay=cfg.code_usage_decay,
          dead_code_threshold=cfg.dead_code_threshold,
          restart_sampling=cfg.get("code_restart_sampling", "uniform"),
          param_dtype=param_dtype, rngs=rngs)
    else:
      # The mean and the log-variance of each latent.
      self.to_latent = linear(d, 2 * cfg.latent_dim, ("embed", "latent"))
      self.kl_weight = cfg.kl_weight
    self.from_latent = linear(cfg.latent_dim, d, ("latent", "embed"))
    self.decoder = transformer(cfg.dec_layers)
    self.to_pixels = linear(d, patch_dim, ("embed", "patch"))

  @property
  def tokens_per_frame(self) -> int:
    """N, tokens per frame."""
    return (self.image_size // self.patch_size) ** 2

  def _check_video(self, video_BTHWC: jax.Array) -> None:
    expected = (self.image_size, self.image_size, self.channels)
    if video_BTHWC.ndim != 5 or tuple(video_BTHWC.shape[2:]) != expected:
      raise ValueError(f"video must be (B, T, {', '.join(map(str, expected))}) for "
                       f"config.model image_size={self.image_size}, "
                       f"channels={self.channels}; got {video_BTHWC.shape}")

  def encode_latents(self, video_BTHWC: jax.Array) -> jax.Array:
    """Latents z_BTNL (float32) of uint8 or [0, 1] float video: before quantisation under
    'vq', the Gaussian's mean under 'kl'."""
    z_BTNX = self._encode(video_BTHWC)
    return z_BTNX[..., :self.latent_dim] if self.quantizer == "kl" else z_BTNX

  def _encode(self, video_BTHWC: jax.Array) -> jax.Array:
    """The encoder's output projection: z_BTNL under 'vq'; mean and log-variance
    concatenated (2L) under 'kl'."""
    self._check_video(video_BTHWC)
    # Centred pixels give the patch embedding zero-mean inputs.
    x_BTHWC = to_unit_interval(video_BTHWC) * 2.0 - 1.0
    x_BTND = self.patch_embed(layers.patchify(x_BTHWC, self.patch_size))
    b, t, n, d = x_BTND.shape
    if self.encoder_context == "frame":
      # Every frame a clip of its own: temporal attention sees only the frame itself.
      x_BTND = self.encoder(x_BTND.reshape(b * t, 1, n, d)).reshape(b, t, n, d)
    else:
      x_BTND = self.encoder(x_BTND)
    return self.to_latent(x_BTND).astype(jnp.float32)

  def decode_latents(self, zq_BTNL: jax.Array) -> jax.Array:
    """Pixels in [0, 1] scale (float32, not clipped) from quantised latents zq_BTNL."""
    return self.pixels(self.decoder(self.from_latent(zq_BTNL)))

  def decoder_input(self, indices_BTN: jax.Array) -> jax.Array:
    """The decoder's input x_BTND for tokens (what `decode` feeds `self.decoder`)."""
    return self.from_latent(self.vq.lookup(indices_BTN))

  def pixels(self, y_BTND: jax.Array) -> jax.Array:
    """Pixels in [0, 1] scale (float32, not clipped) from the decoder's output y_BTND."""
    patches_BTNP = self.to_pixels(y_BTND).astype(jnp.float32)
    x_BTHWC = layers.unpatchify(patches_BTNP, self.patch_size, self.image_size,
                                self.image_size)
    return (x_BTHWC + 1.0) * 0.5

  def __call__(self, video_BTHWC: jax.Array, *, train: bool, rng: jax.Array | None = None
               ) -> dict[str, jax.Array]:
    """Encodes, quantises and reconstructs a clip.

    Args:
      video_BTHWC: uint8 in [0, 255] or float in [0, 1].
      train: update the codebook usage EMA ('vq'); decode a sample of the latents, drawn
        with `rng`, instead of their mean ('kl').

    Returns:
      'recon': float32 video in [0, 1] scale (unclipped, for the loss), same shape;
      'z': z_BTNL, float32 latents before quantisation (the candidates for
      `restart_dead_codes`; the means under 'kl'). Under 'vq' also 'indices_BTN' (int32
      tokens), 'vq_loss' (codebook + beta * commitment), 'codebook_loss',
      'commitment_loss', 'perplexity', 'usage' (see `VectorQuantizer`); under 'kl'
      'kl_loss' (the KL divergence from N(0, 1) per latent entry, a mean) and 'latent_std'
      (the mean standard deviation).
    """
    if self.quantizer == "kl":
      return self._call_kl(video_BTHWC, train=train, rng=rng)
    z_BTNL = self.encode_latents(video_BTHWC)
    zq_BTNL, indices_BTN, aux = self.vq(z_BTNL, train=train)
    out = {
        "recon": self.decode_latents(zq_BTNL),
        "indices_BTN": indices_BTN,
        "z": z_BTNL,
        "vq_loss": aux.pop("loss"),
    }
    out.update(aux)
    return out

  def _call_kl(self, video_BTHWC: jax.Array, *, train: bool, rng: jax.Array | None
               ) -> dict[str, jax.Array]:
    mean_BTNL, logvar_BTNL = jnp.split(self._encode(video_BTHWC), 2, axis=-1)
    std_BTNL = jnp.exp(0.5 * logvar_BTNL)
    z_BTNL = mean_BTNL
    if train:
      if rng is None:
        raise ValueError("training a quantizer='kl' tokenizer needs an rng")
      z_BTNL = mean_BTNL + std_BTNL * jax.random.normal(rng, mean_BTNL.shape)
    kl = 0.5 * jnp.mean(jnp.square(mean_BTNL) + jnp.square(std_BTNL) - 1.0 - logvar_BTNL)
    return dict(recon=self.decode_latents(z_BTNL), z=mean_BTNL, kl_loss=kl,
                latent_std=jnp.mean(std_BTNL))

  def _needs_tokens(self) -> None:
    if self.quantizer != "vq":
      raise ValueError("a quantizer='kl' tokenizer has continuous latents, no tokens "
                       "(encode_latents / decode_latents)")

  def encode(self, video_BTHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Tokens of a clip: (indices_BTN int32, zq_BTNL float32). Leaves the usage EMA alone."""
    self._needs_tokens()
    zq_BTNL, indices_BTN, _ = self.vq(self.encode_latents(video_BTHWC), train=False)
    return indices_BTN, zq_BTNL

  def decode(self, indices_BTN: jax.Array) -> jax.Array:
    """Frames from tokens: float32 video_BTHWC in [0, 1] (clipped)."""
    self._needs_tokens()
    return jnp.clip(self.decode_latents(self.vq.lookup(indices_BTN)), 0.0, 1.0)

  def restart_dead_codes(self, z_BTNL: jax.Array, key: jax.Array) -> jax.Array:
    """Restarts dead codes from this batch's latents `z`; returns how many (see vq)."""
    return self.vq.restart_dead_codes(z_BTNL, key)
