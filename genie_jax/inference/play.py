r"""Play a trained Genie world model in a web browser (the command: genie_jax/cli/play.py).

Pick a prompt frame (the first frames of a few validation clips, or "random"), then press
number keys 1..9, 0 (latent actions 0..9) or the arrow keys (mapped to actions by
--arrow_actions), or click the action buttons. Each frame is shown as soon
as it is generated; the page also shows the generation latency, the recent frames and actions,
and offers the played episode as a GIF. Its step count per frame (MaskGIT's or the diffusion
family's; fewer: faster frames, coarser samples) applies from the next start or reset, and
choosing one resets the episode.

The server is the standard library's ThreadingHTTPServer with one static page (no external
resources) and JSON endpoints:

  GET  /                 the page
  GET  /api/info         {num_actions, image_size, prompts: [PNG data URL], num_prompts,
                          arrow_actions: {key: action}, title}
  POST /api/start        {prompt: index | "random", num_steps?: int}
                         -> {frame, t, prompt, actions, num_steps}
  POST /api/step         {action: int} -> {frame, t, action, latency_ms, actions, num_steps}
  POST /api/reset        {num_steps?: int} -> as /api/start, from the same prompt frame
  GET  /api/episode.gif  the frames played since the last start, as an animated GIF

Errors are JSON {error: message} with HTTP 400 (bad request, e.g. an action out of range) or
500. The world is anything with the `World` interface below (a trained `genie.Genie`, or a
stand-in in tests); one generation runs at a time.
"""

from __future__ import annotations

import base64
import http.server
import importlib.resources
import json
import threading
import time
from typing import Any, Protocol
import urllib.parse

from absl import logging
import imageio.v3 as iio
import jax
import numpy as np


# Keys the page maps to actions through /api/info; number keys are fixed (1..9, 0).
ARROW_KEYS = ("ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown")
NUM_THUMBNAILS = 8
MAX_BODY_BYTES = 1 << 16
# Step counts the page offers a world that takes any (each compiles its own program on first
# use).
STEP_CHOICES = (1, 2, 4, 8, 12, 16, 25, 32, 50)
MAX_NUM_STEPS = 64


class PlaySession(Protocol):
  """One episode being generated."""

  def step(self, action: int) -> np.ndarray:
    """Takes latent `action` at the last frame; returns the next frame, uint8 (H, W, C)."""


class World(Protocol):
  """A playable world model: `genie.Genie`, `diffusion.DiffusionGenie` or a test stand-in."""

  num_actions: int
  # The step counts the world takes (None: any in [1, MAX_NUM_STEPS]); a world without the
  # attribute takes any.
  step_choices: tuple[int, ...] | None

  def start(self, prompt_BTHWC: np.ndarray, num_steps: int) -> PlaySession:
    """Starts an episode from prompt frames, uint8 (1, T, H, W, C), sampling each frame
    with `num_steps` steps (MaskGIT's, or the diffusion family's Euler steps)."""


class PlayError(ValueError):
  """A bad request: answered with HTTP 400 and the message."""


def png_data_url(image_HWC: np.ndarray) -> str:
  """A uint8 image as a data: URL the page can put in an <img> src."""
  png = iio.imwrite("<bytes>", np.asarray(image_HWC, np.uint8), extension=".png")
  return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class Game:
  """The one episode served: prompt choice, steps (one at a time) and its frames."""

  def __init__(self, world: World, prompts_BTHWC: np.ndarray, *,
               arrow_actions: tuple[int, ...] = (0, 1, 2, 3), seed: int = 0,
               title: str = "Genie", num_steps: int = 25):
    prompts_BTHWC = np.asarray(prompts_BTHWC)
    if prompts_BTHWC.ndim != 5 or prompts_BTHWC.dtype != np.uint8 or not len(prompts_BTHWC):
      raise ValueError("prompts must be uint8 clips (B, T, H, W, C) with B >= 1, got "
                       f"{prompts_BTHWC.dtype} {prompts_BTHWC.shape}.")
    self.num_actions = int(world.num_actions)
    bad = [a for a in arrow_actions if not 0 <= a < self.num_actions]
    if len(arrow_actions) != len(ARROW_KEYS) or bad:
      raise ValueError(f"--arrow_actions={list(arrow_actions)}: need {len(ARROW_KEYS)} actions "
                       f"in [0, {self.num_actions}).")
    self._world = world
    choices = getattr(world, "step_choices", None)
    self._step_choices = choices and tuple(c for c in choices if c <= MAX_NUM_STEPS)
    self._num_steps = self._check_num_steps(num_steps)
    self._prompts = prompts_BTHWC
    self._arrow_actions = dict(zip(ARROW_KEYS, arrow_actions))
    self._rng = np.random.default_rng(seed)
    self._title = title
    # Held for a whole generation: the model and the episode are not shared between requests.
    self._lock = threading.Lock()
    self._session: PlaySession | None = None
    self._frames: list[np.ndarray] = []
    self._actions: list[int] = []
    self._prompt = -1

  def info(self) -> dict[str, Any]:
    """What the page needs before the first frame."""
    return dict(
        title=self._title,
        num_actions=self.num_actions,
        image_size=list(self._prompts.shape[2:4]),
        prompts=[png_data_url(clip[0]) for clip in self._prompts[:NUM_THUMBNAILS]],
        num_prompts=len(self._prompts),
        arrow_actions=self._arrow_actions,
        num_steps=self._num_steps,
        step_choices=sorted(set(self._step_choices or STEP_CHOICES) | {self._num_steps}),
    )

  def _check_num_steps(self, num_steps: Any) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not (
        1 <= num_steps <= MAX_NUM_STEPS):
      raise PlayError(f"num_steps={num_steps!r} is not valid: give an integer in "
                      f"[1, {MAX_NUM_STEPS}] (steps per frame).")
    if self._step_choices and num_steps not in self._step_choices:
      raise PlayError(f"num_steps={num_steps} is not valid: this world model takes "
                      f"{list(self._step_choices)} steps per frame.")
    return num_steps

  def start(self, prompt: Any, num_steps: Any = None) -> dict[str, Any]:
    """Starts a new episode from thumbnail `prompt` (an index) or "random", with
    `num_steps` steps per frame from now on (None: as before)."""
    if num_steps is not None:
      num_steps = self._check_num_steps(num_steps)
    with self._lock:
      if prompt == "random":
        # Any frame of any loaded clip, not only the thumbnails' first frames.
        clip = int(self._rng.integers(len(self._prompts)))
        frame_HWC = self._prompts[clip, self._rng.integers(self._prompts.shape[1])]
      elif isinstance(prompt, int) and not isinstance(prompt, bool) and (
          0 <= prompt < len(self._prompts)):
        clip, frame_HWC = prompt, self._prompts[prompt, 0]
      else:
        raise PlayError(f"prompt={prompt!r} is not valid: give an integer in "
                        f"[0, {len(self._prompts)}) or \"random\".")
      return self._start(frame_HWC, clip, num_steps)

  def reset(self, num_steps: Any = None) -> dict[str, Any]:
    """Starts again from the current episode's prompt frame (`num_steps`: as `start`)."""
    if num_steps is not None:
      num_steps = self._check_num_steps(num_steps)
    with self._lock:
      if not self._frames:
        raise PlayError("No episode to reset: pick a prompt first.")
      return self._start(self._frames[0], self._prompt, num_steps)

  def _start(self, frame_HWC: np.ndarray, clip: int, num_steps: int | None) -> dict[str, Any]:
    num_steps = self._num_steps if num_steps is None else num_steps
    self._session = self._world.start(frame_HWC[None, None], num_steps=num_steps)
    self._num_steps = num_steps
    self._frames, self._actions, self._prompt = [frame_HWC], [], clip
    return dict(frame=png_data_url(frame_HWC), t=0, prompt=clip, actions=[],
                num_steps=self._num_steps)

  def step(self, action: Any) -> dict[str, Any]:
    """Generates the frame that latent `action` leads to."""
    if isinstance(action, bool) or not isinstance(action, int) or not (
        0 <= action < self.num_actions):
      raise PlayError(f"action={action!r} is not a valid latent action: give an integer in "
                      f"[0, {self.num_actions}).")
    with self._lock:
      if self._session is None:
        raise PlayError("No episode: POST /api/start {\"prompt\": ...} first.")
      start = time.perf_counter()
      frame_HWC = np.asarray(self._session.step(action))
      latency_ms = (time.perf_counter() - start) * 1e3
      if frame_HWC.shape != self._frames[0].shape or frame_HWC.dtype != np.uint8:
        raise RuntimeError(f"The world returned a {frame_HWC.dtype} {frame_HWC.shape} frame; "
                           f"expected uint8 {self._frames[0].shape}.")
      self._frames.append(frame_HWC)
      self._actions.append(action)
      return dict(frame=png_data_url(frame_HWC), t=len(self._frames) - 1, action=action,
                  latency_ms=latency_ms, actions=list(self._actions), num_steps=self._num_steps)

  def episode_gif(self, fps: int = 8) -> bytes:
    """The frames since the last start as a looping GIF."""
    with self._lock:
      if not self._frames:
        raise PlayError("No episode yet: pick a prompt first.")
      frames_THWC = np.stack(self._frames)
    return iio.imwrite("<bytes>", frames_THWC, extension=".gif", duration=1000 / fps, loop=0)


def _page() -> bytes:
  return importlib.resources.files("genie_jax.inference").joinpath("static/play.html").read_bytes()


class _Handler(http.server.BaseHTTPRequestHandler):
  """Routes the page and the JSON API to the server's Game."""

  server: PlayServer

  def do_GET(self):  # pylint: disable=invalid-name
    path = urllib.parse.urlsplit(self.path).path
    if path in ("/", "/index.html"):
      self._send(200, self.server.page, "text/html; charset=utf-8")
    elif path == "/api/info":
      self._answer(self.server.game.info)
    elif path == "/api/episode.gif":
      self._answer(self.server.game.episode_gif, content_type="image/gif",
                   headers={"Content-Disposition": 'attachment; filename="genie_episode.gif"'})
    else:
      self._json(404, dict(error=f"No such page: {path}"))

  def do_POST(self):  # pylint: disable=invalid-name
    path = urllib.parse.urlsplit(self.path).path
    game = self.server.game
    routes = {"/api/start": ("prompt", lambda b: game.start(b["prompt"], b.get("num_steps"))),
              "/api/step": ("action", lambda b: game.step(b["action"])),
              "/api/reset": (None, lambda b: game.reset(b.get("num_steps")))}
    if path not in routes:
      self._json(404, dict(error=f"No such endpoint: POST {path}"))
      return
    key, method = routes[path]
    try:
      body = self._read_json()
      if key is not None and key not in body:
        raise PlayError(f"POST {path} needs a JSON object with {key!r}, got {body!r}.")
    except PlayError as e:
      self._json(400, dict(error=str(e)))
      return
    self._answer(lambda: method(body))

  def _read_json(self) -> dict[str, Any]:
    header = self.headers.get("Content-Length") or "0"
    try:
      length = int(header)
    except ValueError:
      length = -1
    if length < 0:
      raise PlayError(f"Content-Length {header!r} is not a byte count.")
    if length > MAX_BODY_BYTES:
      raise PlayError(f"Request body of {length} bytes is too large.")
    try:
      body = json.loads(self.rfile.read(length) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
      raise PlayError(f"Request body is not JSON: {e}") from e
    if not isinstance(body, dict):
      raise PlayError(f"Request body must be a JSON object, got {body!r}.")
    return body

  def _answer(self, fn, content_type: str | None = None,
              headers: dict[str, str] | None = None) -> None:
    try:
      result = fn()
    except PlayError as e:
      self._json(400, dict(error=str(e)))
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("Request %s failed.", self.path)
      self._json(500, dict(error=f"{type(e).__name__}: {e}"))
    else:
      if content_type is None:
        self._json(200, result)
      else:
        self._send(200, result, content_type, headers)

  def _json(self, code: int, obj: Any) -> None:
    self._send(code, json.dumps(obj).encode("utf-8"), "application/json")

  def _send(self, code: int, data: bytes, content_type: str,
            headers: dict[str, str] | None = None) -> None:
    self.send_response(code)
    self.send_header("Content-Type", content_type)
    for name, value in (headers or {}).items():
      self.send_header(name, value)
    self.send_header("Content-Length", str(len(data)))
    self.send_header("Cache-Control", "no-store")
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    logging.debug("%s " + format, self.address_string(), *args)


class PlayServer(http.server.ThreadingHTTPServer):
  """Serves the play page and API for one Game; port 0 picks a free port."""

  daemon_threads = True

  def __init__(self, game: Game, host: str = "127.0.0.1", port: int = 0):
    self.game = game
    self.page = _page()
    super().__init__((host, port), _Handler)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}/"


def load_prompts(workdir: str, num_clips: int) -> np.ndarray:
  """The first `num_clips` validation clips of the workdir's data, uint8 (B, T, H, W, C)."""
  from genie_jax import config_lib  # pylint: disable=g-import-not-at-top
  from genie_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(workdir)
  ds = input_pipeline.make_eval_dataset(config.data, "validation", global_batch_size=num_clips,
                                        num_batches=1, drop_remainder=False,
                                        process_index=0, process_count=1)
  batch = next(iter(ds))
  return np.asarray(batch["video"])[np.asarray(batch["episode_id"]) >= 0]


class SampledGenie:
  """A `World` playing a trained genie.Genie with fixed sampling options.

  Every episode gets its own sampling key (folded from `seed`), so a reset does not replay
  the same samples, while the whole sequence of episodes is reproducible.
  """

  def __init__(self, genie: Any, *, temperature: float, seed: int):
    self.genie = genie
    self.num_actions = int(genie.num_actions)
    self.step_choices = genie.step_choices
    self._temperature = temperature
    self._seed = seed
    self._episodes = 0

  def start(self, prompt_BTHWC: np.ndarray, num_steps: int) -> PlaySession:
    rng = jax.random.fold_in(jax.random.key(self._seed), self._episodes)
    self._episodes += 1
    return self.genie.start(prompt_BTHWC, rng=rng, num_steps=num_steps,
                            temperature=self._temperature)


def load_world(workdir: str, *, step: int | None = None, temperature: float = 1.0,
               seed: int = 0) -> SampledGenie:
  """The trained world model of a workdir of either dynamics family (its tokenizer and LAM
  come with it)."""
  # Imported here: serving itself needs no model code (tests serve stand-in worlds).
  from genie_jax.inference import worlds  # pylint: disable=g-import-not-at-top
  return SampledGenie(worlds.load(workdir, step=step), temperature=temperature, seed=seed)
