"""Stage 3: the MaskGIT dynamics model, its task on frozen / co-trained earlier stages, and
restoring stages from their workdirs."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import dynamics as dynamics_config
from configs import lam as lam_config
from configs import tokenizer as tokenizer_config
from genie_jax import config_lib
from genie_jax import sharding
from genie_jax import tasks
from genie_jax.inference import stages
from genie_jax.models import dynamics as dynamics_lib
from genie_jax.models import lam as lam_lib
from genie_jax.tasks import dynamics as dynamics_task
from genie_jax.training import optim
from genie_jax.training import train_state
from genie_jax.training import trainer
from conftest import CLIP_LEN, IMAGE_SIZE, save_random_stage, tiny_data, tiny_stage

@pytest.fixture(scope="module")
def stage_workdirs(tmp_path_factory):
  """Workdirs of a tiny tokenizer and a tiny LAM, and their saved states."""
  root = tmp_path_factory.mktemp("stages")
  tok_dir, lam_dir = str(root / "tok"), str(root / "lam")
  tok_state = save_random_stage(tok_dir, tiny_stage(tokenizer_config), seed=1)
  lam_state = save_random_stage(lam_dir, tiny_stage(lam_config), seed=2)
  return dict(tokenizer=tok_dir, lam=lam_dir, tokenizer_state=tok_state, lam_state=lam_state)


def _dynamics_config(stage_workdirs, arg="", data_dir=""):
  config = dynamics_config.get_config(
      f"size=tiny,runlocal,tokenizer_workdir={stage_workdirs['tokenizer']},"
      f"lam_workdir={stage_workdirs['lam']}" + (f",{arg}" if arg else ""))
  tiny_data(config, data_dir)
  config.model.max_frames = CLIP_LEN
  config.checkpoint.async_save = False
  return config


def _random_batch(batch_size, seed=0):
  rng = np.random.default_rng(seed)
  return dict(video=rng.integers(0, 256, (batch_size, CLIP_LEN, IMAGE_SIZE, IMAGE_SIZE, 3),
                                 dtype=np.uint8),
              actions=rng.integers(0, 6, (batch_size, CLIP_LEN), dtype=np.int32))


_VARIANTS = ([(c, p, "spatial_first") for c in dynamics_lib.CONDITIONINGS
              for p in ("learned", "rope")] + [("additive", "learned", "temporal_first")])


def _tiny_model(conditioning, positions="learned", block_order="spatial_first", **overrides):
  cfg = dynamics_lib.default_config()
  cfg.update(dict(num_layers=2, d_model=32, num_heads=2, num_codes=16, tokens_per_frame=4,
                  num_actions=5, max_frames=6, action_conditioning=conditioning,
                  temporal_positions=positions, block_order=block_order), **overrides)
  return dynamics_lib.DynamicsModel(cfg, rngs=nnx.Rngs(0))


@nnx.jit
def _logits(model, tokens, mask, actions):
  return model(tokens, mask, actions)


def _random_inputs(seed=0, b=2, t=6, n=4):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.integers(0, 16, (b, t, n)), jnp.int32),
          jnp.asarray(rng.random((b, t, n)) < 0.5),
          jnp.asarray(rng.integers(0, 5, (b, t)), jnp.int32))


# --- The training mask ---------------------------------------------------------------------


def test_mask_rate_is_drawn_per_example_and_frame_0_is_never_masked():
  mask_BTN, rate_B = dynamics_task.sample_mask(jax.random.key(0), (64, 8, 256))
  mask_BTN, rate_B = np.asarray(mask_BTN), np.asarray(rate_B)
  assert not mask_BTN[:, 0].any()
  assert ((rate_B >= 0.5) & (rate_B <= 1.0)).all()
  assert rate_B.std() > 0.1  # Not one rate for the batch: U[0.5, 1] has std 0.144.
  frac_B = mask_BTN[:, 1:].mean(axis=(1, 2))
  np.testing.assert_allclose(frac_B, rate_B, atol=0.05)
  assert np.corrcoef(frac_B, rate_B)[0, 1] > 0.95


def test_per_frame_mask_rates_give_masked_frames_a_nearly_whole_past():
  mask_BTN, rate_BT = dynamics_task.sample_mask(jax.random.key(0), (64, 8, 256), per="frame",
                                                min_rate=0.0)
  mask_BTN, rate_BT = np.asarray(mask_BTN), np.asarray(rate_BT)
  assert rate_BT.shape == (64, 8) and not mask_BTN[:, 0].any()
  assert ((rate_BT >= 0.0) & (rate_BT <= 1.0)).all()
  np.testing.assert_allclose(mask_BTN[:, 1:].mean(2), rate_BT[:, 1:], atol=0.12)
  # Frames of one example differ: a frame hidden at over 0.8 often follows one under 0.2,
  # which one rate per example never gives.
  frac_BT = mask_BTN.mean(2)
  assert ((frac_BT[:, 2:] > 0.8) & (frac_BT[:, 1:-1] < 0.2)).sum() > 10
  per_example = np.asarray(dynamics_task.sample_mask(jax.random.key(0), (64, 8, 256))[0])
  frac_BT = per_example.mean(2)
  assert not ((frac_BT[:, 2:] > 0.8) & (frac_BT[:, 1:-1] < 0.2)).any()
  with pytest.raises(ValueError, match="mask rates per 'batch'"):
    dynamics_task.sample_mask(jax.random.key(0), (2, 3, 4), per="batch")


def test_suffix_masks_give_the_first_masked_frame_a_whole_past():
  mask_BTN, rate_B = dynamics_task.sample_mask(jax.random.key(0), (256, 8, 256), per="suffix")
  mask_BTN, rate_B = np.asarray(mask_BTN), np.asarray(rate_B)
  assert rate_B.shape == (256,) and not mask_BTN[:, 0].any()
  hidden_BT = mask_BTN.any(2)
  first_B = np.argmax(hidden_BT, axis=1)
  assert hidden_BT.any(1).all()  # Rates >= 0.5 over 256 tokens: every example hides some.
  for b in range(256):
    k = first_B[b]
    assert not hidden_BT[b, :k].any() and hidden_BT[b, k:].all()
    np.testing.assert_allclose(mask_BTN[b, k:].mean(), rate_B[b], atol=0.12)  # 4 sd, 1 frame
  # The first masked frame is spread over 1..T-1, about a seventh of the examples each.
  counts = np.bincount(first_B, minlength=8)
  assert counts[0] == 0 and (counts[1:] > 256 / 7 / 2).all()


def test_alternate_masks_hide_every_other_frame_after_a_whole_one():
  mask_BTN, rate_B = dynamics_task.sample_mask(jax.random.key(0), (256, 8, 256),
                                               per="alternate")
  mask_BTN, rate_B = np.asarray(mask_BTN), np.asarray(rate_B)
  assert rate_B.shape == (256,) and not mask_BTN[:, 0].any()
  hidden_BT = mask_BTN.any(2)
  parity_B = np.argmax(hidden_BT[:, 1:3], axis=1) + 1  # The first hidden frame: 1 or 2.
  for b in range(256):
    hidden = (np.arange(8) % 2 == parity_B[b] % 2) & (np.arange(8) > 0)
    np.testing.assert_array_equal(hidden_BT[b], hidden)
    np.testing.assert_allclose(mask_BTN[b, hidden].mean(), rate_B[b], atol=0.07)  # 4 sd
  # Either parity, about half the examples each.
  assert 96 < np.sum(parity_B == 1) < 160


def test_rarity_weighted_loss_weighs_rare_codes_up():
  # 100 tokens: code 0 on 96, code 1 on 4; all masked but the first 4 of code 0.
  tokens_BTN = jnp.zeros((1, 1, 100), jnp.int32).at[0, 0, :4].set(1)
  mask_BTN = jnp.ones((1, 1, 100), bool).at[0, 0, 4:8].set(False)
  logits_BTNV = jax.random.normal(jax.random.key(0), (1, 1, 100, 3))
  ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits_BTNV, tokens_BTN))[0, 0]
  mask = np.asarray(mask_BTN)[0, 0]
  plain = dynamics_task.masked_token_metrics(logits_BTNV, tokens_BTN, mask_BTN)
  def weighted_loss(alpha):
    weights_BTN = dynamics_task.rarity_weights(tokens_BTN, mask_BTN, 3, alpha)
    return float(dynamics_task.masked_token_metrics(logits_BTNV, tokens_BTN, mask_BTN,
                                                    weights_BTN)["weighted_loss"])
  np.testing.assert_allclose(weighted_loss(0.0), float(plain["dynamics_loss"]), rtol=1e-6)
  w = np.where(np.arange(100) < 4, 0.04, 0.96) ** -0.5 * mask
  np.testing.assert_allclose(weighted_loss(0.5), np.sum(ce * w) / np.sum(w), rtol=1e-5)
  # The rare code's share of the loss: 4 of 92 masked tokens, weighted 4.9x.
  assert np.sum(w[:4]) / np.sum(w) > 4 * np.sum(mask[:4]) / np.sum(mask)


def test_context_noise_replaces_only_visible_tokens_at_up_to_its_rate():
  tokens_BTN = jnp.zeros((64, 8, 256), jnp.int32)
  mask_BTN, _ = dynamics_task.sample_mask(jax.random.key(1), tokens_BTN.shape)
  noisy_BTN = np.asarray(dynamics_task.corrupt_context(
      jax.random.key(2), tokens_BTN, mask_BTN, 0.4, num_codes=1000))
  mask_BTN = np.asarray(mask_BTN)
  assert not noisy_BTN[mask_BTN].any()  # The masked tokens (the targets' places) untouched.
  changed_B = ((noisy_BTN != 0) & ~mask_BTN).sum((1, 2)) / (~mask_BTN).sum((1, 2))
  assert changed_B.max() < 0.45 and changed_B.mean() == pytest.approx(0.2, abs=0.05)
  assert changed_B.std() > 0.05  # One rate per example.
  unchanged = dynamics_task.corrupt_context(jax.random.key(2), tokens_BTN, mask_BTN, 0.0, 1000)
  assert not np.asarray(unchanged).any()


class _FrameIndexLAM:
  """Stands in for the LAM: the 'action' of transition t -> t+1 is the index of frame t+1,
  read from the pixels (a window only knows its own frames)."""

  def infer_actions(self, video_BTHWC):
    assert video_BTHWC.shape[1] <= 4  # The window.
    return video_BTHWC[:, 1:, 0, 0, 0].astype(jnp.int32)


@pytest.mark.parametrize("t", [2, 4, 7, 8, 10])
def test_lam_actions_of_long_clips_come_from_windows(t):
  video = jnp.broadcast_to(jnp.arange(t, dtype=jnp.uint8)[None, :, None, None, None],
                           (2, t, 1, 1, 1))
  actions = np.asarray(lam_lib.in_windows(_FrameIndexLAM().infer_actions, video, 4))
  np.testing.assert_array_equal(actions, np.broadcast_to(np.arange(1, t), (2, t - 1)))


# --- The dynamics model: action alignment and causality ------------------------------------


@pytest.mark.parametrize("conditioning,positions,block_order", _VARIANTS)
def test_action_t_conditions_frame_t_plus_1_and_later_only(conditioning, positions,
                                                           block_order):
  model = _tiny_model(conditioning, positions, block_order)
  tokens, mask, actions = _random_inputs()
  base = np.asarray(_logits(model, tokens, mask, actions))
  assert base.shape == (2, 6, 4, 16)
  t_max = actions.shape[1]
  for t in range(t_max):
    changed = np.asarray(_logits(model, tokens, mask, actions.at[:, t].set((actions[:, t] + 1) % 5)))
    np.testing.assert_array_equal(changed[:, :t + 1], base[:, :t + 1], err_msg=f"t={t}")
    if t + 1 < t_max:
      # The frame the action produced sees it directly.
      assert np.abs(changed[:, t + 1] - base[:, t + 1]).max() > 1e-4, t
    else:
      np.testing.assert_array_equal(changed, base)  # The last action produced no frame.


@pytest.mark.parametrize("conditioning", dynamics_lib.CONDITIONINGS)
def test_frame_0_gets_the_no_action_embedding(conditioning):
  model = _tiny_model(conditioning)
  caused = np.asarray(model.frame_actions(jnp.asarray([[3, 1, 4, 2]])))
  np.testing.assert_array_equal(caused, [[model.no_action, 3, 1, 4]])
  tokens, mask, actions = _random_inputs()
  base = np.asarray(_logits(model, tokens, mask, actions))
  # A random direction: a constant shift of every component would vanish in the LayerNorm.
  shift_D = jax.random.normal(jax.random.key(1), model.action_embed.shape[1:])
  model.action_embed[...] = model.action_embed[...].at[model.no_action].add(shift_D)
  changed = np.asarray(_logits(model, tokens, mask, actions))
  assert np.abs(changed[:, 0] - base[:, 0]).max() > 1e-4


@pytest.mark.parametrize("conditioning,positions,block_order", _VARIANTS)
def test_frames_never_see_later_frames(conditioning, positions, block_order):
  model = _tiny_model(conditioning, positions, block_order)
  tokens, mask, actions = _random_inputs()
  base = np.asarray(_logits(model, tokens, mask, actions))
  for t in range(1, tokens.shape[1]):
    other_tokens = tokens.at[:, t].set((tokens[:, t] + 1) % 16)
    other_mask = mask.at[:, t].set(~mask[:, t])
    for tok, msk in ((other_tokens, mask), (tokens, other_mask)):
      changed = np.asarray(_logits(model, tok, msk, actions))
      np.testing.assert_array_equal(changed[:, :t], base[:, :t], err_msg=f"t={t}")
      assert np.abs(changed[:, t] - base[:, t]).max() > 1e-4, t


def test_masked_tokens_are_hidden():
  model = _tiny_model("additive")
  tokens, _, actions = _random_inputs()
  mask = jnp.ones(tokens.shape, bool).at[:, 0].set(False)
  base = np.asarray(_logits(model, tokens, mask, actions))
  other = tokens.at[:, 1:].set((tokens[:, 1:] + 3) % 16)
  np.testing.assert_array_equal(np.asarray(_logits(model, other, mask, actions)), base)


def test_bad_model_config_names_the_key():
  with pytest.raises(ValueError, match="config.model.action_conditioning='concat'"):
    _tiny_model("concat")
  with pytest.raises(ValueError, match="config.model.num_codes=0"):
    _tiny_model("additive", num_codes=0)
  with pytest.raises(ValueError, match="config.model.temporal_positions='alibi'"):
    _tiny_model("additive", "alibi")
  with pytest.raises(ValueError, match="config.model.sink_frames=1 needs temporal_positions"):
    _tiny_model("additive", sink_frames=1)
  with pytest.raises(ValueError, match=r"config.model.sink_frames=5 must be in \[0, max_frames"):
    _tiny_model("additive", "rope", sink_frames=5)
  with pytest.raises(ValueError, match="even head width"):
    _tiny_model("additive", "rope", d_model=30, num_heads=2)
  with pytest.raises(ValueError, match="spatial_rope needs a square token grid"):
    _tiny_model("additive", spatial_rope=True, tokens_per_frame=6)
  with pytest.raises(ValueError, match="spatial_rope needs a head width divisible by 4"):
    _tiny_model("additive", spatial_rope=True, d_model=36, num_heads=2)
  with pytest.raises(ValueError, match="config.model.block_order='spatial'"):
    _tiny_model("additive", block_order="spatial")
  with pytest.raises(ValueError, match="config.model.output_head='shared'"):
    _tiny_model("additive", output_head="shared")


@pytest.mark.parametrize("conditioning", dynamics_lib.CONDITIONINGS)
def test_tied_output_head_scores_outputs_against_the_token_embeddings(conditioning):
  model = _tiny_model(conditioning, output_head="tied")
  assert not hasattr(model, "to_logits")
  tokens, mask, actions = _random_inputs()
  logits = np.asarray(_logits(model, tokens, mask, actions))
  x = model.embed(tokens, mask, model.frame_actions(actions))
  y = np.asarray(model.transformer(x))[:, :, int(model.prepend):]
  codes_VD = np.asarray(model.token_embed[...])[:model.num_codes]  # The [MASK] row is no output.
  bias_V = np.asarray(model.logits_bias[...])
  np.testing.assert_allclose(logits, y @ codes_VD.T + bias_V, rtol=1e-5, atol=1e-5)
  untied = _tiny_model(conditioning)
  assert (sum(p.size for p in jax.tree.leaves(nnx.state(untied, nnx.Param)))
          - sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))) == 32 * 16


# --- Restoring stages ----------------------------------------------------------------------


def test_load_stage_round_trip(stage_workdirs):
  loaded = stages.load_stage(stage_workdirs["tokenizer"], expect_stage="tokenizer")
  assert loaded.step == 5 and loaded.config.stage == "tokenizer"
  saved = stage_workdirs["tokenizer_state"]
  _, params, model_state = nnx.split(loaded.model, nnx.Param, ...)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), saved["params"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(model_state),
               saved["model_state"])
  # A mesh of its own, and a model that runs.
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2), jax.devices())
  loaded = stages.load_stage(stage_workdirs["tokenizer"], mesh=mesh)
  assert jax.tree.leaves(nnx.state(loaded.model))[0].sharding.mesh.shape == mesh.shape
  tokens_BTN, _ = loaded.model.encode(_random_batch(2)["video"])
  assert tokens_BTN.shape == (2, CLIP_LEN, 16)


def test_a_trained_world_model_restores_by_itself_without_an_optimizer(stage_workdirs,
                                                                       tmp_path, monkeypatch):
  dyn_dir = str(tmp_path / "dyn")
  saved = save_random_stage(dyn_dir, _dynamics_config(stage_workdirs), seed=3)
  # Its config.json holds the model configs of the stages it builds on, and restoring reads
  # the model's weights only: the stage workdirs are not read, no optimizer is built.
  moved = {name: stage_workdirs[name] + "_moved" for name in ("tokenizer", "lam")}
  for name, path in moved.items():
    os.rename(stage_workdirs[name], path)
  try:
    monkeypatch.setattr(optim, "make_optimizer", _no_optimizer)
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2), jax.devices())
    loaded = stages.load_stage(dyn_dir, mesh=mesh, expect_stage="dynamics")
  finally:
    for name, path in moved.items():
      os.rename(path, stage_workdirs[name])
  assert loaded.step == 5 and loaded.config.model.num_codes == 32
  _, params, model_state = nnx.split(loaded.model, loaded.spec.trainable, ...)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), saved["params"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(model_state),
               saved["model_state"])


def _no_optimizer(*args, **kwargs):
  raise AssertionError(f"an optimizer was built: make_optimizer{args, kwargs}")


def test_load_stage_errors_name_the_workdir(stage_workdirs, tmp_path):
  missing = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="missing"):
    stages.load_stage(missing)
  os.makedirs(missing)
  with pytest.raises(FileNotFoundError, match="config.json"):
    stages.load_stage(missing)
  with pytest.raises(ValueError, match=r"holds a 'lam' stage.*'tokenizer'"):
    stages.load_stage(stage_workdirs["lam"], expect_stage="tokenizer")
  with pytest.raises(FileNotFoundError, match="no checkpoint of step 7"):
    stages.load_stage(stage_workdirs["lam"], step=7)
  no_ckpt = str(tmp_path / "no_ckpt")
  config_lib.save_config(no_ckpt, config_lib.load_config(stage_workdirs["lam"]))
  with pytest.raises(FileNotFoundError, match="no_ckpt.*has no checkpoint"):
    stages.load_stage(no_ckpt)


# --- The dynamics task ---------------------------------------------------------------------


def test_task_takes_vocab_tokens_and_actions_from_the_stage_workdirs(stage_workdirs):
  config = _dynamics_config(stage_workdirs)
  resolved = tasks.get_task(config).config
  assert (resolved.model.num_codes, resolved.model.tokens_per_frame,
          resolved.model.num_actions) == (32, 16, 6)
  # Derived before the task is built, in a copy: the caller's config is left as it was.
  assert (config.model.num_codes, config.model.tokens_per_frame,
          config.model.num_actions) == (0, 0, 0)
  assert resolved.is_locked == config.is_locked and not config.tokenizer_model
  config = _dynamics_config(stage_workdirs)
  config.model.num_codes = 64
  with pytest.raises(ValueError, match="config.model.num_codes=64 differs"):
    tasks.get_task(config)


def test_refuses_a_tokenizer_whose_config_does_not_match_the_data(stage_workdirs, tmp_path):
  config = _dynamics_config(stage_workdirs)
  config.data.image_size = 64
  with pytest.raises(ValueError) as error:
    tasks.get_task(config)
  message = str(error.value)
  assert "config.tokenizer_workdir" in message and stage_workdirs["tokenizer"] in message
  assert "model.image_size=32" in message and "config.data.image_size=64" in message

  config = _dynamics_config(stage_workdirs)
  config.data.clip_len = 12
  config.model.max_frames = 12
  with pytest.raises(ValueError, match=r"config.tokenizer_workdir.*max_frames=8 < "
                                       r"config.data.clip_len=12"):
    tasks.get_task(config)

  # Co-training trains the LAM on full clips, which it must cover.
  short_lam = str(tmp_path / "short_lam")
  lam = config_lib.load_config(stage_workdirs["lam"])
  with lam.unlocked():
    lam.model.max_frames = 4
  config_lib.save_config(short_lam, lam)
  config = _dynamics_config(stage_workdirs, "cotrain")
  config.lam_workdir = short_lam
  with pytest.raises(ValueError, match="config.cotrain_lam=True.*max_frames=4"):
    tasks.get_task(config)
  config.cotrain_lam = False
  tasks.get_task(config)  # Without co-training, the LAM sees long clips in windows.

  # A workdir of the wrong stage, and one that does not exist.
  config = _dynamics_config(stage_workdirs)
  config.tokenizer_workdir = stage_workdirs["lam"]
  with pytest.raises(ValueError, match="config.tokenizer_workdir=.*holds a 'lam' stage"):
    tasks.get_task(config)
  config.tokenizer_workdir = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="config.tokenizer_workdir=.*nowhere.*does not exist"):
    tasks.get_task(config)


def _init_and_train(config, mesh, steps):
  task = tasks.get_task(config)
  spec = train_state.make_state_spec(task, config, mesh)
  state = stages.init_from_dependencies(task, spec.init(jax.random.key(0)), spec)
  initial = jax.device_get(state)
  step_fn = train_state.jit_train_step(task, spec, config.seed)
  for i in range(steps):
    batch = jax.device_put(_random_batch(config.batch_size, seed=i), spec.batch_sharding)
    state, metrics = step_fn(state, batch)
  return spec, initial, jax.device_get(state), jax.device_get(metrics)


def _leaves(spec, state, name):
  """Every variable of submodule `name`, wherever (params or model_state) it lives."""
  return jax.tree.leaves(nnx.state(getattr(spec.model(state), name)))


def _assert_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def _assert_saved_weights(module, saved):
  _assert_equal(jax.tree.leaves(nnx.state(module)),
                jax.tree.leaves((saved["params"], saved["model_state"])))


def test_grafting_puts_the_saved_weights_in_with_the_state_shardings(stage_workdirs):
  config = _dynamics_config(stage_workdirs)
  task = tasks.get_task(config)
  spec = train_state.make_state_spec(
      task, config, sharding.make_mesh(dict(data=2, fsdp=4, tensor=1), jax.devices()))
  state = stages.init_from_dependencies(task, spec.init(jax.random.key(0)), spec)
  # Only the dynamics model is trained, so only it has optimizer state.
  assert set(state["params"].keys()) == {"dynamics"}
  assert {"tokenizer", "lam"} <= set(state["model_state"].keys())
  # The shardings the compiled train step expects, FSDP included.
  shardings = jax.tree.leaves(spec.shardings)
  assert any("fsdp" in str(s.spec) for s in shardings)
  assert len(jax.tree.leaves(state)) == len(shardings)
  for leaf, expected in zip(jax.tree.leaves(state), shardings):
    assert leaf.sharding == expected
  model = spec.model(jax.device_get(state))
  _assert_saved_weights(model.tokenizer, stage_workdirs["tokenizer_state"])
  _assert_saved_weights(model.lam, stage_workdirs["lam_state"])


def test_cotrained_lam_keeps_learning_its_codebook(stage_workdirs):
  config = _dynamics_config(stage_workdirs, "cotrain")
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  spec, initial, final, metrics = _init_and_train(config, mesh, steps=2)
  assert set(spec.abstract["params"].keys()) == {"dynamics", "lam"}
  codebook = lambda s: np.asarray(spec.model(s).lam.vq.codebook[...])
  assert np.abs(codebook(final) - codebook(initial)).max() > 0
  _assert_equal(_leaves(spec, final, "tokenizer"), _leaves(spec, initial, "tokenizer"))
  # Moved by the LAM's own loss, not by a dead-code restart.
  assert "lam_mse" in metrics and metrics["lam_restarted_codes"] == 0
  # runlocal weighs rare codes up: the dynamics term is then the weighted cross-entropy.
  dynamics_term = metrics["weighted_loss"] if config.rare_token_weight else metrics[
      "dynamics_loss"]
  np.testing.assert_allclose(metrics["loss"], dynamics_term + metrics["lam_loss"], rtol=1e-5)


# --- A real run ----------------------------------------------------------------------------


def test_short_training_run_learns_and_restores(stage_workdirs, tmp_path, tiny_data_dir):
  config = _dynamics_config(stage_workdirs, data_dir=tiny_data_dir)
  config.total_steps = 40
  config.log_every_steps = 10
  config.images_every_steps = 40
  config.checkpoint.every_steps = 40
  config.optimizer.warmup_steps = 10
  # A rate that shows learning within 40 steps (runlocal's is chosen for 1500).
  config.optimizer.lr, config.optimizer.end_lr = 1e-3, 1e-4
  config.mesh = dict(data=1, fsdp=1, tensor=1)
  workdir = str(tmp_path / "dyn")
  trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])

  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  assert losses[40] < 0.8 * losses[10], losses
  accuracy = {r["step"]: r["train/masked_accuracy"] for r in rows if "train/loss" in r}
  assert accuracy[40] > accuracy[10], accuracy
  # U[0.5, 1] per example: 0.75 on average over frames 1..T-1; under runlocal's alternate
  # masks half the frames are whole.
  fractions = [r["train/mask_fraction"] for r in rows if "train/loss" in r]
  expected = 0.75 * (0.5 if config.mask_rate_per == "alternate" else 1.0)
  assert abs(np.mean(fractions) - expected) < 0.1 * expected, fractions
  assert any(name.endswith(".gif") for name in os.listdir(os.path.join(workdir, "images")))

  # The trained world model restores from its workdir alone, earlier stages included.
  loaded = stages.load_stage(workdir, expect_stage="dynamics")
  assert isinstance(loaded.model, dynamics_lib.WorldModel) and loaded.step == 40
  # Training moved the dynamics model only: the frozen stages are bitwise the saved ones.
  _assert_saved_weights(loaded.model.tokenizer, stage_workdirs["tokenizer_state"])
  _assert_saved_weights(loaded.model.lam, stage_workdirs["lam_state"])

  # config.json keeps the stages' model configs, so the workdir rebuilds them without the
  # stage workdirs: moved elsewhere, with stage paths that no longer resolve (as relative
  # paths do from another directory), it restores the same world model.
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    saved = json.load(f)
  for stage in ("tokenizer", "lam"):
    assert saved[f"{stage}_model"] == config_lib.config_to_dict(
        config_lib.load_config(stage_workdirs[stage]).model), stage
    saved[f"{stage}_workdir"] = str(tmp_path / "gone" / stage)
  moved = str(tmp_path / "moved")
  shutil.copytree(workdir, moved)
  with open(os.path.join(moved, "config.json"), "w", encoding="utf-8") as f:
    json.dump(saved, f)
  alone = stages.load_stage(moved, expect_stage="dynamics")
  _assert_saved_weights(alone.model.tokenizer, stage_workdirs["tokenizer_state"])
  _assert_saved_weights(alone.model.lam, stage_workdirs["lam_state"])
  np.testing.assert_array_equal(alone.model.dynamics.token_embed[...],
                                loaded.model.dynamics.token_embed[...])
