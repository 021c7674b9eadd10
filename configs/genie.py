r"""The whole Genie pipeline: tokenizer -> LAM -> dynamics -> evaluation -> report.

One config holding the three stage configs (each exactly what configs/<stage>.py gives) and
the report settings. `python -m genie_jax.cli.pipeline` trains the stages in WORKDIR/tokenizer,
WORKDIR/lam and WORKDIR/dynamics (the dynamics config is pointed at the first two), then
evaluates them and writes WORKDIR/report/.

Arguments (after the colon, comma separated):
  data=builtin_world|coinrun|video_folder   dataset for all three stages (default builtin_world)
  runlocal                                  CPU-sized stages (README "Results": wall-clock)
  conditioning=additive|prepend             how the dynamics model takes actions
  size=appf|cpu|tiny                        model size of every stage (tiny is for tests)
  dynamics=maskgit|diffusion                the dynamics family: MaskGIT on VQ tokens (Genie),
                                            or diffusion forcing on a continuous tokenizer's
                                            latents (configs/diffusion.py)
  video_dir=PATH                            data=video_folder: the folder of videos, for
                                            every stage

Examples:
  # The README's main job: the whole pipeline on the built-in world, generated locally.
  python -m genie_jax.cli.pipeline --config=configs/genie.py:runlocal --workdir=workdirs/genie
  # The same on CoinRun (procgen, see data_pipelines/coinrun), whose tokenizer needs longer
  # (README "Data": the recipe for a new dataset):
  python -m genie_jax.cli.pipeline --config=configs/genie.py:runlocal,data=coinrun \
      --workdir=workdirs/genie_coinrun --config.tokenizer.total_steps=1500
  # Your videos (no actions needed): the recipe for a new dataset is in README "Data".
  python -m genie_jax.cli.pipeline --config=configs/genie.py:runlocal,data=video_folder,video_dir=./videos \
      --workdir=workdirs/genie_videos
  # Override any stage's key:
  ... --config.dynamics.total_steps=2000 --config.lam.model.num_actions=8
"""

import ml_collections

from configs import diffusion as diffusion_config
from configs import dynamics as dynamics_config
from configs import lam as lam_config
from configs import tokenizer as tokenizer_config
from genie_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The pipeline config for `arg` (see the module docstring)."""
  args = config_lib.parse_arg(arg, data="builtin_world", runlocal=False,
                              conditioning="additive", size="", video_dir="",
                              dynamics="maskgit")
  if args.dynamics not in ("maskgit", "diffusion"):
    raise ValueError(f"configs/genie.py: dynamics={args.dynamics!r}; expected 'maskgit' or "
                     "'diffusion'")
  stage_arg = f"data={args.data}" + (",runlocal" if args.runlocal else "")
  if args.size:
    stage_arg += f",size={args.size}"

  config = ml_collections.ConfigDict()
  diffusion = args.dynamics == "diffusion"
  config.tokenizer = tokenizer_config.get_config(
      stage_arg + (",quantizer=kl" if diffusion else ""))
  config.lam = lam_config.get_config(stage_arg)
  # The workdirs are filled in by the pipeline (WORKDIR/tokenizer, WORKDIR/lam).
  dynamics_module = diffusion_config if diffusion else dynamics_config
  config.dynamics = dynamics_module.get_config(f"{stage_arg},conditioning={args.conditioning}")

  config.report = ml_collections.ConfigDict(dict(
      # Evaluation batches per stage (0 = the whole validation split).
      num_batches=0,
      # Rollout GIFs written by genie_jax.cli.generate: how many clips, and with which actions.
      num_videos=4,
      # The report's checks. Each threshold's check is switched off by None (or, for a
      # number on the command line, where None cannot be written, by nan). The defaults are
      # the targets for the built-in world. When a check fails, `python -m
      # genie_jax.cli.pipeline` writes the whole report, logs the failed checks with their
      # measured values, then exits non-zero (unless fail_on_check=False).
      fail_on_check=True,
      # Genie's controllability metric, Delta_t PSNR at t = dt (controllability/dtpsnr), dB,
      # must reach this ...
      min_dtpsnr=1.0,
      # ... with its standard error over clips below this fraction of it (well above noise).
      max_dtpsnr_stderr_fraction=0.2,
      # Delta_t PSNR > 0 at every t = 1..horizon (controllability/dtpsnr_t<k>); False: off.
      require_positive_curve=True,
      # Datasets with true actions: the LAM's latent actions against them, as the dynamics
      # model uses them (controllability/nmi) ...
      min_nmi=0.5,
      # ... and these true actions (comma separated names; "" switches the check off) must
      # each get a different latent action most often (controllability/plurality_latent_*).
      # Names the dataset does not have are ignored with a warning.
      distinct_true_actions="noop,left,right,up,down",
      # Delta_t PSNR with the true actions mapped to latent ones (controllability/dtpsnr_true).
      min_dtpsnr_true=0.5,
      # Generated frames t = 1..rollout_gap_frames (inferred actions) within this many dB of
      # the tokenizer's own reconstruction at t = 1: recon_psnr_t1 - psnr_inferred_t<k>.
      # rollout_gap_frames=0 switches the check off too.
      max_rollout_gap_db=2.0,
      rollout_gap_frames=4,
  ))
  if args.runlocal:
    # 192 clips, for the report and for `genie_jax.cli.evaluate` on the dynamics workdir alike:
    # once the actions matter, Delta_t PSNR varies a lot from clip to clip, and the
    # standard-error check needs the clips (README, "Results").
    config.report.num_batches = 24
    config.dynamics.evals.controllability.num_batches = 24
    # The stages do not evaluate while training (the pipeline evaluates each once, after
    # it, for the report); wall-clock: README, "Results".
    config.tokenizer.total_steps = 500
    if not args.size:
      # A smaller codebook than the stage's own makes a world predictable in tokens for a
      # CPU-sized dynamics model (README, "Results").
      config.tokenizer.model.num_codes = 64
      # Most of the CPU budget goes to the dynamics model, the stage that learns slowest.
      config.dynamics.total_steps = 1500
    for stage in (config.tokenizer, config.lam, config.dynamics):
      stage.eval_every_steps = 0
      stage.images_every_steps = stage.total_steps
      stage.checkpoint.every_steps = 250
  if args.video_dir:
    for stage in (config.tokenizer, config.lam, config.dynamics):
      stage.data.video_dir = args.video_dir
  return config
