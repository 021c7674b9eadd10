r"""Generates videos from a trained world model (a dynamics-stage workdir).

  python -m genie_jax.cli.generate --workdir=workdirs/dyn [--step=N] [--num_frames=15] \
      [--actions=0,1,2,...|random|inferred] [--num_steps=25] [--temperature=1.0] \
      [--seed=0] [--num_videos=4] [--prompt_frames=1] [--out=DIR]

Prompts are the first frames of clips of the validation split of the workdir's own data
config. Actions:
  0,1,2,...  the latent action of each generated frame, the same for every video (the list
             sets the number of frames unless --num_frames is given; then it must match);
  random     drawn uniformly from [0, A);
  inferred   the LAM's actions of the ground-truth clip, which is shown beside the rollout.
Writes <out>/video_<i>.gif (and .mp4 when imageio-ffmpeg is installed) with the action
index drawn on each generated frame, and <out>/actions.json; other video_<i>.gif/.mp4 files
already in <out> (an earlier run's) are removed.
"""

from absl import app
from absl import flags

from genie_jax import cli
from genie_jax.inference import generate


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A dynamics-stage workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
  flags.DEFINE_integer(
      "num_frames", None, "Frames to generate; default: the clip length minus the prompt.")
  flags.DEFINE_string("actions", "random",
                      "Comma-separated action indices, 'random' or 'inferred'.")
  flags.DEFINE_integer("num_steps", None, "Steps per frame: MaskGIT steps, or the diffusion "
                       "family's Euler steps; default: 25, or a shortcut model's most.")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature (MaskGIT; 0 = argmax), or the "
                     "scale of each frame's starting noise (diffusion).")
  flags.DEFINE_integer("seed", 0, "Seed of the sampling and of random actions.")
  flags.DEFINE_integer("num_videos", 4, "Videos to generate (one batch).")
  flags.DEFINE_integer("prompt_frames", 1, "Ground-truth frames to start from.")
  flags.DEFINE_string("out", None, "Output folder; default: <workdir>/generate.")
  flags.DEFINE_integer("scale", 4, "Enlarge frames this many times in the outputs.")
  flags.mark_flags_as_required(["workdir"])


def main() -> None:
  f = flags.FLAGS
  try:
    result = generate.generate(
        f.workdir, step=f.step, num_frames=f.num_frames, actions=f.actions,
        num_steps=f.num_steps, temperature=f.temperature, seed=f.seed,
        num_videos=f.num_videos, prompt_frames=f.prompt_frames, out_dir=f.out, scale=f.scale)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from e
  print("\n".join(result["files"]))


if __name__ == "__main__":
  cli.run(define_flags, main)
