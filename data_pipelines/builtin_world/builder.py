"""TFDS builder of the built-in world: random-policy episodes of `BuiltinWorldEnv`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import tensorflow_datasets as tfds

from data_pipelines import episode_builder
from data_pipelines.builtin_world import env as env_lib


@dataclasses.dataclass(eq=False, kw_only=True)
class BuiltinWorldConfig(episode_builder.EpisodeConfig):
  """Generation parameters of the built-in world (see `EpisodeConfig`)."""

  num_train_episodes: int = episode_builder.generation_field(200, "train")
  num_val_episodes: int = episode_builder.generation_field(20, "val")
  episode_len: int = episode_builder.generation_field(160, "len")
  max_hold: int = episode_builder.generation_field(8, "hold")


class BuiltinWorld(episode_builder.EpisodeDatasetBuilder):
  """Episodes of the built-in world played by a sticky random policy, true actions kept."""

  name = "builtin_world"
  VERSION = tfds.core.Version("2.2.0")
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "1.1.0": "No random floor grain; bricks of at least 3 pixels, softer mortar.",
      "1.2.0": "The camera follows the agent over a world 2x the view on each side.",
      "2.0.0": "A grid of cells, an eighth of the view: the agent and balls move a cell per "
               "step; randomly shaded floor and wall cells; balls show their heading; a "
               "world 3x the view; a blocked move ends the policy's hold.",
      # No 2.1.0 entry: its policy (a new action every step) is `builtin_world_max_hold=1`.
      "2.2.0": "The world's border ring, solid since 2.0.0, is drawn as wall, not as floor: "
               "a move into it was stopped by nothing visible (7% of the policy's moves).",
  }
  NUM_ACTIONS = env_lib.NUM_ACTIONS
  ACTION_NAMES = env_lib.ACTION_NAMES
  DESCRIPTION = __doc__

  builder_config: BuiltinWorldConfig

  @classmethod
  def config_from_data_config(cls, data_config) -> BuiltinWorldConfig:
    return BuiltinWorldConfig(
        num_train_episodes=int(data_config.num_train_episodes),
        num_val_episodes=int(data_config.num_val_episodes),
        episode_len=int(data_config.episode_len),
        # Configs saved before the key existed: the default policy, holds of 1-8 steps.
        max_hold=int(data_config.get("builtin_world_max_hold", 8)),
        **episode_builder.common_config_kwargs(data_config))

  def _episodes(self, split: str) -> Iterator[episode_builder.Episode]:
    config = self.builder_config
    if config.episode_len < 2:
      raise ValueError(f"episode_len must be at least 2, got {config.episode_len}.")
    env = env_lib.BuiltinWorldEnv(image_size=config.image_size)
    ids = episode_builder.split_episode_ids(config.num_train_episodes, config.num_val_episodes)
    for episode_id in ids[split]:
      # Seeded by (seed, episode) alone: changing a split's size leaves other episodes as is.
      frames_THWC, actions_T = env_lib.rollout(
          env, episode_builder.episode_seed(config.seed, episode_id), config.episode_len,
          config.max_hold)
      yield episode_builder.Episode(episode_id, frames_THWC, actions_T)
