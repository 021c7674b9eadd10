"""genie_jax.cli.play: the JSON API, one generation at a time, and the page played in Chromium."""

import base64
import http.client
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import types
import urllib.error
import urllib.request

import imageio.v3 as iio
import numpy as np
import pytest
import websocket
from flax import nnx

import data_pipelines
from configs import dynamics as dynamics_config
from configs import lam as lam_config
from configs import tokenizer as tokenizer_config
from genie_jax import config_lib
from genie_jax import tasks
from genie_jax.inference import genie as genie_lib
from genie_jax.inference import play

NUM_ACTIONS = 6
ARROW_ACTIONS = (5, 4, 3, 0)  # Left, Right, Up, Down: not the identity, so the mapping shows.


class FakeSession:
  """Next frame = previous frame + 37 * (action + 1) (mod 256): each action looks different."""

  def __init__(self, world, prompt_BTHWC):
    self._world = world
    self.frames = [prompt_BTHWC[0, -1]]

  def step(self, action):
    with self._world.guard:
      self._world.active += 1
      self._world.max_active = max(self._world.max_active, self._world.active)
    time.sleep(0.02)  # Long enough for overlapping requests to overlap here.
    self.frames.append(expected_next(self.frames[-1], action))
    self._world.actions.append(action)
    with self._world.guard:
      self._world.active -= 1
    return self.frames[-1]


class FakeWorld:
  """A deterministic stand-in for genie.Genie that records what it was asked."""

  num_actions = NUM_ACTIONS

  def __init__(self):
    self.guard = threading.Lock()
    self.active = self.max_active = 0
    self.actions = []
    self.prompts = []
    self.num_steps = []

  def start(self, prompt_BTHWC, num_steps):
    assert prompt_BTHWC.shape == (1, 1, 64, 64, 3) and prompt_BTHWC.dtype == np.uint8
    self.prompts.append(prompt_BTHWC)
    self.num_steps.append(num_steps)
    self.actions = []
    return FakeSession(self, prompt_BTHWC)


def expected_next(frame_HWC, action):
  return ((frame_HWC.astype(np.int32) + 37 * (action + 1)) % 256).astype(np.uint8)


def make_prompts(num_clips=3, num_frames=2):
  """Clips of 8x8-pixel blocks of a few colours (so GIF palettes keep them exact)."""
  rng = np.random.default_rng(0)
  colours = rng.integers(0, 256, (num_clips, num_frames, 8, 8, 3), dtype=np.uint8) // 64 * 64
  return np.repeat(np.repeat(colours, 8, axis=2), 8, axis=3)


def decode(data_url):
  assert data_url.startswith("data:image/png;base64,")
  return iio.imread(base64.b64decode(data_url.split(",", 1)[1]))


@pytest.fixture(name="served")
def served_fixture():
  world, prompts = FakeWorld(), make_prompts()
  game = play.Game(world, prompts, arrow_actions=ARROW_ACTIONS, seed=0, title="fake",
                   num_steps=12)
  server = play.PlayServer(game, "127.0.0.1", 0)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield server, world, prompts
  server.shutdown()
  server.server_close()
  thread.join()


def request(server, path, body=None, timeout=30):
  """(HTTP status, parsed JSON or raw bytes) of GET path, or POST path with a JSON body."""
  data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
  req = urllib.request.Request(server.url.rstrip("/") + path, data=data)
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      status, content, kind = r.status, r.read(), r.headers["Content-Type"]
  except urllib.error.HTTPError as e:
    status, content, kind = e.code, e.read(), e.headers["Content-Type"]
  return status, (json.loads(content) if kind == "application/json" else content)


def test_api(served):
  server, world, prompts = served
  status, page = request(server, "/")
  assert status == 200 and b"image-rendering: pixelated" in page
  assert not re.search(rb"(src|href)=\"https?://", page), "the page must not load anything"

  status, info = request(server, "/api/info")
  assert status == 200 and info["num_actions"] == NUM_ACTIONS and info["image_size"] == [64, 64]
  assert len(info["prompts"]) == 3 and info["num_prompts"] == 3
  np.testing.assert_array_equal(decode(info["prompts"][2]), prompts[2, 0])
  assert info["arrow_actions"] == dict(zip(play.ARROW_KEYS, ARROW_ACTIONS))
  assert info["num_steps"] == 12 and 12 in info["step_choices"] and 25 in info["step_choices"]

  status, err = request(server, "/api/step", {"action": 1})
  assert status == 400 and "/api/start" in err["error"]
  assert request(server, "/api/episode.gif")[0] == 400

  status, first = request(server, "/api/start", {"prompt": 1})
  assert status == 200 and first["t"] == 0 and first["prompt"] == 1
  assert first["num_steps"] == 12 and world.num_steps == [12]
  np.testing.assert_array_equal(decode(first["frame"]), prompts[1, 0])
  frames = [prompts[1, 0]]
  for t, action in enumerate([3, 0, 5], start=1):
    status, answer = request(server, "/api/step", {"action": action})
    frames.append(expected_next(frames[-1], action))
    assert status == 200 and answer["t"] == t and answer["action"] == action
    assert answer["latency_ms"] >= 20
    np.testing.assert_array_equal(decode(answer["frame"]), frames[-1])
  assert world.actions == [3, 0, 5] and answer["actions"] == [3, 0, 5]

  for bad in [6, -1, "2", 1.0, True, None]:
    status, err = request(server, "/api/step", {"action": bad})
    assert status == 400 and "[0, 6)" in err["error"], (bad, err)
  assert world.actions == [3, 0, 5]
  for body in [b"{not json", b"[1]", {"act": 1}, b"[" * 5000 + b"]" * 5000]:
    status, err = request(server, "/api/step", body)
    assert status == 400 and err["error"], body
  for length in ["abc", "-5"]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.putrequest("POST", "/api/step")
    conn.putheader("Content-Length", length)
    conn.endheaders()
    answer = conn.getresponse()
    assert answer.status == 400 and b"Content-Length" in answer.read(), length
    conn.close()
  for prompt in [3, -1, "1", None]:
    status, err = request(server, "/api/start", {"prompt": prompt})
    assert status == 400 and "[0, 3)" in err["error"] and "random" in err["error"]
  assert request(server, "/api/nothing")[0] == 404
  assert request(server, "/api/nothing", {})[0] == 404

  status, gif = request(server, "/api/episode.gif")
  assert status == 200 and gif.startswith(b"GIF8")
  np.testing.assert_array_equal(iio.imread(gif, index=None)[..., :3], np.stack(frames))

  for bad in [0, 65, "8", 2.0, True]:
    status, err = request(server, "/api/reset", {"num_steps": bad})
    assert status == 400 and "[1, 64]" in err["error"], (bad, err)
  status, again = request(server, "/api/reset", {"num_steps": 4})
  assert status == 200 and again["t"] == 0 and again["prompt"] == 1 and world.actions == []
  assert again["num_steps"] == 4 and world.num_steps == [12, 4]
  assert request(server, "/api/step", {"action": 0})[1]["num_steps"] == 4
  np.testing.assert_array_equal(decode(again["frame"]), prompts[1, 0])
  status, rand = request(server, "/api/start", {"prompt": "random"})
  assert status == 200 and any((decode(rand["frame"]) == f).all() for f in prompts.reshape(
      -1, 64, 64, 3))


def test_one_generation_at_a_time(served):
  server, world, _ = served
  request(server, "/api/start", {"prompt": 0})
  answers = []
  threads = [threading.Thread(target=lambda a=a: answers.append(
      request(server, "/api/step", {"action": a % NUM_ACTIONS}))) for a in range(8)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert world.max_active == 1
  assert sorted(answer["t"] for status, answer in answers if status == 200) == list(range(1, 9))


def tiny_stage_config(module, data_dir, arg=""):
  """A tiny stage on a tiny builtin-world dataset (32x32 frames, 8-frame clips)."""
  config = module.get_config("size=tiny,runlocal" + arg)
  config.data.update(data_dir=data_dir, image_size=32, clip_len=8, num_train_episodes=2,
                     num_val_episodes=3, episode_len=24)
  if "image_size" in config.model:  # The dynamics model works on tokens.
    config.model.image_size = 32
  config.model.max_frames = 8
  config.checkpoint.async_save = False
  return config


def test_load_prompts_reads_validation_clips(tmp_path, tiny_data_dir):
  config = tiny_stage_config(tokenizer_config, tiny_data_dir)
  data_pipelines.get_builder(config.data, prepare=True)
  config_lib.save_config(str(tmp_path), config)
  prompts = play.load_prompts(str(tmp_path), num_clips=16)
  # 3 episodes x 3 clips of 8 frames: fewer than asked, and no padding rows.
  assert prompts.shape == (9, 8, 32, 32, 3) and prompts.dtype == np.uint8
  assert len({p.tobytes() for p in prompts[:, 0]}) == 9
  assert prompts.std() > 0


def test_serves_a_real_tiny_genie(tmp_path, tiny_data_dir):
  # An untrained world model: the stages' configs are all its task reads, no checkpoints.
  tok, lam = str(tmp_path / "tok"), str(tmp_path / "lam")
  config_lib.save_config(tok, tiny_stage_config(tokenizer_config, tiny_data_dir))
  config_lib.save_config(lam, tiny_stage_config(lam_config, tiny_data_dir))
  config = tiny_stage_config(dynamics_config, tiny_data_dir,
                             f",tokenizer_workdir={tok},lam_workdir={lam}")
  genie = genie_lib.Genie(tasks.get_task(config).make_model(nnx.Rngs(0)))
  world = play.SampledGenie(genie, temperature=1.0, seed=0)
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, 256, (2, 1, 32, 32, 3), dtype=np.uint8)
  # Compiled here, outside any request: on 2 busy CPU cores that can take tens of seconds.
  assert world.start(prompts[:1], num_steps=2).step(0).shape == (32, 32, 3)
  server = play.PlayServer(play.Game(world, prompts, num_steps=2))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    status, info = request(server, "/api/info")
    num_actions = info["num_actions"]
    assert status == 200 and num_actions == genie.num_actions >= 2
    assert request(server, "/api/start", {"prompt": 1})[0] == 200
    for t, action in enumerate([0, num_actions - 1], start=1):
      status, answer = request(server, "/api/step", {"action": action})
      assert status == 200 and answer["t"] == t and answer["latency_ms"] > 0, answer
      assert decode(answer["frame"]).shape == (32, 32, 3)
    status, err = request(server, "/api/step", {"action": num_actions})
    assert status == 400 and f"[0, {num_actions})" in err["error"]
    status, gif = request(server, "/api/episode.gif")
    assert status == 200 and iio.imread(gif, index=None).shape[:3] == (3, 32, 32)
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


def test_bad_arrow_actions():
  with pytest.raises(ValueError, match="arrow_actions"):
    play.Game(FakeWorld(), make_prompts(), arrow_actions=(0, 1, 2, 6))


def test_a_world_that_takes_only_some_step_counts_offers_those():
  world = FakeWorld()
  world.step_choices = (1, 2, 4)
  with pytest.raises(play.PlayError, match=r"takes \[1, 2, 4\] steps per frame"):
    play.Game(world, make_prompts(), num_steps=25)
  game = play.Game(world, make_prompts(), num_steps=4)
  assert game.info()["step_choices"] == [1, 2, 4]
  game.start(0, num_steps=2)
  with pytest.raises(play.PlayError, match="num_steps=8 is not valid"):
    game.reset(num_steps=8)
  assert world.num_steps == [2]


def test_play_command_checks_its_flags_and_port_before_compiling(monkeypatch):
  from absl import app  # pylint: disable=import-outside-toplevel
  from genie_jax.cli import play as play_cli  # pylint: disable=import-outside-toplevel
  world = FakeWorld()
  world.genie = types.SimpleNamespace(resolve_steps=lambda n, flag: n or 25, step=0)
  world.step_choices = None
  monkeypatch.setattr(play, "load_world", lambda *args, **kwargs: world)
  monkeypatch.setattr(play, "load_prompts", lambda *args: make_prompts())
  f = types.SimpleNamespace(workdir="w", step=None, num_steps=None, temperature=1.0, seed=0,
                            num_prompts=3, arrow_actions=["0", "1", "2", "9"],
                            host="127.0.0.1", port=0)
  monkeypatch.setattr(play_cli, "flags", types.SimpleNamespace(FLAGS=f))
  with pytest.raises(app.UsageError, match=r"--arrow_actions=\[0, 1, 2, 9\]"):
    play_cli.main()
  f.arrow_actions = ["0", "1", "2", "3"]
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    f.port = taken.getsockname()[1]
    with pytest.raises(app.UsageError, match=f"--port={f.port}"):
      play_cli.main()
  assert not world.prompts, "the generation step was compiled before the checks"


def test_play_takes_the_distributed_flags_and_serves_from_one_process(tmp_path):
  import sys  # pylint: disable=import-outside-toplevel
  out = subprocess.run(
      [sys.executable, "-m", "genie_jax.cli.play", f"--workdir={tmp_path / 'none'}",
       "--num_processes=2", "--coordinator_address=127.0.0.1:1", "--malloc=system"],
      capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "serves one page from one process" in out.stderr and "--distributed=no" in out.stderr


# --- The page in a real browser ----------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
  """A headless Chromium page driven over the Chrome DevTools Protocol."""

  def __init__(self, tmp_path, url):
    profile = tmp_path / "chromium"
    self.proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "--window-size=1400,1000", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      port_file = profile / "DevToolsActivePort"
      self._wait(lambda: port_file.exists() and port_file.read_text().count("\n") >= 1, 30)
      port = int(port_file.read_text().split()[0])
      with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
        page = next(t for t in json.load(r) if t["type"] == "page")
      self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=20,
                                            suppress_origin=True)
    except BaseException:
      self.close()
      raise
    self._id = 0

  def close(self):
    if hasattr(self, "ws"):
      self.ws.close()
    self.proc.kill()
    self.proc.wait()

  def send(self, method, **params):
    self._id += 1
    self.ws.send(json.dumps(dict(id=self._id, method=method, params=params)))
    while True:  # Events arrive in between; the answer carries our id.
      message = json.loads(self.ws.recv())
      if message.get("id") == self._id:
        assert "error" not in message, message
        return message["result"]

  def js(self, expression):
    result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                       awaitPromise=True)
    assert "exceptionDetails" not in result, result
    return result["result"].get("value")

  def wait_js(self, expression, timeout=10):
    self._wait(lambda: self.js(expression), timeout, expression)

  @staticmethod
  def _wait(condition, timeout, what="Chromium"):
    deadline = time.monotonic() + timeout
    while not condition():
      assert time.monotonic() < deadline, f"timed out waiting for {what}"
      time.sleep(0.05)

  def press(self, key, code, key_code, text=""):
    """A real key press, as the keyboard sends it."""
    for kind in ("keyDown", "keyUp"):
      self.send("Input.dispatchKeyEvent", type=kind, key=key, code=code, text=text,
                windowsVirtualKeyCode=key_code, nativeVirtualKeyCode=key_code)

  def click(self, selector):
    """A real left click in the middle of the element."""
    box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                  ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    for kind in ("mousePressed", "mouseReleased"):
      self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left",
                clickCount=1)

  def frame(self):
    """The t and pixels of the big frame on screen."""
    t, src = self.js("[document.getElementById('frame').dataset.t, "
                     "document.getElementById('frame').src]")
    return int(t), decode(src)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install "
                    "chromium; .ci/run installs it)")
def test_play_in_browser(served, tmp_path):
  server, world, prompts = served
  browser = DevTools(tmp_path, server.url)
  try:
    browser.wait_js("document.querySelectorAll('#prompts img').length === 3")
    assert browser.js("document.querySelectorAll('#actions button').length") == NUM_ACTIONS
    legend = browser.js("[...document.querySelectorAll('#legend tr')].map(r => r.innerText)")
    assert len(legend) == NUM_ACTIONS
    assert "1" in legend[0] and "\u2193" in legend[0]  # key 1 and ArrowDown -> action 0
    assert "\u2190" in legend[5] and "6" in legend[5]  # ArrowLeft and key 6 -> action 5
    assert browser.js("getComputedStyle(document.getElementById('frame')).imageRendering"
                      ) == "pixelated"
    assert browser.js("document.getElementById('frame').getBoundingClientRect().width") >= 256

    browser.click("#prompts img:nth-child(2)")
    browser.wait_js("document.getElementById('frame').dataset.t === '0'")
    t, shown = browser.frame()
    np.testing.assert_array_equal(shown, prompts[1, 0])
    expected = [prompts[1, 0]]

    # Key "3" is action 2, ArrowRight action ARROW_ACTIONS[1], the button "5" action 5.
    presses = [(lambda: browser.press("3", "Digit3", 51, "3"), 2),
               (lambda: browser.press("ArrowRight", "ArrowRight", 39), ARROW_ACTIONS[1]),
               (lambda: browser.click("#action-5"), 5)]
    for t, (press, action) in enumerate(presses, start=1):
      before = shown
      press()
      browser.wait_js(f"document.getElementById('frame').dataset.t === '{t}'")
      _, shown = browser.frame()
      expected.append(expected_next(expected[-1], action))
      assert not np.array_equal(shown, before), "the frame on screen did not change"
      np.testing.assert_array_equal(shown, expected[-1])
      stats = browser.js("document.getElementById('stats').innerText")
      assert re.search(r"generation \d+ ms \(\d+\.\d frames/s, 12 steps per frame\)", stats), stats
    assert world.actions == [2, ARROW_ACTIONS[1], 5]
    captions = browser.js("[...document.querySelectorAll('#history figcaption')]"
                          ".map(c => c.innerText)")
    assert captions == ["prompt", "a2", f"a{ARROW_ACTIONS[1]}", "a5"]
    assert re.search(r"shown \d+\.\d frames/s", stats), stats

    # Key 9 would be action 8: there is none, so nothing is asked of the world.
    browser.press("9", "Digit9", 57, "9")
    time.sleep(0.3)
    assert browser.frame()[0] == 3 and world.actions == [2, ARROW_ACTIONS[1], 5]

    href = browser.js("document.getElementById('download').href")
    with urllib.request.urlopen(href, timeout=10) as r:
      gif = r.read()
      assert "attachment" in r.headers["Content-Disposition"]
    np.testing.assert_array_equal(iio.imread(gif, index=None)[..., :3], np.stack(expected))

    browser.click("#reset")
    browser.wait_js("document.getElementById('frame').dataset.t === '0'")
    np.testing.assert_array_equal(browser.frame()[1], prompts[1, 0])
    assert browser.js("document.querySelectorAll('#history figure').length") == 1
    assert world.actions == [] and len(world.prompts) == 2

    # Choosing another step count restarts the episode with it.
    assert browser.js("document.getElementById('steps').value") == "12"
    browser.js("(() => { const s = document.getElementById('steps'); s.value = '4'; "
               "s.dispatchEvent(new Event('change')); })()")
    DevTools._wait(lambda: len(world.prompts) == 3, 10, "the restart")  # pylint: disable=protected-access
    assert world.num_steps[-1] == 4
    browser.wait_js("document.getElementById('stats').innerText.includes('prompt 1')")
    browser.press("3", "Digit3", 51, "3")
    browser.wait_js("document.getElementById('stats').innerText.includes('4 steps per frame')")
  finally:
    browser.close()
