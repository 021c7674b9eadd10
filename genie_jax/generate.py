r"""Generates videos from a trained world model (a dynamics-stage workdir).

  python -m genie_jax.generate --workdir=workdirs/dyn [--step=N] [--num_frames=15] \
      [--actions=0,1,2,...|random|inferred] [--num_steps=25] [--temperature=1.0] \
      [--seed=0] [--num_videos=4] [--prompt_frames=1] [--out=DIR]

Prompts are the first frames of clips of the validation split of the workdir's own data
config. Actions:
  0,1,2,...  the latent action of each generated frame, the same for every video (the list
             sets the number of frames unless --num_frames is given; then it must match);
  random     drawn uniformly from [0, A);
  inferred   the LAM's actions of the ground-truth clip, which is shown beside the rollout.
Writes <out>/video_<i>.gif (and .mp4 when imageio-ffmpeg is installed) with the action
index drawn on each generated frame, and <out>/actions.json.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging

from genie_jax import allocator
from genie_jax import distributed
from genie_jax import genie as genie_lib
from genie_jax import paths
from genie_jax import visualize
from genie_jax.data import input_pipeline


def define_flags() -> None:
  """The command-line flags; defined only when this module is the program, so that
  other entry points and tests can import it next to their own flags."""
  allocator.define_flags()
  distributed.define_flags()
  flags.DEFINE_string("workdir", None, "A dynamics-stage workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
  flags.DEFINE_integer(
      "num_frames", None, "Frames to generate; default: the clip length minus the prompt.")
  flags.DEFINE_string("actions", "random",
                      "Comma-separated action indices, 'random' or 'inferred'.")
  flags.DEFINE_integer("num_steps", 25, "MaskGIT steps per frame.")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = argmax).")
  flags.DEFINE_integer("seed", 0, "Seed of the sampling and of random actions.")
  flags.DEFINE_integer("num_videos", 4, "Videos to generate (one batch).")
  flags.DEFINE_integer("prompt_frames", 1, "Ground-truth frames to start from.")
  flags.DEFINE_string("out", None, "Output folder; default: <workdir>/generate.")
  flags.DEFINE_integer("scale", 4, "Enlarge frames this many times in the outputs.")


def parse_actions(spec: str) -> list[int] | str:
  """'random' / 'inferred', or a comma-separated list of ints."""
  if spec in ("random", "inferred"):
    return spec
  try:
    return [int(a) for a in spec.split(",")]
  except ValueError as e:
    raise ValueError(f"--actions={spec!r}: expected 'random', 'inferred' or comma-separated "
                     "integers such as 0,1,2") from e


def generate(workdir: str, *, step: int | None = None, num_frames: int | None = None,
             actions: str = "random", num_steps: int = 25, temperature: float = 1.0,
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
  genie = genie_lib.Genie.from_workdir(workdir, step=step)
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
      process_index=0, process_count=1)))
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

  out_dir = out_dir or paths.join(workdir, "generate")
  actions_file = paths.join(out_dir, "actions.json")
  files = [paths.join(out_dir, f"video_{i}.gif") for i in range(num_videos)] + [actions_file]
  if jax.process_index() != 0:
    # Every process of a multi-process job generated the same videos; process 0 writes them.
    return dict(video=video, actions=action_ids, files=files)
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
  paths.write_text(actions_file, json.dumps(dict(
      workdir=workdir, step=genie.step, actions=actions, action_ids=action_ids.tolist(),
      prompt_frames=prompt_frames, num_steps=num_steps, temperature=temperature, seed=seed),
      indent=2))
  logging.info("Wrote %d videos of %d frames to %s", num_videos, prompt_frames + num_frames,
               out_dir)
  return dict(video=video, actions=action_ids, files=files)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  distributed.initialize_from_flags()
  try:
    f = flags.FLAGS
    result = generate(f.workdir, step=f.step, num_frames=f.num_frames, actions=f.actions,
                      num_steps=f.num_steps, temperature=f.temperature, seed=f.seed,
                      num_videos=f.num_videos, prompt_frames=f.prompt_frames, out_dir=f.out,
                      scale=f.scale)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from e
  print("\n".join(result["files"]))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(allocator.entry_point(main))
