"""The controllability evaluation tells a world model that uses its actions from one that
ignores them, and the report's plurality-latent-action check.

The stand-in world has a known action effect: the tokenizer is an exact codec (a frame is a
grid of grey patches, one per token, code v = grey level 17 v), the LAM reads the action off
two frames' tokens, and the dynamics model predicts frame t+1's tokens as (frame t's tokens +
action) mod V, or, in the stand-in that ignores its actions, as frame t's tokens. The real
ControllabilityEvaluator.run drives it, rollouts through genie_jax.inference.genie included; only the
clips come from memory instead of a TFDS dataset.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dynamics as dynamics_config
from configs import genie as genie_config
from genie_jax import action_metrics
from genie_jax import model_spec
from genie_jax import sharding
from genie_jax.evaluators import base
from genie_jax.evaluators import controllability
from genie_jax.models import dynamics as dynamics_lib
from genie_jax.models import tokenizer as tokenizer_lib
from genie_jax.tasks import dynamics as dynamics_task
from genie_jax.training import pipeline

# 64 tokens per frame: enough that sampling almost never gets a whole frame right, whose
# PSNR would jump to the 100 dB cap and swamp the per-clip statistics.
IMAGE, PATCH, CLIP_LEN, CODES = 32, 4, 6, 16
GREY_STEP = 255 // (CODES - 1)  # 17: code v <-> grey level 17 v, exactly, in uint8.
BATCH, NUM_BATCHES = 8, 4
# Logit of the predicted token over the others: it is sampled with probability
# e^5 / (e^5 + 15) = 0.91 at temperature 1, so rollouts are noisy and the per-clip Delta_t
# PSNR has a standard error to compare with.
SHARPNESS = 5.0


def _tokens_of(video_BTHWC):
  """The codec's codes tokens_BTN of uint8 or [0, 1] video."""
  grey_BTHW = jnp.mean(tokenizer_lib.to_unit_interval(video_BTHWC), axis=-1)
  b, t, h, w = grey_BTHW.shape
  patches = grey_BTHW.reshape(b, t, h // PATCH, PATCH, w // PATCH, PATCH).mean(axis=(3, 5))
  return jnp.round(patches * (CODES - 1)).astype(jnp.int32).reshape(b, t, -1)


class _Window(nnx.Module):
  """What generation reads of a transformer (its window `max_frames`, its temporal
  positions), and, for the dynamics stand-in, a cache that keeps the past frames' inputs."""

  def __init__(self, frames):
    self.max_frames = frames
    self.temporal_positions = "learned"

  def prefill(self, x_BTND):
    return x_BTND, x_BTND

  def decode_frame(self, x_B1ND, cache_BSND, position, valid_S):
    del position
    # The new frame sees the previous frame's tokens (the latest cached frame: the last
    # valid slot of a learned-position cache) and the action that causes it (its input).
    latest = jnp.argmax(jnp.where(valid_S, jnp.arange(valid_S.shape[0]), -1))
    previous_BN = jax.lax.dynamic_index_in_dim(cache_BSND, latest, axis=1, keepdims=False)
    return jnp.stack([previous_BN[..., 0], x_B1ND[:, 0, :, 1]], axis=-1)[:, None], x_B1ND

  def write_cache(self, cache_BSND, frame_B1ND, slot):
    return jax.lax.dynamic_update_slice_in_dim(cache_BSND, frame_B1ND, slot, axis=1)


class _Codec(nnx.Module):
  """Stands in for the tokenizer: exact, so the rollouts' PSNR is the dynamics' alone."""

  def __init__(self):
    self.decoder = _Window(CLIP_LEN)

  def encode(self, video_BTHWC):
    return _tokens_of(video_BTHWC), None

  def decode(self, tokens_BTN):
    b, t, _ = tokens_BTN.shape
    side = IMAGE // PATCH
    grey = (tokens_BTN.astype(jnp.float32) / (CODES - 1)).reshape(b, t, side, 1, side, 1)
    grey = jnp.broadcast_to(grey, (b, t, side, PATCH, side, PATCH)).reshape(b, t, IMAGE, IMAGE)
    return jnp.repeat(grey[..., None], 3, axis=-1)


class _OffsetLAM(nnx.Module):
  """Stands in for the LAM: the action of frame t -> t+1 is the code offset between them,
  which is the true action in the clips of `_clips`."""

  def infer_actions(self, video_BTHWC):
    tokens_BTN = _tokens_of(video_BTHWC)
    return (tokens_BTN[:, 1:, 0] - tokens_BTN[:, :-1, 0]) % CODES


class _OffsetDynamics(nnx.Module):
  """Stands in for the dynamics model, with its call signature and the parts generation
  calls (`genie_jax.inference.genie.generate_next`): frame t+1 = (frame t + action) mod V, or
  frame t when `uses_actions` is False. The prediction reads the previous frame, never the
  masked frame itself, as a perfect dynamics model may."""

  def __init__(self, num_actions, uses_actions):
    self.num_actions = num_actions
    self.uses_actions = uses_actions
    self.transformer = _Window(CLIP_LEN)

  def frame_actions(self, actions_BT):
    first_B1 = jnp.full((actions_BT.shape[0], 1), self.num_actions, jnp.int32)
    return jnp.concatenate([first_B1, actions_BT[:, :-1].astype(jnp.int32)], axis=1)

  def embed(self, tokens_BTN, mask_BTN, caused_BT):
    del mask_BTN
    caused_BTN = jnp.broadcast_to(caused_BT[:, :, None], tokens_BTN.shape)
    return jnp.stack([tokens_BTN, caused_BTN], axis=-1).astype(jnp.float32)

  def embed_context(self, tokens_BTN, caused_BT):
    return self.embed(tokens_BTN, None, caused_BT)

  def readout(self, y_BTN2):
    previous_BTN, action_BTN = y_BTN2[..., 0].astype(jnp.int32), y_BTN2[..., 1].astype(jnp.int32)
    target_BTN = (previous_BTN + action_BTN) % CODES if self.uses_actions else previous_BTN
    return SHARPNESS * jax.nn.one_hot(target_BTN, CODES)

  def __call__(self, tokens_BTN, mask_BTN, actions_BT):
    x_BTN2 = self.embed(tokens_BTN, mask_BTN, self.frame_actions(actions_BT))
    # Frame 0 (never masked) is predicted from itself.
    previous_BTN2 = jnp.concatenate([x_BTN2[:, :1], x_BTN2[:, :-1]], axis=1)
    return self.readout(jnp.stack([previous_BTN2[..., 0], x_BTN2[..., 1]], axis=-1))


def _clips(num_actions, seed=0):
  """Batches of clips whose frame t+1 is frame t's codes + the true action taken at t."""
  rng = np.random.default_rng(seed)
  side = IMAGE // PATCH
  batches = []
  for i in range(NUM_BATCHES):
    actions = rng.integers(0, num_actions, (BATCH, CLIP_LEN)).astype(np.int32)
    tokens = np.zeros((BATCH, CLIP_LEN, side, side), np.int64)
    tokens[:, 0] = rng.integers(0, CODES, (BATCH, side, side))
    for t in range(1, CLIP_LEN):
      tokens[:, t] = (tokens[:, t - 1] + actions[:, t - 1, None, None]) % CODES
    pixels = np.kron(tokens * GREY_STEP, np.ones((PATCH, PATCH), np.int64))
    video = np.repeat(pixels[..., None], 3, axis=-1).astype(np.uint8)
    batches.append(dict(video=video, actions=actions,
                        episode_id=np.arange(i * BATCH, (i + 1) * BATCH, dtype=np.int32)))
  return batches


class _InMemoryEvaluator(controllability.ControllabilityEvaluator):
  """The evaluator on the clips of `_clips` instead of its TFDS split."""

  def __init__(self, *args, batches, **kwargs):
    super().__init__(*args, **kwargs)
    self.batches = batches

  def _dataset(self):
    return self.batches


def _config(tmp_path):
  config = dynamics_config.get_config("size=tiny")
  # The builtin world's true action names; the data itself is never read (no TFDS files).
  config.data.update(dict(data_dir=str(tmp_path), image_size=IMAGE, clip_len=CLIP_LEN))
  config.batch_size = BATCH
  config.evals.controllability.update(dict(horizon=CLIP_LEN - 1, dt=4, maskgit_steps=2,
                                           temperature=1.0, num_videos=2, seed=0))
  return config


def _evaluate(tmp_path, uses_actions):
  config = _config(tmp_path)
  num_true, names = base.true_actions_of(config.data)
  assert 1 < num_true < CODES and len(names) == num_true
  # As many latent actions as true ones: the LAM's action is the true one.
  config.model.num_actions = num_true
  world = dynamics_lib.WorldModel(_Codec(), _OffsetLAM(), _OffsetDynamics(num_true,
                                                                          uses_actions))
  graphdef, params, model_state = nnx.split(world, nnx.Param, ...)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  # The evaluator reads the graph, the mesh and the sharding rules of a spec only.
  spec = model_spec.ModelSpec(graphdef=graphdef, mesh=mesh, rules=sharding.rules_of(config),
                              shardings=None, abstract=None, trainable=nnx.Param)
  evaluator = _InMemoryEvaluator(
      "controllability", config.evals.controllability, config,
      dynamics_task.DynamicsTask(config), spec, batches=_clips(num_true))
  scalars, images = evaluator.run(dict(params=params, model_state=model_state))
  return scalars, images, names


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("controllability")
  return {uses: _evaluate(tmp_path, uses) for uses in (True, False)}


def _report_checks(scalars):
  """The pipeline report's checks at the default thresholds, on these metrics."""
  metrics = dict(dynamics={f"controllability/{k}": v for k, v in scalars.items()})
  return {c.name: c.passed for c in
          pipeline.evaluate_checks(metrics, genie_config.get_config().report)}


def test_a_model_that_uses_its_actions_has_a_large_delta_t_psnr(evaluations):
  scalars, images, names = evaluations[True]
  assert scalars["num_clips"] == BATCH * NUM_BATCHES
  # The LAM's actions are the true ones, one to one.
  assert scalars["nmi"] == pytest.approx(1.0)
  assert scalars["accuracy"] == pytest.approx(1.0)
  for index, name in enumerate(names):
    assert scalars[f"plurality_latent_{name}"] == index
  # Teacher-forced, the right actions give every masked token; random ones rarely.
  assert scalars["masked_accuracy"] == pytest.approx(1.0)
  assert scalars["masked_accuracy_random_actions"] < 0.5
  assert scalars["dtpsnr"] == scalars["dtpsnr_t4"]
  assert scalars["dtpsnr"] > 3.0
  assert scalars["dtpsnr"] > 5 * scalars["dtpsnr_stderr"] > 0
  assert scalars["dtpsnr_true"] > 3.0
  for t in range(1, CLIP_LEN):
    assert scalars[f"dtpsnr_t{t}"] > 0, t
  # The codec is exact: its reconstruction is at the 100 dB cap.
  assert scalars["recon_psnr_t1"] == pytest.approx(100.0)
  # The first generated frame follows every action (bar the sampling noise).
  assert scalars["token_accuracy_t1"] > 0.8
  for name in names:
    assert scalars[f"token_accuracy_t1_{name}"] > 0.8, name
  assert {"rollouts", "dtpsnr_curve", "confusion"} <= set(images)
  checks = _report_checks(scalars)
  assert checks["dtpsnr >= 1 dB"]
  assert checks["dtpsnr_stderr < 0.2 x dtpsnr"]
  assert checks[f"Delta_t PSNR > 0 at every t = 1..{CLIP_LEN - 1}"]
  assert checks["nmi >= 0.5"]
  assert checks["dtpsnr_true >= 0.5 dB"]
  assert checks["plurality latent actions of noop, left, right, up, down all differ"]
  # Noisy sampling keeps generated frames far below the exact codec: the gap check sees it.
  assert not checks["recon_psnr_t1 - psnr_inferred_t1 <= 2 dB"]


def test_a_model_that_ignores_its_actions_has_delta_t_psnr_about_zero(evaluations):
  scalars, _, names = evaluations[False]
  # The same LAM: its actions still match the true ones; only the dynamics differ.
  assert scalars["nmi"] == pytest.approx(1.0)
  assert scalars["masked_accuracy"] == scalars["masked_accuracy_random_actions"]
  # Sampling noise alone: the rollouts differ, yet on average neither is closer.
  assert scalars["dtpsnr_stderr"] > 0
  assert abs(scalars["dtpsnr"]) < 3 * scalars["dtpsnr_stderr"]
  assert abs(scalars["dtpsnr"]) < 0.5
  # A copy of the prompt is right after action 0 (which adds 0) only.
  assert scalars[f"token_accuracy_t1_{names[0]}"] > 0.8
  for name in names[1:]:
    if f"token_accuracy_t1_{name}" in scalars:
      assert scalars[f"token_accuracy_t1_{name}"] < 0.2, name
  checks = _report_checks(scalars)
  assert not checks["dtpsnr >= 1 dB"]
  assert not checks["dtpsnr_stderr < 0.2 x dtpsnr"]


# --- The plurality latent action per true action, and the check that they differ ----------


def test_plurality_latent_is_the_most_frequent_latent_per_true_action():
  # Rows: latent actions; columns: true actions. Column 2 ties (lowest wins), column 3 is
  # empty (never occurred).
  confusion = np.array([[5, 0, 2, 0],
                        [1, 7, 2, 0],
                        [0, 3, 1, 0]])
  np.testing.assert_array_equal(action_metrics.plurality_latent(confusion), [0, 1, 0, -1])


def _dyn(**plurality):
  dyn = {"controllability/nmi": 0.7}
  dyn.update({f"controllability/plurality_latent_{k}": float(v) for k, v in plurality.items()})
  return dyn


def test_distinct_check_passes_only_when_the_named_actions_get_different_latents():
  check = pipeline.distinct_plurality_check(_dyn(noop=0, left=1, right=2), ["noop", "left",
                                                                              "right"])
  assert check.passed and check.name == "plurality latent actions of noop, left, right all differ"
  assert "left -> 1" in check.measured
  assert check.keys == "config.report.distinct_true_actions"
  shared = pipeline.distinct_plurality_check(_dyn(noop=0, left=1, right=1), ["noop", "left",
                                                                               "right"])
  assert not shared.passed
  # Actions not named may share: only the named ones must differ.
  assert pipeline.distinct_plurality_check(_dyn(noop=0, left=1, right=1), ["noop", "left"]).passed
  never = pipeline.distinct_plurality_check(_dyn(noop=0, left=-1), ["noop", "left"])
  assert not never.passed and "never occurred" in never.measured


def test_distinct_check_ignores_unknown_names_and_datasets_without_true_actions(caplog):
  with caplog.at_level("WARNING"):
    check = pipeline.distinct_plurality_check(_dyn(noop=0, left=0), ["noop", "jump", "left"])
  assert not check.passed and "jump" not in check.name
  assert "'jump', which is not a true action of this dataset" in caplog.text
  assert pipeline.distinct_plurality_check(_dyn(noop=0), ["jump"]) is None
  # No NMI: the dataset has no true actions, so there is nothing to check.
  assert pipeline.distinct_plurality_check({"controllability/plurality_latent_noop": 0.0},
                                           ["noop"]) is None
