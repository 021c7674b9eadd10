"""TFDS builder of procgen CoinRun played by a uniform random policy (Genie App. F).

By default the policy draws a new action every step, as in Genie; `max_hold` > 1 holds each
action for 1 to max_hold steps (drawn uniformly), as the built-in world's policy does.

procgen is imported only when episodes are generated; install it with
`bash data_pipelines/coinrun/install_procgen.sh`.

Each split runs its own vectorised environment (`num_envs` games stepped together) seeded from
(seed, split); levels are drawn by procgen from [start_level, start_level + num_levels) for
both splits, which hold different episodes (often of the same level seeds, as in Genie: the
held-out data is new play, not new levels). Episodes end when procgen starts a new one (its
`first` flag) or after `max_episode_len` frames, when the rest of the game is skipped.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
from PIL import Image

from data_pipelines import episode_builder

# procgen's action set (procgen/env.py, combos): 15 discrete actions.
ACTION_NAMES = ("down_left", "left", "up_left", "down", "noop", "up", "down_right", "right",
                "up_right", "d", "a", "w", "s", "q", "e")
NUM_ACTIONS = len(ACTION_NAMES)
_NATIVE_SIZE = 64


@dataclasses.dataclass(eq=False, kw_only=True)
class CoinrunConfig(episode_builder.EpisodeConfig):
  """Generation parameters of CoinRun (see `EpisodeConfig`)."""

  num_train_episodes: int = episode_builder.generation_field(18_000, "train")
  num_val_episodes: int = episode_builder.generation_field(500, "val")
  max_episode_len: int = episode_builder.generation_field(1000, "maxlen")
  start_level: int = episode_builder.generation_field(0, "level")
  num_levels: int = episode_builder.generation_field(10_000, "nlevels")
  distribution_mode: str = episode_builder.generation_field("hard", "")
  # Which episodes finish first depends on how many games run together.
  num_envs: int = episode_builder.generation_field(16, "envs")
  max_hold: int = episode_builder.generation_field(1, "hold", named_if_default=False)


def _import_procgen():
  try:
    from procgen import ProcgenGym3Env  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("The coinrun dataset needs procgen: run "
                      "`bash data_pipelines/coinrun/install_procgen.sh`.") from e
  return ProcgenGym3Env


class Coinrun(episode_builder.EpisodeDatasetBuilder):
  """Procgen CoinRun ("hard"), uniform random policy, true actions kept."""

  name = "coinrun"
  NUM_ACTIONS = NUM_ACTIONS
  ACTION_NAMES = ACTION_NAMES
  EPISODES_PER_SHARD = 50
  DESCRIPTION = __doc__

  builder_config: CoinrunConfig

  @classmethod
  def config_from_data_config(cls, data_config) -> CoinrunConfig:
    # Configs saved before the key existed: a new action every step.
    max_hold = int(data_config.get("coinrun_max_hold", 1))
    if max_hold < 1:
      raise ValueError(f"config.data.coinrun_max_hold={max_hold} must be at least 1 (1: a new "
                       "action every step).")
    return CoinrunConfig(
        num_train_episodes=int(data_config.num_train_episodes),
        num_val_episodes=int(data_config.num_val_episodes),
        max_episode_len=int(data_config.episode_len),
        start_level=int(data_config.coinrun_start_level),
        num_levels=int(data_config.coinrun_num_levels),
        max_hold=max_hold,
        **episode_builder.common_config_kwargs(data_config))

  def _episodes(self, split: str) -> Iterator[episode_builder.Episode]:
    config = self.builder_config
    if not config.min_chunk_len <= config.max_episode_len:
      raise ValueError(f"max_episode_len={config.max_episode_len} is below min_chunk_len="
                       f"{config.min_chunk_len}: no episode would be kept.")
    episode_ids = episode_builder.split_episode_ids(config.num_train_episodes,
                                                    config.num_val_episodes)[split]
    level_seeds = self.info.metadata.setdefault("level_seeds", {})[split] = []
    split_key = episode_builder.SPLITS.index(split)
    env_seed, policy_seed = np.random.SeedSequence([config.seed, split_key]).spawn(2)
    games = dict(num_envs=config.num_envs, distribution_mode=config.distribution_mode,
                 start_level=config.start_level, num_levels=config.num_levels,
                 rand_seed=int(env_seed.generate_state(1)[0] % 2**31),
                 policy_seed=policy_seed, max_episode_len=config.max_episode_len,
                 min_chunk_len=config.min_chunk_len, num_episodes=len(episode_ids),
                 image_size=config.image_size, max_hold=config.max_hold)
    for episode_id, (frames, actions, level) in zip(episode_ids, _play_elsewhere(games)):
      level_seeds.append(level)
      yield episode_builder.Episode(episode_id, frames, actions)


def _play_elsewhere(games: dict) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """`_play(**games)`'s episodes, played in a child process started without an LD_PRELOADed
  allocator: procgen's library aborts while loading under tcmalloc (genie_jax's entry
  points preload it; "free(): invalid pointer"). A plain subprocess, not multiprocessing:
  spawn would import the caller's main module again."""
  if importlib.util.find_spec("procgen") is None:
    _import_procgen()  # Raises, saying how to install it.
  env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
  process = subprocess.Popen(
      [sys.executable, "-c", f"from {__name__} import _serve; _serve()"],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
  try:
    pickle.dump(games, process.stdin)
    process.stdin.close()
    while True:
      try:
        item = pickle.load(process.stdout)
      except EOFError:
        raise RuntimeError(f"the CoinRun game process died (exit code {process.wait()}) "
                           "before sending its episodes; its error is above") from None
      if item is None:
        return
      yield item
  finally:
    process.kill()
    process.wait()
    process.stdout.close()


def _serve() -> None:
  """The child of `_play_elsewhere`: games from stdin, pickled episodes to stdout, then
  None. Anything else written to stdout (procgen's or gym's notices) goes to stderr."""
  out = os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)
  games = pickle.load(sys.stdin.buffer)
  for episode in _play(**games):
    pickle.dump(episode, out, protocol=pickle.HIGHEST_PROTOCOL)
  pickle.dump(None, out)
  out.close()


def _play(*, num_envs: int, distribution_mode: str, start_level: int, num_levels: int,
          rand_seed: int, policy_seed: np.random.SeedSequence, max_episode_len: int,
          min_chunk_len: int, num_episodes: int, image_size: int, max_hold: int
          ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """(frames, actions, level seed) of the first `num_episodes` episodes that `num_envs`
  games played by a uniform random policy finish with at least `min_chunk_len` frames."""
  env = _import_procgen()(
      num=num_envs, env_name="coinrun", distribution_mode=distribution_mode,
      start_level=start_level, num_levels=num_levels, rand_seed=rand_seed)
  rng = np.random.default_rng(policy_seed)

  def frame(rgb_HWC: np.ndarray) -> np.ndarray:
    if image_size == _NATIVE_SIZE:
      return np.array(rgb_HWC, np.uint8)  # A copy: procgen reuses its observation buffer.
    return np.asarray(Image.fromarray(rgb_HWC).resize((image_size, image_size),
                                                      Image.Resampling.BICUBIC))

  n, done = num_envs, 0
  frames = [[] for _ in range(n)]
  actions = [[] for _ in range(n)]
  level = [0] * n
  # After a truncated episode, a game is skipped until procgen starts its next episode.
  skipping = [False] * n
  _, obs, first = env.observe()
  info = env.get_info()
  for i in range(n):
    frames[i].append(frame(obs["rgb"][i]))
    level[i] = int(info[i]["level_seed"])
  action_N, hold_left_N = np.zeros(n, np.int32), np.zeros(n, np.int64)
  while done < num_episodes:
    # One draw of n actions every step whatever the holds, so that max_hold=1 replays the
    # random stream of the data generated before holds existed.
    redraw_N = hold_left_N <= 0
    action_N = np.where(redraw_N, rng.integers(0, NUM_ACTIONS, size=n), action_N).astype(np.int32)
    if max_hold > 1:
      hold_left_N = np.where(redraw_N, rng.integers(1, max_hold + 1, size=n), hold_left_N)
    hold_left_N = hold_left_N - 1
    env.act(action_N)
    _, obs, first = env.observe()
    info = env.get_info()
    for i in range(n):
      ended = bool(first[i])
      if not skipping[i]:
        actions[i].append(int(action_N[i]))
        if not ended and len(frames[i]) == max_episode_len:
          ended, skipping[i] = True, True
        if ended and len(frames[i]) >= min_chunk_len:
          # The action at the last frame led out of the episode; the chunker blanks it.
          yield np.stack(frames[i]), np.array(actions[i][:len(frames[i])]), level[i]
          done += 1
          if done == num_episodes:
            return
      if first[i]:
        skipping[i] = False
        frames[i], actions[i] = [], []
        level[i] = int(info[i]["level_seed"])
      if not skipping[i]:
        frames[i].append(frame(obs["rgb"][i]))
