"""Latent action model: causality, action alignment, VQ invariants, action metrics, training."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import lam as lam_config
from data_pipelines.builtin_world import lam_probe
from genie_jax import action_metrics
from genie_jax import tasks
from genie_jax.models import lam as lam_lib
from genie_jax.training import trainer

T = 5


def tiny_model(context_frames=1, seed=0, spatial_rope=False):
  cfg = lam_config.get_config("size=tiny").model
  cfg.image_size, cfg.max_frames, cfg.decoder_context_frames = 16, T + 1, context_frames
  cfg.spatial_rope = spatial_rope
  model = lam_lib.LatentActionModel(cfg, rngs=nnx.Rngs(seed))
  # The residual head starts at zero (pred = frame t); give it weights so that every input
  # path reaches the prediction.
  kernel = model.to_pixels.kernel
  kernel[...] = jax.random.normal(jax.random.key(1), kernel.shape)
  return model


# Eager calls run op by op (slow on CPU); each shape compiles once.
predict = nnx.jit(lambda model, video, actions: model.predict(video, actions))
encode_latents = nnx.jit(lambda model, video: model.encode_latents(video))
forward = nnx.jit(lambda model, video: model(video, train=False))


def random_video(seed=0, t=T):
  return jax.random.uniform(jax.random.key(seed), (2, t, 16, 16, 3))


def changed(a, b):
  """Per time step: does a differ from b anywhere? (B, T, ...) -> (T,) bool."""
  return np.asarray(jnp.any(jnp.abs(a - b) > 1e-6, axis=tuple(i for i in range(a.ndim)
                                                               if i != 1)))


@pytest.mark.parametrize("context_frames,spatial_rope", [(0, False), (1, False), (2, False),
                                                         (1, True)])
def test_prediction_of_frame_s_depends_only_on_earlier_frames(context_frames, spatial_rope):
  model = tiny_model(context_frames, spatial_rope=spatial_rope)
  video = random_video()
  actions = jnp.array([[0, 1, 2, 3, 4], [5, 4, 3, 2, 1]], jnp.int32)
  pred = predict(model, video, actions)  # pred[:, t] predicts frame t+1 from frames <= t.
  for s in range(T):
    pred_s = predict(model, video.at[:, s].set(0.5), actions)
    expected = np.arange(T) >= s
    if context_frames:  # The decoder sees frames t-k+1..t only.
      expected &= np.arange(T) < s + context_frames
    np.testing.assert_array_equal(changed(pred, pred_s), expected)


@pytest.mark.parametrize("context_frames", [0, 1])
def test_action_t_conditions_the_prediction_of_frame_t_plus_1_and_nothing_earlier(
    context_frames):
  model = tiny_model(context_frames)
  video = random_video()
  actions = jnp.zeros((2, T), jnp.int32)
  pred = predict(model, video, actions)
  for s in range(T):
    diff = changed(pred, predict(model, video, actions.at[:, s].set(3)))
    assert diff[s] and not diff[:s].any(), (s, diff)
    if context_frames == 1:
      assert not diff[s + 1:].any(), (s, diff)


@pytest.mark.parametrize("spatial_rope", [False, True])
def test_latent_action_t_sees_frames_up_to_t_plus_1_only(spatial_rope):
  model = tiny_model(spatial_rope=spatial_rope)
  video = random_video(t=T + 1)
  z = encode_latents(model, video)  # z[:, t]: transition frame t -> frame t+1.
  assert z.shape == (2, T, 8)
  for s in range(T + 1):
    z_s = encode_latents(model, video.at[:, s].set(0.5))
    expected = np.arange(T) >= s - 1
    np.testing.assert_array_equal(changed(z, z_s), expected)


def test_forward_outputs_and_vq_invariants():
  model = tiny_model()
  video = (random_video(t=T + 1) * 255).astype(jnp.uint8)
  out = forward(model, video)
  assert out["pred"].shape == (2, T, 16, 16, 3) and out["pred"].dtype == jnp.float32
  assert out["actions"].shape == (2, T) and out["actions"].dtype == jnp.int32
  assert np.all((np.asarray(out["actions"]) >= 0) & (np.asarray(out["actions"]) < 6))
  np.testing.assert_array_equal(nnx.jit(lambda m, v: m.infer_actions(v))(model, video),
                                out["actions"])
  assert model.action_codebook.shape == (6, 8)
  # The chosen code is the nearest one (cosine or L2, as configured).
  z = np.asarray(out["z"]).reshape(-1, 8)
  codes = np.asarray(model.action_codebook)
  nearest = np.argmin(((z[:, None] - codes[None]) ** 2).sum(-1), -1)
  np.testing.assert_array_equal(nearest, np.asarray(out["actions"]).reshape(-1))
  for key in ("vq_loss", "codebook_loss", "commitment_loss", "usage", "perplexity"):
    assert out[key].shape == () and np.isfinite(out[key])


def test_residual_head_starts_by_copying_the_last_frame():
  cfg = lam_config.get_config("size=tiny").model
  cfg.image_size, cfg.max_frames = 16, T
  model = lam_lib.LatentActionModel(cfg, rngs=nnx.Rngs(0))
  video = random_video()
  np.testing.assert_allclose(forward(model, video)["pred"], video[:, :-1], atol=1e-6)


def test_quantiser_warmup_feeds_the_latent_then_starts_from_kmeans_codes():
  cfg = lam_config.get_config("size=tiny").model
  cfg.image_size, cfg.max_frames, cfg.vq_warmup_steps, cfg.vq_normalize = 16, T, 2, True
  model = lam_lib.LatentActionModel(cfg, rngs=nnx.Rngs(0))
  kernel = model.to_pixels.kernel
  kernel[...] = jax.random.normal(jax.random.key(1), kernel.shape)
  video = random_video()

  @nnx.jit
  def train_step(model, key):
    out = model(video, train=True)
    restarted = model.restart_dead_codes(out["z"], key)
    return out, restarted

  codebook = np.array(model.vq.codebook[...])
  z_norm = lambda z: z / np.linalg.norm(z, axis=-1, keepdims=True)
  for step in range(2):
    out, restarted = train_step(model, jax.random.key(step))
    # Warming up: the prediction is made from the (normalised) continuous latent.
    np.testing.assert_allclose(out["pred"], predict_from(model, video, z_norm(out["z"])),
                               atol=1e-5)
    assert float(out["vq_loss"]) == 0.0 and int(restarted) == 0
  # The second step ended the warm-up: the codebook moved onto that step's latents.
  assert int(model.warmup_left[...]) == 0
  assert not np.allclose(model.vq.codebook[...], codebook)
  out, _ = train_step(model, jax.random.key(2))
  assert int(model.warmup_left[...]) == -1 and float(out["vq_loss"]) > 0
  np.testing.assert_allclose(
      out["pred"], predict(model, video[:, :-1], out["actions"]), atol=1e-5)
  # Inference never bypasses the quantiser.
  cfg.vq_warmup_steps = 5
  fresh = lam_lib.LatentActionModel(cfg, rngs=nnx.Rngs(0))
  out = forward(fresh, video)
  assert float(out["vq_loss"]) > 0 and int(fresh.warmup_left[...]) == 5


predict_from = nnx.jit(lambda model, video, z: model.decode(video[:, :-1], z))


@pytest.mark.parametrize("key,value,message", [
    ("model.num_actions", 1, "config.model.num_actions"),
    ("model.vq_warmup_steps", -1, "config.model.vq_warmup_steps"),
    ("model.patch_size", 5, "config.model.patch_size"),
    ("model.decoder_context_frames", 17, "config.model.decoder_context_frames"),
    ("model.image_size", 32, "config.model.image_size"),
    # (A clip_len set alone carries into max_frames: configs/lam.py.)
    ("model.max_frames", 8, "config.data.clip_len=16 exceeds config.model.max_frames=8"),
    # Tokenizer options the LAM does not have.
    ("model.temporal_positions", "rope", "config.model.temporal_positions='rope': the LAM"),
    ("model.code_restart_sampling", "distance", "config.model.code_restart_sampling"),
])
def test_bad_config_names_the_key(key, value, message):
  config = lam_config.get_config("size=tiny")
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    tasks.get_task(config)


def test_spatial_rope_needs_a_head_width_divisible_by_4():
  config = lam_config.get_config("size=tiny")
  config.model.spatial_rope, config.model.num_heads = True, 16  # head width 2
  with pytest.raises(ValueError, match="config.model.spatial_rope"):
    tasks.get_task(config)


def test_spatial_rope_rotates_attention_by_row_and_column():
  """The same weights with and without the rotary angles give different latents and
  predictions (the key reaches both transformers), and restoring a model saved without the
  key builds the model it was."""
  video = random_video()
  plain, rotary = tiny_model(), tiny_model(spatial_rope=True)
  assert not np.allclose(encode_latents(plain, video), encode_latents(rotary, video))
  actions = jnp.zeros((2, T), jnp.int32)
  assert not np.allclose(predict(plain, video, actions), predict(rotary, video, actions))
  cfg = lam_config.get_config("size=tiny").model.to_dict()
  del cfg["spatial_rope"]
  cfg.update(image_size=16, max_frames=T + 1)
  old = lam_lib.LatentActionModel(ml_collections.ConfigDict(cfg), rngs=nnx.Rngs(0))
  assert old.encoder.blocks[0].spatial_attention.grid is None
  assert rotary.decoder.blocks[0].spatial_attention.grid is not None


# --- Action metrics ---------------------------------------------------------------------------


def test_nmi_is_one_for_a_relabelling_and_near_zero_for_independent_labels():
  rng = np.random.default_rng(0)
  true = rng.integers(0, 6, 5000)
  perm = np.array([3, 0, 5, 1, 4, 2])
  confusion = action_metrics.confusion_matrix(perm[true], true, 6, 6)
  assert action_metrics.normalized_mutual_information(confusion) == pytest.approx(1.0)
  np.testing.assert_array_equal(action_metrics.best_assignment(confusion), perm)
  assert action_metrics.assignment_accuracy(confusion) == pytest.approx(1.0)

  independent = action_metrics.confusion_matrix(rng.integers(0, 6, 5000), true, 6, 6)
  assert action_metrics.normalized_mutual_information(independent) < 0.01
  assert action_metrics.assignment_accuracy(independent) < 0.25


def test_nmi_matches_the_arithmetic_mean_formula_and_skips_unknown_actions():
  latent = np.array([0, 0, 1, 1, 1, 0, 2])
  true = np.array([0, 0, 1, 1, 0, -1, -1])
  confusion = action_metrics.confusion_matrix(latent, true, 3, 2)
  np.testing.assert_array_equal(confusion, [[2, 0], [1, 2], [0, 0]])
  # Direct computation: I = sum p(a,b) log p(a,b) / (p(a) p(b)), H's from the marginals.
  p = confusion / confusion.sum()
  pa, pb = p.sum(1), p.sum(0)
  mutual = sum(p[a, b] * np.log(p[a, b] / (pa[a] * pb[b]))
               for a in range(3) for b in range(2) if p[a, b] > 0)
  h = lambda q: -sum(x * np.log(x) for x in q if x > 0)
  expected = mutual / ((h(pa) + h(pb)) / 2)
  assert action_metrics.normalized_mutual_information(confusion) == pytest.approx(expected)
  assert action_metrics.normalized_mutual_information(np.zeros((3, 2))) == 0.0
  with pytest.raises(ValueError, match="latent actions"):
    action_metrics.confusion_matrix(np.array([3]), np.array([0]), 3, 2)


def test_best_assignment_with_fewer_latent_than_true_actions_and_the_picture():
  confusion = np.array([[0, 9, 1], [7, 0, 2]])
  np.testing.assert_array_equal(action_metrics.best_assignment(confusion), [1, 0, -1])
  # What the true-action rollouts play: an unmatched true action its plurality latent action,
  # one that never occurred latent action 0 (never -1, which would index the "no action" row).
  np.testing.assert_array_equal(
      action_metrics.latent_for_true(np.c_[confusion, [0, 0]]), [1, 0, 1, 0])
  assert action_metrics.assignment_accuracy(confusion) == pytest.approx(16 / 19)
  image = action_metrics.confusion_image(confusion, cell=20)
  assert image.dtype == np.uint8 and image.shape == (20 + 2 * 20, 20 + 3 * 20, 3)
  # The fullest cell of a column is darker than an empty one.
  # (Corners of the cells: the counts are written near their top left.)
  assert image[20 + 17, 20 + 20 + 17].mean() < image[20 + 20 + 17, 20 + 20 + 17].mean()


# --- A real short run through the shared trainer ---------------------------------------------


def test_short_training_run_learns_and_reports_latent_actions(tmp_path, tiny_data_dir):
  config = lam_config.get_config("size=tiny,runlocal")
  config.data.data_dir = tiny_data_dir
  config.data.image_size = config.model.image_size = 32
  config.data.num_train_episodes, config.data.num_val_episodes = 8, 4
  config.data.episode_len = 40
  config.batch_size = 8
  config.total_steps = 40
  config.optimizer.warmup_steps = 5
  config.log_every_steps = 10
  config.eval_every_steps = 20
  config.images_every_steps = 40
  config.checkpoint.every_steps = 40
  config.evals.latent_actions.num_batches = 1
  config.mesh = dict(data=1, fsdp=1, tensor=1)
  workdir = str(tmp_path / "lam")
  trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])

  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  assert losses[40] < 0.5 * losses[10], losses
  evals = {r["step"]: r for r in rows if "latent_actions/nmi" in r}
  assert sorted(evals) == [20, 40]
  last = evals[40]
  assert 0.0 <= last["latent_actions/nmi"] <= 1.0
  assert 0.0 < last["latent_actions/codebook_usage"] <= 1.0
  assert 0.0 < last["latent_actions/accuracy"] <= 1.0
  assert last["latent_actions/num_transitions"] > 0
  assert last["latent_actions/psnr"] > 15.0
  assert os.listdir(os.path.join(workdir, "images"))


def test_lam_probe_latent_separation_tells_separable_latents_from_noise():
  rng = np.random.default_rng(0)
  true = rng.integers(6, size=600)
  centres = rng.normal(size=(6, 16))
  separable = centres[true] + 0.05 * rng.normal(size=(600, 16))
  sep = lam_probe.latent_separation(separable, true, 8, 6, rng)
  assert sep["probe"] > 0.95 and sep["kmeans_nmi"] > 0.8 and sep["explained"] > 0.9, sep
  noise = lam_probe.latent_separation(rng.normal(size=(600, 16)), true, 8, 6, rng)
  assert noise["probe"] < 0.35 and noise["kmeans_nmi"] < 0.1 and noise["explained"] < 0.05, noise
