r"""How much each action changes the built-in world's frames, against what moves by itself.

Prints, per true action, the mean squared difference between consecutive frames (pixels in
[0, 1]) with the world's balls and without them, and the fraction of moves that were
blocked. A latent action model learns what explains the change between frames; where the
balls' own motion changes a frame as much as the agent's move does, its few codes go to the
balls.

  python -m data_pipelines.builtin_world.motion_stats [--image_size=32] [--episodes=30]

It uses only the environment's public API (`BuiltinWorldEnv(image_size, num_balls=...)`,
`rollout`), so the same command measures an older env.py checked out in its place.
"""

from __future__ import annotations

import numpy as np
from absl import app
from absl import flags

from data_pipelines.builtin_world import env as env_lib

_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Frame size.")
_EPISODES = flags.DEFINE_integer("episodes", 30, "Episodes per setting.")
_FRAMES = flags.DEFINE_integer("frames", 64, "Frames per episode.")


def mean_change_by_action(env, episodes: int, frames: int) -> dict[str, float]:
  """Mean over transitions of mean((x_{t+1} - x_t)^2), per true action name."""
  per_action = {name: [] for name in env_lib.ACTION_NAMES}
  for episode in range(episodes):
    frames_THWC, actions_T = env_lib.rollout(env, 1000 + episode, frames)
    x_THWC = frames_THWC.astype(np.float32) / 255.0
    change_T = np.mean(np.square(x_THWC[1:] - x_THWC[:-1]), axis=(1, 2, 3))
    for action, change in zip(actions_T[:-1], change_T):
      per_action[env_lib.ACTION_NAMES[action]].append(float(change))
  return {name: float(np.mean(v)) if v else float("nan") for name, v in per_action.items()}


def main(argv):
  del argv
  size, episodes, frames = _IMAGE_SIZE.value, _EPISODES.value, _FRAMES.value
  rows = {
      "with balls": mean_change_by_action(env_lib.BuiltinWorldEnv(size), episodes, frames),
      "no balls": mean_change_by_action(env_lib.BuiltinWorldEnv(size, num_balls=0), episodes,
                                        frames),
  }
  print(f"mean squared change between consecutive frames x 1e3 ({size}x{size}, {episodes} "
        f"episodes of {frames} frames)")
  print("world | " + " | ".join(env_lib.ACTION_NAMES))
  for name, row in rows.items():
    print(f"{name} | " + " | ".join(f"{row[a] * 1e3:.2f}" for a in env_lib.ACTION_NAMES))
  env = env_lib.BuiltinWorldEnv(size)
  if hasattr(env, "blocked"):
    moves = blocked = 0
    for episode in range(episodes):
      policy = env_lib.StickyRandomPolicy(episode)
      env.reset(episode)
      for _ in range(frames - 1):
        action = policy(env.blocked)
        env.step(action)
        if action in (env_lib.LEFT, env_lib.RIGHT, env_lib.UP, env_lib.DOWN):
          moves += 1
          blocked += env.blocked
    print(f"blocked moves: {blocked / moves:.1%} of {moves}")


if __name__ == "__main__":
  app.run(main)
