"""Trainer defaults shared by every stage's config, config-argument parsing, and a workdir's
config.json (written by training, read by every later stage and by evaluation and play).

Stage configs (configs/<stage>.py) start from `base_config()` and fill in `stage`, `model`,
`data` and `evals`. The result is locked, so `--config.<key>=...` with a misspelt key fails.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections

from genie_jax import paths
from genie_jax import sharding
from genie_jax.training import optim


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'runlocal,variant=x' style config arguments (big_vision convention).

  A bare word sets a boolean to True; `key=value` takes the type of the default.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    parsed[key] = True if not value else typed_like(defaults[key], value)
  return parsed


def typed_like(default, value: str):
  """`value` (command-line text) as the type of `default`: '1'/'true'/'yes' for a bool."""
  if isinstance(default, bool):
    return value.lower() in ("1", "true", "yes")
  return value if default is None else type(default)(value)


def model_size(args: ml_collections.ConfigDict, sizes: dict[str, dict]) -> str:
  """The `size=` config argument, by default 'cpu' with `runlocal` and 'appf' without."""
  size = args.size or ("cpu" if args.runlocal else "appf")
  if size not in sizes:
    raise ValueError(f"config argument size={size!r}; choose one of {sorted(sizes)}")
  return size


def apply_runlocal(config: ml_collections.ConfigDict, data_name: str, *, total_steps: int,
                   lr: float, warmup_steps: int, end_lr: float | None = None) -> None:
  """What `runlocal` means for every stage: a CPU-sized batch and schedule, frequent logs,
  pictures, evaluations and checkpoints, (coinrun) 300 + 20 episodes instead of ~10M
  frames (their size and generation time: README "Tokenizer alone"), and (builtin_world)
  32x32 frames.

  32x32 built-in-world frames keep what the models must learn (the world scales its sprites
  and moves with the frame size) while each patch holds 4x fewer pixels, so CPU-sized models
  with the same token counts learn it in fewer steps. Stage configs pick patch sizes to suit.
  """
  config.batch_size = 8
  config.total_steps = total_steps
  config.optimizer.lr = lr
  if end_lr is not None:
    config.optimizer.end_lr = end_lr
  config.optimizer.warmup_steps = warmup_steps
  config.log_every_steps = 10
  every = max(total_steps // 2, 1)
  config.images_every_steps = every
  config.eval_every_steps = every
  config.checkpoint.every_steps = every
  if data_name == "coinrun":
    config.data.num_train_episodes = 300
    config.data.num_val_episodes = 20
  if data_name == "builtin_world":
    config.data.image_size = 32


def base_config() -> ml_collections.ConfigDict:
  """Everything the shared trainer reads, with production defaults."""
  config = ml_collections.ConfigDict()
  config.stage = ""
  config.seed = 0
  config.batch_size = 48  # Global, across all devices and processes.
  # Each step's batch in this many equal parts, one after the other, their gradients averaged
  # into one update (`train_state.accumulate`): less memory per step for the same batch.
  config.microbatches = 1
  config.total_steps = 300_000

  # Mesh axes (outer to inner) and the logical-axis rules: DP, FSDP or TP is the mesh shape.
  config.mesh = sharding.default_mesh_shape()
  # Multi-slice jobs: config.mesh is one slice's mesh (ICI) and mesh_dcn the mesh of slices
  # (DCN); each axis has size mesh * mesh_dcn. All ones: one slice.
  config.mesh_dcn = sharding.single_device_mesh_shape()
  config.sharding = ml_collections.ConfigDict()
  config.sharding.rules = [list(rule) for rule in sharding.DEFAULT_RULES]

  config.optimizer = optim.default_config()

  config.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1000, max_to_keep=3, keep_period=0, async_save=True,
      # On SIGTERM the trainer checkpoints and exits with this status (0: a finished job to
      # the scheduler; e.g. 143 to have it restart the job). Several processes without JAX's
      # preemption service agree on the step every `preemption_check_every_steps`.
      preemption_exit_code=0, preemption_check_every_steps=10))
  # A non-finite loss or gradient norm: "stop" (raise, naming the step; the last checkpoint
  # is finite) or "skip" (drop that update on device; counted in train/skipped_updates).
  config.nonfinite = "stop"

  config.log_every_steps = 50
  config.images_every_steps = 2000
  config.num_images = 4
  config.eval_every_steps = 5000
  config.evals = ml_collections.ConfigDict()
  # A jax.profiler trace of the train steps start_step + 1 .. start_step + num_steps (the
  # updates made from state start_step on) into WORKDIR/profile, for TensorBoard's profile
  # plugin or xprof; num_steps=0: none. Process 0 only, unless all_processes.
  config.profile = ml_collections.ConfigDict(dict(start_step=10, num_steps=0,
                                                  all_processes=False))
  # Weights & Biases beside TensorBoard (process 0; needs the wandb package: the [wandb]
  # extra). mode "offline" writes each job's run under WORKDIR/wandb for `wandb sync`, one
  # group per workdir. Empty strings: W&B's defaults; name: the workdir's last two folders.
  config.wandb = ml_collections.ConfigDict(dict(
      enabled=False, mode="online", project="genie_jax", entity="", name="", group="",
      tags=[]))
  return config


# --- A workdir's config.json.

CONFIG_FILE = "config.json"


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON-compatible values (what config.json holds)."""
  return json.loads(config.to_json_best_effort())


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes workdir/config.json (process 0 only)."""
  if jax.process_index() != 0:
    return
  paths.write_text(paths.join(workdir, CONFIG_FILE),
                   json.dumps(config_to_dict(config), indent=2, sort_keys=True))


def read_saved(workdir: str) -> dict[str, Any] | None:
  """workdir/config.json as plain values, older configs' names renamed to today's; None
  where the workdir has none."""
  path = paths.path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  tree = json.loads(path.read_text())
  if "rules" in tree.get("sharding", {}):
    tree["sharding"]["rules"] = sharding.upgrade_rules(tree["sharding"]["rules"])
  return tree


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (`read_saved`), locked so that typos in
  overrides fail."""
  tree = read_saved(workdir)
  if tree is None:
    paths.check_bucket(workdir, "workdir")
    raise FileNotFoundError(
        f"{paths.path(workdir) / CONFIG_FILE} not found: {workdir!r} is not a genie_jax "
        "workdir (train there first, or pass the workdir that holds config.json and "
        "checkpoints/)")
  config = ml_collections.ConfigDict(tree)
  config.lock()
  return config
