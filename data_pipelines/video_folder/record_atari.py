r"""Records Atari games as a folder of videos for the `video_folder` dataset.

A real game recording without a download: ale-py ships the ROMs. Each episode is played by
a sticky random policy (an action held for a random number of agent steps, as a person holds
a key) and written as `<game>_<episode>.npy`, uint8 (T, H, W, 3) at the emulator's 210x160;
the `video_folder` builder crops and resizes it. The actions are not written: the recording
stands for a user's video, whose actions the latent action model has to find.

  pip install -e '.[atari]'
  python -m data_pipelines.video_folder.record_atari --game=battle_zone \
      --out_dir=./videos/battle_zone --episodes=120 --frames=160
  python -m genie_jax.cli.pipeline --config=configs/genie.py:runlocal,data=video_folder \
      --config.tokenizer.data.video_dir=./videos/battle_zone ... (README, "Results")
"""

from __future__ import annotations

import os

import numpy as np
from absl import app
from absl import flags

_GAME = flags.DEFINE_string("game", "battle_zone", "ROM id (ale_py.roms.get_all_rom_ids()).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder to write the .npy episodes to.",
                               required=True)
_EPISODES = flags.DEFINE_integer("episodes", 120, "Episodes to record.")
_FRAMES = flags.DEFINE_integer("frames", 160, "Frames per episode.")
_FRAME_SKIP = flags.DEFINE_integer("frame_skip", 4, "Emulator frames per recorded frame.")
_MEAN_HOLD = flags.DEFINE_float("mean_hold", 4.0, "Mean number of recorded frames an action "
                                "is held for (geometric).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the emulator and the policy.")


def record_episode(ale, actions: np.ndarray, rng: np.random.Generator, num_frames: int,
                   frame_skip: int, mean_hold: float) -> np.ndarray:
  """One episode of `num_frames` frames (the game restarts if it ends first)."""
  ale.reset_game()
  frames = np.empty((num_frames, *ale.getScreenRGB().shape), np.uint8)
  action, hold = actions[0], 0
  for t in range(num_frames):
    frames[t] = ale.getScreenRGB()
    if hold == 0:
      action, hold = rng.choice(actions), int(rng.geometric(1.0 / mean_hold))
    hold -= 1
    for _ in range(frame_skip):
      ale.act(action)
    if ale.game_over():
      ale.reset_game()
  return frames


def main(argv):
  del argv
  from ale_py import ALEInterface, LoggerMode, roms  # The optional [atari] extra.
  ALEInterface.setLoggerMode(LoggerMode.Error)
  ale = ALEInterface()
  ale.setInt("random_seed", _SEED.value)
  ale.setFloat("repeat_action_probability", 0.0)
  ale.loadROM(roms.get_rom_path(_GAME.value))
  actions = np.asarray(ale.getMinimalActionSet())
  rng = np.random.default_rng(_SEED.value)
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  for episode in range(_EPISODES.value):
    frames = record_episode(ale, actions, rng, _FRAMES.value, _FRAME_SKIP.value,
                            _MEAN_HOLD.value)
    np.save(os.path.join(_OUT_DIR.value, f"{_GAME.value}_{episode:04d}.npy"), frames)
  print(f"{_EPISODES.value} episodes of {_FRAMES.value} frames ({len(actions)} actions) in "
        f"{_OUT_DIR.value}")


if __name__ == "__main__":
  app.run(main)
