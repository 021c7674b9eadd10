r"""Stage 3: MaskGIT dynamics model on a trained tokenizer and LAM.

Genie App. F (CoinRun case study) shapes by default: 12 ST blocks, d_model 512, 8 heads,
batch 36 x 16 frames, 200k steps, AdamW b1=b2=0.9, lr 3e-5 -> 3e-6, warmup 5k. The tokenizer
and the LAM are rebuilt from the configs saved in their workdirs; the codebook size, tokens
per frame and number of actions come from there.

Arguments (after the colon, comma separated):
  tokenizer_workdir=DIR, lam_workdir=DIR    the trained stages 1 and 2 (required)
  data=builtin_world|coinrun|video_folder   dataset (default builtin_world)
  size=appf|cpu|tiny                        model size (appf = the paper's App. F shapes)
  runlocal                                  a CPU-sized run: size=cpu unless given, small
                                            batch, short schedule, frequent logs
  conditioning=additive|prepend             how actions enter (Genie adds; Jasmine prepends)
  cotrain                                   train the LAM on, with its own loss, alongside

Examples:
  # After configs/tokenizer.py:runlocal and configs/lam.py:runlocal (README "Results": wall-clock):
  python -m genie_jax.cli.train --config=configs/dynamics.py:runlocal,tokenizer_workdir=workdirs/tok,lam_workdir=workdirs/lam \
      --workdir=workdirs/dyn
  # CoinRun at App. F shapes on an accelerator:
  python -m genie_jax.cli.train --config=configs/dynamics.py:data=coinrun,tokenizer_workdir=workdirs/tok_cr,lam_workdir=workdirs/lam_cr \
      --workdir=workdirs/dyn_cr
"""

import ml_collections

import data_pipelines
from genie_jax import config_lib
from genie_jax.models import dynamics as dynamics_lib

# Model sizes. `tiny` is for tests.
SIZES = {
    "appf": dict(),
    "cpu": dict(num_layers=2, d_model=128, num_heads=4),
    "tiny": dict(num_layers=1, d_model=32, num_heads=2),
}


def world_model_config(stage: str, args) -> ml_collections.ConfigDict:
  """What every world-model stage's config holds besides its model: the trainer's settings
  at Genie App. F (CoinRun) scale, the stages it builds on (by workdir; step 0 = their latest
  checkpoint; their model configs filled in when training starts: leave them empty, and
  config.json keeps them, so that its workdir alone rebuilds every model) and the data."""
  config = config_lib.base_config()
  config.stage = stage
  config.batch_size = 36
  config.total_steps = 200_000
  config.optimizer.lr = 3e-5
  config.optimizer.end_lr = 3e-6
  config.optimizer.warmup_steps = 5_000
  for name in ("tokenizer", "lam"):
    config[f"{name}_workdir"] = args[f"{name}_workdir"]
    config[f"{name}_step"] = 0
    config[f"{name}_model"] = ml_collections.ConfigDict()
  config.data = data_pipelines.default_data_config(args.data)
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The dynamics config for `arg` (see the module docstring)."""
  args = config_lib.parse_arg(arg, tokenizer_workdir="", lam_workdir="", data="builtin_world",
                              size="", runlocal=False, conditioning="additive", cotrain=False)
  size = config_lib.model_size(args, SIZES)

  config = world_model_config("dynamics", args)
  config.cotrain_lam = args.cotrain
  config.lam_loss_weight = 1.0
  # Largest fraction of the visible context tokens replaced by random codes in training
  # (against rollouts that copy their own errors forward; genie_jax/tasks/dynamics.py).
  # 0: Genie's clean context (README, "Results", compares rates).
  config.context_noise = 0.0
  # The training mask (genie_jax/tasks/dynamics.py, sample_mask): what draws its own rate
  # ('example', Genie; 'frame'; 'suffix'; or 'alternate') and the lowest rate, up to 1.
  config.mask_rate_per = "example"
  config.min_mask_rate = 0.5
  # Cross-entropy of each masked token weighted by its code's batch frequency^-alpha
  # (genie_jax/tasks/dynamics.py, rarity_weights); 0: Genie's plain cross-entropy.
  config.rare_token_weight = 0.0
  # Sampling adds rare_token_weight * log(code frequency) to the logits, which takes back
  # what the weighting does to the predicted probabilities (genie_jax/inference/genie.py,
  # sampling_prior_weight).
  config.unbias_sampling = True

  config.model = dynamics_lib.default_config()
  config.model.update(SIZES[size])
  # Follows an override of data.clip_len (see configs/tokenizer.py).
  config.model.max_frames = config.data.get_ref("clip_len").identity()
  config.model.action_conditioning = args.conditioning

  # Teacher-forced accuracy, rollouts against the truth, Genie's Delta_t PSNR, LAM vs true
  # actions (genie_jax/evaluators/controllability.py). Genie samples with 25 MaskGIT steps at
  # temperature 1 on CoinRun.
  config.evals.controllability = ml_collections.ConfigDict(dict(
      type="controllability", split="validation", batch_size=0, num_batches=8, horizon=0,
      dt=4, maskgit_steps=25, temperature=1.0, seed=0, num_videos=4))

  if args.runlocal:
    # Argmax sampling: a CPU-sized model's sampled tokens drift from the scene within a few
    # frames, with either actions, and bury the actions' effect (README, "Results", the
    # temperatures compared on one checkpoint).
    config.evals.controllability.update(num_batches=4, maskgit_steps=8, temperature=0.0)
    # Rotary row/column positions in spatial attention: a move scrolls the view, and a
    # CPU-sized model learns "the token one cell over" faster by relative offset than from
    # a table of absolute places (README, "Results").
    config.model.spatial_rope = True
    # Temporal before spatial attention in each block: a 2-block model then has two ways to
    # read "the token one cell over, one frame back" instead of one (README, "Results").
    config.model.block_order = "temporal_first"
    # Every other frame whole: under Genie's mask a frame's previous frame is as hidden as
    # it is, so what moves by itself (the built-in world's balls) has no whole past frame to
    # be predicted from (README, "Results").
    config.mask_rate_per = "alternate"
    # Rare codes weigh more in the loss (frequency^-0.5; sampling takes the weighting's bias
    # back, unbias_sampling): the built-in world's coins and balls take few tokens, and in a
    # plain cross-entropy they weigh next to nothing (README, "Results").
    config.rare_token_weight = 0.5
    # Peak learning rate: temporal-first blocks learn the built-in world's scroll within the
    # short schedule at this rate (README, "Results", compares rates).
    config_lib.apply_runlocal(config, args.data, total_steps=500, lr=1e-3, end_lr=1e-4,
                              warmup_steps=50)
  return config
