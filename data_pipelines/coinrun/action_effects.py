r"""How much one key changes CoinRun's next frames, against how much they change anyway.

From states that the dataset's uniform random policy reaches, each of KEYS is held for H
steps, always from the same state (procgen's `get_state` / `set_state`), and the outcomes are
compared: each key's frame with the noop's (what the key itself changes), left's with
right's, and the state's own frame with the frame after H steps of the random policy (what
changes anyway: mostly the view following the agent). A latent action model can learn a key
only where what the key changes exceeds its own error in predicting the next frame (the LAM
evaluator's PSNR).

  python -m data_pipelines.coinrun.action_effects [--states=200] [--holds=1,2,4] [--seed=0]

Per hold and comparison it prints the PSNR between the two frames (of the mean squared
difference over states; pixels in [0, 1]), the mean share of pixels that differ, and the
share of states where any pixel differs. States whose episode ends within the hold are
skipped for that hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from absl import app
from absl import flags

from data_pipelines.coinrun import builder

KEYS = ("noop", "left", "right", "up", "down")
COMPARISONS = tuple(f"{key} vs noop" for key in KEYS[1:]) + ("left vs right",
                                                              "random policy vs start")

_STATES = flags.DEFINE_integer("states", 200, "States to compare the keys from.")
_HOLDS = flags.DEFINE_list("holds", ["1", "2", "4"], "Steps each key is held.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the levels and of the random policy.")
_MODE = flags.DEFINE_string("distribution_mode", "hard", "procgen's distribution mode.")


def _frame(env) -> np.ndarray:
  return env.observe()[1]["rgb"][0].astype(np.float32) / 255.0


def _play(env, actions: Sequence[int]) -> tuple[np.ndarray, bool]:
  """The frame after `actions`, and whether an episode ended on the way."""
  ended = False
  for action in actions:
    env.act(np.array([action], np.int32))
    ended |= bool(env.observe()[2][0])
  return _frame(env), ended


def effects(states: int, holds: Sequence[int], seed: int = 0,
            distribution_mode: str = "hard") -> dict[int, dict[str, dict[str, float]]]:
  """{hold: {comparison: {'psnr_db', 'pixels_changed', 'states_changed', 'states'}}}."""
  env = builder._import_procgen()(  # pylint: disable=protected-access
      num=1, env_name="coinrun", distribution_mode=distribution_mode, start_level=0,
      num_levels=10_000, rand_seed=seed)
  rng = np.random.default_rng(seed)
  key_action = {key: builder.ACTION_NAMES.index(key) for key in KEYS}
  diffs = {h: {c: [] for c in COMPARISONS} for h in holds}
  done = 0
  while done < states:
    _, ended = _play(env, rng.integers(0, builder.NUM_ACTIONS, size=rng.integers(5, 30)))
    if ended:
      continue
    state, start = env.get_state(), _frame(env)
    for h in holds:
      outcomes, any_ended = {}, False
      for key in KEYS:
        env.set_state(state)
        outcomes[key], ended = _play(env, [key_action[key]] * h)
        any_ended |= ended
      env.set_state(state)
      again, _ = _play(env, [key_action["noop"]] * h)
      if not np.array_equal(again, outcomes["noop"]):
        raise RuntimeError("procgen's set_state did not restore the game: the same keys from "
                           "one state gave different frames")
      env.set_state(state)
      policy, ended = _play(env, rng.integers(0, builder.NUM_ACTIONS, size=h))
      if any_ended or ended:
        continue
      pairs = {f"{key} vs noop": (outcomes[key], outcomes["noop"]) for key in KEYS[1:]}
      pairs["left vs right"] = (outcomes["left"], outcomes["right"])
      pairs["random policy vs start"] = (policy, start)
      for name, (a, b) in pairs.items():
        diffs[h][name].append(a - b)
    env.set_state(state)
    done += 1
  out = {}
  for h in holds:
    out[h] = {}
    for name, d in diffs[h].items():
      if not d:
        continue
      d = np.stack(d)
      mse = float(np.mean(np.square(d)))
      changed = np.any(d != 0, axis=-1)  # [S, H, W]
      out[h][name] = dict(
          psnr_db=float("inf") if mse == 0 else float(-10.0 * np.log10(mse)),
          pixels_changed=float(np.mean(changed)),
          states_changed=float(np.mean(np.any(changed, axis=(1, 2)))), states=float(len(d)))
  return out


def main(argv: Sequence[str]) -> None:
  del argv
  holds = [int(h) for h in _HOLDS.value]
  results = effects(_STATES.value, holds, _SEED.value, _MODE.value)
  print(f"CoinRun ({_MODE.value}), {_STATES.value} states of the uniform random policy, "
        f"seed {_SEED.value}")
  print("| hold | comparison | PSNR (dB) | pixels that differ | states where any differs |")
  print("|---|---|---|---|---|")
  for h in holds:
    for name, r in results[h].items():
      print(f"| {h} | {name} | {r['psnr_db']:.1f} | {100 * r['pixels_changed']:.1f}% | "
            f"{100 * r['states_changed']:.0f}% (of {r['states']:.0f}) |")


if __name__ == "__main__":
  app.run(main)
