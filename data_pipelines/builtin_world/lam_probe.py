r"""What a LAM's decoder gains from knowing the true action, and what its encoder finds.

Trains a LAM of the given config from scratch on fresh episodes of the built-in world's
random policy, with the decoder fed, instead of the quantised latent action:
  * `none`: nothing (a zero latent): the best prediction without any action;
  * `true_action`: a learned embedding of the true action: what the decoder can make of a
    perfect action, the bound on what a latent action can buy;
  * `latent`: the encoder's continuous latent (the quantiser's warm-up, never ending).
Every `--eval_every` steps it prints the validation MSE per true action and, for `latent`,
how well the latents tell the true actions apart: a least-squares linear probe's accuracy
(two-fold), the NMI of k-means clusters of the latents (as many as the LAM has codes), and
the fraction of the latents' variance the true action explains. A decoder that gains little
from `true_action` gives its encoder little reason to find the action.

  python -m data_pipelines.builtin_world.lam_probe --config=configs/lam.py:runlocal \
      --decoder_input=true_action --config.model.spatial_rope=False
"""

from __future__ import annotations

import time

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from data_pipelines.builtin_world import env as env_lib
from data_pipelines.builtin_world import lam_latents

FLAGS = flags.FLAGS
DECODER_INPUTS = ("none", "true_action", "latent")


def define_flags() -> None:
  """The command-line flags; defined only when this module is the program."""
  config_flags.DEFINE_config_file("config", "configs/lam.py:runlocal", "LAM config file.")
  flags.DEFINE_enum("decoder_input", "latent", DECODER_INPUTS, "What the decoder gets.")
  flags.DEFINE_integer("steps", 1500, "Training steps.")
  flags.DEFINE_integer("eval_every", 500, "Steps between evaluations.")
  flags.DEFINE_integer("episodes", 600, "Episodes of 64 frames played (the first "
                       "--val_clips clips are held out).")
  flags.DEFINE_integer("val_clips", 512, "Validation clips.")


def latent_separation(z_NL: np.ndarray, true_N: np.ndarray, num_clusters: int,
                      num_true: int, rng: np.random.Generator) -> dict[str, float]:
  """How well latents z_NL (l2-normalised here) tell the true actions apart: 'probe'
  (two-fold least-squares linear probe accuracy), 'kmeans_nmi' (mean of 5 fits) and
  'explained' (between-action share of the variance)."""
  from genie_jax import action_metrics  # pylint: disable=g-import-not-at-top
  z_NL = z_NL / np.maximum(np.linalg.norm(z_NL, axis=-1, keepdims=True), 1e-12)
  x_NF = np.concatenate([z_NL, np.ones((len(z_NL), 1))], 1)
  y_NA = np.eye(num_true)[true_N]
  half = len(z_NL) // 2
  hits = []
  for fit, test in ((slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))):
    w_FA = np.linalg.solve(x_NF[fit].T @ x_NF[fit] + 1e-3 * np.eye(x_NF.shape[1]),
                           x_NF[fit].T @ y_NA[fit])
    hits.append(np.argmax(x_NF[test] @ w_FA, 1) == true_N[test])
  nmis = []
  for _ in range(5):
    centres_KL = lam_latents.kmeans(z_NL, num_clusters, rng)
    label_N = np.argmin(((z_NL[:, None] - centres_KL[None]) ** 2).sum(-1), 1)
    nmis.append(action_metrics.normalized_mutual_information(
        action_metrics.confusion_matrix(label_N, true_N, num_clusters, num_true)))
  mean_L = z_NL.mean(0)
  between = sum((true_N == a).sum() * np.sum((z_NL[true_N == a].mean(0) - mean_L) ** 2)
                for a in np.unique(true_N))
  return dict(probe=float(np.concatenate(hits).mean()), kmeans_nmi=float(np.mean(nmis)),
              explained=float(between / np.sum((z_NL - mean_L) ** 2)))


def main(argv):
  del argv
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from genie_jax.training import optim  # pylint: disable=g-import-not-at-top
  from genie_jax.models import lam as lam_lib  # pylint: disable=g-import-not-at-top
  from genie_jax.models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  config = FLAGS.config
  mode = FLAGS.decoder_input
  clip_len, image_size = config.data.clip_len, config.data.image_size
  clips, true_N = lam_latents.transitions(image_size, clip_len, FLAGS.episodes)
  true_BT = true_N.reshape(len(clips), clip_len - 1)
  if len(clips) <= FLAGS.val_clips:
    raise ValueError(f"--episodes={FLAGS.episodes} give {len(clips)} clips, not more than "
                     f"--val_clips={FLAGS.val_clips}")
  val_clips, val_true = clips[:FLAGS.val_clips], true_BT[:FLAGS.val_clips]
  train_clips, train_true = clips[FLAGS.val_clips:], true_BT[FLAGS.val_clips:]

  rngs = nnx.Rngs(config.seed)
  modules = nnx.List([lam_lib.LatentActionModel(config.model, rngs=rngs),
                      nnx.Embed(env_lib.NUM_ACTIONS, config.model.latent_dim, rngs=rngs)])
  tx, _ = optim.make_optimizer(config.optimizer, FLAGS.steps)
  optimizer = nnx.Optimizer(modules, tx, wrt=nnx.Param)

  def predict(modules, video_BTHWC, true_BT):
    lam, embed = modules
    if mode == "latent":
      z_BTL = lam.encode_latents(video_BTHWC)
    elif mode == "true_action":
      z_BTL = embed(true_BT)
    else:
      z_BTL = jnp.zeros(true_BT.shape + (config.model.latent_dim,), jnp.float32)
    return lam.decode(video_BTHWC[:, :-1], z_BTL), z_BTL

  def target(video_BTHWC):
    return tokenizer_lib.to_unit_interval(video_BTHWC)[:, 1:]

  @nnx.jit
  def train_step(modules, optimizer, video_BTHWC, true_BT):
    def loss_fn(modules):
      return jnp.mean(jnp.square(predict(modules, video_BTHWC, true_BT)[0]
                                 - target(video_BTHWC)))
    loss, grads = nnx.value_and_grad(loss_fn)(modules)
    optimizer.update(modules, grads)
    return loss

  @nnx.jit
  def eval_step(modules, video_BTHWC, true_BT):
    pred_BTHWC, z_BTL = predict(modules, video_BTHWC, true_BT)
    error_BT = jnp.mean(jnp.square(jnp.clip(pred_BTHWC, 0, 1) - target(video_BTHWC)),
                        axis=(2, 3, 4))
    return error_BT, z_BTL

  def evaluate(step, seconds):
    outs = [eval_step(modules, val_clips[i:i + 128], val_true[i:i + 128])
            for i in range(0, len(val_clips), 128)]
    error_N = np.concatenate([np.asarray(e) for e, _ in outs]).reshape(-1)
    labels_N = val_true.reshape(-1)
    per_action = " ".join(f"{name} {error_N[labels_N == a].mean():.5f}"
                          for a, name in enumerate(env_lib.ACTION_NAMES))
    line = (f"{mode} step {step} ({seconds:.0f} s): validation MSE {error_N.mean():.5f} | "
            f"{per_action}")
    if mode == "latent":
      z_NL = np.concatenate([np.asarray(z) for _, z in outs]).reshape(len(labels_N), -1)
      sep = latent_separation(z_NL, labels_N, config.model.num_actions, env_lib.NUM_ACTIONS,
                              np.random.default_rng(0))
      line += (f" | linear probe {sep['probe']:.3f}, k-means NMI {sep['kmeans_nmi']:.3f}, "
               f"variance explained by the action {sep['explained']:.3f}")
    print(line, flush=True)

  rng = np.random.default_rng(config.seed)
  start = time.time()
  for step in range(1, FLAGS.steps + 1):
    rows = rng.integers(len(train_clips), size=config.batch_size)
    train_step(modules, optimizer, train_clips[rows], train_true[rows])
    if step % FLAGS.eval_every == 0 or step == FLAGS.steps:
      evaluate(step, time.time() - start)


if __name__ == "__main__":
  define_flags()
  app.run(main)
