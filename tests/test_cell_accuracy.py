"""The built-in world's per-cell contents and the per-content rollout accuracy tool."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from data_pipelines.builtin_world import cell_accuracy
from data_pipelines.builtin_world import env as env_lib

IMAGE = 32
CELL = IMAGE // env_lib.CELLS_PER_VIEW


def _cell_pixels(frame_HWC, y, x):
  return frame_HWC[y * CELL:(y + 1) * CELL, x * CELL:(x + 1) * CELL].reshape(-1, 3)


def _has_colour(pixels, colours):
  return any((pixels == np.asarray(c, np.uint8)).all(-1).any() for c in colours)


def test_view_contents_name_what_each_cell_shows():
  env = env_lib.BuiltinWorldEnv(image_size=IMAGE)
  seen = set()
  for episode in range(6):
    frames_THWC, actions_T = env_lib.rollout(env, episode, 30)
    # rollout leaves the env at its last frame.
    frame_HWC, contents_YU = frames_THWC[-1], env.view_contents()
    assert contents_YU.shape == (8, 8) and contents_YU.dtype == np.int32
    palette = env.floor_palette
    for y in range(8):
      for x in range(8):
        name = env_lib.CONTENT_NAMES[contents_YU[y, x]]
        pixels = _cell_pixels(frame_HWC, y, x)
        seen.add(name)
        if name == "floor":
          assert (pixels == pixels[0]).all() and _has_colour(pixels, palette), (y, x)
        elif name == "ball":
          assert _has_colour(pixels, env_lib._BALL_COLOURS), (y, x)
        elif name == "coin":
          assert _has_colour(pixels, [env_lib._COIN_COLOUR]), (y, x)
        elif name == "agent":
          assert (y, x) == env_lib.AGENT_VIEW_CELL[::-1]
          assert _has_colour(pixels, env_lib._AGENT_COLOURS)
        elif name == "obstacle":
          assert _has_colour(pixels, [env_lib._OBSTACLE_COLOUR]), (y, x)
        else:  # Wall: brick of a wall shade, never the floor's.
          assert _has_colour(pixels, env_lib._WALL_COLOURS.astype(np.uint8)), (y, x)
          assert not _has_colour(pixels, palette), (y, x)
  assert {"floor", "wall", "agent"} <= seen


@functools.lru_cache
def _genie(patch_size):
  from genie_jax.inference import genie as genie_lib  # pylint: disable=g-import-not-at-top
  from genie_jax.models import dynamics as dynamics_lib  # pylint: disable=g-import-not-at-top
  from genie_jax.models import lam as lam_lib  # pylint: disable=g-import-not-at-top
  from genie_jax.models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  common = dict(image_size=IMAGE, patch_size=patch_size, max_frames=4, d_model=16,
                num_heads=2, enc_layers=1, dec_layers=1, latent_dim=4)
  tok_cfg = tokenizer_lib.default_config()
  tok_cfg.update(dict(common, num_codes=8))
  lam_cfg = lam_lib.default_config()
  lam_cfg.update(dict(common, num_actions=3))
  dyn_cfg = dynamics_lib.default_config()
  dyn_cfg.update(dict(num_layers=1, d_model=16, num_heads=2, num_codes=8,
                      tokens_per_frame=(IMAGE // patch_size) ** 2, num_actions=3, max_frames=4))
  rngs = nnx.Rngs(0)
  return genie_lib.Genie(dynamics_lib.WorldModel(
      tokenizer_lib.Tokenizer(tok_cfg, rngs=rngs), lam_lib.LatentActionModel(lam_cfg, rngs=rngs),
      dynamics_lib.DynamicsModel(dyn_cfg, rngs=rngs)))


def test_cell_accuracy_counts_every_cell_once():
  video_BTHWC, contents_BTN, new_BTN = cell_accuracy.play_clips(IMAGE, 3, 4, skip=2)
  assert video_BTHWC.shape == (3, 4, IMAGE, IMAGE, 3) and contents_BTN.shape == (3, 4, 64)
  results, split = cell_accuracy.cell_accuracy(_genie(CELL), video_BTHWC, contents_BTN,
                                               new_BTN, maskgit_steps=2, temperature=0.0,
                                               rng=jax.random.key(0))
  assert list(split["parts"]) == ["new in view"] + list(env_lib.CONTENT_NAMES)
  assert sum(r["cells"] for r in split["parts"].values()) == 3 * 64
  assert sum(r["share"] for r in split["parts"].values()) == pytest.approx(1.0)
  assert list(results) == list(env_lib.CONTENT_NAMES)
  assert sum(r["cells"] for r in results.values()) == 3 * 64
  for name, r in results.items():
    assert r["cells"] == int(np.sum(contents_BTN[:, 1] == env_lib.CONTENT_NAMES.index(name)))
    assert len(r["accuracy_t"]) == 3
    for value in r["accuracy_t"] + [r["p_true_t1"]]:
      assert np.isnan(value) or 0.0 <= value <= 1.0, name
    k = env_lib.CONTENT_NAMES.index(name)
    # A token of one content alone occurs in the true frames only where that content is.
    assert all(r["only_true"][t - 1] <= np.sum(contents_BTN[:, t] == k) for t in (1, 2, 3))
    present = bool(np.any(contents_BTN == k))
    tok = r["tokenizer"]
    assert (tok["looks"] >= 1 and tok["codes"] >= 1) if present else (
        tok["looks"] == tok["codes"] == 0)
  # The floor of one episode has at most its palette's two shades.
  assert results["floor"]["tokenizer"]["looks"] <= 2 * 3


def _ball_clips():
  """Clips with balls in view (seeds whose first frames show one)."""
  video_BTHWC, contents_BTN, _ = cell_accuracy.play_clips(IMAGE, 12, 2, skip=0)
  keep = np.any(contents_BTN == env_lib.CONTENT_NAMES.index("ball"), axis=(1, 2))
  assert keep.sum() >= 2
  return video_BTHWC[keep], contents_BTN[keep]


def test_ball_headings_are_the_balls_velocities():
  """The quarter `ball_headings` reads from a ball's pixels is the one its velocity points
  to (checked against the world's own ball state)."""
  env = env_lib.BuiltinWorldEnv(image_size=IMAGE)
  checked = 0
  for episode in range(12):
    env.reset(episode)
    frame_HWC = env.render()
    cells = cell_accuracy._cells(frame_HWC[None, None])[0, 0]  # pylint: disable=protected-access
    for xy, velocity in zip(env._balls, env._ball_v):  # pylint: disable=protected-access
      vx, vy = np.asarray(xy) - env._view  # pylint: disable=protected-access
      # The agent's sprite hides a ball under it.
      if not (0 <= vx < 8 and 0 <= vy < 8) or np.array_equal(xy, env._agent):  # pylint: disable=protected-access
        continue
      (quarter,) = cell_accuracy.ball_headings(cells[None, vy * 8 + vx])
      assert quarter == 2 * (velocity[1] > 0) + (velocity[0] > 0), (episode, xy, velocity)
      checked += 1
  assert checked >= 3


def test_tokenizer_cells_reads_psnr_codes_and_heading_purity():
  video_BTHWC, contents_BTN = _ball_clips()
  ball = env_lib.CONTENT_NAMES.index("ball")
  cells = cell_accuracy._cells(video_BTHWC)  # pylint: disable=protected-access
  b, t, n = contents_BTN.shape
  # A "tokenizer" whose token is the cell's look and whose reconstruction is exact: every
  # content's PSNR is the cap, its tokens are its looks, the heading purity is 1.
  looks_BTN = cell_accuracy.cell_looks(video_BTHWC)
  exact = cell_accuracy.tokenizer_cells(looks_BTN, video_BTHWC / 255.0, video_BTHWC,
                                        contents_BTN)
  assert sum(r["cells"] for r in exact.values()) == b * t * n
  for name, r in exact.items():
    if r["cells"]:
      assert r["looks"] == r["codes"] and r["recon_psnr"] == 100.0, name
  assert exact["ball"]["heading_purity"] == 1.0
  assert np.isnan(exact["floor"]["heading_purity"])
  # One token for every cell and a grey reconstruction: purity is the commonest heading's
  # share, and the PSNR is that of grey against the cells.
  grey = np.full(video_BTHWC.shape, 0.5, np.float32)
  lumped = cell_accuracy.tokenizer_cells(np.zeros_like(looks_BTN), grey, video_BTHWC,
                                         contents_BTN)
  headings = cell_accuracy.ball_headings(cells[contents_BTN == ball])
  assert lumped["ball"]["heading_purity"] == pytest.approx(
      np.bincount(headings).max() / len(headings))
  assert lumped["ball"]["codes"] == 1
  floor = cells[contents_BTN == 0] / 255.0
  assert lumped["floor"]["recon_psnr"] == pytest.approx(
      -10 * np.log10(np.mean(np.square(floor - 0.5))), rel=1e-5)
  with pytest.raises(ValueError, match="one per cell"):
    cell_accuracy.tokenizer_cells(looks_BTN[:, :, :16], grey, video_BTHWC, contents_BTN)


def test_new_in_view_cells_are_the_row_or_column_a_move_brings_in():
  video_BTHWC, contents_BTN, new_BTN = cell_accuracy.play_clips(IMAGE, 6, 12, skip=0)
  cells_BTYU = cell_accuracy._cells(video_BTHWC).reshape(6, 12, 8, 8, -1)  # pylint: disable=protected-access
  static_BTYU = np.isin(contents_BTN, [0, 1, 2]).reshape(6, 12, 8, 8)  # floor, wall, obstacle
  assert not new_BTN[:, 0].any()
  moves = 0
  for b in range(6):
    for t in range(1, 12):
      new_YU = new_BTN[b, t].reshape(8, 8)
      assert new_YU.sum() in (0, 8)
      # The view moved by (dy, dx): the new row or column is on that side.
      dy = int(new_YU[-1].all()) - int(new_YU[0].all())
      dx = int(new_YU[:, -1].all()) - int(new_YU[:, 0].all())
      moves += bool(new_YU.any())
      for y in range(8):
        for x in range(8):
          if not new_YU[y, x] and static_BTYU[b, t, y, x] and static_BTYU[b, t - 1, y + dy,
                                                                            x + dx]:
            np.testing.assert_array_equal(cells_BTYU[b, t, y, x],
                                          cells_BTYU[b, t - 1, y + dy, x + dx])
  assert moves >= 10


def test_error_split_shares_and_gains():
  video_BTHWC, contents_BTN, new_BTN = cell_accuracy.play_clips(IMAGE, 4, 2, skip=3)
  truth_BHWC = video_BTHWC[:, 1] / 255.0
  recon_BHWC = np.clip(truth_BHWC + 0.01, 0, 1)
  # Generated frames wrong (black) on the new cells only.
  new_BHW = np.repeat(np.repeat(new_BTN[:, 1].reshape(4, 8, 8), CELL, 1), CELL, 2)
  generated_BHWC = np.where(new_BHW[..., None], 0.0, recon_BHWC)
  assert new_BTN[:, 1].any()
  split = cell_accuracy.error_split(generated_BHWC, recon_BHWC, video_BTHWC[:, 1],
                                    contents_BTN[:, 1], new_BTN[:, 1])
  parts = split["parts"]
  assert sum(r["cells"] for r in parts.values()) == 4 * 64
  assert parts["new in view"]["share"] > 0.9
  # Were the new cells as good as the reconstruction, the frames would be the reconstruction.
  assert parts["new in view"]["psnr_if_recon"] == pytest.approx(split["recon_psnr"], rel=1e-5)
  assert parts["floor"]["psnr_if_recon"] == pytest.approx(split["generated_psnr"], abs=0.05)


def test_cell_looks_are_equal_exactly_for_equal_pixels():
  video_BTHWC = np.zeros((1, 2, IMAGE, IMAGE, 3), np.uint8)
  video_BTHWC[0, 0, :CELL, :CELL] = 200           # cell 0 of frame 0
  video_BTHWC[0, 1, CELL:2 * CELL, :CELL] = 200   # cell 8 of frame 1: the same pixels
  video_BTHWC[0, 1, 0, CELL] = 1                  # cell 1 of frame 1: one pixel differs
  looks_BTN = cell_accuracy.cell_looks(video_BTHWC)
  assert looks_BTN.shape == (1, 2, 64)
  assert looks_BTN[0, 0, 0] == looks_BTN[0, 1, 8] != looks_BTN[0, 0, 1]
  assert looks_BTN[0, 1, 1] not in (looks_BTN[0, 0, 0], looks_BTN[0, 0, 1])
  assert len(np.unique(looks_BTN)) == 3


def test_cell_accuracy_needs_one_token_per_cell():
  video_BTHWC, contents_BTN, new_BTN = cell_accuracy.play_clips(IMAGE, 1, 4, skip=0)
  with pytest.raises(ValueError, match="16 tokens per frame.*one per cell.*64"):
    cell_accuracy.cell_accuracy(_genie(2 * CELL), video_BTHWC, contents_BTN, new_BTN,
                                maskgit_steps=1, temperature=0.0, rng=jax.random.key(0))


def test_lam_latents_clips_and_kmeans():
  from data_pipelines.builtin_world import lam_latents  # pylint: disable=g-import-not-at-top
  from genie_jax import action_metrics  # pylint: disable=g-import-not-at-top
  clips, true_N = lam_latents.transitions(IMAGE, 4, episodes=2)
  # 16 clips of 4 frames from each 64-frame episode, 3 transitions each.
  assert clips.shape == (32, 4, IMAGE, IMAGE, 3) and true_N.shape == (96,)
  assert set(true_N.tolist()) <= set(range(env_lib.NUM_ACTIONS))
  # Well separated clusters are found whatever the seeding.
  rng = np.random.default_rng(0)
  centres_KL = rng.normal(size=(4, 8)) * 10
  label_N = np.repeat(np.arange(4), 50)
  x_NL = centres_KL[label_N] + rng.normal(size=(200, 8)) * 0.1
  found_KL = lam_latents.kmeans(x_NL, 4, rng)
  assigned_N = np.argmin(((x_NL[:, None] - found_KL[None]) ** 2).sum(-1), 1)
  confusion = action_metrics.confusion_matrix(assigned_N, label_N, 4, 4)
  assert action_metrics.normalized_mutual_information(confusion) == pytest.approx(1.0)
