r"""Stage 3, diffusion family: a diffusion-forcing dynamics model on the latents of a
continuous tokenizer (configs/tokenizer.py:...,quantizer=kl) and the actions of a LAM.

The same sizes, schedule and data as configs/dynamics.py (MaskGIT), so that the two families
compare at equal settings; the tokenizer and the LAM are rebuilt from their workdirs, and the
latent width, tokens per frame and number of actions come from there.

Arguments (after the colon, comma separated):
  tokenizer_workdir=DIR, lam_workdir=DIR    the trained stages 1 and 2 (required)
  data=builtin_world|coinrun|video_folder   dataset (default builtin_world)
  size=appf|cpu|tiny                        model size (appf = the MaskGIT stage's App. F)
  runlocal                                  a CPU-sized run (as configs/dynamics.py's)
  conditioning=additive|prepend             how actions (and noise levels) enter
  objective=velocity|x0                     what the model predicts (genie_jax/tasks/diffusion.py)
  shortcut=K                                a shortcut model (K a power of two >= 2):
                                            sampling in 1, 2, 4, ... or K steps per frame
                                            (0, the default: a plain flow)

Example:
  python -m genie_jax.cli.train --config=configs/tokenizer.py:runlocal,quantizer=kl --workdir=workdirs/ktok
  python -m genie_jax.cli.train --config=configs/lam.py:runlocal --workdir=workdirs/lam
  python -m genie_jax.cli.train --config=configs/diffusion.py:runlocal,tokenizer_workdir=workdirs/ktok,lam_workdir=workdirs/lam \
      --workdir=workdirs/diff
"""

import ml_collections

from configs import dynamics as dynamics_config
from genie_jax import config_lib
from genie_jax.models import diffusion as diffusion_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The diffusion dynamics config for `arg` (see the module docstring)."""
  args = config_lib.parse_arg(arg, tokenizer_workdir="", lam_workdir="", data="builtin_world",
                              size="", runlocal=False, conditioning="additive",
                              objective="velocity", shortcut=0)
  size = config_lib.model_size(args, dynamics_config.SIZES)

  config = dynamics_config.world_model_config("diffusion", args)

  config.model = diffusion_lib.default_config()
  config.model.update(dynamics_config.SIZES[size])
  # Follows an override of data.clip_len (see configs/tokenizer.py).
  config.model.max_frames = config.data.get_ref("clip_len").identity()
  config.model.action_conditioning = args.conditioning
  config.model.objective = args.objective
  config.model.shortcut_steps = int(args.shortcut)
  # The share of training frames left clean (level 0), as every generated frame's past is
  # at sampling (genie_jax/tasks/diffusion.py).
  config.clean_frame_fraction = 0.5

  # Rollouts against the truth, Delta_t PSNR, LAM vs true actions, as for the MaskGIT stage
  # (genie_jax/evaluators/controllability.py); sampling_steps Euler steps per frame, and
  # temperature the scale of each frame's starting noise.
  config.evals.controllability = ml_collections.ConfigDict(dict(
      type="controllability", split="validation", batch_size=0, num_batches=8, horizon=0,
      dt=4, sampling_steps=25, temperature=1.0, seed=0, num_videos=4))

  if args.runlocal:
    config.evals.controllability.update(num_batches=4, sampling_steps=8)
    # As the MaskGIT stage's runlocal (configs/dynamics.py gives the reasons).
    config.model.spatial_rope = True
    config.model.block_order = "temporal_first"
    config_lib.apply_runlocal(config, args.data, total_steps=500, lr=1e-3, end_lr=1e-4,
                              warmup_steps=50)
  if args.shortcut:
    # The finest steps the model learnt.
    config.evals.controllability.sampling_steps = int(args.shortcut)
  return config
