"""Test set-up: 8 fake CPU devices (before jax is imported) and small shared fixtures."""

import os

# Must precede any jax import: every test process sees 8 CPU devices, so sharded runs and
# single-device baselines (meshes over jax.devices()[:1]) can be compared in one process.
# LLVM's optimisation level 0 (XLA's HLO passes still run; the matmuls are library calls):
# the tests' programs are tiny, so compiling them costs more than running them.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Read when gcsfs is imported: its experimental file system would ask the Storage Control
# API (gRPC to Google, not the test server of tests/gcs_server.py) for every bucket's layout.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
# Most of the suite's time is XLA compiling the same tiny programs again: in test after test
# and in every subprocess a test starts (the CLIs, each process of a multi-process job). One
# persistent compilation cache for the session, inherited by those subprocesses, compiles
# each program once; a cache hit loads the same executable, so results are unchanged.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="genie_jax_tests_xla_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# pylint: disable=g-import-not-at-top,wrong-import-position
import json

import jax
import jax.numpy as jnp
import numpy as np

import pytest

from configs import genie as genie_config
from configs import tokenizer as tokenizer_config
from genie_jax import config_lib
from genie_jax import sharding
from genie_jax import tasks
from genie_jax.data import input_pipeline
from genie_jax.training import checkpointing
from genie_jax.training import pipeline
from genie_jax.training import train_state


def pytest_configure(config):
  # The suite runs near CI's time bound: every run names its slowest tests (--durations=N
  # on the command line overrides).
  if config.option.durations is None:
    config.option.durations = 15


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  """A TFDS data_dir shared by the tests that build the tiny builtin dataset."""
  return str(tmp_path_factory.mktemp("tfds"))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, **overrides):
  """Tiny tokenizer on a tiny builtin-world dataset (32x32 frames, 8-frame clips)."""
  config = tokenizer_config.get_config("size=tiny,runlocal")
  config.data.data_dir = data_dir
  config.data.image_size = 32
  config.data.clip_len = 8
  config.data.num_train_episodes = 8
  config.data.num_val_episodes = 4
  config.data.episode_len = 40
  config.model.image_size = 32
  config.model.max_frames = 8
  config.batch_size = 8
  config.total_steps = 6
  config.log_every_steps = 1
  config.images_every_steps = 3
  config.eval_every_steps = 3
  config.evals.reconstruction.num_batches = 1
  config.checkpoint.every_steps = 3
  config.checkpoint.max_to_keep = 5
  config.optimizer.warmup_steps = 2
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return config


def restore_setup(workdir):
  """(config, state spec on one device, training iterator) of a trained workdir, for
  restoring its checkpoints in process."""
  config = config_lib.load_config(workdir)
  task = tasks.get_task(config)
  spec = train_state.make_state_spec(
      task, config, sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]))
  iterator = iter(input_pipeline.make_dataset(config.data, "train", seed=config.seed,
                                              global_batch_size=config.batch_size))
  return config, spec, iterator


def read_metrics(workdir, key="train/loss"):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return {row["step"]: row[key] for row in rows if key in row}


# --- The tiny pipeline (configs/genie.py:runlocal,size=tiny at 32x32) ----------------------

# The pipeline's stages in training order, from the stages each builds on.
STAGES = pipeline.stage_names(genie_config.get_config("runlocal"))
IMAGE_SIZE, CLIP_LEN = 32, 8


def tiny_pipeline_overrides(data_dir):
  """{dotted config key: value} that turn configs/genie.py:runlocal,size=tiny into the tiny
  pipeline of these tests (applied in process, or passed as --config.KEY=VALUE flags)."""
  config = genie_config.get_config("runlocal,size=tiny")
  values = {}
  for stage in STAGES:
    # The LAM learns on shorter clips than the others, as in runlocal, so that evaluation and
    # generation must read its actions of longer clips in windows.
    clip_len = 4 if stage == "lam" else CLIP_LEN
    stage_values = {
        "data.data_dir": data_dir, "data.image_size": IMAGE_SIZE, "data.clip_len": clip_len,
        "data.num_train_episodes": 8, "data.num_val_episodes": 4, "data.episode_len": 40,
        "model.max_frames": clip_len, "batch_size": 8, "total_steps": 4,
        "log_every_steps": 2, "images_every_steps": 4,
        "eval_every_steps": 100,  # Evaluated once, by the pipeline.
        "checkpoint.every_steps": 4, "optimizer.warmup_steps": 1}
    if "image_size" in config[stage].model:
      stage_values["model.image_size"] = IMAGE_SIZE
    for name in config[stage].evals:
      stage_values[f"evals.{name}.num_batches"] = 1
    values.update({f"{stage}.{k}": v for k, v in stage_values.items()})
  # Sampled, not runlocal's argmax: the untrained model's rollouts then differ from clip to
  # clip and action to action, so the standard error below is measured, not zero.
  values.update({"dynamics.evals.controllability.maskgit_steps": 2,
                 "dynamics.evals.controllability.horizon": 5,
                 "dynamics.evals.controllability.temperature": 1.0})
  # A 4-step model reaches none of the built-in world's targets: thresholds no PSNR
  # difference in [-100, 100] dB and no NMI in [0, 1] can miss, and the others off.
  values.update({f"report.{k}": v for k, v in dict(
      num_batches=1, num_videos=2, min_dtpsnr=-100.0, max_dtpsnr_stderr_fraction=None,
      require_positive_curve=False, min_nmi=0.0, distinct_true_actions="",
      min_dtpsnr_true=-100.0, max_rollout_gap_db=100.0, rollout_gap_frames=4).items()})
  return values


def tiny_pipeline_config(data_dir):
  config = genie_config.get_config("runlocal,size=tiny")
  for key, value in tiny_pipeline_overrides(data_dir).items():
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


# --- Stage workdirs with random weights (no training) -----------------------------------


def tiny_data(config, data_dir=""):
  """The tiny built-in world at 32x32, 8-frame clips, in config.data."""
  config.data.data_dir = data_dir
  config.data.image_size = IMAGE_SIZE
  config.data.clip_len = CLIP_LEN
  config.data.num_train_episodes = 8
  config.data.num_val_episodes = 4
  config.data.episode_len = 40


def tiny_stage(module, arg=""):
  """A tiny stage config of configs/<stage>.py (`module`) on `tiny_data`."""
  config = module.get_config("size=tiny,runlocal" + (f",{arg}" if arg else ""))
  tiny_data(config)
  config.model.image_size = IMAGE_SIZE
  config.model.max_frames = CLIP_LEN
  config.checkpoint.async_save = False
  return config


def save_random_stage(workdir, config, seed):
  """A stage workdir as the trainer leaves it (config.json + a checkpoint of step 5), with
  random weights drawn on the host: no training, and no compiled init (fast)."""
  task = tasks.get_task(config)
  spec = train_state.make_state_spec(
      task, config, sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]))
  rng = np.random.default_rng(seed)

  def fill(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return np.zeros(x.shape, x.dtype)
    if x.ndim >= 2:  # Matrices, tables and codebooks, scaled by their leading axis.
      return (rng.standard_normal(x.shape) / np.sqrt(x.shape[0])).astype(x.dtype)
    return (1.0 + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)  # Scales, biases.

  state = jax.tree.map(fill, spec.abstract)
  config_lib.save_config(workdir, task.config)
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint, task.config)
  ckpt.save(5, jax.device_put(state, spec.shardings), force=True)
  ckpt.close()
  return state
