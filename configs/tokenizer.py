r"""Stage 1: ST-ViViT VQ-VAE video tokenizer.

Genie App. F (CoinRun case study) shapes by default: 64x64 frames, 16-frame clips, patch 4,
d_model 512, 8 encoder + 8 decoder blocks, 8 heads, 1024 codes x 32, batch 48, 300k steps,
AdamW b1=b2=0.9, lr 3e-4, warmup 10k.

Arguments (after the colon, comma separated):
  data=builtin_world|coinrun|video_folder   dataset (default builtin_world, generated locally)
  size=appf|cpu|tiny                        model size (appf = the paper's App. F shapes)
  runlocal                                  a CPU-sized run: size=cpu unless given, small
                                            batch, short schedule, frequent logs and evals,
                                            and (coinrun) 300 + 20 episodes instead of ~10M
                                            frames
  quantizer=vq|kl                           discrete tokens (Genie) or continuous latents
                                            (for the diffusion dynamics stage)

Examples:
  # Default data, CPU-sized (the README's main job):
  python -m genie_jax.cli.train --config=configs/tokenizer.py:runlocal --workdir=workdirs/tok
  # CoinRun at App. F shapes on an accelerator:
  python -m genie_jax.cli.train --config=configs/tokenizer.py:data=coinrun --workdir=workdirs/tok_cr
"""

import ml_collections

import data_pipelines
from genie_jax import config_lib
from genie_jax.models import tokenizer as tokenizer_lib

# Model sizes. `cpu` trains to a recognisable reconstruction within minutes on 2 CPU cores;
# `tiny` is for tests.
SIZES = {
    "appf": dict(),
    "cpu": dict(patch_size=8, d_model=128, num_heads=4, enc_layers=2, dec_layers=2,
                num_codes=256),
    "tiny": dict(patch_size=8, d_model=32, num_heads=2, enc_layers=1, dec_layers=1,
                 num_codes=32, latent_dim=8),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The tokenizer config for `arg` (see the module docstring)."""
  args = config_lib.parse_arg(arg, data="builtin_world", size="", runlocal=False,
                              quantizer="vq")
  size = config_lib.model_size(args, SIZES)

  config = config_lib.base_config()
  config.stage = "tokenizer"

  config.data = data_pipelines.default_data_config(args.data)

  config.model = tokenizer_lib.default_config()
  config.model.update(SIZES[size])
  # Derived references, not copies: an override of data.image_size or data.clip_len (the
  # new-dataset recipe, README "Data") carries into the model; setting the model's own key
  # unlinks it and leaves the data's alone.
  config.model.image_size = config.data.get_ref("image_size").identity()
  config.model.max_frames = config.data.get_ref("clip_len").identity()
  config.model.quantizer = args.quantizer

  config.evals.reconstruction = ml_collections.ConfigDict(dict(
      type="reconstruction", split="validation", batch_size=0, num_batches=8, num_images=4))

  if args.runlocal:
    config_lib.apply_runlocal(config, args.data, total_steps=600, lr=1e-3, warmup_steps=100)
    if args.data == "builtin_world" and size != "tiny":
      # 32x32 frames (see apply_runlocal): patch 4 keeps the cpu size's 64 tokens per frame.
      config.model.patch_size = 4
    # A code that depends on the patch alone: content that moved or stayed keeps its token,
    # so the dynamics model predicts where tokens go, not how they are re-encoded (README,
    # "Results": code stability and PSNR against 'clip').
    config.model.encoder_context = "patch"
    # Short runs collapse onto a few codes early; a fast usage EMA restarts dead codes within
    # tens of steps instead of hundreds.
    config.model.code_usage_decay = 0.9
    # Dead codes restart on latents far from every code, where a rare content (a small
    # sprite) lies, rather than on the common floor (README, "Results": sprite codes).
    config.model.code_restart_sampling = "distance"
  return config
