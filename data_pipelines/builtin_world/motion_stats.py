r"""How much each action changes the built-in world's frames, against what moves by itself.

Prints, per true action, the mean squared difference between consecutive frames (pixels in
[0, 1]) with the world's balls and without them, and the fraction of moves that were
blocked. A latent action model learns what explains the change between frames; where the
balls' own motion changes a frame as much as the agent's move does, its few codes go to the
balls.

  python -m data_pipelines.builtin_world.motion_stats [--image_size=32] [--episodes=30]

It uses only the environment's public API (`BuiltinWorldEnv(image_size, num_balls=...)`,
`rollout`), so the same command measures any env.py checked out in its place.

With `--ceiling_recon_psnr=DB` it also prints what any world model could reach on a
transition: a predictor that knows the frame, the action and every rule of the world still
cannot know the cells a move brings into view. It guesses each of them as a floor cell of a
random shade (what a model that samples or takes the argmax of one token does); its error,
added to a tokenizer's reconstruction error (that PSNR), gives the PSNR ceiling of a generated
frame against the true one, per action.
"""

from __future__ import annotations

import numpy as np
from absl import app
from absl import flags

from data_pipelines.builtin_world import env as env_lib

_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Frame size.")
_EPISODES = flags.DEFINE_integer("episodes", 30, "Episodes per setting.")
_FRAMES = flags.DEFINE_integer("frames", 64, "Frames per episode.")
_CEILING = flags.DEFINE_float("ceiling_recon_psnr", None,
                              "Tokenizer reconstruction PSNR (dB) for the ceiling table; "
                              "unset: no ceiling.")


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


def revealed_cell_error(env, episodes: int, frames: int) -> dict[str, list[float]]:
  """Per action, mean squared error of each transition's best guess of the next frame: the
  true frame with every newly visible cell replaced by a floor cell of a random shade."""
  per_action = {name: [] for name in env_lib.ACTION_NAMES}
  c, cells = env.cell, env_lib.CELLS_PER_VIEW
  for episode in range(episodes):
    policy = env_lib.StickyRandomPolicy(episode)
    rng = np.random.default_rng(episode)
    env.reset(1000 + episode)
    view = env.agent_cell - np.array(env_lib.AGENT_VIEW_CELL)
    for _ in range(frames - 1):
      action = policy(env.blocked)
      nxt = env.step(action).astype(np.float32) / 255.0
      new_view = env.agent_cell - np.array(env_lib.AGENT_VIEW_CELL)
      guess = nxt.copy()
      for vy in range(cells):
        for vx in range(cells):
          world = new_view + (vx, vy)
          if not ((view <= world) & (world < view + cells)).all():
            shade = env.floor_palette[rng.integers(2)] / 255.0
            guess[vy * c:(vy + 1) * c, vx * c:(vx + 1) * c] = shade
      per_action[env_lib.ACTION_NAMES[action]].append(float(np.mean(np.square(guess - nxt))))
      view = new_view
  return per_action


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
  if _CEILING.value is not None:
    recon_mse = 10 ** (-_CEILING.value / 10)
    errors = revealed_cell_error(env, episodes, frames)
    psnr = {a: [-10 * np.log10(e + recon_mse) for e in v] for a, v in errors.items()}
    every = [p for v in psnr.values() for p in v]
    print(f"PSNR ceiling of a generated frame (dB; newly visible cells guessed, plus the "
          f"tokenizer's {_CEILING.value:.2f} dB): mean {np.mean(every):.2f}")
    print("action | " + " | ".join(env_lib.ACTION_NAMES))
    print("ceiling | " + " | ".join(f"{np.mean(psnr[a]):.2f}" for a in env_lib.ACTION_NAMES))


if __name__ == "__main__":
  app.run(main)
