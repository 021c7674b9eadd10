r"""Play a trained Genie world model in a web browser.

  python -m genie_jax.cli.play --workdir=workdirs/dyn [--port=8000] [--host=127.0.0.1] \
      [--step=N] [--num_steps=25] [--temperature=1.0] [--seed=0] [--arrow_actions=0,1,2,3]

then open http://127.0.0.1:8000/. The page and its server: genie_jax/inference/play.py. One
process serves it (more are refused before anything loads).
"""

from absl import app
from absl import flags
from absl import logging

from genie_jax import cli
from genie_jax.inference import play


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A dynamics workdir written by genie_jax.cli.train.")
  flags.DEFINE_integer("port", 8000, "Port to serve the page on.")
  flags.DEFINE_string("host", "127.0.0.1", "Address to serve on (0.0.0.0: all).")
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
  flags.DEFINE_integer("num_steps", None, "Steps per frame at the start (MaskGIT's, or the "
                       "diffusion family's Euler steps; default: Genie's 25, or a shortcut "
                       "model's most); the page can change it.")
  flags.DEFINE_float("temperature", 1.0,
                     "Sampling temperature (MaskGIT; Genie: 1.0 on CoinRun; 0: argmax), or "
                     "the scale of each frame's starting noise (diffusion).")
  flags.DEFINE_integer("seed", 0, "Seed of the sampler and of the random prompt.")
  flags.DEFINE_integer("num_prompts", 32, "Validation clips whose frames can be prompts.")
  flags.DEFINE_list("arrow_actions", ["0", "1", "2", "3"],
                    "Latent actions of the Left, Right, Up, Down arrow keys.")
  flags.mark_flags_as_required(["workdir"])


def main() -> None:
  f = flags.FLAGS
  if f.num_steps is not None and not 1 <= f.num_steps <= play.MAX_NUM_STEPS:
    raise app.UsageError(f"--num_steps={f.num_steps} must be in [1, {play.MAX_NUM_STEPS}].")
  if f.temperature < 0:
    raise app.UsageError(f"--temperature={f.temperature} must be >= 0.")
  try:
    arrow_actions = tuple(int(a) for a in f.arrow_actions)
  except ValueError as e:
    raise app.UsageError(f"--arrow_actions={f.arrow_actions}: {e}") from e
  if f.num_prompts < 1:
    raise app.UsageError(f"--num_prompts={f.num_prompts} must be at least 1.")
  world = play.load_world(f.workdir, step=f.step, temperature=f.temperature, seed=f.seed)
  try:
    num_steps = world.genie.resolve_steps(f.num_steps, "--num_steps")
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if f.num_steps is None and num_steps > play.MAX_NUM_STEPS:
    # A model's own default (a shortcut model's finest step count) past the page's bound:
    # the most steps the page offers.
    num_steps = max([c for c in world.step_choices or () if c <= play.MAX_NUM_STEPS]
                    or [play.MAX_NUM_STEPS])
  prompts_BTHWC = play.load_prompts(f.workdir, f.num_prompts)
  # Flags and the port are checked before the compile below, which takes seconds to minutes.
  try:
    game = play.Game(world, prompts_BTHWC, arrow_actions=arrow_actions, seed=f.seed,
                     title=f"{f.workdir} (step {world.genie.step})", num_steps=num_steps)
  except ValueError as e:  # --arrow_actions, or play.PlayError: --num_steps
    raise app.UsageError(str(e)) from e
  try:
    server = play.PlayServer(game, f.host, f.port)
  except OSError as e:
    raise app.UsageError(f"--host={f.host} --port={f.port}: {e}") from e
  # Compiles the step now, so the first key press is not kept waiting.
  logging.info("Compiling the generation step...")
  world.start(prompts_BTHWC[:1, :1], num_steps=num_steps).step(0)
  logging.info("Serving Genie on %s (Ctrl-C stops).", server.url)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


if __name__ == "__main__":
  cli.run(define_flags, main, processes="one")
