"""Vector quantisation with a straight-through estimator and dead-code restarts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from genie_jax import reductions
from genie_jax.models import layers


class CodeUsage(nnx.Variable):
  """EMA of how often each code is chosen (a distribution over the V codes).

  Not a `nnx.Param`: the optimizer never touches it; the forward pass updates it in
  training and `VectorQuantizer.restart_dead_codes` reads and resets it.
  """


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-12))


# How `VectorQuantizer.restart_dead_codes` draws the latents dead codes move to.
RESTART_SAMPLINGS = ("uniform", "distance")


def _code_distances(x_XL: jax.Array, codes_VL: jax.Array) -> jax.Array:
  """(..., V): squared distance of each latent to each code, less ||x||^2 (the same for
  every code, so it does not change which code is nearest)."""
  # HIGHEST: TPUs (bfloat16 passes) and recent GPUs (TF32) would otherwise round the
  # products, and with them which code is nearest; CPUs compute float32 either way.
  return (jnp.sum(jnp.square(codes_VL), -1)
          - 2.0 * jnp.einsum("...l,vl->...v", x_XL, codes_VL,
                             precision=jax.lax.Precision.HIGHEST))


class VectorQuantizer(nnx.Module):
  """Nearest-codebook-entry quantiser (VQ-VAE, van den Oord et al. 2017).

  Calling it on latents z_XL (any leading axes X, last axis L) returns
  `(zq_XL, indices_X, aux)`:
    zq: codebook[indices] in value; in the backward pass its gradient flows to z unchanged
      (straight-through), so the encoder learns from the decoder's loss.
    indices: int32 index of the nearest code (squared L2, or cosine when `normalize`).
    aux (float32 scalars):
      'codebook_loss'   mean ||sg(z) - e||^2: moves the codes (gradient to the codebook only);
      'commitment_loss' mean ||z - sg(e)||^2: keeps the encoder near its codes (gradient to
                        the encoder only), NOT yet multiplied by beta;
      'loss'            codebook_loss + commitment_beta * commitment_loss: add this to the
                        reconstruction loss;
      'perplexity'      exp(entropy) of the batch's code histogram (V means uniform use);
      'usage'           fraction of the V codes chosen at least once in the batch.
  Means are over every element of z (as in an MSE).

  Args:
    num_codes: V.
    code_dim: L.
    commitment_beta: weight of the commitment loss inside aux['loss'].
    normalize: l2-normalise z and the codes before matching (cosine similarity, as in
      ViT-VQGAN); zq is then a unit vector.
    usage_decay: decay of the per-code usage EMA.
    dead_code_threshold: a code is dead when its usage EMA falls below this fraction of
      the uniform share 1/V (e.g. 0.1: used ten times less often than uniform).
    restart_sampling: how `restart_dead_codes` picks the latents that dead codes move to:
      'uniform' (any latent of the batch alike) or 'distance' (with probability
      proportional to a latent's squared distance to its nearest code, as k-means++ seeds).
      Uniform picks land where the data is common and already well served; a content on
      1% of the tokens (a small sprite) is then almost never given a code of its own.
  """

  def __init__(self, num_codes: int, code_dim: int, *, commitment_beta: float = 0.25,
               normalize: bool = False, usage_decay: float = 0.99,
               dead_code_threshold: float = 0.1, restart_sampling: str = "uniform",
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if restart_sampling not in RESTART_SAMPLINGS:
      raise ValueError(f"restart_sampling={restart_sampling!r}: expected 'uniform' or "
                       "'distance'")
    self.num_codes = num_codes
    self.commitment_beta = commitment_beta
    self.normalize = normalize
    self.usage_decay = usage_decay
    self.dead_code_threshold = dead_code_threshold
    self.restart_sampling = restart_sampling
    # Unit-variance codes match the encoder's latents at init (a fan-in-scaled projection of
    # a LayerNorm output), so the first batches already spread over many codes.
    self.codebook = layers.param(rngs, jax.nn.initializers.normal(1.0),
                                 (num_codes, code_dim), ("vocab", "latent"), param_dtype)
    self.usage = CodeUsage(jnp.full((num_codes,), 1.0 / num_codes, jnp.float32))

  def codes(self) -> jax.Array:
    """The codebook as used for matching and lookup: (V, L) float32."""
    codes_VL = self.codebook[...].astype(jnp.float32)
    return _l2_normalize(codes_VL) if self.normalize else codes_VL

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Code vectors for `indices` (any shape) -> (..., L) float32."""
    return jnp.take(self.codes(), indices, axis=0)

  def __call__(self, z_XL: jax.Array, *, train: bool, bypass: jax.Array | bool = False
               ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Quantises z_XL; see the class docstring.

    `bypass` (a traced bool is fine): zq is z itself (l2-normalised when `normalize`) and
    aux['loss'] is zero, for a continuous warm-up before quantising; indices, usage and the
    other aux values are computed as usual.
    """
    z_XL = z_XL.astype(jnp.float32)
    if self.normalize:
      z_XL = _l2_normalize(z_XL)
    codes_VL = self.codes()
    indices_X = reductions.argmin(_code_distances(z_XL, codes_VL))
    e_XL = jnp.take(codes_VL, indices_X, axis=0)

    codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z_XL) - e_XL))
    commitment_loss = jnp.mean(jnp.square(z_XL - jax.lax.stop_gradient(e_XL)))
    zq_XL = z_XL + jax.lax.stop_gradient(e_XL - z_XL)
    vq_loss = codebook_loss + self.commitment_beta * commitment_loss
    if bypass is not False:
      zq_XL = jnp.where(bypass, z_XL, zq_XL)
      vq_loss = jnp.where(bypass, 0.0, vq_loss)

    counts_V = jnp.bincount(indices_X.reshape(-1), length=self.num_codes)
    freq_V = counts_V.astype(jnp.float32) / indices_X.size
    if train:
      decay = self.usage_decay
      self.usage[...] = decay * self.usage[...] + (1.0 - decay) * freq_V
    aux = {
        "loss": vq_loss,
        "codebook_loss": codebook_loss,
        "commitment_loss": commitment_loss,
        "perplexity": jnp.exp(-jnp.sum(jax.scipy.special.xlogy(freq_V, freq_V))),
        "usage": jnp.mean((counts_V > 0).astype(jnp.float32)),
    }
    return zq_XL, indices_X, aux

  def init_from_kmeans(self, candidates_XL: jax.Array, key: jax.Array, *,
                       where: jax.Array | bool = True, iterations: int = 10) -> None:
    """Sets the codebook to k-means centres of `candidates_XL` (k-means++ seeding, then
    `iterations` Lloyd steps; cosine geometry when `normalize`) and the usage to uniform.

    For a codebook that starts after a continuous warm-up: codes placed where the latents
    cluster are all used from the first quantised step. Traceable; `where` (a traced bool)
    keeps the current codebook when False. Needs at least as many candidates as codes.
    """
    x_XL = jax.lax.stop_gradient(candidates_XL).reshape(-1, candidates_XL.shape[-1])
    x_XL = x_XL.astype(jnp.float32)
    if self.normalize:
      x_XL = _l2_normalize(x_XL)
    n, v = x_XL.shape[0], self.num_codes
    if n < v:
      raise ValueError(f"k-means of {v} codes needs at least {v} latents, got {n}")

    def sq_dist(c_VL):
      return jnp.sum(jnp.square(x_XL[:, None, :] - c_VL[None]), -1)  # (X, V)

    # k-means++: each next centre drawn with probability proportional to the squared
    # distance to the nearest centre chosen so far.
    keys = jax.random.split(key, v)
    centres_VL = jnp.zeros((v, x_XL.shape[1]), jnp.float32)
    centres_VL = centres_VL.at[0].set(x_XL[jax.random.randint(keys[0], (), 0, n)])
    for i in range(1, v):
      d_X = jnp.min(sq_dist(centres_VL)[:, :i], axis=1)
      logits_X = jnp.log(jnp.maximum(d_X, 1e-12))
      centres_VL = centres_VL.at[i].set(x_XL[reductions.categorical(keys[i], logits_X)])

    def lloyd(_, c_VL):
      onehot_XV = jax.nn.one_hot(reductions.argmin(sq_dist(c_VL)), v, dtype=jnp.float32)
      counts_V = onehot_XV.sum(0)
      means_VL = (jnp.matmul(onehot_XV.T, x_XL, precision=jax.lax.Precision.HIGHEST)
                  / jnp.maximum(counts_V, 1.0)[:, None])
      # An empty cluster keeps its centre.
      return jnp.where(counts_V[:, None] > 0, means_VL, c_VL)

    centres_VL = jax.lax.fori_loop(0, iterations, lloyd, centres_VL)
    if self.normalize:
      centres_VL = _l2_normalize(centres_VL)
    self.codebook[...] = jnp.where(where, centres_VL.astype(self.codebook.dtype),
                                   self.codebook[...])
    self.usage[...] = jnp.where(where, 1.0 / v, self.usage[...])

  def dead_codes(self) -> jax.Array:
    """Boolean (V,): codes whose usage EMA is below the dead-code threshold."""
    return self.usage[...] < self.dead_code_threshold / self.num_codes

  def restart_dead_codes(self, candidates_XL: jax.Array, key: jax.Array) -> jax.Array:
    """Moves every dead code onto a candidate latent (drawn as `restart_sampling` says);
    returns how many moved.

    Candidates are encoder outputs of the current batch (e.g. the tokenizer's 'z'), so a
    restarted code lies where the encoder actually puts latents and will be chosen again.
    Restarted codes get the uniform usage 1/V, which gives them time to be picked before
    they could count as dead again; live codes and their usage are left bit-identical.
    Traceable: call it inside jit (e.g. every few hundred steps). The optimizer's moments
    of a restarted row are kept; Adam's normalisation makes that harmless.

    Args:
      candidates_XL: latents with any leading axes; their last axis is L.
      key: PRNG key choosing the candidates.

    Returns:
      int32 scalar, the number of codes restarted.
    """
    candidates_XL = jax.lax.stop_gradient(candidates_XL).reshape(-1, candidates_XL.shape[-1])
    num_candidates = candidates_XL.shape[0]
    dead_V = self.dead_codes()
    if self.restart_sampling == "distance" and num_candidates >= self.num_codes:
      x_XL = candidates_XL.astype(jnp.float32)
      if self.normalize:
        x_XL = _l2_normalize(x_XL)
      d_X = jnp.maximum(jnp.min(_code_distances(x_XL, self.codes()), axis=-1)
                        + jnp.sum(jnp.square(x_XL), -1), 0.0)
      # Gumbel top-k: V distinct rows drawn in proportion to d (without replacement).
      scores_X = jnp.log(d_X + 1e-12) + jax.random.gumbel(key, d_X.shape)
      ranked_V = jax.lax.top_k(scores_X, self.num_codes)[1]
      # The k-th dead code takes the k-th draw, so a single dead code gets the first.
      rows_V = ranked_V[jnp.maximum(jnp.cumsum(dead_V) - 1, 0)]
    else:
      rows_V = jax.random.choice(key, num_candidates, (self.num_codes,),
                                 replace=num_candidates < self.num_codes)
    new_VL = candidates_XL[rows_V].astype(self.codebook.dtype)
    self.codebook[...] = jnp.where(dead_V[:, None], new_VL, self.codebook[...])
    self.usage[...] = jnp.where(dead_V, 1.0 / self.num_codes, self.usage[...])
    return jnp.sum(dead_V.astype(jnp.int32))
