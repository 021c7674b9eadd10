"""Videos from a trained world model (a dynamics-stage workdir): prompts from its data's
validation split, actions given, random or inferred; GIFs (and MP4s) with the action drawn
on each generated frame. The command: genie_jax/cli/generate.py."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
from absl import logging

from genie_jax import paths
from genie_jax import visualize
from genie_jax.data import input_pipeline
from genie_jax.inference import worlds


def parse_actions(spec: str) -> list[int] | str:
  """'random' / 'inferred', or a comma-separated list of ints."""
  if spec in ("random", "inferred"):
    return spec
  try:
    return [int(a) for a in spec.split(",")]
  except ValueError as e:
    raise ValueError(f"--actions={spec!r}: expected 'random', 'inferred' or comma-separated "
                     "integers such as 0,1,2") from e


_VIDEO_NAME = re.compile(r"video_\d+\.(gif|mp4)")


def _check_out_dir(out_dir: str) -> None:
  """Refuses an output folder holding files of this command's names (video_<i>.gif/.mp4,
  actions.json) that an earlier run of it did not write: it would overwrite or delete them.
  An earlier run's folder (its actions.json says so) is reused."""
  folder = paths.path(out_dir)
  if not folder.is_dir():
    return
  ours = [p.name for p in folder.iterdir()
          if _VIDEO_NAME.fullmatch(p.name) or p.name == "actions.json"]
  if not ours:
    return
  try:
    written = json.loads((folder / "actions.json").read_text())
  except (FileNotFoundError, ValueError):
    written = None
  if not (isinstance(written, dict) and {"workdir", "action_ids", "num_steps"} <= set(written)):
    raise ValueError(f"--out={out_dir} holds {', '.join(sorted(ours))}, not written by "
                     "genie_jax.cli.generate; they would be overwritten or deleted: choose "
                     "an empty or new folder")


def generate(workdir: str, *, step: int | None = None, num_frames: int | None = None,
             actions: str = "random", num_steps: int | None = None,
             temperature: float = 1.0,
             seed: int = 0, num_videos: int = 4, prompt_frames: int = 1,
             out_dir: str | None = None, scale: int = 4) -> dict[str, object]:
  """Generates and writes `num_videos` rollouts (see the module docstring).

  Returns:
    {'video': float32 (num_videos, P + F, H, W, C) rollouts, 'actions': int32
    (num_videos, F), 'files': the paths written}.

  Raises:
    FileNotFoundError: naming the workdir when it holds no trained dynamics stage.
    ValueError: naming the flag when an argument cannot work (e.g. an action out of range).
  """
  action_spec = parse_actions(actions)
  if out_dir:
    paths.check_bucket(out_dir, "--out")
  if num_videos < 1:
    raise ValueError(f"--num_videos={num_videos} must be at least 1")
  if scale < 1:
    raise ValueError(f"--scale={scale} must be at least 1")
  out_dir = out_dir or paths.join(workdir, "generate")
  _check_out_dir(out_dir)
  genie = worlds.load(workdir, step=step)
  num_steps = genie.resolve_steps(num_steps, "--num_steps")
  clip_len = int(genie.config.data.clip_len)
  if not 1 <= prompt_frames <= min(genie.max_prompt_frames, clip_len):
    raise ValueError(f"--prompt_frames={prompt_frames} must be in [1, "
                     f"{min(genie.max_prompt_frames, clip_len)}] for this model and data")
  if isinstance(action_spec, list):
    if num_frames is not None and num_frames != len(action_spec):
      raise ValueError(f"--actions lists {len(action_spec)} actions but --num_frames="
                       f"{num_frames}")
    num_frames = len(action_spec)
  num_frames = clip_len - prompt_frames if num_frames is None else num_frames
  if num_frames < 1:
    raise ValueError(f"--num_frames={num_frames} must be at least 1")
  if action_spec == "inferred" and prompt_frames + num_frames > clip_len:
    raise ValueError(f"--actions=inferred needs prompt_frames + num_frames <= the clip length "
                     f"{clip_len} of the data (config.data.clip_len); got {prompt_frames} + "
                     f"{num_frames}")

  batch = next(iter(input_pipeline.make_eval_dataset(
      genie.config.data, "validation", global_batch_size=num_videos, num_batches=1,
      process_index=0, process_count=1)), None)
  if batch is None:
    raise ValueError(f"--num_videos={num_videos}: the validation split of the workdir's data "
                     f"has fewer clips of {clip_len} frames (config.data.clip_len) than that")
  clips = np.asarray(batch["video"])
  prompt = clips[:, :prompt_frames]
  rng = np.random.default_rng(seed)
  if action_spec == "random":
    action_ids = rng.integers(0, genie.num_actions, (num_videos, num_frames))
  elif action_spec == "inferred":
    truth = clips[:, :prompt_frames + num_frames]
    action_ids = np.asarray(genie.infer_actions(truth))[:, prompt_frames - 1:]
  else:
    action_ids = np.broadcast_to(np.asarray(action_spec), (num_videos, num_frames))
  action_ids = genie.check_actions(action_ids)

  video = np.asarray(genie.rollout(prompt, action_ids, rng=jax.random.key(seed),
                                   num_steps=num_steps, temperature=temperature))

  actions_file = paths.join(out_dir, "actions.json")
  files = [paths.join(out_dir, f"video_{i}.gif") for i in range(num_videos)] + [actions_file]
  if jax.process_index() != 0:
    # Every process of a multi-process job generated the same videos; process 0 writes them.
    return dict(video=video, actions=action_ids, files=files)
  # First, so that a folder left by an interrupted run is known as this command's.
  paths.write_text(actions_file, json.dumps(dict(
      workdir=workdir, step=genie.step, actions=actions, action_ids=action_ids.tolist(),
      prompt_frames=prompt_frames, num_steps=num_steps, temperature=temperature, seed=seed),
      indent=2))
  labels = [None] * prompt_frames
  for i in range(num_videos):
    frames = visualize.label_frames(video[i], labels + [f"a={a}" for a in action_ids[i]],
                                    scale=scale)
    if action_spec == "inferred":
      truth_frames = visualize.label_frames(
          clips[i, :prompt_frames + num_frames], labels + ["truth"] * num_frames, scale=scale)
      frames = visualize.side_by_side_video([frames, truth_frames])
    path = paths.join(out_dir, f"video_{i}")
    visualize.save_gif(path + ".gif", frames)
    if visualize.save_mp4(path + ".mp4", frames):
      files.append(path + ".mp4")
  # A reused folder keeps no videos of an earlier, larger (or MP4-writing) run: every
  # video_<i>.gif/.mp4 there belongs to this run's actions.json.
  for stale in paths.path(out_dir).iterdir():
    if (_VIDEO_NAME.fullmatch(stale.name) and stale.is_file()
        and paths.join(out_dir, stale.name) not in files):
      stale.unlink()
  logging.info("Wrote %d videos of %d frames to %s", num_videos, prompt_frames + num_frames,
               out_dir)
  return dict(video=video, actions=action_ids, files=files)
