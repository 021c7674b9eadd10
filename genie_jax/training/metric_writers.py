"""Metrics out of the trainer: TensorBoard events, a JSON-lines file, images, optionally
Weights & Biases, and a progress line.

Only process 0 writes; every process calls these functions with the same (replicated) values,
so no JAX computation ever runs on one process alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from genie_jax import allocator
from genie_jax import paths
from genie_jax import visualize


WANDB_MODES = ("online", "offline")
# The workdir's W&B run: its id, so that a resumed run continues the same W&B run.
WANDB_RUN_FILE = "wandb_run.json"


def check_wandb_config(cfg: Any) -> None:
  """Raises ValueError naming the config.wandb key that cannot work (before any work)."""
  if cfg is None or not cfg.enabled:
    return
  if cfg.mode not in WANDB_MODES:
    raise ValueError(f"config.wandb.mode={cfg.mode!r}; expected one of {list(WANDB_MODES)}")
  if importlib.util.find_spec("wandb") is None:
    raise ValueError("config.wandb.enabled=True needs the wandb package: pip install "
                     "wandb==0.31.0 (pip install -e '.[wandb]' in a checkout), or leave "
                     "config.wandb.enabled False")


class WandbRun:
  """The workdir's Weights & Biases run: scalars, images and GIF videos at their steps.

  Online, the run's id is kept in WORKDIR/wandb_run.json, so a resumed job logs into the same
  run (steps W&B already holds are dropped by W&B, as TensorBoard's are purged by ours).
  Offline runs cannot be resumed by W&B: each job writes a run of its own, all in one group
  (default: the workdir), each synced with `wandb sync`. The local files of a workdir on Cloud
  Storage are copied into WORKDIR/wandb when the writer closes.
  """

  def __init__(self, workdir: str, cfg: Any, run_config: Mapping[str, Any] | None):
    import wandb  # pylint: disable=g-import-not-at-top
    self._wandb = wandb
    self._workdir = workdir
    # Default name: the workdir's last two folders (a pipeline's "genie/tokenizer").
    label = "/".join(workdir.rstrip("/").split("/")[-2:])
    run_id = secrets.token_hex(6)  # W&B run ids: lower-case letters and digits.
    if cfg.mode == "online":
      id_path = paths.path(workdir) / WANDB_RUN_FILE
      if id_path.exists():
        run_id = json.loads(id_path.read_text())["id"]
      else:
        paths.write_text(id_path, json.dumps({"id": run_id}))
    self._remote = paths.is_remote(workdir)
    if self._remote:
      self._local = tempfile.mkdtemp(prefix="genie_jax_wandb_")
    else:
      self._local = os.path.join(workdir, "wandb")
      os.makedirs(self._local, exist_ok=True)
    self._offline = cfg.mode == "offline"
    self._scratch = tempfile.mkdtemp(prefix="genie_jax_wandb_media_")
    self.run = wandb.init(
        project=cfg.project or None, entity=cfg.entity or None, name=cfg.name or label,
        group=cfg.group or (label if self._offline else None), tags=list(cfg.tags) or None,
        mode=cfg.mode, dir=self._local, id=run_id,
        resume=None if self._offline else "allow", config=dict(run_config or {}))

  def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self.run.log(dict(scalars), step=int(step))

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    self.run.log({k: self._wandb.Image(v) for k, v in images.items()}, step=int(step))

  def videos(self, step: int, gifs: Mapping[str, bytes]) -> None:
    """Encoded GIFs (`visualize.gif_bytes`), which W&B reads from a local file."""
    logged = {}
    for name, data in gifs.items():
      gif = os.path.join(self._scratch, f"{name}_{step:08d}.gif")
      with open(gif, "wb") as f:
        f.write(data)
      # Apart from the image of the same name at the same step (the trainer logs both).
      logged[f"{name}_video"] = self._wandb.Video(gif, format="gif")
    self.run.log(logged, step=int(step))

  def close(self, exit_code: int = 0) -> None:
    self.run.finish(exit_code=exit_code)
    shutil.rmtree(self._scratch, ignore_errors=True)
    if self._remote:
      if self._offline:
        paths.copy_tree(self._local, paths.join(self._workdir, "wandb"))
      shutil.rmtree(self._local, ignore_errors=True)


class MetricWriter:
  """Writes scalars to TensorBoard (tensorboardX, no TensorFlow) and workdir/metrics.jsonl.

  The workdir may be on Cloud Storage: TensorBoard's events are then written locally and
  uploaded (`paths.LocalMirror`), and metrics.jsonl, which Cloud Storage cannot append to,
  is uploaded whole at most every `upload_every_s` seconds and at `flush` and `close`.
  """

  def __init__(self, workdir: str, *, first_step: int = 0, enabled: bool | None = None,
               upload_every_s: float = 60.0, wandb_config: Any = None,
               run_config: Mapping[str, Any] | None = None):
    """Opens the writers; rows after `first_step` (left by a run that stopped after its last
    checkpoint) are dropped, so a resumed run logs every step once. With
    `wandb_config.enabled` (config.wandb, checked before any work by `check_wandb_config`)
    also a W&B run whose config is `run_config`."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir
    self._tb = None
    self._jsonl = None
    self._wandb = None
    self._upload_every_s = upload_every_s
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      paths.path(workdir).mkdir(parents=True, exist_ok=True)
      self._tb_dir = paths.LocalMirror(paths.join(workdir, "tensorboard"))
      self._tb = SummaryWriter(self._tb_dir.local,
                               purge_step=first_step + 1 if first_step else None)
      self._jsonl_path = paths.path(workdir) / "metrics.jsonl"
      kept = []
      if self._jsonl_path.exists():
        kept = [line for line in self._jsonl_path.read_text().splitlines(keepends=True)
                if json.loads(line)["step"] <= first_step]
      if paths.is_remote(workdir):
        self._lines = kept
        self._upload()
      else:
        with open(self._jsonl_path, "w", encoding="utf-8") as f:
          f.writelines(kept)
        self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")
    if self.enabled and wandb_config is not None and wandb_config.enabled:
      self._wandb = WandbRun(workdir, wandb_config, run_config)

  def _upload(self) -> None:
    """Cloud Storage: metrics.jsonl and TensorBoard's events as they are now."""
    self._tb.flush()
    self._tb_dir.sync()
    paths.write_text(self._jsonl_path, "".join(self._lines))
    self._uploaded_at = time.monotonic()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    for name, value in clean.items():
      self._tb.add_scalar(name, value, step)
    if self._wandb is not None:
      self._wandb.scalars(step, clean)
    line = json.dumps({"step": int(step), **clean}) + "\n"
    if self._jsonl is not None:
      self._jsonl.write(line)
      self._jsonl.flush()
      return
    self._lines.append(line)
    if time.monotonic() - self._uploaded_at >= self._upload_every_s:
      self._upload()

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Writes uint8 HWC images as TensorBoard images and PNGs under workdir/images/."""
    if not self.enabled:
      return
    for name, image_HWC in images.items():
      self._tb.add_image(name, image_HWC, step, dataformats="HWC")
      visualize.save_png(paths.join(self.workdir, "images", f"{name}_{step:08d}.png"),
                         image_HWC)
    if self._wandb is not None:
      self._wandb.images(step, images)

  def write_videos(self, step: int, videos: Mapping[str, np.ndarray], fps: int = 8) -> None:
    """Writes uint8 THWC videos as GIFs under workdir/images/."""
    if not self.enabled:
      return
    gifs = {name: visualize.gif_bytes(video_THWC, fps) for name, video_THWC in videos.items()}
    for name, data in gifs.items():
      paths.write_bytes(paths.join(self.workdir, "images", f"{name}_{step:08d}.gif"), data)
    if self._wandb is not None:
      self._wandb.videos(step, gifs)

  def flush(self) -> None:
    """Everything written so far is in the workdir (uploaded, on Cloud Storage)."""
    if not self.enabled:
      return
    if self._jsonl is None:
      self._upload()
    else:
      self._tb.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    if self._jsonl is None:
      self._upload()
    else:
      self._jsonl.close()
    self._tb.close()
    self._tb_dir.close()
    if self._wandb is not None:
      # Called from the trainer's `finally`: a failing run is marked failed in W&B.
      self._wandb.close(exit_code=1 if sys.exc_info()[0] is not None else 0)


class Progress:
  """Steps/s, examples/s, TFLOP/s per device (given the step's FLOPs per device) and ETA over
  the last logging interval; the host's peak memory."""

  def __init__(self, first_step: int, total_steps: int, global_batch_size: int,
               flops_per_step: float | None = None):
    self.total_steps = total_steps
    self.batch = global_batch_size
    self.flops_per_step = flops_per_step
    self._last_step = first_step
    self._last_time = time.perf_counter()

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    seconds = max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    rate = steps / seconds
    out = {"steps_per_sec": rate, "examples_per_sec": rate * self.batch,
           "eta_hours": (self.total_steps - step) / rate / 3600,
           "host_peak_rss_mib": allocator.peak_rss_mib()}
    if self.flops_per_step:
      out["tflops_per_sec_per_device"] = rate * self.flops_per_step / 1e12
    return out

  def log_line(self, step: int, scalars: Mapping[str, float]) -> None:
    shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items()))
    logging.info("[step %d/%d] %s", step, self.total_steps, shown)
