r"""Which of the built-in world's contents a trained world model keeps in its rollouts.

Plays fresh episodes of the world (seeds no dataset split uses) with the data's random
policy, rolls a dynamics workdir out from each clip's first frame with the LAM's actions
inferred from the clip (as the controllability evaluation does), and prints, per cell
content of the true frames (floor, wall, obstacle, coin, ball, agent: the environment knows
what each cell shows):
  * the fraction of those cells whose generated token is the tokenizer's token of the true
    frame, at each generated frame (--horizon of them);
  * at frame 1, the model's probability of the true token in one pass with the whole frame
    hidden (what MaskGIT's first step sees): low for a content the model never predicts;
  * how many tokens that only this content has (e.g. ball sprites) the true and the
    generated frames hold: a content that vanishes from rollouts has none in the latter;
  * how many different looks (pixel patterns) its cells have in the true frames and how
    many tokens the tokenizer gives them: fewer tokens than looks that matter (a ball's
    heading) leave the world model nothing to predict them from;
  * the tokenizer's reconstruction PSNR on its cells, and for balls how often a ball's
    token tells its heading (the heading purity: the share of ball cells whose token's
    most common heading is theirs; 1/4 is chance).
A second table splits the first generated frame's squared error into the cells the view
newly shows (a move brings a row or column into view that no frame has shown) and the
others by content: each part's share, and the frame's PSNR were that part as good as the
tokenizer's reconstruction (what getting that part right would gain).
Given a tokenizer workdir it prints the tokenizer's columns alone.

  python -m data_pipelines.builtin_world.cell_accuracy --workdir=workdirs/genie/dynamics
  python -m data_pipelines.builtin_world.cell_accuracy --workdir=workdirs/genie/tokenizer
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from data_pipelines.builtin_world import env as env_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags; defined only when this module is the program."""
  flags.DEFINE_string("workdir", None, "A dynamics- or tokenizer-stage workdir (built-in "
                      "world).")
  flags.DEFINE_integer("step", None, "The checkpoint's step; the latest if not given.")
  flags.DEFINE_integer("clips", 96, "Episodes played, one clip each.")
  flags.DEFINE_integer("horizon", 4, "Generated frames per clip.")
  flags.DEFINE_integer("maskgit_steps", 8, "MaskGIT steps per frame.")
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: argmax).")
  flags.DEFINE_integer("skip", 7, "Steps played before each clip starts, so that clips start "
                       "inside the policy's held actions.")


# Far from the dataset builders' episode seeds.
_SEED_BASE = 987_654


def play_clips(image_size: int, num_clips: int, num_frames: int, skip: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """video_BTHWC uint8, contents_BTN int32 (CONTENT_NAMES index per cell, raster order) and
  new_BTN bool (cells the view did not show in the frame before; none in frame 0) of
  `num_clips` clips of the random policy (`StickyRandomPolicy`, holds of 1-8 steps)."""
  env = env_lib.BuiltinWorldEnv(image_size=image_size)
  videos, contents, new = [], [], []
  for i in range(num_clips):
    env_seed, policy_seed = np.random.SeedSequence([_SEED_BASE, i]).spawn(2)
    policy = env_lib.StickyRandomPolicy(policy_seed)
    frames = [env.reset(env_seed)]
    cells = [env.view_contents().reshape(-1)]
    moves = [np.zeros(2, int)]
    for _ in range(skip + num_frames - 1):
      before = env.agent_cell
      frames.append(env.step(policy(env.blocked)))
      cells.append(env.view_contents().reshape(-1))
      moves.append(env.agent_cell - before)
    videos.append(np.stack(frames[-num_frames:]))
    contents.append(np.stack(cells[-num_frames:]))
    new.append(np.stack([_new_in_view(m) for m in moves[-num_frames:]]))
  new_BTN = np.stack(new)
  new_BTN[:, 0] = False
  return np.stack(videos), np.stack(contents), new_BTN


def _new_in_view(move_xy: np.ndarray) -> np.ndarray:
  """bool (N,): the cells a view that followed the agent by `move_xy` (one cell at most)
  newly shows, raster order."""
  n = env_lib.CELLS_PER_VIEW
  new_YU = np.zeros((n, n), bool)
  dx, dy = move_xy
  if dx:
    new_YU[:, -1 if dx > 0 else 0] = True
  if dy:
    new_YU[-1 if dy > 0 else 0, :] = True
  return new_YU.reshape(-1)


def _cells(x_BTHWC: np.ndarray) -> np.ndarray:
  """(B, T, N, s, s, C): the view's cells in raster order."""
  b, t, h, w, c = x_BTHWC.shape
  n, side = env_lib.CELLS_PER_VIEW, h // env_lib.CELLS_PER_VIEW
  return x_BTHWC.reshape(b, t, n, side, n, side, c).transpose(0, 1, 2, 4, 3, 5, 6).reshape(
      b, t, n * n, side, side, c)


def _cell_errors(x_BTHWC: np.ndarray, video_BTHWC: np.ndarray) -> np.ndarray:
  """(B, T, N): the mean squared error of each cell of frames x (float, [0, 1]) against the
  uint8 video's."""
  return np.mean(np.square(_cells(x_BTHWC.astype(np.float32))
                           - _cells(video_BTHWC).astype(np.float32) / 255.0), axis=(3, 4, 5))


def cell_looks(video_BTHWC: np.ndarray) -> np.ndarray:
  """int (B, T, N): an id per cell of the view (raster order) that is equal for two cells
  exactly when their pixels are."""
  cells = _cells(video_BTHWC)
  _, ids = np.unique(cells.reshape(-1, cells[0, 0, 0].size), axis=0, return_inverse=True)
  return ids.reshape(cells.shape[:3])


def ball_headings(ball_cells: np.ndarray) -> np.ndarray:
  """The quarter (0 up-left, 1 up-right, 2 down-left, 3 down-right) that shows the ball's
  heading colour: int (cells,) of ball cells' uint8 pixels (cells, side, side, C)."""
  half = ball_cells.shape[1] // 2
  is_heading = np.all(ball_cells == env_lib.BALL_HEADING_COLOUR, axis=-1)  # (cells, side, side)
  quarters = [is_heading[:, :half, :half], is_heading[:, :half, half:],
              is_heading[:, half:, :half], is_heading[:, half:, half:]]
  return np.argmax(np.stack([q.sum((1, 2)) for q in quarters], -1), -1)


def tokenizer_cells(tokens_BTN: np.ndarray, recon_BTHWC: np.ndarray, video_BTHWC: np.ndarray,
                    contents_BTN: np.ndarray) -> dict:
  """Per content, over every frame: {name: dict(cells, recon_psnr, looks, codes,
  heading_purity)} from the tokenizer's tokens and reconstruction (float, [0, 1]) of a uint8
  clip; heading_purity is NaN but for balls, every value NaN (cells 0) where a content
  never occurs."""
  if tokens_BTN.shape[2] != contents_BTN.shape[2]:
    raise ValueError(f"the tokenizer has {tokens_BTN.shape[2]} tokens per frame; this tool "
                     f"needs one per cell of the world's view ({contents_BTN.shape[2]})")
  looks_BTN = cell_looks(video_BTHWC)
  true_cells = _cells(video_BTHWC)
  error_BTN = _cell_errors(recon_BTHWC, video_BTHWC)
  results = {}
  for k, name in enumerate(env_lib.CONTENT_NAMES):
    where_BTN = contents_BTN == k
    n = int(where_BTN.sum())
    purity = float("nan")
    if name == "ball" and n:
      # One entry per ball cell.
      headings, ball_tokens = ball_headings(true_cells[where_BTN]), tokens_BTN[where_BTN]
      purity = sum(np.bincount(headings[ball_tokens == u], minlength=4).max()
                   for u in np.unique(ball_tokens)) / n
    results[name] = dict(
        cells=n,
        recon_psnr=float(-10.0 * np.log10(max(error_BTN[where_BTN].mean(), 1e-10))) if n
        else float("nan"),
        looks=len(np.unique(looks_BTN[where_BTN])), codes=len(np.unique(tokens_BTN[where_BTN])),
        heading_purity=purity)
  return results


def error_split(generated_BHWC: np.ndarray, recon_BHWC: np.ndarray, video_BHWC: np.ndarray,
                contents_BN: np.ndarray, new_BN: np.ndarray) -> dict:
  """The squared error of generated frames (float, [0, 1]) against the true uint8 ones, by
  part: 'new in view' (new_BN) and each content of the other cells. {part: dict(cells,
  share (of the whole frame's squared error), psnr_if_recon (the frames' PSNR with that
  part's cells replaced by the tokenizer's reconstruction recon_BHWC))} under 'parts', and
  the PSNR of the generated frames and of the reconstruction."""
  generated_BN, recon_BN = (_cell_errors(x_BHWC[:, None], video_BHWC[:, None])[:, 0]
                            for x_BHWC in (generated_BHWC, recon_BHWC))
  parts = {"new in view": new_BN}
  for k, name in enumerate(env_lib.CONTENT_NAMES):
    parts[name] = (contents_BN == k) & ~new_BN
  psnr = lambda error_BN: float(-10.0 * np.log10(error_BN.mean()))
  results = {}
  for name, where_BN in parts.items():
    results[name] = dict(cells=int(where_BN.sum()),
                         share=float(generated_BN[where_BN].sum() / generated_BN.sum()),
                         psnr_if_recon=psnr(np.where(where_BN, recon_BN, generated_BN)))
  return dict(parts=results, generated_psnr=psnr(generated_BN), recon_psnr=psnr(recon_BN))


def cell_accuracy(genie, video_BTHWC: np.ndarray, contents_BTN: np.ndarray,
                  new_BTN: np.ndarray, *, maskgit_steps: int, temperature: float,
                  rng: jax.Array) -> tuple[dict, dict]:
  """Per-content token accuracy of a rollout from frame 0 (see the module docstring), and
  `error_split` of its first generated frame.

  The first is {content name: dict(cells=..., accuracy_t=[...], p_true_t1=...,
  only_tokens=[...], only_true=[...], only_generated=[...], tokenizer=...)} with
  `tokenizer_cells`' entry for the content under 'tokenizer'; entries are NaN where a
  content never occurs.
  """
  from genie_jax.inference import genie as genie_lib  # The world alone needs no JAX.

  tokens_BTN = np.asarray(genie.tokenize(video_BTHWC))
  recon_BTHWC = np.asarray(genie.detokenize(tokens_BTN))
  tokenizer = tokenizer_cells(tokens_BTN, recon_BTHWC, video_BTHWC, contents_BTN)
  actions_BT = np.asarray(genie.infer_actions(video_BTHWC))
  from flax import nnx

  @nnx.jit
  def run(world, tokens_BTN, actions_BT, rng):
    rolled_BTN = genie_lib.rollout_tokens(
        world, jnp.asarray(video_BTHWC[:, :1]), actions_BT, rng, num_steps=maskgit_steps,
        temperature=temperature, prior_weight=genie.prior_weight)
    hidden_BTN = jnp.zeros(tokens_BTN[:, :2].shape, bool).at[:, 1].set(True)
    logits_BNV = world.dynamics(tokens_BTN[:, :2], hidden_BTN, actions_BT[:, :2])[:, 1]
    p_true_BN = jnp.take_along_axis(jax.nn.softmax(logits_BNV, -1),
                                    tokens_BTN[:, 1, :, None], -1)[..., 0]
    return rolled_BTN, p_true_BN

  rolled_BTN, p_true_BN = map(np.asarray, run(genie.world, jnp.asarray(tokens_BTN),
                                              jnp.asarray(actions_BT), rng))
  horizon = rolled_BTN.shape[1] - 1
  results = {}
  for k, name in enumerate(env_lib.CONTENT_NAMES):
    where_BTN = contents_BTN == k
    # Tokens that this content alone takes in the true frames.
    others = np.unique(tokens_BTN[~where_BTN])
    only = np.setdiff1d(np.unique(tokens_BTN[where_BTN]), others)
    accuracy = [float(np.mean(rolled_BTN[:, t][where_BTN[:, t]] == tokens_BTN[:, t][
        where_BTN[:, t]])) if where_BTN[:, t].any() else float("nan")
                for t in range(1, horizon + 1)]
    results[name] = dict(
        cells=int(where_BTN[:, 1].sum()), accuracy_t=accuracy,
        p_true_t1=float(p_true_BN[where_BTN[:, 1]].mean()) if where_BTN[:, 1].any()
        else float("nan"),
        only_tokens=only.tolist(),
        only_true=[int(np.isin(tokens_BTN[:, t], only).sum()) for t in range(1, horizon + 1)],
        only_generated=[int(np.isin(rolled_BTN[:, t], only).sum())
                        for t in range(1, horizon + 1)],
        tokenizer=tokenizer[name])
  generated_BHWC = np.asarray(genie.detokenize(rolled_BTN[:, :2]))[:, 1]
  return results, error_split(generated_BHWC, recon_BTHWC[:, 1], video_BTHWC[:, 1],
                              contents_BTN[:, 1], new_BTN[:, 1])


def _tokenizer_columns(r: dict) -> str:
  purity = "" if np.isnan(r["heading_purity"]) else f", heading purity {r['heading_purity']:.2f}"
  return f"{r['recon_psnr']:.2f} | {r['looks']} / {r['codes']}{purity}"


def _tokenizer_main(workdir: str) -> None:
  from flax import nnx
  from genie_jax.inference import stages
  from genie_jax.models import tokenizer as tokenizer_lib

  loaded = stages.load_stage(workdir, step=FLAGS.step, expect_stage="tokenizer")
  frames = min(FLAGS.horizon + 1, loaded.config.model.max_frames)
  video_BTHWC, contents_BTN, _ = play_clips(loaded.config.model.image_size, FLAGS.clips,
                                            frames, FLAGS.skip)

  @nnx.jit
  def run(tokenizer, video_BTHWC):
    tokens_BTN, _ = tokenizer.encode(tokenizer_lib.to_unit_interval(video_BTHWC))
    return tokens_BTN, tokenizer.decode(tokens_BTN)

  tokens_BTN, recon_BTHWC = map(np.asarray, run(loaded.model, jnp.asarray(video_BTHWC)))
  results = tokenizer_cells(tokens_BTN, recon_BTHWC, video_BTHWC, contents_BTN)
  mse = np.mean(np.square(recon_BTHWC - video_BTHWC / 255.0))
  print(f"{workdir} (step {loaded.step}): {FLAGS.clips} clips of {frames} frames, "
        f"{len(np.unique(tokens_BTN))} of {loaded.config.model.num_codes} codes used, "
        f"reconstruction PSNR {-10 * np.log10(mse):.2f} dB")
  print("content | cells | reconstruction PSNR (dB) | looks / tokens in the true frames")
  for name, r in results.items():
    print(f"{name} | {r['cells']} | {_tokenizer_columns(r)}")


def main(argv):
  del argv
  from genie_jax import config_lib
  from genie_jax.inference import genie as genie_lib

  if config_lib.load_config(FLAGS.workdir).stage == "tokenizer":
    _tokenizer_main(FLAGS.workdir)
    return
  genie = genie_lib.Genie.from_workdir(FLAGS.workdir, step=FLAGS.step)
  image_size = genie.frame_shape[0]
  video_BTHWC, contents_BTN, new_BTN = play_clips(image_size, FLAGS.clips, FLAGS.horizon + 1,
                                                  FLAGS.skip)
  results, split = cell_accuracy(
      genie, video_BTHWC, contents_BTN, new_BTN, maskgit_steps=FLAGS.maskgit_steps,
      temperature=FLAGS.temperature, rng=jax.random.key(0))
  h = FLAGS.horizon
  print(f"{FLAGS.workdir} (step {genie.step}): {FLAGS.clips} clips, rollouts from frame 0 "
        f"with inferred actions, {FLAGS.maskgit_steps} MaskGIT steps, temperature "
        f"{FLAGS.temperature}")
  print("content | cells at t1 | " + " | ".join(f"token acc t{t}" for t in range(1, h + 1))
        + " | p(true token) t1, one pass | its own tokens: in true / generated frames t1.. "
        "| tokenizer: reconstruction PSNR (dB) | looks / tokens in the true frames")
  for name, r in results.items():
    own = ", ".join(f"{a}/{b}" for a, b in zip(r["only_true"], r["only_generated"]))
    print(f"{name} | {r['cells']} | " + " | ".join(f"{a:.3f}" for a in r["accuracy_t"])
          + f" | {r['p_true_t1']:.3f} | {own if r['only_tokens'] else '-'}"
          + f" | {_tokenizer_columns(r['tokenizer'])}")
  print(f"the first generated frame: PSNR {split['generated_psnr']:.2f} dB, the tokenizer's "
        f"reconstruction {split['recon_psnr']:.2f} dB")
  print("its squared error by part (cells new in view; the others by content) | cells | "
        "share | its PSNR were the part the tokenizer's (dB)")
  for name, r in split["parts"].items():
    print(f"{name} | {r['cells']} | {r['share']:.3f} | {r['psnr_if_recon']:.2f}")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
