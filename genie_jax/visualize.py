"""Pictures of what a model does: image grids, PNGs and GIFs (host-side numpy)."""

from __future__ import annotations

import os
import tempfile

import imageio.v3 as iio
import numpy as np

from genie_jax import paths


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
  """Writes a PNG to a local or gs:// path."""
  paths.write_bytes(path, iio.imwrite("<bytes>", to_uint8(image_HWC), extension=".png"))


def gif_bytes(video_THWC: np.ndarray, fps: int = 8) -> bytes:
  """A looping GIF of the video, encoded."""
  return iio.imwrite("<bytes>", to_uint8(video_THWC), extension=".gif", duration=1000 / fps,
                     loop=0)


def save_gif(path: str, video_THWC: np.ndarray, fps: int = 8) -> None:
  """Writes a looping GIF to a local or gs:// path."""
  paths.write_bytes(path, gif_bytes(video_THWC, fps))


def label_frames(video_THWC: np.ndarray, labels: list[str | None], *, scale: int = 1
                 ) -> np.ndarray:
  """Frames enlarged `scale` times (nearest neighbour) with a label drawn top-left on each.

  A label of None leaves its frame unmarked (e.g. prompt frames, caused by no action).
  """
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  video = to_uint8(video_THWC)
  if len(labels) != video.shape[0]:
    raise ValueError(f"{len(labels)} labels for {video.shape[0]} frames")
  video = np.repeat(np.repeat(video, scale, axis=1), scale, axis=2)
  out = []
  for frame, label in zip(video, labels):
    image = Image.fromarray(frame)
    if label:
      draw = ImageDraw.Draw(image)
      # A dark box behind white text keeps it readable on any background.
      left, top, right, bottom = draw.textbbox((2, 1), label)
      draw.rectangle((0, 0, right + 2, bottom + 1), fill=(0, 0, 0))
      draw.text((2, 1), label, fill=(255, 255, 255))
    out.append(np.asarray(image))
  return np.stack(out)


def save_mp4(path: str, video_THWC: np.ndarray, fps: int = 8) -> bool:
  """Writes an MP4 if imageio-ffmpeg is installed; returns whether it did."""
  try:
    import imageio_ffmpeg  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  video = to_uint8(video_THWC)
  # H.264 wants even frame sides.
  video = video[:, :video.shape[1] // 2 * 2, :video.shape[2] // 2 * 2]
  # ffmpeg writes to a local file only.
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "video.mp4")
    iio.imwrite(local, video, extension=".mp4", fps=fps, codec="libx264", macro_block_size=1)
    with open(local, "rb") as f:
      paths.write_bytes(path, f.read())
  return True


_PLOT_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


def line_plot(curves: dict[str, np.ndarray], *, title: str = "", x_start: int = 0,
              width: int = 480, height: int = 320) -> np.ndarray:
  """A small line chart (uint8 HWC) of named curves over x = x_start, x_start + 1, ...

  Drawn with PIL so that pictures need no plotting library; axes carry the y range, a zero
  line is drawn when the range spans zero.
  """
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  ys = [np.asarray(v, np.float64) for v in curves.values()]
  finite = np.concatenate([y[np.isfinite(y)] for y in ys] + [np.zeros(1)])
  lo, hi = float(finite.min()), float(finite.max())
  if hi - lo < 1e-9:
    lo, hi = lo - 1.0, hi + 1.0
  pad_l, pad_r, pad_t, pad_b = 56, 16, 28, 28
  img = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(img)
  n = max(len(y) for y in ys)
  to_x = lambda i: pad_l + (width - pad_l - pad_r) * (i / max(n - 1, 1))
  to_y = lambda v: pad_t + (height - pad_t - pad_b) * (hi - v) / (hi - lo)
  draw.rectangle([pad_l, pad_t, width - pad_r, height - pad_b], outline=(0, 0, 0))
  if lo < 0 < hi:
    draw.line([pad_l, to_y(0.0), width - pad_r, to_y(0.0)], fill=(160, 160, 160))
  for v in (lo, hi):
    draw.text((4, to_y(v) - 6), f"{v:.3g}", fill=(0, 0, 0))
  for i in range(n):
    draw.text((to_x(i) - 4, height - pad_b + 6), str(x_start + i), fill=(0, 0, 0))
  draw.text((pad_l, 6), title, fill=(0, 0, 0))
  for c, (name, y) in enumerate(zip(curves, ys)):
    colour = _PLOT_COLOURS[c % len(_PLOT_COLOURS)]
    points = [(to_x(i), to_y(v)) for i, v in enumerate(y) if np.isfinite(v)]
    if len(points) > 1:
      draw.line(points, fill=colour, width=2)
    for x, y_ in points:
      draw.ellipse([x - 2, y_ - 2, x + 2, y_ + 2], fill=colour)
    draw.text((width - pad_r - 150, pad_t + 6 + 14 * c), name, fill=colour)
  return np.asarray(img)
