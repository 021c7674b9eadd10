"""A small procedural 2-D world in numpy, rich enough to give every Genie model work.

The world is a grid of square cells, an eighth of the view on each side. The agent (a cell
with an eye on the side it faces) walks one cell per step on a floor of randomly shaded
cells inside a brick wall, is stopped by brick obstacles, changes colour on demand, and
collects coins that reappear elsewhere. Balls roll diagonally, one cell per step, and bounce
off the walls, the obstacles and the agent; a bright quarter of each ball shows where it is
heading. The layout, palette and headings are drawn from the seed of each episode.

The camera follows the agent, as in CoinRun and most platformers: the world is `world_scale`
times the view on each side, the agent sits in cell (4, 4) of the view's 8 x 8, and what
lies beyond the world's border wall is drawn as more wall. A move therefore shifts the whole
view by exactly one cell. Why a grid, and why this floor (what a world model needs to
follow its actions; README "Results"):
  * A move must be large against everything else that changes. Where a move changes the
    frame (mean squared difference) about as little as the balls' own motion does, the latent
    action model spends its few codes on the balls (`motion_stats` measures both).
  * A move must shift whole tokens. A cell is one token for a patch of an eighth of the
    frame (patch 4 at 32x32, 8 at 64x64), so a move is a shift of the token grid, a copy
    that a dynamics model can learn, not a new sub-patch texture in every token.
  * The floor must not be periodic at the step: on a checkerboard of two-cell period a step
    left and a step right give the same floor. Each floor cell takes one of two shades at
    random, so every shift is told apart from every other.
  * What moves by itself must be predictable from one frame: balls show their heading, so
    neither the latent action model (whose decoder sees one frame) nor a rollout from one
    prompt frame has to guess it; ball sprites are a whole cell, so a tokenizer with a small
    codebook represents them.

What each model can learn from it: the tokenizer, a few dozen cell contents; the latent
action model, six actions whose effect is visible in the next frame (a move scrolls the view
by a cell and turns the agent's eye, recolouring changes its colour, a blocked move only
turns the eye); the dynamics model, scrolling, collisions, bounces and the coins.

`BuiltinWorldEnv` is independent of the dataset code so that it can be played interactively:
`frame = env.reset(seed)`, then `frame = env.step(action)`.
"""

from __future__ import annotations

import numpy as np

ACTION_NAMES = ("noop", "left", "right", "up", "down", "recolour")
# What a cell of the view shows (`BuiltinWorldEnv.view_contents`); a sprite hides what is
# under it, in this order of precedence: agent, ball, coin.
CONTENT_NAMES = ("floor", "wall", "obstacle", "coin", "ball", "agent")
NUM_ACTIONS = len(ACTION_NAMES)
NOOP, LEFT, RIGHT, UP, DOWN, RECOLOUR = range(NUM_ACTIONS)
_MOVES = {LEFT: (-1, 0), RIGHT: (1, 0), UP: (0, -1), DOWN: (0, 1)}
CELLS_PER_VIEW = 8
# The agent's cell in the view, (x, y).
AGENT_VIEW_CELL = (CELLS_PER_VIEW // 2, CELLS_PER_VIEW // 2)

# Saturated sprites on a darker floor, so that every object stands out for the tokenizer.
_AGENT_COLOURS = np.array([(235, 45, 45), (255, 150, 0), (245, 245, 245)], np.uint8)
_BALL_COLOURS = np.array([(230, 60, 230), (40, 220, 230)], np.uint8)
BALL_HEADING_COLOUR = np.array((255, 255, 255), np.uint8)
_COIN_COLOUR = np.array((255, 215, 0), np.uint8)
# Two shades per palette, far enough apart that a shifted floor differs from the unshifted
# one by much more than the tokenizer's reconstruction error.
_FLOOR_PALETTES = np.array([
    [(30, 62, 42), (70, 108, 78)],
    [(38, 40, 72), (84, 88, 132)],
    [(28, 58, 66), (64, 108, 118)],
    [(58, 56, 30), (104, 102, 60)],
], np.uint8)
# Two shades of wall too: a uniform wall would not show a move along it.
_WALL_COLOURS = np.array([(112, 112, 122), (150, 150, 160)], np.int16)
_OBSTACLE_COLOUR = np.array((170, 92, 56), np.int16)
_EYE_COLOUR = 20


def _brick_cell(cell: int, colour: np.ndarray) -> np.ndarray:
  """One cell of brick: `colour` with darker mortar along its top and left edges."""
  out_HWC = np.broadcast_to(colour, (cell, cell, 3)).copy()
  mortar = max(1, cell // 8)
  out_HWC[:mortar] = out_HWC[:, :mortar] = (colour * 0.7).astype(np.int16)
  return out_HWC.astype(np.uint8)


def _disc_mask(d: int) -> np.ndarray:
  centre = (d - 1) / 2
  y, x = np.mgrid[:d, :d]
  return (x - centre) ** 2 + (y - centre) ** 2 <= (d / 2) ** 2 + 0.25


def _diamond_mask(d: int) -> np.ndarray:
  centre = (d - 1) / 2
  y, x = np.mgrid[:d, :d]
  return np.abs(x - centre) + np.abs(y - centre) <= d / 2 - 0.5


class BuiltinWorldEnv:
  """The built-in world. Frames are uint8 (image_size, image_size, 3).

  `image_size` must be a multiple of 8 (the view is 8 x 8 cells). The numbers of balls,
  obstacles and coins default to 1, 2 and 1 per view-sized area of world.
  """

  num_actions = NUM_ACTIONS
  action_names = ACTION_NAMES

  def __init__(self, image_size: int = 64, world_scale: int = 3, num_balls: int | None = None,
               num_obstacles: int | None = None, num_coins: int | None = None):
    """Creates the world; call `reset` before `step`."""
    if image_size < 32 or image_size % CELLS_PER_VIEW:
      raise ValueError(f"image_size must be a multiple of {CELLS_PER_VIEW} and at least 32, "
                       f"got {image_size}.")
    if world_scale < 1:
      raise ValueError(f"world_scale must be at least 1, got {world_scale}.")
    area = world_scale ** 2
    self.image_size = image_size
    self.cell = image_size // CELLS_PER_VIEW
    # World size in cells, its border wall included.
    self.world_cells = CELLS_PER_VIEW * world_scale
    self.num_balls = area if num_balls is None else num_balls
    self.num_obstacles = 2 * area if num_obstacles is None else num_obstacles
    self.num_coins = area if num_coins is None else num_coins
    c = self.cell
    self._wall_cells = [_brick_cell(c, colour) for colour in _WALL_COLOURS]
    self._obstacle_cell = _brick_cell(c, _OBSTACLE_COLOUR)
    self._ball_mask = _disc_mask(c)
    self._coin_mask = _diamond_mask(c)
    self._rng: np.random.Generator | None = None

  # --- Episode state -------------------------------------------------------------------

  def reset(self, seed: int | np.random.SeedSequence) -> np.ndarray:
    """Starts an episode whose layout is drawn from `seed`; returns its first frame."""
    self._rng = rng = np.random.default_rng(seed)
    s = self.world_cells
    self._solid = np.zeros((s, s), bool)  # [y, x]
    self._solid[0] = self._solid[-1] = self._solid[:, 0] = self._solid[:, -1] = True
    for _ in range(self.num_obstacles):
      h, w = rng.integers(1, 4, size=2)
      y, x = rng.integers(2, s - 2 - np.array([h, w]) + 1)
      self._solid[y:y + h, x:x + w] = True
    self._obstacle = self._solid.copy()
    self._obstacle[0] = self._obstacle[-1] = self._obstacle[:, 0] = self._obstacle[:, -1] = False
    self._palette = _FLOOR_PALETTES[rng.integers(len(_FLOOR_PALETTES))]
    self._shade = rng.integers(0, 2, size=(s, s))
    self._background_HWC = self._render_background()

    self._agent = self._free_cell()
    self._facing = RIGHT
    self._colour = 0
    self.score = 0
    self._balls, self._ball_v = [], []
    for _ in range(self.num_balls):
      self._balls.append(self._free_cell(avoid=True))
      self._ball_v.append(rng.choice([-1, 1], size=2))
    self._ball_colours = np.resize(rng.permutation(len(_BALL_COLOURS)), self.num_balls)
    self._coins = [self._free_cell(avoid=True) for _ in range(self.num_coins)]
    self.blocked = False
    return self.render()

  def step(self, action: int) -> np.ndarray:
    """Applies `action` (0..5, see ACTION_NAMES) and returns the next frame.

    Afterwards `blocked` says whether a move was stopped by something solid.
    """
    if self._rng is None:
      raise RuntimeError("Call reset(seed) before step().")
    action = int(action)
    if not 0 <= action < NUM_ACTIONS:
      raise ValueError(f"action must be in [0, {NUM_ACTIONS}), got {action}.")
    self.blocked = False
    if action in _MOVES:
      self._facing = action
      nxt = self._agent + _MOVES[action]
      self.blocked = self._is_solid(nxt) or any(np.array_equal(nxt, b) for b in self._balls)
      if not self.blocked:
        self._agent = nxt
    elif action == RECOLOUR:
      self._colour = (self._colour + 1) % len(_AGENT_COLOURS)
    for i in range(self.num_balls):
      self._move_ball(i)
    for i, coin in enumerate(self._coins):
      if np.array_equal(coin, self._agent):
        self.score += 1
        self._coins[i] = self._free_cell(avoid=True)
    return self.render()

  @property
  def agent_cell(self) -> np.ndarray:
    """The agent's world cell (x, y); the view's top-left cell is this - AGENT_VIEW_CELL."""
    return self._agent.copy()

  def view_contents(self) -> np.ndarray:
    """int32 (8, 8) [row, column]: what each cell of the last rendered view shows, as an
    index into CONTENT_NAMES (cells beyond the world's border are wall)."""
    s = self.world_cells
    columns_U = self._view[0] + np.arange(CELLS_PER_VIEW)
    rows_Y = self._view[1] + np.arange(CELLS_PER_VIEW)
    inside_YU = (((rows_Y >= 0) & (rows_Y < s))[:, None]
                 & ((columns_U >= 0) & (columns_U < s))[None, :])
    yc, xc = np.clip(rows_Y, 0, s - 1), np.clip(columns_U, 0, s - 1)
    obstacle_YU = self._obstacle[np.ix_(yc, xc)] & inside_YU
    solid_YU = self._solid[np.ix_(yc, xc)] | ~inside_YU
    out_YU = np.where(obstacle_YU, 2, np.where(solid_YU, 1, 0)).astype(np.int32)
    for content, cells in ((3, self._coins), (4, self._balls), (5, [self._agent])):
      for x, y in cells:
        vx, vy = x - self._view[0], y - self._view[1]
        if 0 <= vx < CELLS_PER_VIEW and 0 <= vy < CELLS_PER_VIEW:
          out_YU[vy, vx] = content
    return out_YU

  @property
  def floor_palette(self) -> np.ndarray:
    """uint8 (2, 3): this episode's two floor shades."""
    return self._palette.copy()

  # --- Physics ---------------------------------------------------------------------------

  def _is_solid(self, xy) -> bool:
    return bool(self._solid[xy[1], xy[0]])

  def _free_cell(self, avoid: bool = False) -> np.ndarray:
    s = self.world_cells
    for _ in range(1000):
      xy = self._rng.integers(1, s - 1, size=2)
      if self._is_solid(xy):
        continue
      if avoid and np.abs(xy - self._agent).max() <= 1:
        continue
      return xy
    raise RuntimeError("No free cell in the layout; use fewer obstacles.")

  def _move_ball(self, i: int) -> None:
    # Axis by axis, so that a ball meeting a wall edge-on bounces along that axis only.
    xy, v = self._balls[i], self._ball_v[i]
    for axis in (0, 1):
      nxt = xy.copy()
      nxt[axis] += v[axis]
      if self._is_solid(nxt) or np.array_equal(nxt, self._agent):
        v[axis] = -v[axis]
      else:
        xy = nxt
    self._balls[i] = xy

  # --- Rendering -------------------------------------------------------------------------

  def _render_background(self) -> np.ndarray:
    """The world's static pixels, with a margin of wall half a view wide around it."""
    c, s, m = self.cell, self.world_cells, CELLS_PER_VIEW // 2
    cells = s + 2 * m
    wall_shade = self._rng.integers(0, 2, size=(cells, cells))
    out_HWC = np.stack(self._wall_cells)[wall_shade].transpose(0, 2, 1, 3, 4).reshape(
        cells * c, cells * c, 3)
    # Inside the world's border ring, which is solid and drawn as wall like the margin.
    floor_HWC = self._palette[self._shade[1:-1, 1:-1]].repeat(c, 0).repeat(c, 1)
    inner = slice((m + 1) * c, (m + s - 1) * c)
    out_HWC[inner, inner] = floor_HWC
    for y, x in zip(*np.nonzero(self._obstacle)):
      out_HWC[(m + y) * c:(m + y + 1) * c, (m + x) * c:(m + x + 1) * c] = self._obstacle_cell
    return out_HWC

  def _paste(self, frame_HWC, xy, sprite_HWC, mask=None) -> None:
    """Draws a cell-sized sprite at world cell `xy` if that cell is in view."""
    vx, vy = np.asarray(xy) - self._view
    if not (0 <= vx < CELLS_PER_VIEW and 0 <= vy < CELLS_PER_VIEW):
      return
    c = self.cell
    target = frame_HWC[vy * c:(vy + 1) * c, vx * c:(vx + 1) * c]
    if mask is None:
      target[...] = sprite_HWC
    else:
      target[mask] = sprite_HWC[mask]

  def render(self) -> np.ndarray:
    """The current view, uint8 (image_size, image_size, 3), the agent in cell (4, 4)."""
    c, v, m = self.cell, self.image_size, CELLS_PER_VIEW // 2
    # The view's top-left world cell; the margin keeps it on the canvas.
    self._view = self._agent - AGENT_VIEW_CELL
    x, y = (self._view + m) * c
    frame_HWC = self._background_HWC[y:y + v, x:x + v].copy()
    coin_HWC = np.broadcast_to(_COIN_COLOUR, (c, c, 3))
    for xy in self._coins:
      self._paste(frame_HWC, xy, coin_HWC, self._coin_mask)
    for xy, vel, colour in zip(self._balls, self._ball_v, self._ball_colours):
      self._paste(frame_HWC, xy, self._ball_sprite(colour, vel), self._ball_mask)
    self._paste(frame_HWC, self._agent, self._agent_sprite())
    return frame_HWC

  def _ball_sprite(self, colour: int, velocity) -> np.ndarray:
    c, h = self.cell, self.cell // 2
    sprite_HWC = np.broadcast_to(_BALL_COLOURS[colour], (c, c, 3)).copy()
    # The quarter of the ball on the side it is heading to.
    ys = slice(h, c) if velocity[1] > 0 else slice(0, h)
    xs = slice(h, c) if velocity[0] > 0 else slice(0, h)
    sprite_HWC[ys, xs] = BALL_HEADING_COLOUR
    return sprite_HWC

  def _agent_sprite(self) -> np.ndarray:
    c = self.cell
    sprite_HWC = np.broadcast_to(_AGENT_COLOURS[self._colour], (c, c, 3)).copy()
    # The eye: a dark bar along the middle half of the side the agent faces.
    e, lo, hi = max(1, c // 4), c // 4, c - c // 4
    if self._facing == LEFT:
      sprite_HWC[lo:hi, :e] = _EYE_COLOUR
    elif self._facing == RIGHT:
      sprite_HWC[lo:hi, c - e:] = _EYE_COLOUR
    elif self._facing == UP:
      sprite_HWC[:e, lo:hi] = _EYE_COLOUR
    else:
      sprite_HWC[c - e:, lo:hi] = _EYE_COLOUR
    return sprite_HWC


class StickyRandomPolicy:
  """Random actions, each held for 1 to `max_hold` steps (uniformly), so that moves are
  visibly long.

  With a new action every step (`max_hold=1`) the agent mostly jitters about one place,
  which teaches a world model less about its actions (README "Results" compares both). A move
  that was blocked ends its hold, so that the agent does not stand against a wall for most of
  an episode.
  """

  # noop, left, right, up, down, recolour.
  PROBS = np.array([0.12, 0.2, 0.2, 0.2, 0.2, 0.08])

  def __init__(self, seed: int | np.random.SeedSequence, max_hold: int = 8):
    """Creates the policy; `max_hold` is the longest run of one action."""
    if max_hold < 1:
      raise ValueError(f"max_hold must be at least 1, got {max_hold}.")
    self._rng = np.random.default_rng(seed)
    self._max_hold = max_hold
    self._action, self._left = NOOP, 0

  def __call__(self, blocked: bool = False) -> int:
    """The next action; `blocked`: the last move was stopped."""
    if blocked:
      self._left = 0
    if self._left == 0:
      self._action = int(self._rng.choice(NUM_ACTIONS, p=self.PROBS))
      # Recolouring every step for a while would only flicker; it is a one-step action.
      self._left = 1 if self._action == RECOLOUR else int(
          self._rng.integers(1, self._max_hold + 1))
    self._left -= 1
    return self._action


def rollout(env: BuiltinWorldEnv, seed: int | np.random.SeedSequence,
            num_frames: int, max_hold: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Plays one episode with the random policy (`StickyRandomPolicy(max_hold)`).

  Returns:
    frames_THWC uint8 and actions_T int32 with actions_T[t] applied at frame t; the last
    action is -1 (no frame follows).
  """
  if not isinstance(seed, np.random.SeedSequence):
    seed = np.random.SeedSequence(seed)
  env_seed, policy_seed = seed.spawn(2)
  policy = StickyRandomPolicy(policy_seed, max_hold)
  frames_THWC = np.empty((num_frames, env.image_size, env.image_size, 3), np.uint8)
  actions_T = np.full((num_frames,), -1, np.int32)
  frames_THWC[0] = env.reset(env_seed)
  for t in range(num_frames - 1):
    actions_T[t] = policy(env.blocked)
    frames_THWC[t + 1] = env.step(actions_T[t])
  return frames_THWC, actions_T
