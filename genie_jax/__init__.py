"""genie_jax: Genie-style world models (tokenizer, latent actions, MaskGIT or diffusion
dynamics) in JAX.

Shape suffixes. Arrays are named with the letters of their axes, in order, after an
underscore: ``video_BTHWC`` is a batch of clips, ``z_BTNL`` their latents. One letter, one
meaning, everywhere in the project:

  B  batch (examples)                  N  tokens (patches) per frame
  T  time (frames) of the queries      M  tokens per frame in a transformer (N, or N + 1
                                          with a prepended action token)
  S  time on the attended (key) side   D  model width
  H  image height                      F  feed-forward width
  W  image width                       K  attention heads
  C  image channels                    E  width of one attention head
  P  pixels of one patch (p*p*C)       L  latent (codebook entry) width
  V  codebook size (token vocabulary)  A  latent-action vocabulary
  Q  the stacked q/k/v axis (3)        I  images: batch and time folded (B*T)
  R  rows of a picture grid            X  any leading axes (e.g. z_XL: latents of any shape)
  Y  rows of a grid of world cells     U  columns of a grid of world cells
  1  an axis of size 1 (e.g. caused_B1: one action per example)
  G  variants of the same examples, e.g. the action sets the controllability evaluator
     compares (inferred, random, true)
"""
