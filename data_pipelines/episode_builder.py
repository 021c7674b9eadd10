"""The record format shared by every dataset: episodes cut into chunks, stored as ArrayRecord.

A record is one chunk of one episode:

  frames      uint8  (L, H, W, 3)  zlib-compressed tensor
  actions     int32  (L,)          actions[t] was applied at frame t and produced frame t+1;
                                   ACTION_UNKNOWN (-1) on the last frame of an episode and
                                   everywhere for data without actions (videos)
  episode_id  int64               unique over all splits of a dataset
  start       int32               index of frames[0] within its episode

Chunks are `chunk_len` frames; an episode's last chunk may be shorter but is dropped when
shorter than `min_chunk_len`. Records are stored in generation order, and the length of every
chunk is kept in `builder.info.metadata['chunk_lengths'][split]`, so a reader can index all
clips of a split without reading a single record.

Builders derive from `EpisodeDatasetBuilder`, which is a `tfds.core.ShardBasedBuilder` rather
than a `GeneratorBasedBuilder`: the latter funnels every example through TFDS's shuffler,
which spills to disk through `tf.io.gfile` above 1 GB (TensorFlow is not a dependency) and,
with shuffling disabled, would sort the whole split in memory. Shard-based generation streams
each shard straight into its ArrayRecord file, in order, without TensorFlow.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import itertools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

TRAIN = "train"
VALIDATION = "validation"
SPLITS = (TRAIN, VALIDATION)

# The action recorded where none is known: the last frame of an episode, and video data.
ACTION_UNKNOWN = -1


def generation_field(default: Any, short: str | None, *, named_if_default: bool = True) -> Any:
  """A config field; `short` is its key in the config name, None keeps it out of the name.

  named_if_default=False leaves the field out of the name while it holds its default: a
  field added later then keeps the names (and the data) of what was generated before it.
  """
  return dataclasses.field(default=default,
                           metadata={"short": short, "named_if_default": named_if_default})


@dataclasses.dataclass(eq=False, kw_only=True)
class EpisodeConfig(tfds.core.BuilderConfig):
  """Generation parameters common to all datasets.

  Unless given, the config name is made of the generation parameters (e.g.
  "img64_chunk160_min16_seed0_train200_val20_len160"), and it is a directory of the generated
  dataset: data generated with other parameters is never silently reused.
  """

  name: str = ""
  image_size: int = generation_field(64, "img")
  chunk_len: int = generation_field(160, "chunk")
  min_chunk_len: int = generation_field(16, "min")
  seed: int = generation_field(0, "seed")

  def __post_init__(self):
    if not self.name:
      self.name = generation_name(self)

  def generation_fields(self) -> dict[str, Any]:
    """Fields that determine the generated data, in declaration order."""
    base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in base}


def common_config_kwargs(data_config: Any) -> dict[str, Any]:
  """The `EpisodeConfig` fields, from `config.data`."""
  return dict(image_size=int(data_config.image_size), chunk_len=int(data_config.chunk_len),
              min_chunk_len=int(data_config.min_chunk_len), seed=int(data_config.seed))


def generation_name(config: EpisodeConfig) -> str:
  """A readable, filesystem-safe config name made of the config's generation parameters."""
  parts = []
  for field in dataclasses.fields(config):
    short = field.metadata.get("short")
    if short is None:
      continue
    value = getattr(config, field.name)
    if not field.metadata.get("named_if_default", True) and value == field.default:
      continue
    parts.append(f"{short}{value:g}" if isinstance(value, float) else f"{short}{value}")
  name = "_".join(parts)
  if not re.fullmatch(r"[\w.-]+", name):
    raise ValueError(f"Generation parameters give an unusable config name: {name!r}")
  return name


@dataclasses.dataclass
class Episode:
  """One episode, as produced by a dataset's episode stream.

  Attributes:
    episode_id: unique over all splits of the dataset.
    frames: frames_THWC as an array, or an iterable of frame_HWC arrays (long videos are
      chunked while being read, never held whole).
    actions_T: int actions, actions_T[t] applied at frame t; None where unknown.
  """

  episode_id: int
  frames: np.ndarray | Iterable[np.ndarray]
  actions_T: np.ndarray | None = None


def chunk_episode(
    episode: Episode, *, chunk_len: int, min_chunk_len: int, image_size: int,
) -> Iterator[dict[str, Any]]:
  """Cuts an episode into records of at most `chunk_len` frames (see module docstring)."""
  frame_shape = (image_size, image_size, 3)

  def make_record(start: int, frames_THWC: np.ndarray, end_of_episode: bool) -> dict:
    n = len(frames_THWC)
    if episode.actions_T is None:
      actions_T = np.full((n,), ACTION_UNKNOWN, np.int32)
    else:
      actions_T = np.asarray(episode.actions_T[start:start + n], np.int32).copy()
      if len(actions_T) != n:
        raise ValueError(f"Episode {episode.episode_id}: fewer actions than frames.")
    if end_of_episode:
      # No frame follows the last one, so no action can have produced it.
      actions_T[-1] = ACTION_UNKNOWN
    if frames_THWC.shape[1:] != frame_shape or frames_THWC.dtype != np.uint8:
      raise ValueError(f"Episode {episode.episode_id}: frames {frames_THWC.dtype}"
                       f"{frames_THWC.shape}, expected uint8 (T, {image_size}, {image_size}, 3).")
    return {"frames": frames_THWC, "actions": actions_T,
            "episode_id": np.int64(episode.episode_id), "start": np.int32(start)}

  if isinstance(episode.frames, np.ndarray):
    num_frames = len(episode.frames)
    for start in range(0, num_frames, chunk_len):
      frames_THWC = episode.frames[start:start + chunk_len]
      if len(frames_THWC) >= min_chunk_len:
        yield make_record(start, frames_THWC, start + chunk_len >= num_frames)
    num_seen = num_frames
  else:
    # Streams: a chunk is only known to be the episode's last once the next frame is missing.
    frames = iter(episode.frames)
    start, pending = 0, list(itertools.islice(frames, chunk_len))
    while pending:
      following = list(itertools.islice(frames, chunk_len))
      if len(pending) >= min_chunk_len:
        yield make_record(start, np.stack(pending), not following)
      start, pending = start + len(pending), following
    num_seen = start
  if episode.actions_T is not None and len(episode.actions_T) != num_seen:
    raise ValueError(f"Episode {episode.episode_id}: {len(episode.actions_T)} actions for "
                     f"{num_seen} frames.")


class EpisodeDatasetBuilder(tfds.core.ShardBasedBuilder, skip_registration=True):
  """Base of the genie_jax datasets: episodes from `_episodes`, chunked into records.

  Subclasses set `NUM_ACTIONS`/`ACTION_NAMES`, implement `_episodes` and, unless their config
  has num_train_episodes/num_val_episodes, `_num_episodes`.
  Shards hold `EPISODES_PER_SHARD` consecutive episodes of the split's episode stream; shards
  are written one after the other in this process, so a stream (e.g. a vectorised
  environment) may carry its state from one shard to the next.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  NUM_ACTIONS: int = 0
  ACTION_NAMES: tuple[str, ...] = ()
  EPISODES_PER_SHARD: int = 100
  DESCRIPTION: str = ""

  builder_config: EpisodeConfig

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=invalid-overridden-method
    # TFDS's own lookup imports the `importlib_resources` backport, which it only declares as
    # a dependency for Python < 3.9.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    features = tfds.features.FeaturesDict({
        # zlib: frames of rendered worlds compress well, and decoding needs no TensorFlow.
        "frames": tfds.features.Tensor(shape=(None, size, size, 3), dtype=np.uint8,
                                       encoding=tfds.features.Encoding.ZLIB),
        "actions": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "episode_id": tfds.features.Scalar(dtype=np.int64),
        "start": tfds.features.Scalar(dtype=np.int32),
    })
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, features=features,
        metadata=tfds.core.MetadataDict())

  @classmethod
  @abc.abstractmethod
  def config_from_data_config(cls, data_config: Any) -> EpisodeConfig:
    """The builder config described by `config.data` (see data_pipelines.registry)."""

  def _num_episodes(self, split: str) -> int:
    """How many episodes `_episodes(split)` yields; by default from the config's
    num_train_episodes / num_val_episodes (generated datasets)."""
    config = self.builder_config
    return len(split_episode_ids(config.num_train_episodes, config.num_val_episodes)[split])

  @abc.abstractmethod
  def _episodes(self, split: str) -> Iterator[Episode]:
    """Yields the split's episodes, deterministically for the builder config."""

  def _shard_iterators_per_split(
      self, dl_manager: tfds.download.DownloadManager,
  ) -> dict[str, list[Callable[[], Iterator[tuple[int, dict]]]]]:
    del dl_manager  # Nothing is downloaded.
    config = self.builder_config
    if not 1 <= config.min_chunk_len <= config.chunk_len:
      raise ValueError(f"Need 1 <= min_chunk_len ({config.min_chunk_len}) <= chunk_len "
                       f"({config.chunk_len}).")
    metadata = self.info.metadata
    metadata.update(
        num_actions=self.NUM_ACTIONS, action_names=list(self.ACTION_NAMES),
        generation=config.generation_fields(),
        chunk_lengths={}, num_episodes={}, num_frames={})
    shard_fns = {}
    for split in SPLITS:
      num_episodes = self._num_episodes(split)
      if num_episodes <= 0:
        raise ValueError(f"{self.name}: split {split!r} would have no episodes.")
      # The metadata lists are filled while the shards are written, in record order.
      metadata["chunk_lengths"][split] = []
      metadata["num_episodes"][split] = 0
      metadata["num_frames"][split] = 0
      episodes = self._episodes(split)
      num_shards = math.ceil(num_episodes / self.EPISODES_PER_SHARD)
      shard_fns[split] = [
          _ShardExamples(self, split, episodes, self._shard_size(num_episodes, i),
                         last=i == num_shards - 1)
          for i in range(num_shards)]
    return shard_fns

  def _shard_size(self, num_episodes: int, shard_index: int) -> int:
    return min(self.EPISODES_PER_SHARD, num_episodes - shard_index * self.EPISODES_PER_SHARD)


class _ShardExamples:
  """Callable giving one shard's examples: the next `num_episodes` episodes of a stream."""

  def __init__(self, builder: EpisodeDatasetBuilder, split: str, episodes: Iterator[Episode],
               num_episodes: int, last: bool):
    self._builder = builder
    self._split = split
    self._episodes = episodes
    self._num_episodes = num_episodes
    self._last = last

  def __call__(self) -> Iterator[tuple[int, dict[str, Any]]]:
    config = self._builder.builder_config
    metadata = self._builder.info.metadata
    lengths = metadata["chunk_lengths"][self._split]
    for episode in itertools.islice(self._episodes, self._num_episodes):
      num_chunks = 0
      for record in chunk_episode(episode, chunk_len=config.chunk_len,
                                  min_chunk_len=config.min_chunk_len,
                                  image_size=config.image_size):
        n = len(record["frames"])
        lengths.append(n)
        metadata["num_frames"][self._split] += n
        num_chunks += 1
        yield len(lengths) - 1, record
        # TFDS's ShardWriter tees the example iterator to count it afterwards, which keeps
        # every example of the shard alive; this one is serialized by now, so free its arrays.
        record.clear()
      if num_chunks:
        metadata["num_episodes"][self._split] += 1
      else:
        logging.warning("%s/%s: episode %d is shorter than min_chunk_len=%d; dropped.",
                        self._builder.name, self._split, episode.episode_id,
                        config.min_chunk_len)
    if self._last and not lengths:
      raise ValueError(f"{self._builder.name}: split {self._split!r} got no records; all its "
                       f"episodes are shorter than min_chunk_len={config.min_chunk_len}.")


def split_summary(builder: tfds.core.DatasetBuilder) -> dict[str, dict[str, int]]:
  """Records, episodes and frames per split of a prepared dataset."""
  metadata = builder.info.metadata
  return {split: {"records": builder.info.splits[split].num_examples,
                  "episodes": metadata["num_episodes"][split],
                  "frames": metadata["num_frames"][split]}
          for split in SPLITS}


def episode_seed(seed: int, episode_id: int) -> np.random.SeedSequence:
  """Independent random stream of one episode: it depends on nothing but (seed, episode)."""
  return np.random.SeedSequence([seed, episode_id])


def split_episode_ids(num_train: int, num_val: int) -> dict[str, Sequence[int]]:
  """Episode ids of each split: train first, then validation; disjoint by construction."""
  return {TRAIN: range(num_train), VALIDATION: range(num_train, num_train + num_val)}
