"""TFDS builder of procgen CoinRun played by a uniform random policy (Genie App. F).

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
    return CoinrunConfig(
        num_train_episodes=int(data_config.num_train_episodes),
        num_val_episodes=int(data_config.num_val_episodes),
        max_episode_len=int(data_config.episode_len),
        start_level=int(data_config.coinrun_start_level),
        num_levels=int(data_config.coinrun_num_levels),
        **episode_builder.common_config_kwargs(data_config))

  def _episodes(self, split: str) -> Iterator[episode_builder.Episode]:
    config = self.builder_config
    if not config.min_chunk_len <= config.max_episode_len:
      raise ValueError(f"max_episode_len={config.max_episode_len} is below min_chunk_len="
                       f"{config.min_chunk_len}: no episode would be kept.")
    episode_ids = iter(episode_builder.split_episode_ids(config.num_train_episodes,
                                                         config.num_val_episodes)[split])
    level_seeds = self.info.metadata.setdefault("level_seeds", {})[split] = []
    split_key = episode_builder.SPLITS.index(split)
    env_seed, policy_seed = np.random.SeedSequence([config.seed, split_key]).spawn(2)
    env = _import_procgen()(
        num=config.num_envs, env_name="coinrun", distribution_mode=config.distribution_mode,
        start_level=config.start_level, num_levels=config.num_levels,
        rand_seed=int(env_seed.generate_state(1)[0] % 2**31))
    rng = np.random.default_rng(policy_seed)

    n = config.num_envs
    frames = [[] for _ in range(n)]
    actions = [[] for _ in range(n)]
    level = [0] * n
    # After a truncated episode, a game is skipped until procgen starts its next episode.
    skipping = [False] * n
    _, obs, first = env.observe()
    info = env.get_info()
    for i in range(n):
      frames[i].append(self._frame(obs["rgb"][i]))
      level[i] = int(info[i]["level_seed"])
    while True:
      action_N = rng.integers(0, NUM_ACTIONS, size=n).astype(np.int32)
      env.act(action_N)
      _, obs, first = env.observe()
      info = env.get_info()
      for i in range(n):
        ended = bool(first[i])
        if not skipping[i]:
          actions[i].append(int(action_N[i]))
          if not ended and len(frames[i]) == config.max_episode_len:
            ended, skipping[i] = True, True
          if ended and len(frames[i]) >= config.min_chunk_len:
            episode_id = next(episode_ids, None)
            if episode_id is None:
              return
            level_seeds.append(level[i])
            # The action at the last frame led out of the episode; the chunker blanks it.
            yield episode_builder.Episode(
                episode_id, np.stack(frames[i]), np.array(actions[i][:len(frames[i])]))
        if first[i]:
          skipping[i] = False
          frames[i], actions[i] = [], []
          level[i] = int(info[i]["level_seed"])
        if not skipping[i]:
          frames[i].append(self._frame(obs["rgb"][i]))

  def _frame(self, rgb_HWC: np.ndarray) -> np.ndarray:
    size = self.builder_config.image_size
    if size == _NATIVE_SIZE:
      return np.array(rgb_HWC, np.uint8)  # A copy: procgen reuses its observation buffer.
    return np.asarray(Image.fromarray(rgb_HWC).resize((size, size), Image.Resampling.BICUBIC))
