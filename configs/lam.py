r"""Stage 2: latent action model (LAM).

Genie App. F (CoinRun case study) shapes by default: 64x64 frames, 16-frame clips, patch 16,
d_model 512, 8 encoder + 8 decoder blocks, 8 heads, 6 latent actions x 32, batch 36, 200k
steps, AdamW b1=b2=0.9, lr 3e-5 -> 3e-6 cosine, warmup 5k.

The decoder sees only frame t when predicting frame t+1 (config.model.decoder_context_frames
=1, not Genie's full past; see genie_jax/models/lam.py for why); set it to 0 for Genie's.

Arguments (after the colon, comma separated):
  data=builtin_world|coinrun|video_folder   dataset (default builtin_world, generated locally)
  size=appf|cpu|tiny                        model size (appf = the paper's App. F shapes)
  runlocal                                  a CPU-sized run: size=cpu unless given, small
                                            batch, short schedule, frequent logs and evals,
                                            and (coinrun) 300 + 20 episodes

Examples:
  # Default data, CPU-sized (a few minutes on 2 cores):
  python -m genie_jax.cli.train --config=configs/lam.py:runlocal --workdir=workdirs/lam
  # CoinRun at App. F shapes on an accelerator:
  python -m genie_jax.cli.train --config=configs/lam.py:data=coinrun --workdir=workdirs/lam_cr
"""

import ml_collections

import data_pipelines
from genie_jax import config_lib
from genie_jax.models import lam as lam_lib

# Model sizes. `cpu` is sized for a 2-core CPU; `tiny` is for tests.
SIZES = {
    "appf": dict(),
    "cpu": dict(d_model=128, num_heads=4, enc_layers=2, dec_layers=2),
    "tiny": dict(patch_size=8, d_model=32, num_heads=2, enc_layers=1, dec_layers=1,
                 latent_dim=8),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The LAM config for `arg` (see the module docstring)."""
  args = config_lib.parse_arg(arg, data="builtin_world", size="", runlocal=False)
  size = config_lib.model_size(args, SIZES)

  config = config_lib.base_config()
  config.stage = "lam"
  config.batch_size = 36
  config.total_steps = 200_000
  config.optimizer.lr = 3e-5
  config.optimizer.end_lr = 3e-6
  config.optimizer.warmup_steps = 5_000

  config.data = data_pipelines.default_data_config(args.data)

  config.model = lam_lib.default_config()
  config.model.update(SIZES[size])
  # References, as in configs/tokenizer.py: the model follows overrides of the data's.
  config.model.image_size = config.data.get_ref("image_size").identity()
  config.model.max_frames = config.data.get_ref("clip_len").identity()

  config.evals.latent_actions = ml_collections.ConfigDict(dict(
      type="latent_actions", split="validation", batch_size=0, num_batches=8, num_images=4))

  if args.runlocal:
    # 4-frame clips: more updates per CPU second than 16-frame ones (with
    # decoder_context_frames=1 the decoder never uses more than one past frame anyway).
    config.data.clip_len = 4
    # Cosine matching spreads the latents over the codes; squared L2 sends every latent to
    # the code of smallest norm at initialisation.
    config.model.vq_normalize = True
    config_lib.apply_runlocal(config, args.data, total_steps=3000, lr=1e-3, end_lr=1e-4,
                              warmup_steps=50)
    if size != "tiny":
      # App. F's patch for its frame size (16 at 64x64): 8 at the built-in world's 32x32,
      # two cells on a side, so a move shows inside each token pair; patch 4 (one cell, 4x
      # the tokens) buys far fewer steps in the same time (README, "Results").
      config.model.patch_size = config.data.get_ref("image_size") // 4
      # Rotary row/column angles in spatial attention: the decoder shifts the view by
      # "the token one over" whatever its place, so a direction in the latent pays off
      # early and the encoder keeps it apart from the other moves (README, "Results").
      config.model.spatial_rope = True
    if not args.size:
      # 48 transitions per batch: enough for the k-means that ends the quantiser warm-up.
      config.batch_size = 16
      # Genie's vocabulary for its main models: codes to spare beyond the built-in world's
      # 6 actions, so that two moves need not share one (README, "Results").
      config.model.num_actions = 8
      # Half the run continuous (see genie_jax/models/lam.py: without it CPU-sized LAMs
      # stay at chance), then quantised from k-means codes.
      config.model.vq_warmup_steps = config.total_steps // 2
      # A light commitment: a strong one (the usual 0.25) pulls every latent onto one code
      # soon after the warm-up ends, before the codes tell the moves apart (README, "Results").
      config.model.commitment_beta = 0.02
    # With 6 codes a collapse onto one is quick; a fast usage EMA restarts it within tens of
    # steps.
    config.model.code_usage_decay = 0.9
  return config
