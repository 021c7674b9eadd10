"""Learning-rate schedules and the weight-decay mask."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tokenizer as tokenizer_config
from genie_jax.models import tokenizer as tokenizer_lib
from genie_jax.training import optim


def schedule(**overrides):
  cfg = optim.default_config()
  cfg.update(dict(lr=1.0, end_lr=0.1, warmup_steps=10, **overrides))
  return optim.learning_rate_schedule(cfg, total_steps=100)


def test_warmup_cosine():
  lr = schedule(schedule="warmup_cosine")
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)
  assert float(lr(55)) == pytest.approx(0.55, abs=1e-6)  # Halfway down the cosine.
  assert float(lr(100)) == pytest.approx(0.1)


def test_warmup_stable_decay():
  lr = schedule(schedule="wsd", decay_fraction=0.2)
  assert float(lr(5)) == pytest.approx(0.5)
  for step in (10, 50, 80):  # Stable until the last 20% of training.
    assert float(lr(step)) == pytest.approx(1.0)
  assert float(lr(90)) == pytest.approx(0.55)
  assert float(lr(100)) == pytest.approx(0.1)


def test_unknown_schedule_names_the_key():
  with pytest.raises(ValueError, match="config.optimizer.schedule='linear'"):
    schedule(schedule="linear")


def test_weight_decay_applies_to_kernels_only():
  config = tokenizer_config.get_config("size=tiny")
  model = nnx.eval_shape(lambda: tokenizer_lib.Tokenizer(config.model, rngs=nnx.Rngs(0)))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  decayed = {jax.tree_util.keystr(path): flag for path, flag in
             jax.tree_util.tree_leaves_with_path(optim.decay_mask(params))}
  assert decayed
  for path, flag in decayed.items():
    assert flag == ("kernel" in path), path
  assert not any(flag for path, flag in decayed.items()
                 if "codebook" in path or "pos" in path or "bias" in path or "norm" in path)


def test_decayed_parameters_shrink_and_others_do_not():
  """With zero gradients, AdamW's decoupled decay moves only the masked-in weights."""
  cfg = optim.default_config()
  cfg.update(dict(schedule="constant", warmup_steps=0, lr=0.1, weight_decay=0.5,
                  grad_clip_norm=0.0))
  tx, _ = optim.make_optimizer(cfg, total_steps=10)
  params = {"dense": {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)}}
  zeros = jax.tree.map(np.zeros_like, params)
  _, state = tx.update(zeros, tx.init(params), params)  # Step 0: the warmup's zero rate.
  updates, _ = tx.update(zeros, state, params)
  assert np.all(np.asarray(updates["dense"]["kernel"]) < 0)
  np.testing.assert_array_equal(updates["dense"]["bias"], 0)
