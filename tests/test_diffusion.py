"""The diffusion family: the continuous tokenizer, the diffusion-forcing dynamics model, its
task on frozen earlier stages, and its cached sampler."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import diffusion as diffusion_config
from configs import genie as genie_config
from configs import dynamics as dynamics_config
from configs import lam as lam_config
from configs import tokenizer as tokenizer_config
from genie_jax import evaluators
from genie_jax import sharding
from genie_jax import tasks
from genie_jax import visualize
from genie_jax.inference import diffusion as diffusion_sampling
from genie_jax.inference import worlds
from genie_jax.models import diffusion as diffusion_lib
from genie_jax.models import tokenizer as tokenizer_lib
from genie_jax.tasks import diffusion as diffusion_task
from genie_jax.training import pipeline
from genie_jax.training import trainer
from conftest import (CLIP_LEN, IMAGE_SIZE, save_random_stage, tiny_data,
                      tiny_pipeline_overrides, tiny_stage)

LATENT, TOKENS, ACTIONS, FRAMES = 4, 4, 3, 5


def _model(conditioning="additive", objective="velocity", **overrides):
  cfg = diffusion_lib.default_config()
  cfg.update(dict(dict(num_layers=2, d_model=16, num_heads=2, latent_dim=LATENT,
                       tokens_per_frame=TOKENS, num_actions=ACTIONS, max_frames=FRAMES,
                       action_conditioning=conditioning, objective=objective), **overrides))
  return diffusion_lib.DiffusionModel(cfg, rngs=nnx.Rngs(0))


def _inputs(b=2, t=FRAMES, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((b, t, TOKENS, LATENT)).astype(np.float32),
          rng.uniform(size=(b, t)).astype(np.float32),
          rng.integers(0, ACTIONS, (b, t)).astype(np.int32))


# --- The continuous tokenizer -----------------------------------------------------------


def test_kl_tokenizer_has_latents_and_a_kl_term_and_no_tokens():
  cfg = tokenizer_config.get_config("size=tiny,quantizer=kl").model
  cfg.update(image_size=IMAGE_SIZE, max_frames=4)
  model = tokenizer_lib.Tokenizer(cfg, rngs=nnx.Rngs(0))
  video = np.random.default_rng(0).integers(0, 256, (2, 4, IMAGE_SIZE, IMAGE_SIZE, 3),
                                            dtype=np.uint8)
  out = model(video, train=True, rng=jax.random.key(0))
  assert out["z"].shape == (2, 4, 16, cfg.latent_dim) and float(out["kl_loss"]) > 0
  # Training decodes a sample, evaluation the mean: the same encoder's mean either way.
  np.testing.assert_allclose(model.encode_latents(video), out["z"], rtol=1e-6)
  evaluated = model(video, train=False)
  assert not np.allclose(evaluated["recon"], out["recon"])
  with pytest.raises(ValueError, match="no tokens"):
    model.encode(video)
  with pytest.raises(ValueError, match="needs an rng"):
    model(video, train=True)
  cfg.quantizer = "gaussian"
  with pytest.raises(ValueError, match="config.model.quantizer='gaussian'"):
    tokenizer_lib.Tokenizer(cfg, rngs=nnx.Rngs(0))


def test_kl_tokenizer_trains(tmp_path, tiny_data_dir):
  config = tiny_stage(tokenizer_config, "quantizer=kl")
  config.data.data_dir = tiny_data_dir
  config.update(total_steps=3, log_every_steps=1, images_every_steps=0, eval_every_steps=3,
                batch_size=4)
  config.evals.reconstruction.num_batches = 1
  config.mesh = dict(data=1, fsdp=1, tensor=1)
  metrics = trainer.train_and_evaluate(config, str(tmp_path / "ktok"),
                                       devices=jax.devices()[:1])
  assert np.isfinite(metrics["loss"]) and metrics["kl_loss"] > 0 and "restarted_codes" not in metrics
  with open(tmp_path / "ktok" / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  evals = [r for r in rows if "reconstruction/psnr" in r]
  assert evals and "reconstruction/codebook_usage" not in evals[-1]


# --- The model ---------------------------------------------------------------------------


def test_levels_are_drawn_per_frame_and_noise_follows_the_path():
  tau_BT = diffusion_task.sample_levels(jax.random.key(0), (512, 6))
  assert tau_BT.shape == (512, 6) and 0.0 <= float(tau_BT.min()) and float(tau_BT.max()) <= 1
  # Independent per frame: frames of one clip differ, and are uncorrelated across clips.
  assert float(jnp.mean(jnp.std(tau_BT, axis=1))) > 0.2
  corr = np.corrcoef(np.asarray(tau_BT).T)
  assert np.max(np.abs(corr - np.eye(6))) < 0.15
  np.testing.assert_allclose(np.mean(tau_BT), 0.5, atol=0.03)
  z, eps = np.ones((1, 2, 1, 1)), np.zeros((1, 2, 1, 1))
  np.testing.assert_allclose(diffusion_lib.noised(z, eps, jnp.array([[0.0, 0.25]])).ravel(),
                             [1.0, 0.75])


@pytest.mark.parametrize("conditioning", ["additive", "prepend"])
def test_frame_t_depends_on_its_past_and_the_action_that_caused_it(conditioning):
  model = _model(conditioning)
  z, tau, actions = _inputs()
  base = np.asarray(model(z, tau, actions))
  t = 2
  # Later frames, their levels and later actions change nothing up to frame t.
  z2, tau2, actions2 = z.copy(), tau.copy(), actions.copy()
  z2[:, t + 1:] += 1.0
  tau2[:, t + 1:] = 1.0 - tau2[:, t + 1:]
  actions2[:, t:] = (actions2[:, t:] + 1) % ACTIONS  # actions[:, t] causes frame t + 1.
  np.testing.assert_allclose(np.asarray(model(z2, tau2, actions2))[:, :t + 1],
                             base[:, :t + 1], atol=1e-5)
  # The action that caused frame t (taken at frame t - 1) changes frame t.
  actions3 = actions.copy()
  actions3[:, t - 1] = (actions3[:, t - 1] + 1) % ACTIONS
  changed = np.asarray(model(z, tau, actions3))
  np.testing.assert_allclose(changed[:, :t], base[:, :t], atol=1e-5)
  assert np.abs(changed[:, t] - base[:, t]).max() > 1e-4
  # So does the frame's own noise level.
  tau4 = tau.copy()
  tau4[:, t] = 1.0 - tau4[:, t]
  assert np.abs(np.asarray(model(z, tau4, actions))[:, t] - base[:, t]).max() > 1e-4


@pytest.mark.parametrize("objective", ["velocity", "x0"])
def test_the_objective_and_its_estimates(objective):
  model = _model(objective=objective)
  z0 = np.random.default_rng(1).standard_normal((2, FRAMES, TOKENS, LATENT)).astype(np.float32)
  eps = np.random.default_rng(2).standard_normal(z0.shape).astype(np.float32)
  tau = np.full((2, FRAMES), 0.3, np.float32)
  z_tau = diffusion_lib.noised(z0, eps, tau)
  # The prediction a perfect model makes recovers the clean latents and the flow's velocity.
  perfect = eps - z0 if objective == "velocity" else z0
  np.testing.assert_allclose(model.clean_estimate(perfect, z_tau, tau), z0, atol=1e-5)
  np.testing.assert_allclose(model.velocity(perfect, z_tau, tau), eps - z0, atol=1e-4)


# --- The task on frozen stages -----------------------------------------------------------


@pytest.fixture(scope="module", name="stage_workdirs")
def fixture_stage_workdirs(tmp_path_factory):
  """A continuous tokenizer, a VQ tokenizer and a LAM, with random weights."""
  root = tmp_path_factory.mktemp("stages")
  dirs = dict(ktok=str(root / "ktok"), tok=str(root / "tok"), lam=str(root / "lam"))
  save_random_stage(dirs["ktok"], tiny_stage(tokenizer_config, "quantizer=kl"), seed=1)
  save_random_stage(dirs["tok"], tiny_stage(tokenizer_config), seed=2)
  save_random_stage(dirs["lam"], tiny_stage(lam_config), seed=3)
  return dirs


def _diffusion_config(tokenizer_dir, lam_dir, data_dir="", arg=""):
  config = diffusion_config.get_config(
      f"size=tiny,runlocal,tokenizer_workdir={tokenizer_dir},lam_workdir={lam_dir}"
      + (f",{arg}" if arg else ""))
  tiny_data(config, data_dir)
  config.model.max_frames = CLIP_LEN
  config.checkpoint.async_save = False
  return config


def test_each_family_refuses_the_others_tokenizer(stage_workdirs):
  task = tasks.get_task(_diffusion_config(stage_workdirs["ktok"], stage_workdirs["lam"]))
  tok = task.config.tokenizer_model
  assert (task.config.model.latent_dim, task.config.model.tokens_per_frame,
          task.config.model.num_actions) == (tok.latent_dim, 16, task.config.lam_model.num_actions)
  with pytest.raises(ValueError, match="config.tokenizer_workdir=.*'vq'.*needs a 'kl'"):
    tasks.get_task(_diffusion_config(stage_workdirs["tok"], stage_workdirs["lam"]))
  maskgit = dynamics_config.get_config(
      f"size=tiny,runlocal,tokenizer_workdir={stage_workdirs['ktok']},"
      f"lam_workdir={stage_workdirs['lam']}")
  tiny_data(maskgit)
  maskgit.model.max_frames = CLIP_LEN
  with pytest.raises(ValueError, match="'kl'.*needs a 'vq' tokenizer"):
    tasks.get_task(maskgit)


@pytest.mark.parametrize("objective,clean", [("velocity", 0.0), ("x0", 0.0),
                                             ("velocity", 0.5)])
def test_loss_is_the_objectives_mean_squared_error(stage_workdirs, objective, clean):
  config = _diffusion_config(stage_workdirs["ktok"], stage_workdirs["lam"],
                             arg=f"objective={objective}")
  config.clean_frame_fraction = clean
  task = tasks.get_task(config)
  model = task.make_model(nnx.Rngs(0))
  video = np.random.default_rng(0).integers(0, 256, (4, CLIP_LEN, IMAGE_SIZE, IMAGE_SIZE, 3),
                                            dtype=np.uint8)
  batch = dict(video=video, actions=np.zeros((4, CLIP_LEN), np.int32))
  rng = jax.random.key(3)
  loss, metrics, _ = task.loss(model, batch, rng)
  ex = task.noised_batch(model, batch, rng)
  z, tau = np.asarray(ex["z"]), np.asarray(ex["tau"])
  np.testing.assert_allclose(z, model.tokenizer.encode_latents(video), atol=1e-6)
  np.testing.assert_allclose(ex["target"], ex["eps"] - z if objective == "velocity" else z,
                             atol=1e-6)
  prediction = np.asarray(model.dynamics(ex["z_tau"], ex["tau"], ex["actions"]))
  x0 = (prediction if objective == "x0"
        else np.asarray(ex["z_tau"]) - tau[:, :, None, None] * prediction)
  # Means over the noised frames: a clean frame (level 0, its latents as they are) is context.
  noised = np.ones(tau.shape, bool) if ex["clean"] is None else ~np.asarray(ex["clean"])
  if clean:
    assert 0.3 < np.mean(~noised) < 0.7
    assert np.all(tau[~noised] == 0)
    np.testing.assert_array_equal(np.asarray(ex["z_tau"])[~noised], z[~noised])
  assert np.all(tau[noised] > 0)
  per_frame = lambda a: np.mean(np.square(a), axis=(2, 3))[noised].mean()
  np.testing.assert_allclose(loss, per_frame(prediction - np.asarray(ex["target"])), rtol=1e-5)
  np.testing.assert_allclose(metrics["x0_mse"], per_frame(x0 - z), rtol=1e-5)
  assert float(jnp.std(ex["tau"][:, 1:] - ex["tau"][:, :-1])) > 0.05  # Levels per frame.


def test_shortcut_frames_learn_two_half_steps_in_one_on_the_levels_grid(stage_workdirs):
  config = _diffusion_config(stage_workdirs["ktok"], stage_workdirs["lam"], arg="shortcut=4")
  assert config.evals.controllability.sampling_steps == 4
  config.model.shortcut_fraction = 0.5
  task = tasks.get_task(config)
  evaluators.check_configs(task.config)
  model = task.make_model(nnx.Rngs(0))
  dyn = model.dynamics
  video = np.random.default_rng(0).integers(0, 256, (4, CLIP_LEN, IMAGE_SIZE, IMAGE_SIZE, 3),
                                            dtype=np.uint8)
  batch = dict(video=video, actions=np.zeros((4, CLIP_LEN), np.int32))
  rng = jax.random.key(7)
  ex = task.noised_batch(model, batch, rng)
  step, tau, shortcut = (np.asarray(ex[k]) for k in ("step", "tau", "shortcut"))
  # One frame (never the first) in each of two clips, every second one: sizes 1 or 1/2,
  # levels on their grids; every other frame the flow at the finest size 1/4.
  np.testing.assert_array_equal(shortcut.sum(axis=1), [1, 0, 1, 0])
  assert not shortcut[:, 0].any()
  assert set(step[shortcut]) <= {0, 1} and np.all(step[~shortcut] == 2)
  per = 2.0 ** step[shortcut]
  np.testing.assert_allclose(tau[shortcut] * per, np.round(tau[shortcut] * per), atol=1e-6)
  assert tau[shortcut].min() >= 0.5 - 1e-6 and tau[shortcut].max() <= 1.0
  np.testing.assert_allclose(ex["z_tau"], diffusion_lib.noised(ex["z"], ex["eps"], tau),
                             atol=1e-6)
  flow = ~shortcut
  np.testing.assert_allclose(ex["target"][flow], (ex["eps"] - ex["z"])[flow], atol=1e-6)
  # The shortcut target, by hand: two half steps of the shortcut frame, its past untouched.
  sc = np.array([0, 2])
  z_tau = np.asarray(ex["z_tau"])[sc]
  half = np.where(shortcut[sc], step[sc] + 1, step[sc])
  d2 = np.where(shortcut[sc], 0.5 ** half, 0.0)
  actions = np.asarray(ex["actions"])[sc]
  v1 = np.asarray(dyn(z_tau, tau[sc], actions, half))
  moved = z_tau - d2[:, :, None, None] * v1
  v2 = np.asarray(dyn(moved, tau[sc] - d2, actions, half))
  target = np.asarray(ex["target"])
  np.testing.assert_allclose(target[sc][shortcut[sc]], ((v1 + v2) / 2)[shortcut[sc]],
                             atol=1e-5)
  # Had the second pass moved the past too (each frame by half a finest step), the target
  # would differ.
  d2_all = np.where(shortcut[sc], d2, 0.5 ** (step[sc] + 1))
  v2_all = np.asarray(dyn(z_tau - d2_all[:, :, None, None] * v1, tau[sc] - d2_all, actions,
                          half))
  assert np.abs(((v1 + v2_all) / 2 - target[sc])[shortcut[sc]]).max() > 1e-3
  assert np.abs(ex["target"][shortcut] - (ex["eps"] - ex["z"])[shortcut]).max() > 0.1
  # Clean frames (the default's half of the others) are context only: out of every loss.
  noised = ~np.asarray(ex["clean"])
  assert np.all(noised[shortcut]) and not np.all(noised) and np.all(tau[~noised] == 0)
  loss, metrics, _ = task.loss(model, batch, rng)
  prediction = np.asarray(dyn(ex["z_tau"], tau, ex["actions"], step))
  error = np.mean(np.square(prediction - ex["target"]), axis=(2, 3))
  np.testing.assert_allclose(loss, error[noised].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["shortcut_loss"], error[shortcut].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["flow_loss"], error[flow & noised].mean(), rtol=1e-5)
  # The step size is an input: the same frames at another size give another prediction.
  other_size = np.asarray(dyn(ex["z_tau"], tau, ex["actions"], step * 0))
  assert np.abs(other_size - prediction).max() > 1e-4
  # Samplers take 1, 2 or 4 steps; the evaluator's setting is checked before any work.
  for steps in (1, 2, 4):
    dyn.check_num_steps(steps)
  for steps in (3, 8):
    with pytest.raises(ValueError, match=f"={steps}: this model takes a power of two up to "
                                         "config.model.shortcut_steps=4"):
      dyn.check_num_steps(steps)
  genie = diffusion_sampling.DiffusionGenie(model)
  assert genie.step_choices == (1, 2, 4) and genie.default_steps == 4
  with pytest.raises(ValueError, match="=3: this model takes a power of two"):
    genie.start(video[:1, :1], num_steps=3)
  task.config.evals.controllability.sampling_steps = 8
  with pytest.raises(ValueError, match="config.evals.controllability.sampling_steps=8"):
    evaluators.check_configs(task.config)
  for key, value, message in (("shortcut_steps", 3, "must be 0 or a power of two >= 2"),
                              ("shortcut_steps", 1, "must be 0 or a power of two >= 2"),
                              ("objective", "x0", "needs config.model.objective='velocity'")):
    bad = _diffusion_config(stage_workdirs["ktok"], stage_workdirs["lam"], arg="shortcut=4")
    bad.model[key] = value
    with pytest.raises(ValueError, match=message):
      tasks.get_task(bad)


def test_trains_on_frozen_stages_and_resumes_exactly(stage_workdirs, tmp_path, tiny_data_dir):
  config = _diffusion_config(stage_workdirs["ktok"], stage_workdirs["lam"], tiny_data_dir)
  config.update(total_steps=4, log_every_steps=1, images_every_steps=0, eval_every_steps=0,
                batch_size=4)
  config.checkpoint.every_steps = 2
  config.mesh = dict(data=1, fsdp=1, tensor=1)
  workdir = str(tmp_path / "diffusion")
  devices = jax.devices()[:1]

  def losses():
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]

  trainer.train_and_evaluate(config, workdir, devices=devices)
  straight = losses()
  assert [s for s, _ in straight] == [1, 2, 3, 4] and all(np.isfinite(v) for _, v in straight)
  # As if the job had died after step 2's checkpoint: the rerun continues from it.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  metrics_file = os.path.join(workdir, "metrics.jsonl")
  with open(metrics_file, encoding="utf-8") as f:
    kept = [line for line in f if json.loads(line)["step"] <= 2]
  with open(metrics_file, "w", encoding="utf-8") as f:
    f.writelines(kept)
  trainer.train_and_evaluate(config, workdir, devices=devices)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
  assert losses() == straight


# --- Sampling ----------------------------------------------------------------------------


@pytest.mark.parametrize("conditioning,positions,sinks,objective", [
    ("additive", "learned", 0, "velocity"), ("prepend", "learned", 0, "velocity"),
    ("additive", "rope", 0, "velocity"), ("prepend", "rope", 1, "velocity"),
    ("additive", "learned", 0, "x0")])
def test_cached_sampling_equals_the_uncached_reference(conditioning, positions, sinks,
                                                       objective):
  model = _model(conditioning, objective, temporal_positions=positions, sink_frames=sinks)
  z, _, _ = _inputs(b=2, t=2, seed=4)
  actions = np.random.default_rng(5).integers(0, ACTIONS, (2, 6)).astype(np.int32)
  # 2 prompt + 6 generated frames: past the window of 5, which then slides.
  run = lambda cached: diffusion_sampling.rollout_latents(
      model, z, actions, jax.random.key(0), num_steps=3, cached=cached,
      prompt_actions_BT=np.ones((2, 1), np.int32))
  cached, uncached = np.asarray(run(True)), np.asarray(run(False))
  assert cached.shape == (2, 8, TOKENS, LATENT)
  np.testing.assert_array_equal(cached[:, :2], z)
  if positions == "rope":
    # Past the window the rolling cache keeps the keys/values its frames got when they were
    # new (genie_jax.inference.genie, tested there): the streaming model, not the window.
    np.testing.assert_allclose(cached[:, :FRAMES], uncached[:, :FRAMES], atol=2e-4)
    assert np.abs(cached[:, FRAMES:] - uncached[:, FRAMES:]).max() > 1e-3
  else:
    np.testing.assert_allclose(cached, uncached, atol=2e-4)
  assert np.all(np.isfinite(cached)) and np.abs(cached[:, 2:]).max() > 0


def test_rolling_cache_sampling_equals_an_unbounded_cache_masked_to_the_window():
  """Past the window, the rolling cache (rope, one sink frame) against a reference that keeps
  every frame's keys/values in its own slot, each computed seeing what the ring held then,
  and masks all but the sink and the latest frames: the same frames."""
  model = _model(temporal_positions="rope", sink_frames=1)
  transformer = model.transformer
  z, _, _ = _inputs(b=2, t=1, seed=9)
  length, key = 9, jax.random.key(4)
  actions = np.random.default_rng(9).integers(0, ACTIONS, (2, length - 1)).astype(np.int32)
  rolled = np.asarray(diffusion_sampling.rollout_latents(model, z, actions, key, num_steps=2))
  caused = model.frame_actions(np.pad(actions, ((0, 0), (0, 1))))

  def context(g):
    frames = jnp.arange(length)
    visible = (frames < g) & ((frames == 0) | (frames >= g - (FRAMES - 2)))
    return visible, jnp.where(frames == 0, jnp.maximum(g - (FRAMES - 1), 0), frames)

  shape = (2, TOKENS, 2, length, 8)  # (B, N, K, S, E): every frame in its own slot.
  kv = [(jnp.zeros(shape), jnp.zeros(shape))] * 2
  for g in range(length):
    if g:
      visible, positions = context(g)
      rotated = transformer.rotate_cache(kv, positions)

      def predict(x, tau, step_B1, rotated=rotated, visible=visible, g=g):
        x_B1MD = model.embed(x[:, None], jnp.full((2, 1), tau), caused[:, g:g + 1], step_B1)
        return model.readout(transformer.decode_frame(x_B1MD, rotated, g, visible)[0])[:, 0]

      noise = jax.random.normal(jax.random.fold_in(key, g), rolled[:, g].shape)
      np.testing.assert_allclose(
          rolled[:, g], diffusion_sampling._denoise(model, predict, noise, 2),  # pylint: disable=protected-access
          atol=2e-4)
    visible, positions = context(g)
    _, frame_kv = transformer.decode_frame(
        model.embed_context(rolled[:, g:g + 1], caused[:, g:g + 1]),
        transformer.rotate_cache(kv, positions), g, visible)
    kv = transformer.write_cache(kv, frame_kv, g)


def test_shortcut_clips_spread_over_the_batch_stay_on_their_devices(stage_workdirs):
  """The shortcut clips are every (B // nb)-th: on a data=4 mesh with 4 clips per shard,
  one in each shard; the example is the one-device example, and computing it moves nothing
  between devices."""
  config = _diffusion_config(stage_workdirs["ktok"], stage_workdirs["lam"], arg="shortcut=4")
  task = tasks.get_task(config)
  model = task.make_model(nnx.Rngs(0))
  video = np.random.default_rng(0).integers(0, 256, (16, CLIP_LEN, IMAGE_SIZE, IMAGE_SIZE, 3),
                                            dtype=np.uint8)
  batch = dict(video=video, actions=np.zeros((16, CLIP_LEN), np.int32))
  rng = jax.random.key(7)
  mesh = sharding.make_mesh(dict(data=4, fsdp=1, tensor=1), jax.devices()[:4])
  rules = sharding.DEFAULT_RULES
  graph, state = nnx.split(model)

  def noised(state, batch, on_mesh):
    if not on_mesh:
      return task.noised_batch(nnx.merge(graph, state), batch, rng)
    with sharding.activation_rules(mesh, rules):
      return task.noised_batch(nnx.merge(graph, state), batch, rng)

  single = jax.jit(functools.partial(noised, on_mesh=False))(state, batch)
  sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
  step = jax.jit(functools.partial(noised, on_mesh=True))
  ex = step(state, sharded_batch)
  shortcut = np.asarray(ex["shortcut"])
  np.testing.assert_array_equal(shortcut.sum(axis=1), [1, 0, 0, 0] * 4)
  for key in ("shortcut", "step", "tau", "target"):
    np.testing.assert_allclose(np.asarray(ex[key]), np.asarray(single[key]), atol=1e-6,
                               err_msg=key)
  # Clip 4's target is its own shortcut target (placement; the target's value is checked
  # by hand in test_shortcut_frames_learn_two_half_steps_in_one_on_the_levels_grid).
  clip = slice(4, 5)
  by_hand = diffusion_task.DiffusionTask.shortcut_target(
      model.dynamics, ex["z_tau"][clip], ex["tau"][clip], ex["actions"][clip],
      ex["step"][clip], ex["shortcut"][clip])
  np.testing.assert_allclose(ex["target"][clip][shortcut[clip]], by_hand[shortcut[clip]],
                             atol=1e-5)
  hlo = step.lower(state, sharded_batch).compile().as_text()
  for collective in ("collective-permute", "all-gather", "all-to-all", "all-reduce",
                     "reduce-scatter", "collective-broadcast"):
    assert collective not in hlo, collective
  # 7 clips: round(1.75) = 2 shortcut clips, every third; clip 6 is past the last stride.
  seven = jax.tree.map(lambda x: x[:7], batch)
  ex = task.noised_batch(model, seven, rng)
  np.testing.assert_array_equal(np.asarray(ex["shortcut"]).sum(axis=1), [1, 0, 0, 1, 0, 0, 0])
  flow = ~np.asarray(ex["shortcut"])
  np.testing.assert_allclose(ex["target"][flow], (ex["eps"] - ex["z"])[flow], atol=1e-6)


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_a_shortcut_model_is_told_the_samplers_step_size(num_steps):
  model = _model(shortcut_steps=8, max_frames=2)
  z, _, _ = _inputs(b=2, t=1, seed=8)
  actions = np.array([[1], [2]], np.int32)
  rolled = np.asarray(diffusion_sampling.rollout_latents(model, z, actions, jax.random.key(3),
                                                         num_steps=num_steps))
  # By hand: Euler steps of size 1 / num_steps, index log2(num_steps); the clean past at the
  # finest size (index 3).
  x = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(3), 1), z[:, 0].shape))
  for k in range(num_steps):
    tau = 1.0 - k / num_steps
    v = model(np.stack([z[:, 0], x], 1), np.array([[0.0, tau]] * 2, np.float32),
              np.concatenate([actions, actions], 1),
              np.array([[3, int(np.log2(num_steps))]] * 2, np.int32))[:, 1]
    x = x - v / num_steps
  # float32 of a cached pass against a whole-clip one, on values of order 1.
  np.testing.assert_allclose(rolled[:, 1], x, rtol=1e-4, atol=1e-4)
  # Told the finest size instead, the model would step elsewhere.
  x_finest = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(3), 1),
                                          z[:, 0].shape))
  for k in range(num_steps):
    v = model(np.stack([z[:, 0], x_finest], 1),
              np.array([[0.0, 1.0 - k / num_steps]] * 2, np.float32),
              np.concatenate([actions, actions], 1), np.array([[3, 3]] * 2, np.int32))[:, 1]
    x_finest = x_finest - v / num_steps
  assert np.abs(x_finest - x).max() > 1e-2


def test_sampling_compiles_once_and_follows_the_actions():
  model = _model()
  graphdef, state = nnx.split(model)
  compiles = []

  @jax.jit
  def rollout(state, prompt, actions, rng):
    compiles.append(1)
    return diffusion_sampling.rollout_latents(nnx.merge(graphdef, state), prompt, actions, rng,
                                              num_steps=2)

  z, _, _ = _inputs(b=1, t=1, seed=6)
  actions = np.zeros((1, 4), np.int32)
  first = np.asarray(rollout(state, z, actions, jax.random.key(0)))
  other = np.asarray(rollout(state, z, actions + 1, jax.random.key(0)))
  assert len(compiles) == 1
  np.testing.assert_array_equal(first[:, 0], np.asarray(z)[:, 0])  # The prompt leads.
  assert first.shape[1] == 5
  assert np.abs(first[:, 1] - other[:, 1]).max() > 1e-4  # Frame 1 follows actions[:, 0].


# --- The whole pipeline, generation and play ----------------------------------------------


def test_the_pipeline_evaluates_generates_and_plays_the_diffusion_family(tmp_path,
                                                                         tiny_data_dir):
  config = genie_config.get_config("runlocal,size=tiny,dynamics=diffusion")
  for key, value in tiny_pipeline_overrides(tiny_data_dir).items():
    key = key.replace("controllability.maskgit_steps", "controllability.sampling_steps")
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  workdir = str(tmp_path / "genie")
  report = pipeline.run_pipeline(config, workdir)
  dyn = report["metrics"]["dynamics"]
  for key in ("dtpsnr", "dtpsnr_stderr", "denoising_mse", "denoising_mse_random_actions",
              "psnr_inferred_t1", "recon_psnr_t1", "nmi"):
    assert np.isfinite(dyn[f"controllability/{key}"]), key
  assert "controllability/masked_accuracy" not in dyn
  assert "reconstruction/codebook_usage" not in report["metrics"]["tokenizer"]
  assert report["videos"]["inferred"] and report["videos"]["random"]

  genie = worlds.load(os.path.join(workdir, "dynamics"))
  assert isinstance(genie, diffusion_sampling.DiffusionGenie)
  prompt = np.zeros((1, 1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  session = genie.start(prompt, num_steps=2)
  for action in range(genie.max_frames + 1):  # Past the window: the buffer rolls.
    frame = session.step(action % genie.num_actions)
  assert frame.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and frame.dtype == np.uint8
  assert session.frames.shape[1] == genie.max_frames + 2
  assert genie._play_step._cache_size() == 1  # pylint: disable=protected-access
  video = genie.rollout(prompt, np.zeros((1, 3), np.int32), rng=jax.random.key(0), num_steps=2)
  assert video.shape == (1, 4, IMAGE_SIZE, IMAGE_SIZE, 3)
  # Without noise a rollout and a play session are the same flow: from a 2-frame prompt
  # (the LAM's action between them) and past the window, where it slides.
  prompt = np.random.default_rng(0).integers(0, 256, (1, 2, IMAGE_SIZE, IMAGE_SIZE, 3),
                                             dtype=np.uint8)
  actions = np.arange(genie.max_frames + 2).reshape(1, -1) % genie.num_actions
  rolled = genie.rollout(prompt, actions, rng=jax.random.key(0), num_steps=2, temperature=0.0)
  session = genie.start(prompt, num_steps=2, temperature=0.0)
  for action in actions[0]:
    session.step(int(action))
  played = session.frames.astype(np.int32)
  np.testing.assert_allclose(visualize.to_uint8(np.asarray(rolled)), played, atol=1)
  with pytest.raises(ValueError, match=r"out of range.*\[0, "):
    genie.rollout(prompt, np.full((1, 3), genie.num_actions), rng=jax.random.key(0))
  with pytest.raises(ValueError, match="holds a 'tokenizer' stage.*world model"):
    worlds.load(os.path.join(workdir, "tokenizer"))
