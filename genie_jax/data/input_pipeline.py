"""Grain input pipeline: fixed-length clips of episode chunks, per JAX process.

Training clips are drawn uniformly from ALL clips of a split: the pipeline indexes every
(chunk, start) pair, a chunk of L frames giving L - T + 1 clips of T = config.data.clip_len
frames, using the chunk lengths stored by data_pipelines in the dataset's metadata (no record
is read to build the index). Drawing one random start per chunk instead would over-sample
the frames of short chunks (episode tails, short CoinRun episodes), and would give epochs no
meaning; with the index, an epoch is every clip exactly once, and Grain's lazy global shuffle
of the index keeps this cheap (one searchsorted per clip, no per-clip table).

Batches come from a Grain MapDataset whose elements are whole local batches, so their
content does not depend on the number of reader threads or worker processes, and the
iterator state (`get_state`/`set_state`, or `grain.checkpoint.CheckpointSave`/`Restore`
inside an Orbax CheckpointManager) restores the exact stream.

Training: every JAX process computes the same sequence of global batches of clip indices and
reads only its rows of each (process p: rows [p*b, (p+1)*b)), so the global batches, and the
iterator state (the number of batches drawn), are the same for any number of processes: a
checkpoint written by N processes continues exactly in M. Evaluation likewise: global batch k
holds clips [k * G, (k + 1) * G) of the split and each process reads its rows of it, so every
process yields the same number of batches (the clips that do not fill the last one dropped, or
padded with rows of episode_id -1).

With config.data.worker_count > 0, Grain reads in spawned processes: the main script needs an
`if __name__ == "__main__":` guard, and a saved iterator state only restores into a pipeline
with the same worker_count.

Batch fields (b = global_batch_size / process_count):
  video       uint8 (b, T, H, W, C)
  actions     int32 (b, T)   actions[:, t] was taken at frame t (it produced frame t+1);
                             -1 where unknown (no action data, or the episode's last frame)
  episode_id  int64 (b,)     -1 marks padding rows (eval batches with drop_remainder=False)
  start       int32 (b,)     index of the clip's first frame within its episode
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Callable
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

import data_pipelines

PADDING_EPISODE_ID = -1


class RecordError(ValueError):
  """A record that cannot be read, or does not match the dataset's description."""


class UnknownSplitError(ValueError):
  """A split the dataset does not have."""


class _Records:
  """Random access to the chunks of one split: decoded, validated, errors name the file.

  A few decoded chunks are kept, because evaluation reads several clips of each chunk in a row.
  """

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str, lengths: np.ndarray,
               image_size: int, cache_size: int):
    self._source = builder.as_data_source(split)
    self._split = split
    self._lengths = lengths
    self.image_size = image_size
    self._cache_size = cache_size
    instructions = builder.info.splits[split].file_instructions
    self._files = [str(fi.filename) for fi in instructions]
    self._skips = np.array([fi.skip for fi in instructions], np.int64)
    self._ends = np.cumsum([fi.take for fi in instructions])
    self._init_cache()

  def _init_cache(self):
    self._cache: collections.OrderedDict[int, dict] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self):
    # Grain's worker processes receive a pickled pipeline; locks do not pickle.
    state = self.__dict__.copy()
    del state["_cache"], state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  def location(self, record: int) -> str:
    """'record <position> of <file>' for the split's record `record`."""
    shard = int(np.searchsorted(self._ends, record, side="right"))
    first = self._ends[shard - 1] if shard else 0
    position = int(self._skips[shard] + record - first)
    return f"record {position} of ArrayRecord file {self._files[shard]}"

  def __getitem__(self, record: int) -> dict[str, Any]:
    with self._lock:
      if record in self._cache:
        self._cache.move_to_end(record)
        return self._cache[record]
    example = self._read(record)
    with self._lock:
      self._cache[record] = example
      while len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    return example

  def _read(self, record: int) -> dict[str, Any]:
    try:
      example = self._source[record]
    except Exception as e:  # Any failure of reading/decoding is reported with its location.
      raise RecordError(f"Cannot read {self.location(record)} (index {record} of split "
                        f"{self._split!r}): {type(e).__name__}: {e}") from e
    s = self.image_size
    length = int(self._lengths[record])
    problems = []
    frames, actions = example.get("frames"), example.get("actions")
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.shape != (
        length, s, s, 3):
      problems.append(f"frames {_describe(frames)}, expected uint8 {(length, s, s, 3)}")
    if not isinstance(actions, np.ndarray) or actions.dtype != np.int32 or actions.shape != (
        length,):
      problems.append(f"actions {_describe(actions)}, expected int32 {(length,)}")
    if problems:
      raise RecordError(f"Bad {self.location(record)} (index {record} of split "
                        f"{self._split!r}): {'; '.join(problems)}.")
    return example


def _describe(x: Any) -> str:
  if isinstance(x, np.ndarray):
    return f"{x.dtype}{x.shape}"
  return type(x).__name__


class _ClipSource:
  """Random-access source of clips: index i -> (chunk, start) over all usable chunks.

  Each chunk of L >= T frames gives (L - T) // stride + 1 clips starting at multiples of
  `stride`. Indices past the last clip (up to `pad_to`'s length) give padding clips.
  """

  def __init__(self, records: _Records, lengths: np.ndarray, clip_len: int, stride: int):
    self._records = records
    self._clip_len = clip_len
    self._stride = stride
    usable = lengths >= clip_len
    self._usable_chunks = np.flatnonzero(usable)
    clips_per_chunk = (lengths[usable] - clip_len) // stride + 1
    self._first_clip = np.concatenate([[0], np.cumsum(clips_per_chunk)]).astype(np.int64)
    self.num_clips = int(self._first_clip[-1])
    self._len = self.num_clips
    image_size = records.image_size
    self._padding = {
        "video": np.zeros((clip_len, image_size, image_size, 3), np.uint8),
        "actions": np.full((clip_len,), -1, np.int32),
        "episode_id": np.int64(PADDING_EPISODE_ID),
        "start": np.int32(0),
    }

  def __len__(self) -> int:
    return self._len

  def pad_to(self, length: int) -> None:
    """Indices up to `length` (>= num_clips), those past the last clip giving padding."""
    self._len = length

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"Clip {index} out of range [0, {self._len}).")
    if index >= self.num_clips:
      return self._padding
    r = int(np.searchsorted(self._first_clip, index, side="right")) - 1
    record = int(self._usable_chunks[r])
    offset = int(index - self._first_clip[r]) * self._stride
    example = self._records[record]
    t = slice(offset, offset + self._clip_len)
    return {
        "video": example["frames"][t],
        "actions": example["actions"][t],
        "episode_id": np.int64(example["episode_id"]),
        "start": np.int32(example["start"] + offset),
    }

  def __repr__(self) -> str:
    return (f"_ClipSource(clips={self.num_clips}, len={self._len}, clip_len={self._clip_len}, "
            f"stride={self._stride})")


def _process_share(global_batch_size: int, process_index: int | None,
                   process_count: int | None) -> tuple[int, int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"config.batch_size={global_batch_size} must be a positive multiple of "
                     f"the number of JAX processes ({process_count}).")
  return process_index, process_count, global_batch_size // process_count


def _open_split(data_config: ml_collections.ConfigDict, split: str,
                builder: tfds.core.DatasetBuilder | None) -> tuple[_Records, np.ndarray]:
  """Checks the dataset against config.data (reading no record) and opens `split`."""
  if builder is None:
    builder = data_pipelines.get_builder(data_config, prepare=False)
  where = f"dataset {builder.data_dir}"
  if split not in builder.info.splits:
    raise UnknownSplitError(f"Split {split!r} not in {where}; it has "
                            f"{list(builder.info.splits)}.")
  s = int(data_config.image_size)
  frame_shape = tuple(builder.info.features["frames"].shape)
  if frame_shape[1:] != (s, s, 3):
    raise ValueError(f"config.data.image_size={s} does not match {where}, whose frames are "
                     f"{frame_shape[1:]}; regenerate the dataset or fix config.data.image_size.")
  metadata = builder.info.metadata or {}
  if split not in metadata.get("chunk_lengths", {}):
    raise ValueError(f"{where} has no chunk lengths in its metadata.json: it was not written "
                     "by data_pipelines (or is incomplete); regenerate it.")
  lengths = np.asarray(metadata["chunk_lengths"][split], np.int64)
  if len(lengths) != builder.info.splits[split].num_examples:
    raise ValueError(f"{where}: metadata lists {len(lengths)} chunks for split {split!r}, the "
                     f"files hold {builder.info.splits[split].num_examples}; regenerate it.")
  clip_len = int(data_config.clip_len)
  if clip_len < 1 or not (lengths >= clip_len).any():
    longest = int(lengths.max()) if len(lengths) else 0
    raise ValueError(f"config.data.clip_len={clip_len}: no chunk of split {split!r} of {where} "
                     f"is that long (longest: {longest} frames; config.data.chunk_len="
                     f"{data_config.chunk_len}).")
  cache_size = max(2, int(data_config.read_threads) + 1)
  return _Records(builder, split, lengths, s, cache_size), lengths


def _to_iter_dataset(ds: grain.MapDataset,
                     data_config: ml_collections.ConfigDict) -> grain.IterDataset:
  # Elements are whole batches: threads and workers change speed, never content.
  prefetch = int(data_config.prefetch)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(data_config.read_threads),
                                            prefetch_buffer_size=prefetch))
  if data_config.worker_count > 0:
    if not flags.FLAGS.is_parsed():
      # Grain's worker processes read its absl flags; outside an absl app (tests, notebooks)
      # nothing parsed them, and their defaults are what an unparsed program would get.
      logging.info("Marking absl flags as parsed for Grain's worker processes.")
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(data_config.worker_count), per_worker_buffer_size=max(1, prefetch)))
  return it


def make_dataset(
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    seed: int,
    global_batch_size: int,
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    builder: tfds.core.DatasetBuilder | None = None,
) -> grain.IterDataset:
  """Training clips: this process's share of each global batch (see module docstring).

  Args:
    data_config: config.data.
    split: "train" or "validation".
    seed: shuffling seed, in [0, 2**32); each epoch is shuffled differently.
    global_batch_size: clips per step over all processes (config.batch_size).
    shuffle: shuffle the clips (else in dataset order: chunk by chunk, start by start).
    repeat: repeat forever (else one epoch, remainder dropped).
    process_index, process_count: this process's place (default: from JAX).
    builder: the prepared dataset (default: get_builder(data_config, prepare=False)).

  Returns:
    A grain.IterDataset of dicts of numpy arrays; its iterator is checkpointable.
  """
  process_index, process_count, local_batch = _process_share(global_batch_size, process_index,
                                                             process_count)
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
  records, lengths = _open_split(data_config, split, builder)
  clips = _ClipSource(records, lengths, int(data_config.clip_len), stride=1)
  if clips.num_clips < global_batch_size:
    raise ValueError(f"Split {split!r} has {clips.num_clips} clips, not enough for "
                     f"config.batch_size={global_batch_size}.")
  # Every process orders the clip *indices* of the global batches alike, then reads only its
  # rows: the global stream, and the iterator state, do not depend on the process count.
  ds = grain.MapDataset.range(clips.num_clips)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  ds = ds.batch(global_batch_size, drop_remainder=True)
  return _to_iter_dataset(_read_rows(ds, clips, process_index, local_batch), data_config)


def _stack(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _read_rows(batches: grain.MapDataset, clips: _ClipSource, process_index: int,
               local_batch: int) -> grain.MapDataset:
  """Global batches of clip indices -> this process's rows of each, read and stacked."""
  rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
  return batches.map(lambda indices: _stack([clips[i] for i in indices[rows]]))


def make_eval_dataset(
    data_config: ml_collections.ConfigDict,
    split: str = "validation",
    *,
    global_batch_size: int,
    num_batches: int | None = None,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    builder: tfds.core.DatasetBuilder | None = None,
) -> grain.IterDataset:
  """Evaluation clips: fixed, in order, one pass.

  The clips are the non-overlapping clips of every chunk (starts 0, T, 2T, ...), so every
  frame of the split is seen once (up to the chunks' tails); every process yields the same
  number of batches.

  Args:
    data_config: config.data.
    split: the split to evaluate on.
    global_batch_size: clips per step over all processes.
    num_batches: stop after this many batches (None: the whole split).
    drop_remainder: drop the clips that do not fill a global batch; if False, the last
      batches are filled with padding rows (episode_id -1, zero video, actions -1).
    process_index, process_count: this process's place (default: from JAX).
    builder: the prepared dataset (default: get_builder(data_config, prepare=False)).
  """
  process_index, process_count, local_batch = _process_share(global_batch_size, process_index,
                                                             process_count)
  clips = _eval_clips(data_config, split, builder)
  if drop_remainder:
    total = clips.num_clips // global_batch_size * global_batch_size
  else:
    total = math.ceil(clips.num_clips / global_batch_size) * global_batch_size
    clips.pad_to(total)
  # As in training: global batch k holds clips [k * G, (k + 1) * G) whatever the process
  # count, and each process reads its rows of it, so `num_batches` batches are the same
  # clips for any number of processes.
  ds = grain.MapDataset.range(total).batch(global_batch_size, drop_remainder=True)
  if num_batches is not None:
    ds = ds[:num_batches]
  return _to_iter_dataset(_read_rows(ds, clips, process_index, local_batch), data_config)


def num_eval_clips(data_config: ml_collections.ConfigDict, split: str = "validation", *,
                   builder: tfds.core.DatasetBuilder | None = None) -> int:
  """How many clips `make_eval_dataset` has in `split` (before batching); reads no record.

  Raises ValueError, as make_eval_dataset would, for a split the dataset lacks or one with
  no chunk of config.data.clip_len frames.
  """
  return _eval_clips(data_config, split, builder).num_clips


def _eval_clips(data_config: ml_collections.ConfigDict, split: str,
                builder: tfds.core.DatasetBuilder | None) -> _ClipSource:
  """The non-overlapping clips of every chunk of `split` (starts 0, T, 2T, ...)."""
  records, lengths = _open_split(data_config, split, builder)
  clip_len = int(data_config.clip_len)
  return _ClipSource(records, lengths, clip_len, stride=clip_len)


def batch_shapes(data_config: ml_collections.ConfigDict, global_batch_size: int, *,
                 evaluation: bool = False) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{key: (shape, dtype)} of one global batch as `to_global_batch` gives it: training
  batches, or evaluation batches (`evaluation`, which also carry episode_id)."""
  b, t, s = global_batch_size, data_config.clip_len, data_config.image_size
  shapes = dict(video=((b, t, s, s, 3), np.uint8), actions=((b, t), np.int32),
                start=((b,), np.int32))
  if evaluation:
    # int64 on the host, held as jax's default integer.
    shapes["episode_id"] = ((b,), jax.dtypes.canonicalize_dtype(np.int64))
  return shapes


def _batch_axis_sharding(sharding: NamedSharding) -> NamedSharding:
  """`sharding`'s first entry (the batch axes) alone: one sharding for arrays of any rank."""
  return NamedSharding(sharding.mesh, P(sharding.spec[0] if sharding.spec else None))


def check_process_rows(sharding: NamedSharding, global_batch_size: int, what: str, *,
                       process_of: Callable[[jax.Device], int] | None = None) -> None:
  """Raises ValueError, naming config.mesh, unless each process's devices hold as many rows of
  a batch as the process reads, G / P, none of them also held by another process.

  Processes share rows when the batch's mesh axes split it into fewer shards than there are
  processes (e.g. tensor parallelism across processes, one process per GPU). `what` names
  the batch size G (e.g. config.batch_size); P is the number of processes among the mesh's
  devices; `process_of` defaults to each device's process_index.
  """
  process_of = process_of or (lambda device: device.process_index)
  batch_sharding = _batch_axis_sharding(sharding)
  rows: dict[int, set[int]] = collections.defaultdict(set)
  for device, index in batch_sharding.devices_indices_map((global_batch_size,)).items():
    rows[process_of(device)].update(range(global_batch_size)[index[0]])
  local = global_batch_size // len(rows)
  for p, held in sorted(rows.items()):
    if len(held) != local:
      raise ValueError(
          f"config.mesh={dict(sharding.mesh.shape)} with {what}={global_batch_size} over "
          f"{len(rows)} processes: process {p}'s devices hold {len(held)} rows of each batch, "
          f"not the {local} it reads (rows shared between processes); the batch's mesh axes "
          f"(config.sharding.rules, act_batch) must split it into a multiple of the process "
          f"count (e.g. no tensor parallelism across processes).")


def to_global_batch(local_batch: dict[str, np.ndarray],
                    sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles every process's local batch into global arrays sharded along axis 0.

  Only the first entry of `sharding.spec` (the batch axes) is used; the other axes of each
  array are replicated, so one sharding serves arrays of every rank. The global batch is the
  local one times jax.process_count() along axis 0.
  """
  batch_sharding = _batch_axis_sharding(sharding)

  def put(x: np.ndarray) -> jax.Array:
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(batch_sharding, x, global_shape)

  return {k: put(v) for k, v in local_batch.items()}
