r"""How well a LAM checkpoint's continuous latents separate the built-in world's true actions.

For a LAM workdir and step (e.g. the end of its quantiser warm-up, before any code is
chosen), encodes the transitions of fresh episodes of the random policy and prints:
  * the cosine between the mean latents of every two true actions (two actions whose means
    point the same way are hard for any codebook to tell apart);
  * the NMI between the true actions and the LAM's own codes of the same transitions, and
    each true action's most frequent code;
  * the NMI between the true actions and k-means clusters of the latents (as many clusters
    as the LAM has codes, cosine geometry when its quantiser normalises), for k-means fitted
    on few and on many latents, 10 fits each: what a codebook initialised by k-means can
    start from.

  python -m data_pipelines.builtin_world.lam_latents --workdir=workdirs/genie/lam --step=1500
"""

from __future__ import annotations

import numpy as np
from absl import app
from absl import flags

from data_pipelines.builtin_world import env as env_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags; defined only when this module is the program."""
  flags.DEFINE_string("workdir", None, "A LAM workdir (built-in world).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("episodes", 200, "Episodes of 64 frames played.")
  flags.DEFINE_list("samples", ["48", "192", "768", "3072"],
                    "Numbers of latents k-means is fitted on.")


# Far from the dataset builders' episode seeds.
_SEED_BASE = 777_000


def transitions(image_size: int, clip_len: int, episodes: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Clips uint8 (B, clip_len, H, W, 3) cut from random-policy episodes, and the true action
  of each of their transitions (B * (clip_len - 1),)."""
  env = env_lib.BuiltinWorldEnv(image_size=image_size)
  clips, actions = [], []
  for i in range(episodes):
    frames_THWC, actions_T = env_lib.rollout(env, np.random.SeedSequence([_SEED_BASE, i]), 64)
    for start in range(0, 64 - clip_len + 1, clip_len):
      clips.append(frames_THWC[start:start + clip_len])
      actions.append(actions_T[start:start + clip_len - 1])
  return np.stack(clips), np.concatenate(actions)


def kmeans(x_NL: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 10
           ) -> np.ndarray:
  """k-means++ seeding, then Lloyd steps: centres (k, L)."""
  centres = [x_NL[rng.integers(len(x_NL))]]
  for _ in range(1, k):
    d_N = np.min(((x_NL[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), 1)
    centres.append(x_NL[rng.choice(len(x_NL), p=d_N / d_N.sum())])
  centres_KL = np.asarray(centres)
  for _ in range(iterations):
    label_N = np.argmin(((x_NL[:, None] - centres_KL[None]) ** 2).sum(-1), 1)
    for j in range(k):
      if (label_N == j).any():
        centres_KL[j] = x_NL[label_N == j].mean(0)
  return centres_KL


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from genie_jax import action_metrics  # pylint: disable=g-import-not-at-top
  from genie_jax.inference import stages  # pylint: disable=g-import-not-at-top

  loaded = stages.load_stage(FLAGS.workdir, step=FLAGS.step, expect_stage="lam")
  lam = loaded.model
  clips, true_N = transitions(loaded.config.data.image_size, loaded.config.data.clip_len,
                              FLAGS.episodes)
  encode = jax.jit(lam.encode_latents)
  z_NL = np.concatenate([np.asarray(encode(clips[i:i + 256]))
                         for i in range(0, len(clips), 256)]).reshape(len(true_N), -1)
  if lam.vq.normalize:
    z_NL = z_NL / np.linalg.norm(z_NL, axis=-1, keepdims=True)
  num_codes = lam.vq.codebook.shape[0]
  names = env_lib.ACTION_NAMES
  print(f"{FLAGS.workdir} step {loaded.step}: {len(z_NL)} transitions, {num_codes} codes")
  means_AL = np.stack([z_NL[true_N == a].mean(0) for a in range(len(names))])
  unit_AL = means_AL / np.linalg.norm(means_AL, axis=1, keepdims=True)
  print("cosine between mean latents | " + " | ".join(names))
  for a, name in enumerate(names):
    print(f"{name} | " + " | ".join(f"{c:.2f}" for c in unit_AL[a] @ unit_AL.T))
  # The quantiser on the latents above: the codes infer_actions would give, without a
  # second pass of the encoder.
  codes_N = np.asarray(lam.vq(jax.numpy.asarray(z_NL), train=False)[1])
  confusion = action_metrics.confusion_matrix(codes_N, true_N, num_codes, len(names))
  plurality = action_metrics.plurality_latent(confusion)
  print(f"the LAM's own codes: NMI {action_metrics.normalized_mutual_information(confusion):.3f}"
        f"; plurality code per true action: "
        + ", ".join(f"{name} {code}" for name, code in zip(names, plurality)))
  rng = np.random.default_rng(0)
  print("k-means on N latents | NMI mean | min | max")
  for n in map(int, FLAGS.samples):
    nmis = []
    for _ in range(10):
      centres_KL = kmeans(z_NL[rng.choice(len(z_NL), n, replace=False)], num_codes, rng)
      label_N = np.argmin(((z_NL[:, None] - centres_KL[None]) ** 2).sum(-1), 1)
      nmis.append(action_metrics.normalized_mutual_information(
          action_metrics.confusion_matrix(label_N, true_N, num_codes, len(names))))
    print(f"{n} | {np.mean(nmis):.3f} | {np.min(nmis):.3f} | {np.max(nmis):.3f}")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
