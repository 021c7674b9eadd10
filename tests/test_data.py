"""Tests of data_pipelines (builders, record format) and genie_jax.data.input_pipeline."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

import data_pipelines
from data_pipelines import episode_builder
from data_pipelines.builtin_world import env as env_lib
from data_pipelines.video_folder import builder as video_builder
from genie_jax import sharding
from genie_jax.data import input_pipeline
from conftest import REPO

CLIP_LEN = 6
IMAGE_SIZE = 32


def _tiny_config(data_dir, **overrides):
  # 6 + 2 episodes of 40 frames in chunks of 16: each episode gives chunks of 16, 16 and 8
  # frames, i.e. 11 + 11 + 3 = 25 clips of 6 frames; the train split has 150 clips.
  config = data_pipelines.default_data_config("builtin_world")
  config.data_dir = str(data_dir)
  config.image_size = IMAGE_SIZE
  config.num_train_episodes = 6
  config.num_val_episodes = 2
  config.episode_len = 40
  config.chunk_len = 16
  config.min_chunk_len = 4
  config.clip_len = CLIP_LEN
  config.read_threads = 2
  config.prefetch = 2
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  config = _tiny_config(tmp_path_factory.mktemp("tfds"))
  builder = data_pipelines.get_builder(config, prepare=True, process_index=0)
  return config, builder


def _episode(config, episode_id):
  """The episode as the builder must have generated it: (frames_THWC, actions_T)."""
  env = env_lib.BuiltinWorldEnv(image_size=config.image_size)
  frames, actions = env_lib.rollout(env, episode_builder.episode_seed(config.seed, episode_id),
                                    config.episode_len)
  return frames, actions


def _batches(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _clip_ids(ds):
  return [(int(e), int(s)) for batch in ds for e, s in zip(batch["episode_id"], batch["start"])]


# --- The built-in world ---------------------------------------------------------------------


def test_env_is_deterministic_for_a_seed():
  actions = np.random.default_rng(0).integers(0, env_lib.NUM_ACTIONS, 30)
  runs = []
  for _ in range(2):
    env = env_lib.BuiltinWorldEnv(image_size=64)
    runs.append(np.stack([env.reset(7)] + [env.step(a) for a in actions]))
  np.testing.assert_array_equal(runs[0], runs[1])
  assert runs[0].shape == (31, 64, 64, 3) and runs[0].dtype == np.uint8
  assert not np.array_equal(env_lib.BuiltinWorldEnv(64).reset(8), runs[0][0])


def test_actions_change_the_agent_motion():
  def play(actions):
    env = env_lib.BuiltinWorldEnv(image_size=64)
    env.reset(4)  # Nothing solid next to the agent: every move goes through.
    return np.stack([env.step(a) for a in actions])

  noop = play([env_lib.NOOP] * 6)
  for action in (env_lib.LEFT, env_lib.RIGHT, env_lib.UP, env_lib.DOWN, env_lib.RECOLOUR):
    other = play([action] * 6)
    # Balls move the same way whatever the agent does, so every difference is the action's.
    assert not np.array_equal(other[0], noop[0]), env_lib.ACTION_NAMES[action]
  # Different sequences, different videos; the same sequence, the same video.
  np.testing.assert_array_equal(play([1, 1, 3, 3]), play([1, 1, 3, 3]))
  assert not np.array_equal(play([1, 1, 3, 3]), play([2, 2, 4, 4]))


def test_ceiling_guesses_only_the_cells_a_move_brings_into_view():
  from data_pipelines.builtin_world import motion_stats  # pylint: disable=g-import-not-at-top
  env = env_lib.BuiltinWorldEnv(image_size=32)
  errors = motion_stats.revealed_cell_error(env, episodes=3, frames=40)
  # Nothing comes into view without a move; an unblocked move brings a row or column (8 of
  # the 64 cells), of which a random guess gets some wrong.
  for name in ("noop", "recolour"):
    assert errors[name] and not any(errors[name]), name
  for name in ("left", "right", "up", "down"):
    assert 0 < np.mean(errors[name]) < 1 / 8, name  # Pixels in [0, 1]: at most 8 cells.


@pytest.mark.parametrize("image_size", [32, 64])
def test_a_move_scrolls_the_view_by_one_cell_or_not_at_all(image_size):
  # Without balls, everything but the agent's cell is the world, so a move must shift the
  # whole view by exactly one cell (an eighth of the view: one token for patches of that
  # size) in the action's direction, or leave it where it was when blocked.
  env = env_lib.BuiltinWorldEnv(image_size=image_size, num_balls=0, num_coins=0)
  c = image_size // 8
  frame = env.reset(11)
  keep = np.ones((8, 8), bool)
  keep[env_lib.AGENT_VIEW_CELL[1], env_lib.AGENT_VIEW_CELL[0]] = False
  keep = keep.repeat(c, 0).repeat(c, 1)
  moves = {env_lib.LEFT: (-1, 0), env_lib.RIGHT: (1, 0), env_lib.UP: (0, -1),
           env_lib.DOWN: (0, 1)}
  moved = blocked = 0
  rng = np.random.default_rng(0)
  for action in rng.choice(list(moves), 80):
    nxt = env.step(action)
    dx, dy = (0, 0) if env.blocked else tuple(c * m for m in moves[action])
    # nxt[y, x] shows what frame[y + dy, x + dx] showed.
    h = image_size
    ys, xs = slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), h - max(0, dx))
    ys0, xs0 = slice(max(0, dy), h - max(0, -dy)), slice(max(0, dx), h - max(0, -dx))
    k = keep[ys, xs] & keep[ys0, xs0]
    np.testing.assert_array_equal(nxt[ys, xs][k], frame[ys0, xs0][k])
    # ... and no other shift explains it: the floor is not periodic at one cell.
    if not env.blocked:
      assert not np.array_equal(nxt[c:-c, c:-c][keep[c:-c, c:-c]],
                                frame[c:-c, c:-c][keep[c:-c, c:-c]])
    moved += not env.blocked
    blocked += env.blocked
    frame = nxt
  assert moved > 40 and blocked > 0, (moved, blocked)


def test_balls_show_where_they_head():
  # A ball's next cell is readable from one frame: its bright quarter points along its
  # motion (models that see one frame, the LAM's decoder and a one-frame prompt, need it).
  env = env_lib.BuiltinWorldEnv(image_size=32, num_balls=1, num_coins=0, num_obstacles=0)
  c = env.cell
  env.reset(2)
  checked = 0
  for _ in range(30):
    before = env._balls[0].copy()
    frame = env.step(env_lib.NOOP)
    after, v = env._balls[0], env._ball_v[0]
    if np.abs(after - env._agent).max() <= 1:
      continue  # It may bounce off the agent next.
    vx, vy = after - env._view
    if not (0 <= vx < 8 and 0 <= vy < 8):
      continue
    cell_HWC = frame[vy * c:(vy + 1) * c, vx * c:(vx + 1) * c].astype(int)
    bright = cell_HWC.sum(-1) >= 3 * 250
    ys, xs = np.nonzero(bright)
    assert len(ys), "no heading mark"
    assert np.sign(ys.mean() - (c - 1) / 2) == v[1] and np.sign(xs.mean() - (c - 1) / 2) == v[0]
    assert np.abs(after - before).max() <= 1
    checked += 1
  assert checked >= 2, checked  # The ball was in view, away from the agent, at some steps.


def test_policy_holds_actions_unless_told_not_to():
  def repeats(max_hold):
    _, actions = env_lib.rollout(env_lib.BuiltinWorldEnv(image_size=32), 3, 400, max_hold)
    return np.mean(actions[1:-1] == actions[:-2])
  # Independent draws repeat the last action with probability sum(p^2) = 0.18; holds of
  # 1-8 steps (4.5 on average, fewer after blocked moves) much more often.
  assert repeats(1) < 0.3
  assert repeats(8) > 0.6
  with pytest.raises(ValueError, match="max_hold must be at least 1"):
    env_lib.StickyRandomPolicy(0, max_hold=0)


def test_old_configs_get_the_policy_they_were_generated_with():
  from data_pipelines.builtin_world import builder  # pylint: disable=g-import-not-at-top
  config = data_pipelines.default_data_config("builtin_world")
  config.builtin_world_max_hold = 1
  assert builder.BuiltinWorld.config_from_data_config(config).max_hold == 1
  saved = config.to_dict()
  del saved["builtin_world_max_hold"]
  import ml_collections  # pylint: disable=g-import-not-at-top
  old = builder.BuiltinWorld.config_from_data_config(ml_collections.ConfigDict(saved))
  assert old.max_hold == 8 and old.name.endswith("_hold8")


def test_rollout_records_the_action_applied_at_each_frame():
  env = env_lib.BuiltinWorldEnv(image_size=32)
  frames, actions = env_lib.rollout(env, 5, 50)
  assert actions[-1] == -1 and ((actions[:-1] >= 0) & (actions[:-1] < 6)).all()
  env.reset(np.random.SeedSequence(5).spawn(2)[0])
  for t in range(5):
    np.testing.assert_array_equal(env.step(actions[t]), frames[t + 1])


# --- Builders and record format -------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_chunk_episode(stream):
  frames = np.broadcast_to(np.arange(37, dtype=np.uint8)[:, None, None, None], (37, 32, 32, 3))
  actions = np.arange(37, dtype=np.int32)
  episode = episode_builder.Episode(4, iter(list(frames)) if stream else frames, actions)
  records = list(episode_builder.chunk_episode(episode, chunk_len=16, min_chunk_len=5,
                                               image_size=32))
  assert [(r["start"], len(r["frames"])) for r in records] == [(0, 16), (16, 16), (32, 5)]
  for r in records:
    np.testing.assert_array_equal(r["frames"][:, 0, 0, 0], np.arange(r["start"], r["start"] +
                                                                     len(r["frames"])))
    assert r["episode_id"] == 4 and r["actions"].dtype == np.int32
  assert records[1]["actions"][-1] == 31 and records[2]["actions"][-1] == -1
  # A tail shorter than min_chunk_len is dropped; the chunk before keeps its real last action.
  records = list(episode_builder.chunk_episode(episode_builder.Episode(
      4, frames[:34], actions[:34]), chunk_len=16, min_chunk_len=5, image_size=32))
  assert [len(r["frames"]) for r in records] == [16, 16] and records[1]["actions"][-1] == 31


def test_builder_writes_array_record_chunks(tiny):
  config, builder = tiny
  for split in ("train", "validation"):
    assert glob.glob(os.path.join(builder.data_dir, f"builtin_world-{split}.array_record-*"))
  metadata = builder.info.metadata
  assert metadata["chunk_lengths"]["train"] == [16, 16, 8] * 6
  assert metadata["num_frames"] == {"train": 240, "validation": 80}
  assert metadata["num_actions"] == 6
  ids = {}
  for split in ("train", "validation"):
    source = builder.as_data_source(split)
    ids[split] = {int(source[i]["episode_id"]) for i in range(len(source))}
    for i in range(len(source)):
      record = source[i]
      episode_id, start = int(record["episode_id"]), int(record["start"])
      frames, actions = _episode(config, episode_id)
      n = len(record["frames"])
      assert record["frames"].dtype == np.uint8 and record["frames"].shape == (n, 32, 32, 3)
      assert record["actions"].dtype == np.int32 and record["actions"].shape == (n,)
      np.testing.assert_array_equal(record["frames"], frames[start:start + n])
      np.testing.assert_array_equal(record["actions"], actions[start:start + n])
  assert ids == {"train": set(range(6)), "validation": {6, 7}}


def test_generation_parameters_name_the_dataset(tiny, tmp_path):
  config, builder = tiny
  other = data_pipelines.make_builder(_tiny_config(config.data_dir, episode_len=41))
  assert other.data_dir != builder.data_dir and not other.is_prepared()
  with pytest.raises(FileNotFoundError, match="config.data.name='builtin_world'"):
    data_pipelines.get_builder(_tiny_config(config.data_dir, seed=3), prepare=False)
  assert data_pipelines.make_builder(_tiny_config(config.data_dir)).data_dir == builder.data_dir


def test_other_processes_wait_for_process_0(tmp_path):
  config = _tiny_config(tmp_path, num_train_episodes=2, num_val_episodes=1, episode_len=20)
  with pytest.raises(FileNotFoundError, match="did not generate"):
    data_pipelines.get_builder(config, prepare=True, process_index=1, poll_interval_s=0.05,
                               timeout_s=0.2)
  waiter = {}
  thread = threading.Thread(target=lambda: waiter.setdefault("builder", data_pipelines.get_builder(
      config, prepare=True, process_index=1, poll_interval_s=0.05, timeout_s=60)))
  thread.start()
  data_pipelines.get_builder(config, prepare=True, process_index=0)
  thread.join()
  assert waiter["builder"].info.splits["train"].num_examples == 4


# --- Input pipeline -------------------------------------------------------------------------


def test_batches_are_aligned_clips(tiny):
  config, builder = tiny
  ds = input_pipeline.make_dataset(config, "train", seed=0, global_batch_size=4,
                                   process_index=0, process_count=1, builder=builder)
  for batch in _batches(ds, 3):
    assert batch["video"].shape == (4, CLIP_LEN, 32, 32, 3) and batch["video"].dtype == np.uint8
    assert batch["actions"].shape == (4, CLIP_LEN) and batch["actions"].dtype == np.int32
    assert batch["episode_id"].shape == (4,) and batch["episode_id"].dtype == np.int64
    for video, actions, episode_id, start in zip(batch["video"], batch["actions"],
                                                 batch["episode_id"], batch["start"]):
      frames, true_actions = _episode(config, episode_id)
      # actions[t] is the action taken at video[t], the one that produced video[t + 1].
      np.testing.assert_array_equal(video, frames[start:start + CLIP_LEN])
      np.testing.assert_array_equal(actions, true_actions[start:start + CLIP_LEN])


def test_pipeline_is_deterministic_for_a_seed(tiny):
  config, builder = tiny
  make = lambda seed: input_pipeline.make_dataset(
      config, "train", seed=seed, global_batch_size=4, process_index=0, process_count=1,
      builder=builder)
  _assert_batches_equal(_batches(make(0), 5), _batches(make(0), 5))
  ids0, ids1 = (_clip_ids(_batches(make(seed), 5)) for seed in (0, 1))
  assert ids0 != ids1


def test_one_epoch_covers_every_clip_once_and_reshuffles(tiny):
  config, builder = tiny
  ds = input_pipeline.make_dataset(config, "train", seed=0, global_batch_size=5,
                                   process_index=0, process_count=1, builder=builder)
  epochs = _batches(ds, 60)  # 150 clips: two epochs of 30 batches.
  first, second = _clip_ids(epochs[:30]), _clip_ids(epochs[30:])
  assert len(set(first)) == 150 and set(first) == set(second) and first != second


def test_processes_read_disjoint_shares_covering_the_split(tiny):
  config, builder = tiny
  make = lambda **kw: input_pipeline.make_dataset(
      config, "train", seed=0, repeat=False, builder=builder, **kw)
  single = _clip_ids(make(global_batch_size=5, process_index=0, process_count=1))
  shares = [_clip_ids(make(global_batch_size=10, process_index=p, process_count=2))
            for p in (0, 1)]
  assert len(shares[0]) == len(shares[1]) == 75
  assert not set(shares[0]) & set(shares[1])
  assert set(shares[0]) | set(shares[1]) == set(single) and len(single) == 150
  # The global batches do not depend on the process count: 2 processes' rows, side by side,
  # are the 1-process stream at the same global batch size.
  whole = _clip_ids(make(global_batch_size=10, process_index=0, process_count=1))
  assert sum((shares[0][i:i + 5] + shares[1][i:i + 5] for i in range(0, 75, 5)), []) == whole


def test_iterator_state_restores_the_exact_stream(tiny):
  config, builder = tiny
  ds = input_pipeline.make_dataset(config, "train", seed=0, global_batch_size=4,
                                   process_index=0, process_count=1, builder=builder)
  it = iter(ds)
  _ = [next(it) for _ in range(40)]  # Past the first epoch (37 batches).
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = iter(ds)
  resumed.set_state(state)
  _assert_batches_equal([next(resumed) for _ in range(3)], expected)


def test_iterator_resumes_through_orbax_checkpoint_manager(tiny, tmp_path):
  config, builder = tiny
  ds = input_pipeline.make_dataset(config, "train", seed=0, global_batch_size=4,
                                   process_index=0, process_count=1, builder=builder)
  it = iter(ds)
  _ = [next(it) for _ in range(5)]
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(5, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"step": np.int32(5)}),
        data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = [next(it) for _ in range(3)]

  resumed = iter(ds)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(),
        data_iter=grain.checkpoint.CheckpointRestore(resumed)))
  assert int(restored.state["step"]) == 5
  _assert_batches_equal([next(resumed) for _ in range(3)], expected)


def test_worker_processes_change_speed_not_content(tiny):
  config, builder = tiny
  make = lambda workers: input_pipeline.make_dataset(
      _tiny_config(config.data_dir, worker_count=workers), "train", seed=0,
      global_batch_size=4, process_index=0, process_count=1, builder=builder)
  expected = _batches(make(0), 6)
  it = iter(make(2))
  try:
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    _assert_batches_equal(first + [next(it) for _ in range(3)], expected)
  finally:
    it.close()
  it = iter(make(2))
  try:
    it.set_state(state)
    _assert_batches_equal([next(it) for _ in range(3)], expected[3:])
  finally:
    it.close()


def test_eval_dataset_is_fixed_padded_and_equal_across_processes(tiny):
  config, builder = tiny
  make = lambda **kw: input_pipeline.make_eval_dataset(config, "validation", builder=builder,
                                                       **kw)
  # 2 episodes x (2 + 2 + 1) non-overlapping clips of 6 frames = 10 clips.
  batches = list(make(global_batch_size=4, drop_remainder=False, process_index=0,
                      process_count=1))
  _assert_batches_equal(batches, list(make(global_batch_size=4, drop_remainder=False,
                                           process_index=0, process_count=1)))
  ids = _clip_ids(batches)
  assert len(batches) == 3 and sum(e >= 0 for e, _ in ids) == 10
  assert sorted(ids)[-10:] == sorted(
      (e, s) for e in (6, 7) for s in (0, 6, 16, 22, 32))
  padding = batches[-1]["episode_id"] == input_pipeline.PADDING_EPISODE_ID
  assert padding.sum() == 2 and (batches[-1]["actions"][padding] == -1).all()
  per_process = [list(make(global_batch_size=4, drop_remainder=False, process_index=p,
                           process_count=2)) for p in (0, 1)]
  assert len(per_process[0]) == len(per_process[1]) == 3
  assert sorted(sum((_clip_ids(b) for b in per_process), [])) == sorted(ids)
  assert len(list(make(global_batch_size=4, process_index=0, process_count=1))) == 2
  assert len(list(make(global_batch_size=2, num_batches=3, process_index=0,
                       process_count=1))) == 3


def test_to_global_batch():
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  local = {"video": np.arange(len(devices) * 2 * 3, dtype=np.uint8).reshape(-1, 3, 1, 1, 1),
           "episode_id": np.arange(len(devices) * 2, dtype=np.int64)}
  batch = input_pipeline.to_global_batch(local, sharding)
  for key in local:
    assert isinstance(batch[key], jax.Array)
    np.testing.assert_array_equal(np.asarray(batch[key]), local[key])
  assert batch["video"].sharding.spec == jax.sharding.PartitionSpec("data")


def test_meshes_whose_processes_would_share_batch_rows_are_refused():
  # 8 devices as if each were a process (one process per GPU), pairs as processes, or two
  # slices (processes) over DCN along fsdp, whose rows interleave.
  devices = jax.devices()[:8]
  batch_of = lambda mesh: jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  tensor2 = batch_of(sharding.make_mesh(dict(data=4, fsdp=1, tensor=2), devices))
  data8 = batch_of(sharding.make_mesh(dict(data=8, fsdp=1, tensor=1), devices))
  dcn = batch_of(sharding.make_mesh(dict(data=4, fsdp=1, tensor=1), devices,
                                    dcn_shape=dict(data=1, fsdp=2, tensor=1)))
  per_device, per_pair = devices.index, lambda d: devices.index(d) // 2
  with pytest.raises(ValueError, match=r"config.mesh=.*'tensor': 2.*config.batch_size=16 over "
                                       r"8 processes: process 0's devices hold 4 rows .* not "
                                       r"the 2 it reads"):
    input_pipeline.check_process_rows(tensor2, 16, "config.batch_size", process_of=per_device)
  input_pipeline.check_process_rows(data8, 16, "config.batch_size", process_of=per_device)
  input_pipeline.check_process_rows(tensor2, 16, "config.batch_size", process_of=per_pair)
  input_pipeline.check_process_rows(dcn, 16, "config.batch_size",
                                    process_of=lambda d: devices.index(d) // 4)


# --- Errors ---------------------------------------------------------------------------------


def test_config_mismatches_are_named(tiny):
  config, builder = tiny
  with pytest.raises(ValueError, match=r"config.data.image_size=64 .*tfds"):
    input_pipeline.make_dataset(_tiny_config(config.data_dir, image_size=64), "train", seed=0,
                                global_batch_size=4, builder=builder)
  with pytest.raises(ValueError, match=r"config.data.clip_len=17"):
    input_pipeline.make_dataset(_tiny_config(config.data_dir, clip_len=17), "train", seed=0,
                                global_batch_size=4, builder=builder)
  with pytest.raises(ValueError, match=r"config.batch_size=5"):
    input_pipeline.make_dataset(config, "train", seed=0, global_batch_size=5,
                                process_index=0, process_count=2, builder=builder)


@pytest.fixture
def tiny_copy(tiny, tmp_path):
  """A private copy of the tiny dataset, to damage."""
  config, _ = tiny
  shutil.copytree(config.data_dir, tmp_path / "tfds")
  config = _tiny_config(tmp_path / "tfds")
  builder = data_pipelines.get_builder(config, prepare=False)
  return config, builder


def test_corrupt_array_record_file_is_named(tiny_copy):
  config, builder = tiny_copy
  [path] = glob.glob(os.path.join(builder.data_dir, "*-validation.array_record-*"))
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\xde\xad\xbe\xef" * 16)
  ds = input_pipeline.make_eval_dataset(config, global_batch_size=2, process_index=0,
                                        process_count=1, builder=builder)
  with pytest.raises(input_pipeline.RecordError,
                     match=rf"Cannot read record \d+ of ArrayRecord file {re.escape(path)}"):
    list(ds)


def test_record_of_wrong_shape_is_named(tiny_copy):
  config, builder = tiny_copy
  metadata_path = os.path.join(builder.data_dir, "metadata.json")
  with open(metadata_path) as f:
    metadata = json.load(f)
  metadata["chunk_lengths"]["validation"][1] = 12  # Record 1 holds 16 frames.
  with open(metadata_path, "w") as f:
    json.dump(metadata, f)
  builder = data_pipelines.get_builder(config, prepare=False)
  ds = input_pipeline.make_eval_dataset(config, global_batch_size=2, process_index=0,
                                        process_count=1, builder=builder)
  with pytest.raises(input_pipeline.RecordError,
                     match=r"Bad record 1 of ArrayRecord file .*validation.*frames uint8"):
    list(ds)


# --- Other datasets -------------------------------------------------------------------------


def _gradient_video(num_frames, h, w):
  t, y, x = np.meshgrid(np.arange(num_frames), np.arange(h), np.arange(w), indexing="ij")
  return np.stack([(x * 4 + t * 8) % 256, (y * 4) % 256, (t * 16) % 256], -1).astype(np.uint8)


def test_video_folder_import(tmp_path):
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
  videos = tmp_path / "videos"
  (videos / "clips" / "frames").mkdir(parents=True)
  iio.imwrite(videos / "a.gif", _gradient_video(20, 48, 64), duration=40, loop=0)
  np.save(videos / "b.npy", _gradient_video(30, 40, 40))
  np.save(videos / "clips" / "c.npy", _gradient_video(18, 32, 32))
  for t, frame in enumerate(_gradient_video(25, 36, 36)):
    Image.fromarray(frame).save(videos / "clips" / "frames" / f"{t:03d}.png")

  config = _tiny_config(tmp_path / "tfds", name="video_folder", video_dir=str(videos),
                        val_fraction=0.25, min_chunk_len=16, episode_len=0)
  builder = data_pipelines.get_builder(config, prepare=True, process_index=0)
  metadata = builder.info.metadata
  assert [s[0] for s in metadata["sources"]] == ["a.gif", "b.npy", "clips/c.npy",
                                                 "clips/frames"]
  sources = metadata["episode_sources"]
  assert len(sources["validation"]) == 1 and not set(sources["train"]) & set(
      sources["validation"])
  for split in ("train", "validation"):
    source = builder.as_data_source(split)
    for i in range(len(source)):
      record = source[i]
      assert record["frames"].shape[1:] == (32, 32, 3)
      assert (record["actions"] == -1).all()
  # b.npy is square already: frames are only resized, 40 -> 32.
  b_id = [s[0] for s in metadata["sources"]].index("b.npy")
  all_records = [r for split in ("train", "validation") for r in builder.as_data_source(split)]
  [b_record] = [r for r in all_records if r["episode_id"] == b_id]
  expected = np.asarray(Image.fromarray(_gradient_video(30, 40, 40)[3]).resize(
      (32, 32), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(b_record["frames"][3], expected)

  batch = next(iter(input_pipeline.make_dataset(config, "train", seed=0, global_batch_size=2,
                                                process_index=0, process_count=1)))
  assert batch["video"].shape == (2, CLIP_LEN, 32, 32, 3) and (batch["actions"] == -1).all()

  np.save(videos / "d.npy", _gradient_video(20, 32, 32))
  with pytest.raises(ValueError, match="changed since"):
    data_pipelines.get_builder(config, prepare=False)


def test_an_unreadable_npy_video_is_named(tmp_path):
  for name, content in (("objects.npy", None), ("truncated.npy", b"\x93NUMPY"),
                        ("empty.npy", b"")):
    path = tmp_path / name
    if content is None:
      np.save(path, np.array([{"frame": 1}], dtype=object))
    else:
      path.write_bytes(content)
    with pytest.raises(ValueError, match=f"Cannot read {path} as a numpy array of frames"):
      list(video_builder.read_frames(str(path)))


def test_coinrun_generation(tmp_path):
  pytest.importorskip("procgen")
  config = data_pipelines.default_data_config("coinrun")
  config.data_dir = str(tmp_path)
  config.num_train_episodes = 2
  config.num_val_episodes = 1
  config.episode_len = 40
  config.chunk_len = 20
  config.min_chunk_len = 1  # Keeps every tail, so every episode ends with action -1.
  builder = data_pipelines.get_builder(config, prepare=True, process_index=0)
  episodes = {}
  for split in ("train", "validation"):
    source = builder.as_data_source(split)
    for i in range(len(source)):
      record = source[i]
      assert record["frames"].dtype == np.uint8 and record["frames"].shape[1:] == (64, 64, 3)
      assert record["actions"].shape == record["frames"].shape[:1]
      episodes.setdefault(int(record["episode_id"]), []).append(record)
  assert sorted(episodes) == [0, 1, 2]
  for records in episodes.values():
    actions = np.concatenate([r["actions"] for r in sorted(records, key=lambda r: r["start"])])
    assert 1 < len(actions) <= 40
    assert actions[-1] == -1 and ((actions[:-1] >= 0) & (actions[:-1] < 15)).all()
  assert builder.info.metadata["num_actions"] == 15
  assert len(builder.info.metadata["level_seeds"]["train"]) == 2


def test_coinrun_policy_can_hold_its_actions(tmp_path):
  pytest.importorskip("procgen")
  config = data_pipelines.default_data_config("coinrun")
  config.update(data_dir=str(tmp_path), num_train_episodes=2, num_val_episodes=1,
                episode_len=60, chunk_len=60, min_chunk_len=1)
  # The default (a new action every step) keeps the names of data generated before holds.
  assert "hold" not in data_pipelines.make_builder(config).builder_config.name
  config.coinrun_max_hold = 0
  with pytest.raises(ValueError, match=r"config.data.coinrun_max_hold=0 must be at least 1"):
    data_pipelines.make_builder(config)
  config.coinrun_max_hold = 8
  builder = data_pipelines.get_builder(config, prepare=True, process_index=0)
  assert builder.builder_config.name.endswith("_hold8")
  source = builder.as_data_source("train")
  for i in range(len(source)):
    actions = source[i]["actions"][:-1]
    runs = 1 + np.count_nonzero(actions[1:] != actions[:-1])
    assert len(actions) / runs > 2, actions  # Uniform holds of 1-8 steps: 4.5 on average.


def test_coinrun_generation_under_tcmalloc(tmp_path):
  """genie_jax's entry points preload tcmalloc, under which procgen's library aborts while
  loading; the builder plays the games in a child process started without it."""
  pytest.importorskip("procgen")
  from genie_jax import allocator  # pylint: disable=g-import-not-at-top
  if not os.path.exists(allocator.TCMALLOC):
    pytest.skip("tcmalloc is not installed")
  env = allocator.environment("tcmalloc", dict(os.environ))
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.build", "--dataset=coinrun",
       f"--data_dir={tmp_path}", "--num_train_episodes=2", "--num_val_episodes=1",
       "--episode_len=40", "--chunk_len=20", "--min_chunk_len=1"],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "train: " in result.stdout and "2 episodes" in result.stdout, result.stdout


def test_coinrun_action_effects_compares_keys_from_one_state():
  """data_pipelines.coinrun.action_effects replays keys from saved game states (it fails if
  a replay differs) and tables what each key changes; left and right always part ways."""
  pytest.importorskip("procgen")
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.coinrun.action_effects", "--states=3",
       "--holds=1,2"], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
          if line.startswith("| 1 ") or line.startswith("| 2 ")]
  assert len(rows) == 12, result.stdout
  left_right = [row for row in rows if row[1].strip() == "left vs right"]
  assert len(left_right) == 2, result.stdout  # One per hold.
  for hold, _, psnr, _, states in left_right:
    assert float(psnr) < 60 and states.strip().startswith("100%"), (hold, result.stdout)
