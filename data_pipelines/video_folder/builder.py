"""TFDS builder importing a folder of the user's videos: one video, one episode, no actions.

Episodes found under `video_dir` (recursively, in sorted path order):
  * video files: .mp4 .mov .avi .mkv .webm .m4v (need imageio-ffmpeg: `pip install
    genie_jax[video]`) and .gif (no ffmpeg needed);
  * .npy arrays of frames, uint8 (T, H, W, 3) (or (T, H, W) grey, or 4 channels);
  * folders of frame images (.png .jpg .jpeg .bmp .webp), frames in file-name order.
Frames are centre-cropped to a square and resized to image_size. Files are split into
train/validation by `val_fraction` with the generation seed.

The dataset name depends on the folder's absolute path; the list of files (with sizes) is
kept in the metadata, and a dataset whose folder has changed since is refused rather than
silently reused (see `VideoFolder.verify_source`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image

from data_pipelines import episode_builder

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclasses.dataclass(eq=False, kw_only=True)
class VideoFolderConfig(episode_builder.EpisodeConfig):
  """Generation parameters of a video import (see `EpisodeConfig`)."""

  video_dir: str = episode_builder.generation_field("", None)
  # Hash of the absolute video_dir, so that each folder gets its own dataset.
  dir_hash: str = episode_builder.generation_field("", "dir")
  val_fraction: float = episode_builder.generation_field(0.1, "valfrac")
  # Frames kept per video (0: all).
  max_frames: int = episode_builder.generation_field(0, "maxframes")


def list_videos(video_dir: str) -> list[tuple[str, int]]:
  """(path relative to video_dir, size in bytes) of every episode source, sorted by path.

  A folder of frames counts as one source whose size is the sum of its images.
  """
  sources = []
  for root, dirs, files in os.walk(video_dir):
    dirs.sort()
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if images:
      sources.append((os.path.relpath(root, video_dir),
                      sum(os.path.getsize(os.path.join(root, f)) for f in images)))
    for f in files:
      if f.lower().endswith(VIDEO_EXTENSIONS + (".npy",)):
        path = os.path.join(root, f)
        sources.append((os.path.relpath(path, video_dir), os.path.getsize(path)))
  return sorted(sources)


def split_sources(num_sources: int, val_fraction: float, seed: int) -> dict[str, list[int]]:
  """Indices of the sources of each split: a seeded random `val_fraction` is held out."""
  num_val = round(num_sources * val_fraction)
  if val_fraction > 0 and num_sources >= 2:
    num_val = min(max(num_val, 1), num_sources - 1)
  order = np.random.default_rng(seed).permutation(num_sources)
  return {episode_builder.TRAIN: sorted(order[num_val:].tolist()),
          episode_builder.VALIDATION: sorted(order[:num_val].tolist())}


def to_square_rgb(frame: np.ndarray, size: int) -> np.ndarray:
  """A frame as uint8 (size, size, 3): RGB, centre-cropped to a square, resized."""
  frame = np.asarray(frame)
  if frame.ndim == 2:
    frame = frame[..., None]
  if frame.shape[-1] == 1:
    frame = np.repeat(frame, 3, axis=-1)
  frame = frame[..., :3]  # Drops alpha.
  if frame.dtype != np.uint8:
    if np.issubdtype(frame.dtype, np.floating) and frame.max(initial=0) <= 1.0:
      frame = frame * 255
    frame = np.clip(frame, 0, 255).astype(np.uint8)
  h, w = frame.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  frame = frame[top:top + side, left:left + side]
  if side != size:
    frame = np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.BICUBIC))
  return np.ascontiguousarray(frame)


def read_frames(path: str) -> Iterator[np.ndarray]:
  """Frames of one source (file or folder of images), as stored."""
  if os.path.isdir(path):
    for f in sorted(os.listdir(path)):
      if f.lower().endswith(IMAGE_EXTENSIONS):
        with Image.open(os.path.join(path, f)) as image:
          yield np.asarray(image.convert("RGB"))
  elif path.lower().endswith(".npy"):
    try:
      frames = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
      raise ValueError(f"Cannot read {path} as a numpy array of frames ({e!r})") from e
    if frames.ndim not in (3, 4):
      raise ValueError(f"{path}: expected frames (T, H, W[, C]), got shape {frames.shape}.")
    yield from frames
  else:
    import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
    try:
      # GIFs keep their palette per frame unless converted to RGB.
      kwargs = {"mode": "RGB"} if path.lower().endswith(".gif") else {}
      yield from iio.imiter(path, **kwargs)
    except (ImportError, OSError, ValueError, RuntimeError) as e:
      raise RuntimeError(f"Cannot read video {path} ({type(e).__name__}: {e}); videos other "
                         "than .gif need `pip install imageio-ffmpeg` (genie_jax[video]).") from e


class VideoFolder(episode_builder.EpisodeDatasetBuilder):
  """Videos of a folder, one per episode, no actions (all -1)."""

  name = "video_folder"
  EPISODES_PER_SHARD = 20
  DESCRIPTION = __doc__

  builder_config: VideoFolderConfig

  @classmethod
  def config_from_data_config(cls, data_config) -> VideoFolderConfig:
    if not data_config.video_dir:
      raise ValueError("config.data.video_dir must name the folder of videos to import.")
    video_dir = os.path.abspath(os.path.expanduser(data_config.video_dir))
    return VideoFolderConfig(
        video_dir=video_dir,
        dir_hash=hashlib.sha1(video_dir.encode()).hexdigest()[:10],
        val_fraction=float(data_config.val_fraction),
        max_frames=int(data_config.episode_len),
        **episode_builder.common_config_kwargs(data_config))

  def _sources(self) -> list[tuple[str, int]]:
    if not hasattr(self, "_source_list"):
      video_dir = self.builder_config.video_dir
      if not os.path.isdir(video_dir):
        raise FileNotFoundError(f"config.data.video_dir={video_dir!r} is not a folder.")
      self._source_list = list_videos(video_dir)
      if len(self._source_list) < 2:
        raise ValueError(f"config.data.video_dir={video_dir!r} holds "
                         f"{len(self._source_list)} video(s); need at least 2 (train and "
                         "validation).")
      self.info.metadata["sources"] = [list(s) for s in self._source_list]
    return self._source_list

  def _split(self) -> dict[str, list[int]]:
    config = self.builder_config
    return split_sources(len(self._sources()), config.val_fraction, config.seed)

  def _num_episodes(self, split: str) -> int:
    return len(self._split()[split])

  def _episodes(self, split: str) -> Iterator[episode_builder.Episode]:
    config = self.builder_config
    sources = self._sources()
    episode_ids = self._split()[split]
    self.info.metadata.setdefault("episode_sources", {})[split] = [
        sources[i][0] for i in episode_ids]
    for episode_id in episode_ids:
      frames = read_frames(os.path.join(config.video_dir, sources[episode_id][0]))
      if config.max_frames > 0:
        frames = itertools.islice(frames, config.max_frames)
      yield episode_builder.Episode(
          episode_id, (to_square_rgb(f, config.image_size) for f in frames))

  def verify_source(self) -> None:
    """Raises if the video folder changed since this (prepared) dataset was generated."""
    video_dir = self.builder_config.video_dir
    if not os.path.isdir(video_dir):
      return  # The import outlives its source.
    recorded = [tuple(s) for s in self.info.metadata.get("sources", [])]
    if recorded != list_videos(video_dir):
      raise ValueError(
          f"The videos in config.data.video_dir={video_dir!r} changed since {self.data_dir} "
          "was generated from them; delete that dataset to regenerate it.")

