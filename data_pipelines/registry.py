"""From `config.data` to a prepared TFDS builder: defaults, builder configs, generation."""

from __future__ import annotations

import importlib
import os
import time
from typing import TYPE_CHECKING

import ml_collections
from absl import logging

if TYPE_CHECKING:
  # Only the builders need TFDS at run time: configs import this module without it.
  import tensorflow_datasets as tfds

# Dataset name -> (module, builder class). Imported on use, so that a dataset's dependencies
# are only needed when it is used.
_BUILDERS = {
    "builtin_world": ("data_pipelines.builtin_world.builder", "BuiltinWorld"),
    "coinrun": ("data_pipelines.coinrun.builder", "Coinrun"),
    "video_folder": ("data_pipelines.video_folder.builder", "VideoFolder"),
}
DATASET_NAMES = tuple(_BUILDERS)

# Per dataset: (num_train_episodes, num_val_episodes, episode_len).
_EPISODE_DEFAULTS = {
    # About 35k frames: quick to generate on a CPU.
    "builtin_world": (200, 20, 160),
    # Genie App. F: ~10M transitions, in episodes of the random policy's average length.
    "coinrun": (18_000, 500, 1000),
    # Episodes are the files in video_dir; episode_len caps frames per video (0: all).
    "video_folder": (0, 0, 0),
}


def default_data_config(name: str = "builtin_world") -> ml_collections.ConfigDict:
  """The `config.data` fields with their defaults for dataset `name`.

  Generation (see `get_builder`):
    name: one of DATASET_NAMES.
    data_dir: TFDS data_dir; a dataset lands in data_dir/name/<generation parameters>/1.0.0.
    image_size: frames are image_size x image_size RGB.
    chunk_len, min_chunk_len: frames per record; shorter episode tails are dropped.
    num_train_episodes, num_val_episodes, episode_len: episodes per split and frames per
      episode (coinrun: the maximum; video_folder: unused, and episode_len caps each video).
    seed: generation seed.
    video_dir, val_fraction: video_folder: the folder, and the fraction of files held out.
    coinrun_start_level, coinrun_num_levels: coinrun level seeds.
    coinrun_max_hold: coinrun: the random policy holds each action for 1 to this many steps
      (1, the default: a new action every step, as in Genie; README "Results" measures 8).
    builtin_world_max_hold: builtin_world: the random policy holds each action for 1 to
      this many steps (1: a new action every step; README "Results" measures both).
  Reading (see genie_jax.data.input_pipeline):
    clip_len: frames per training clip.
    worker_count: grain worker processes (0: read in the training process).
    read_threads: threads reading records in each process.
    prefetch: batches read ahead (at least read_threads, or threads sit idle).

  The returned dict is locked (a misspelt key is an error); overriding values is fine.
  """
  if name not in _BUILDERS:
    raise ValueError(f"Unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}.")
  num_train, num_val, episode_len = _EPISODE_DEFAULTS[name]
  c = ml_collections.ConfigDict()
  c.name = name
  c.data_dir = "./data"
  c.clip_len = 16
  c.image_size = 64
  c.chunk_len = 160
  c.min_chunk_len = 16
  c.num_train_episodes = num_train
  c.num_val_episodes = num_val
  c.episode_len = episode_len
  c.seed = 0
  c.video_dir = ""
  c.val_fraction = 0.1
  c.coinrun_start_level = 0
  c.coinrun_num_levels = 10_000
  c.coinrun_max_hold = 1
  c.builtin_world_max_hold = 8
  c.worker_count = 0
  c.read_threads = 4
  c.prefetch = 4
  c.lock()
  return c


def _builder_class(name: str) -> type[tfds.core.DatasetBuilder]:
  if name not in _BUILDERS:
    raise ValueError(f"config.data.name={name!r} is not a dataset; known: "
                     f"{', '.join(DATASET_NAMES)}.")
  module, cls = _BUILDERS[name]
  return getattr(importlib.import_module(module), cls)


def make_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The builder for `data_config`, whether or not its data exists (nothing is generated)."""
  for key in ("data_dir", "video_dir"):
    value = str(data_config.get(key, ""))
    if value.startswith("gs://"):
      # ArrayRecord files and videos are read through local file handles.
      raise ValueError(
          f"config.data.{key}={value!r}: datasets are not read from gs:// directly. Mount "
          "the bucket with Cloud Storage FUSE (gcsfuse; launch/tpu_vm.sh does it when "
          "DATA_BUCKET is set; on GKE, the Cloud Storage FUSE CSI driver) and pass the "
          f"mounted path, e.g. --config.data.{key}=/gcs/BUCKET/data. Workdirs may be gs:// "
          "paths.")
  cls = _builder_class(data_config.name)
  return cls(config=cls.config_from_data_config(data_config),
             data_dir=os.path.expanduser(data_config.data_dir), file_format="array_record")


def get_builder(
    data_config: ml_collections.ConfigDict,
    *,
    prepare: bool,
    process_index: int | None = None,
    poll_interval_s: float = 5.0,
    timeout_s: float | None = None,
) -> tfds.core.DatasetBuilder:
  """Returns the prepared builder of `config.data`, generating the dataset if asked.

  Args:
    data_config: `config.data` (see `default_data_config`).
    prepare: generate the dataset when it is missing; if False, a missing dataset is an error.
    process_index: this JAX process (default: jax.process_index()). Only process 0
      generates; the others wait until the dataset is complete on the shared data_dir.
    poll_interval_s: how often waiting processes look for the dataset.
    timeout_s: how long waiting processes wait (None: as long as it takes).

  Raises:
    FileNotFoundError: the dataset is missing and prepare is False, or never appeared.
  """
  builder = make_builder(data_config)
  if builder.is_prepared():
    return _verified(builder)
  where = (f"config.data.name={data_config.name!r} with config.data.data_dir="
           f"{data_config.data_dir!r} (looked for {builder.data_dir})")
  if not prepare:
    raise FileNotFoundError(
        f"Dataset not generated: {where}. Generate it with `python -m data_pipelines.build "
        f"--dataset={data_config.name} --data_dir={data_config.data_dir} ...` using the same "
        "generation parameters, or call get_builder(..., prepare=True).")
  if process_index is None:
    import jax  # pylint: disable=g-import-not-at-top  # Only multi-process runs need it.
    process_index = jax.process_index()
  if process_index == 0:
    logging.info("Generating %s into %s.", data_config.name, builder.data_dir)
    start = time.monotonic()
    builder.download_and_prepare()
    logging.info("Generated %s in %.1f s.", builder.data_dir, time.monotonic() - start)
  else:
    # TFDS writes into a temporary directory and renames it when complete, so the finished
    # files appearing under the final name means the dataset is whole.
    start = time.monotonic()
    while not builder.is_prepared():
      waited = time.monotonic() - start
      if timeout_s is not None and waited > timeout_s:
        raise FileNotFoundError(f"Process 0 did not generate the dataset in {timeout_s} s: "
                                f"{where}.")
      logging.log_every_n_seconds(logging.INFO, "Waiting %.0f s for process 0 to generate "
                                  "%s.", 60, waited, builder.data_dir)
      time.sleep(poll_interval_s)
  # A fresh builder reads the DatasetInfo (splits, metadata) that generation wrote.
  return _verified(make_builder(data_config))


def _verified(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  # Datasets made from the user's files check that those files did not change since.
  if hasattr(builder, "verify_source"):
    builder.verify_source()
  return builder
