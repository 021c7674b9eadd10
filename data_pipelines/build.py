r"""Generates a dataset; flags left unset keep `default_data_config(dataset)`'s values.

  python -m data_pipelines.build --dataset=builtin_world --data_dir=./data
  python -m data_pipelines.build --dataset=coinrun --data_dir=./data \
      --num_train_episodes=100 --num_val_episodes=10 --episode_len=1000
  python -m data_pipelines.build --dataset=video_folder --data_dir=./data \
      --video_dir=~/my_videos --val_fraction=0.1

Training reads the dataset whose generation parameters match config.data; build it with the
same values as the training config (or let the trainer generate it).
"""

import time

from absl import app
from absl import flags

import data_pipelines
from data_pipelines import episode_builder

_DATASET = flags.DEFINE_enum("dataset", "builtin_world", data_pipelines.DATASET_NAMES,
                             "Dataset to generate.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir to write to.")
_INT_FLAGS = {
    name: flags.DEFINE_integer(name, None, help_)
    for name, help_ in [
        ("num_train_episodes", "Episodes in the train split."),
        ("num_val_episodes", "Episodes in the validation split."),
        ("episode_len", "Frames per episode (coinrun: at most; video_folder: per video, "
                        "0 for all)."),
        ("image_size", "Frame height and width."),
        ("chunk_len", "Frames per record."),
        ("min_chunk_len", "Shortest episode tail kept."),
        ("seed", "Generation seed."),
        ("coinrun_start_level", "First CoinRun level seed."),
        ("coinrun_num_levels", "Number of CoinRun level seeds."),
        ("coinrun_max_hold", "coinrun: longest run of one action (1, the default: a new "
                             "action every step)."),
        ("builtin_world_max_hold", "builtin_world: longest run of one action (1: a new "
                                   "action every step)."),
    ]
}
_VIDEO_DIR = flags.DEFINE_string("video_dir", None, "video_folder: folder of videos.")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", None,
                                   "video_folder: fraction of videos held out.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = data_pipelines.default_data_config(_DATASET.value)
  for name, flag in _INT_FLAGS.items():
    if flag.value is not None:
      config[name] = flag.value
  if _DATA_DIR.value is not None:
    config.data_dir = _DATA_DIR.value
  if _VIDEO_DIR.value is not None:
    config.video_dir = _VIDEO_DIR.value
  if _VAL_FRACTION.value is not None:
    config.val_fraction = _VAL_FRACTION.value

  start = time.monotonic()
  builder = data_pipelines.get_builder(config, prepare=True, process_index=0)
  print(f"{config.name}: {builder.data_dir} ({time.monotonic() - start:.1f} s)")
  for split, counts in episode_builder.split_summary(builder).items():
    print(f"  {split}: {counts['records']} records, {counts['episodes']} episodes, "
          f"{counts['frames']} frames")


if __name__ == "__main__":
  app.run(main)
