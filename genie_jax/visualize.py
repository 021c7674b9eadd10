"""Pictures of what a model does: image grids, PNGs and GIFs (host-side numpy)."""

from __future__ import annotations

import os

import imageio.v3 as iio
import numpy as np


def to_uint8(x: np.ndarray) -> np.ndarray:
  """Float images in [0, 1] (or uint8) -> uint8."""
  x = np.asarray(x)
  if x.dtype == np.uint8:
    return x
  return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def video_grid(rows_RBTHWC: list[np.ndarray], max_frames: int | None = None,
               pad: int = 1) -> np.ndarray:
  """Tiles several batches of clips into one image.

  Row r*B + b shows clip b of `rows_RBTHWC[r]`, frames left to right; so passing
  [originals, reconstructions] puts each reconstruction right under its original.
  """
  rows = [to_uint8(r) for r in rows_RBTHWC]
  b, t, h, w, c = rows[0].shape
  t = t if max_frames is None else min(t, max_frames)
  grid = np.full((b * len(rows) * (h + pad) + pad, t * (w + pad) + pad, c), 255, np.uint8)
  for i in range(b):
    for r, row in enumerate(rows):
      y = (i * len(rows) + r) * (h + pad) + pad
      for j in range(t):
        x = j * (w + pad) + pad
        grid[y:y + h, x:x + w] = row[i, j]
  return grid


def side_by_side_video(videos_RTHWC: list[np.ndarray], pad: int = 1) -> np.ndarray:
  """Concatenates clips horizontally, frame by frame, for a GIF."""
  vids = [to_uint8(v) for v in videos_RTHWC]
  t, h, _, c = vids[0].shape
  sep = np.full((t, h, pad, c), 255, np.uint8)
  parts = []
  for v in vids:
    parts += [v, sep]
  return np.concatenate(parts[:-1], axis=2)


def save_png(path: str, image_HWC: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  iio.imwrite(path, to_uint8(image_HWC))


def save_gif(path: str, video_THWC: np.ndarray, fps: int = 8) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  iio.imwrite(path, to_uint8(video_THWC), extension=".gif", duration=1000 / fps, loop=0)
