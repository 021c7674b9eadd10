"""Models: ST-transformer layers, vector quantiser, video tokenizer.

Parameters carry logical axis names (see `genie_jax.sharding`); the trainer turns them into
shardings itself and initialises under `jax.jit(..., out_shardings=...)`. Eager sharding is
switched off because it needs a mesh at construction time, which tests and eval_shape lack.
"""

from flax import nnx

nnx.use_eager_sharding(False)
