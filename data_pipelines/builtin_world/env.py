"""A small procedural 2-D world in numpy, rich enough to give every Genie model work.

The agent (a square with an outline and an eye on the side it faces) walks on a tiled,
textured floor inside a brick wall, is stopped by brick obstacles, changes colour on demand,
and collects coins that reappear elsewhere (each catch adds a tick to a counter drawn along
the top of the view). Balls bounce off the walls, the obstacles and the agent with their own
velocities. The layout, palette and velocities are drawn from the seed of each episode.

The camera follows the agent, as in CoinRun and most platformers: the world is `world_scale`
times the view on each side, the view is centred on the agent, and what lies beyond the
world's border wall is drawn as more wall. A move therefore shifts the whole view, not a
6-pixel sprite: with a fixed camera the only trace of an action was a few dozen pixels, and
the latent action model's decoder did not learn to use the action within CPU-sized runs
even when given the true one (its prediction error stayed within 15% of copying frame t).
`world_scale=1` gives a world of one view, still centred on the agent (wall fills the rest).

What each model can learn from it: the tokenizer, textures and sprites; the latent-action
model, six actions whose effect is visible in the next frame (a move scrolls the view and
turns the agent's eye, recolouring changes its colour; a blocked move only turns the eye);
the dynamics model, scrolling, collisions, bounces, the coins and the counter.

`BuiltinWorldEnv` is independent of the dataset code so that it can be played interactively:
`frame = env.reset(seed)`, then `frame = env.step(action)`.
"""

from __future__ import annotations

import numpy as np

ACTION_NAMES = ("noop", "left", "right", "up", "down", "recolour")
NUM_ACTIONS = len(ACTION_NAMES)
NOOP, LEFT, RIGHT, UP, DOWN, RECOLOUR = range(NUM_ACTIONS)
_MOVES = {LEFT: (-1, 0), RIGHT: (1, 0), UP: (0, -1), DOWN: (0, 1)}

# Saturated sprites on a dark floor, so that every object stands out for the tokenizer.
_AGENT_COLOURS = np.array([(235, 45, 45), (255, 150, 0), (245, 245, 245)], np.uint8)
_BALL_COLOURS = np.array([(60, 100, 255), (225, 60, 225), (40, 215, 225), (120, 230, 60)],
                         np.uint8)
_COIN_COLOUR = np.array((255, 215, 0), np.uint8)
_FLOOR_PALETTES = np.array([
    [(34, 52, 40), (46, 70, 52)],
    [(40, 38, 62), (54, 52, 84)],
    [(60, 44, 34), (80, 60, 46)],
    [(30, 54, 62), (40, 72, 82)],
    [(52, 52, 52), (70, 70, 70)],
], np.uint8)
_WALL_COLOUR = np.array((120, 120, 132), np.int16)
_OBSTACLE_COLOUR = np.array((150, 96, 60), np.int16)


def _disc_mask(d: int) -> np.ndarray:
  centre = (d - 1) / 2
  y, x = np.mgrid[:d, :d]
  return (x - centre) ** 2 + (y - centre) ** 2 <= (d / 2) ** 2 + 0.25


def _diamond_mask(d: int) -> np.ndarray:
  centre = (d - 1) / 2
  y, x = np.mgrid[:d, :d]
  return np.abs(x - centre) + np.abs(y - centre) <= d / 2


def _bricks(h: int, w: int, colour: np.ndarray, brick: int) -> np.ndarray:
  """A brick texture: staggered rows separated by darker mortar."""
  y, x = np.mgrid[:h, :w]
  row = y // brick
  mortar = (y % brick == 0) | ((x + (row % 2) * brick) % (2 * brick) == 0)
  out_HWC = np.broadcast_to(colour, (h, w, 3)).copy()
  out_HWC[mortar] = (colour * 0.75).astype(np.int16)
  return out_HWC


class BuiltinWorldEnv:
  """The built-in world. Frames are uint8 (image_size, image_size, 3).

  Object sizes and speeds are defined for 64x64 frames and scale with `image_size`; the
  numbers of balls, obstacles and coins default to 2, 4 and 1 per view-sized area of world.
  """

  num_actions = NUM_ACTIONS
  action_names = ACTION_NAMES

  def __init__(self, image_size: int = 64, world_scale: int = 2, num_balls: int | None = None,
               num_obstacles: int | None = None, num_coins: int | None = None):
    """Creates the world; call `reset` before `step`."""
    if image_size < 32:
      raise ValueError(f"image_size must be at least 32, got {image_size}.")
    if world_scale < 1:
      raise ValueError(f"world_scale must be at least 1, got {world_scale}.")
    area = world_scale ** 2
    self.image_size = image_size
    self.world_size = image_size * world_scale
    self.num_balls = 2 * area if num_balls is None else num_balls
    self.num_obstacles = 4 * area if num_obstacles is None else num_obstacles
    self.num_coins = area if num_coins is None else num_coins
    u = image_size / 64
    self._wall = max(2, round(3 * u))
    self._agent_size = max(4, round(6 * u))
    self._ball_size = max(3, round(5 * u))
    self._coin_size = max(3, round(5 * u))
    self._speed = max(1, round(2 * u))
    self._ball_mask = _disc_mask(self._ball_size)
    self._coin_mask = _diamond_mask(self._coin_size)
    self._tick = max(2, round(3 * u))
    self._rng: np.random.Generator | None = None

  # --- Episode state -------------------------------------------------------------------

  def reset(self, seed: int | np.random.SeedSequence) -> np.ndarray:
    """Starts an episode whose layout is drawn from `seed`; returns its first frame."""
    self._rng = rng = np.random.default_rng(seed)
    s, wall = self.world_size, self._wall
    self._solid_HW = np.zeros((s, s), bool)
    self._solid_HW[:wall] = self._solid_HW[-wall:] = True
    self._solid_HW[:, :wall] = self._solid_HW[:, -wall:] = True
    floor_HWC = self._floor(rng)
    # Bricks on the border wall, then the obstacles.
    # Bricks of at least 3 pixels: thinner ones read as noise at small image sizes.
    brick = max(3, round(4 * self.image_size / 64))
    # The world inside a margin of wall half a view wide, so that a view centred anywhere in
    # the world stays on the canvas.
    m = self._margin = self.image_size // 2 + self._agent_size
    walls_HWC = _bricks(s + 2 * m, s + 2 * m, _WALL_COLOUR, brick)
    floor_HWC[self._solid_HW] = walls_HWC[m:-m, m:-m][self._solid_HW]
    obstacles_HWC = _bricks(s, s, _OBSTACLE_COLOUR, brick)
    lo = max(4, round(self.image_size * 6 / 64))
    hi = max(6, round(self.image_size * 14 / 64))
    for _ in range(self.num_obstacles):
      h, w = rng.integers(lo, hi + 1, size=2)
      y, x = rng.integers(wall + 2, s - wall - 2 - np.array([h, w]) + 1)
      self._solid_HW[y:y + h, x:x + w] = True
      floor_HWC[y:y + h, x:x + w] = obstacles_HWC[y:y + h, x:x + w]
    walls_HWC[m:-m, m:-m] = floor_HWC
    self._background_HWC = walls_HWC.astype(np.uint8)

    self._agent_xy = self._free_spot(self._agent_size)
    self._facing = RIGHT
    self._colour = 0
    self._score = 0
    self._balls_xy, self._balls_v = [], []
    for _ in range(self.num_balls):
      self._balls_xy.append(self._free_spot(self._ball_size, avoid_agent=True))
      v = rng.integers(1, self._speed + 1, size=2) * rng.choice([-1, 1], size=2)
      self._balls_v.append(v)
    # Every colour once before any repeats.
    self._ball_colours = np.resize(rng.permutation(len(_BALL_COLOURS)), self.num_balls)
    self._coins_xy = [self._free_spot(self._coin_size, avoid_agent=True)
                      for _ in range(self.num_coins)]
    return self.render()

  def step(self, action: int) -> np.ndarray:
    """Applies `action` (0..5, see ACTION_NAMES) and returns the next frame."""
    if self._rng is None:
      raise RuntimeError("Call reset(seed) before step().")
    action = int(action)
    if not 0 <= action < NUM_ACTIONS:
      raise ValueError(f"action must be in [0, {NUM_ACTIONS}), got {action}.")
    if action in _MOVES:
      self._facing = action
      self._move_agent(*_MOVES[action])
    elif action == RECOLOUR:
      self._colour = (self._colour + 1) % len(_AGENT_COLOURS)
    for i in range(self.num_balls):
      self._move_ball(i)
    for i, coin_xy in enumerate(self._coins_xy):
      if self._overlaps(self._agent_xy, self._agent_size, coin_xy, self._coin_size):
        self._score += 1
        self._coins_xy[i] = self._free_spot(self._coin_size, avoid_agent=True)
    return self.render()

  # --- Physics ---------------------------------------------------------------------------

  def _hits_solid(self, xy, size: int) -> bool:
    x, y = xy
    return bool(self._solid_HW[y:y + size, x:x + size].any())

  @staticmethod
  def _overlaps(a_xy, a_size: int, b_xy, b_size: int) -> bool:
    return (a_xy[0] < b_xy[0] + b_size and b_xy[0] < a_xy[0] + a_size and
            a_xy[1] < b_xy[1] + b_size and b_xy[1] < a_xy[1] + a_size)

  def _free_spot(self, size: int, avoid_agent: bool = False) -> np.ndarray:
    s = self.world_size
    for _ in range(1000):
      xy = self._rng.integers(0, s - size + 1, size=2)
      if self._hits_solid(xy, size):
        continue
      if avoid_agent and self._overlaps(xy, size, self._agent_xy, self._agent_size + 2):
        continue
      return xy
    raise RuntimeError("No free spot in the layout; use fewer or smaller obstacles.")

  def _move_agent(self, dx: int, dy: int) -> None:
    # Pixel by pixel, so that the agent stops flush against whatever blocks it.
    for _ in range(self._speed):
      nxt = self._agent_xy + (dx, dy)
      if self._hits_solid(nxt, self._agent_size):
        break
      self._agent_xy = nxt

  def _move_ball(self, i: int) -> None:
    xy, v, size = self._balls_xy[i], self._balls_v[i], self._ball_size
    # A ball the agent walked into may pass through it rather than stick to it.
    touching_agent = self._overlaps(xy, size, self._agent_xy, self._agent_size)
    for axis in (0, 1):
      nxt = xy.copy()
      nxt[axis] += v[axis]
      blocked = self._hits_solid(nxt, size) or (
          not touching_agent and self._overlaps(nxt, size, self._agent_xy, self._agent_size))
      if blocked:
        v[axis] = -v[axis]
      else:
        xy = nxt
    self._balls_xy[i] = xy

  # --- Rendering -------------------------------------------------------------------------

  def _floor(self, rng: np.random.Generator) -> np.ndarray:
    s = self.world_size
    tile = max(4, round(8 * self.image_size / 64))
    palette = _FLOOR_PALETTES[rng.integers(len(_FLOOR_PALETTES))].astype(np.int16)
    y, x = np.mgrid[:s, :s]
    checker = ((y // tile + x // tile) % 2)[..., None]
    floor_HWC = np.where(checker, palette[1], palette[0])
    # A diagonal light gradient; no random grain, which no model could learn and which would
    # cap the reconstruction PSNR of any tokenizer.
    floor_HWC = floor_HWC + ((x + y) * 12 // (2 * s))[..., None]
    return np.clip(floor_HWC, 0, 255).astype(np.int16)

  def _paste(self, frame_HWC, xy, mask, colour) -> None:
    """Draws `colour` where `mask` is set, at world position `xy`, clipped to the view."""
    x, y = xy[0] - self._view_xy[0], xy[1] - self._view_xy[1]
    h, w = mask.shape
    v = self.image_size
    if x >= v or y >= v or x + w <= 0 or y + h <= 0:
      return
    x0, y0 = max(x, 0), max(y, 0)
    sub = mask[y0 - y:min(y + h, v) - y, x0 - x:min(x + w, v) - x]
    frame_HWC[y0:y0 + sub.shape[0], x0:x0 + sub.shape[1]][sub] = colour

  def render(self) -> np.ndarray:
    """The current view, uint8 (image_size, image_size, 3), centred on the agent."""
    v, a, m = self.image_size, self._agent_size, self._margin
    # World position of the view's top-left pixel; the margin keeps it on the canvas.
    self._view_xy = self._agent_xy + a // 2 - v // 2
    x, y = self._view_xy + m
    frame_HWC = self._background_HWC[y:y + v, x:x + v].copy()
    for xy in self._coins_xy:
      self._paste(frame_HWC, xy, self._coin_mask, _COIN_COLOUR)
    for xy, c in zip(self._balls_xy, self._ball_colours):
      self._paste(frame_HWC, xy, self._ball_mask, _BALL_COLOURS[c])
    self._draw_agent(frame_HWC)
    # Score counter: ticks along the top of the view, wrapping around when full.
    slots = (v - 2 * self._wall) // (self._tick + 1)
    for k in range(self._score % (slots + 1)):
      x0 = self._wall + k * (self._tick + 1)
      frame_HWC[max(0, self._wall // 2 - 1):self._wall // 2 + 1, x0:x0 + self._tick] = 255
    return frame_HWC

  def _draw_agent(self, frame_HWC: np.ndarray) -> None:
    a = self._agent_size
    x, y = self._agent_xy - self._view_xy
    sprite_HWC = np.zeros((a, a, 3), np.uint8)  # Black outline.
    sprite_HWC[1:-1, 1:-1] = _AGENT_COLOURS[self._colour]
    # The eye: a dark block on the side the agent faces, centred along that side.
    e = max(1, a // 3)
    lo = (a - e) // 2
    if self._facing == LEFT:
      sprite_HWC[lo:lo + e, 1:1 + e] = 20
    elif self._facing == RIGHT:
      sprite_HWC[lo:lo + e, a - 1 - e:a - 1] = 20
    elif self._facing == UP:
      sprite_HWC[1:1 + e, lo:lo + e] = 20
    else:
      sprite_HWC[a - 1 - e:a - 1, lo:lo + e] = 20
    frame_HWC[y:y + a, x:x + a] = sprite_HWC


class StickyRandomPolicy:
  """Random actions held for a random number of steps, so that moves are visibly long.

  A uniformly random action every step makes the agent jitter in place, which hides the
  effect of actions from a model that only sees frames.
  """

  # noop, left, right, up, down, recolour.
  PROBS = np.array([0.12, 0.2, 0.2, 0.2, 0.2, 0.08])

  def __init__(self, seed: int | np.random.SeedSequence, max_hold: int = 8):
    """Creates the policy; `max_hold` is the longest run of one action."""
    self._rng = np.random.default_rng(seed)
    self._max_hold = max_hold
    self._action, self._left = NOOP, 0

  def __call__(self) -> int:
    """The next action."""
    if self._left == 0:
      self._action = int(self._rng.choice(NUM_ACTIONS, p=self.PROBS))
      # Recolouring every step for a while would only flicker; it is a one-step action.
      self._left = 1 if self._action == RECOLOUR else int(
          self._rng.integers(1, self._max_hold + 1))
    self._left -= 1
    return self._action


def rollout(env: BuiltinWorldEnv, seed: int | np.random.SeedSequence,
            num_frames: int) -> tuple[np.ndarray, np.ndarray]:
  """Plays one episode with the sticky random policy.

  Returns:
    frames_THWC uint8 and actions_T int32 with actions_T[t] applied at frame t; the last
    action is -1 (no frame follows).
  """
  if not isinstance(seed, np.random.SeedSequence):
    seed = np.random.SeedSequence(seed)
  env_seed, policy_seed = seed.spawn(2)
  policy = StickyRandomPolicy(policy_seed)
  frames_THWC = np.empty((num_frames, env.image_size, env.image_size, 3), np.uint8)
  actions_T = np.full((num_frames,), -1, np.int32)
  frames_THWC[0] = env.reset(env_seed)
  for t in range(num_frames - 1):
    actions_T[t] = policy()
    frames_THWC[t + 1] = env.step(actions_T[t])
  return frames_THWC, actions_T
