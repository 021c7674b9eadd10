"""Workdirs written before the redesign restore, run and resume with today's code.

tests/data/workdirs_5c0edaa holds the tiny pipeline's tokenizer, LAM and dynamics workdirs
(two steps each; config.json and checkpoints only) written by the code at commit 5c0edaa,
whose configs name the activation axes 'batch', 'time' and 'tokens', and expected.npz: what
that code's restored models gave on fixed inputs (the tokenizer's tokens, the LAM's actions,
the dynamics model's logits).
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from genie_jax import config_lib
from genie_jax import sharding
from genie_jax import tasks
from genie_jax.inference import genie as genie_lib
from genie_jax.inference import stages
from genie_jax.training import checkpointing
from genie_jax.training import trainer
from conftest import read_metrics

OLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "workdirs_5c0edaa")


@pytest.fixture(name="old")
def fixture_old(tmp_path):
  """A copy of the old workdirs (a resume writes into them) and the expected outputs."""
  root = str(tmp_path / "old")
  shutil.copytree(OLD, root)
  return os.path.join(root, "genie"), dict(np.load(os.path.join(root, "expected.npz")))


def test_old_workdirs_restore_to_the_same_models(old):
  genie_dir, expected = old
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices())
  tokenizer = stages.load_stage(os.path.join(genie_dir, "tokenizer"), mesh=mesh).model
  tokens_BTN, _ = tokenizer.encode(expected["video"])
  np.testing.assert_array_equal(tokens_BTN, expected["tokens"])
  lam = stages.load_stage(os.path.join(genie_dir, "lam")).model
  np.testing.assert_array_equal(lam.infer_actions(expected["video"]), expected["actions"])
  loaded = stages.load_stage(os.path.join(genie_dir, "dynamics"), expect_stage="dynamics")
  # Its config predates the names the stages' keys have now: it resolves as written.
  assert loaded.config.model.num_codes == loaded.config.tokenizer_model.num_codes
  world = loaded.model
  tokens_BTN, _ = world.tokenizer.encode(expected["video"])
  actions_BT = np.pad(world.lam.infer_actions(expected["video"]), ((0, 0), (0, 1)))
  logits_BTNV = world.dynamics(tokens_BTN, expected["mask"], actions_BT)
  np.testing.assert_allclose(logits_BTNV, expected["logits"], rtol=1e-5, atol=1e-5)
  # And it generates.
  genie = genie_lib.Genie.from_workdir(os.path.join(genie_dir, "dynamics"))
  video_BTHWC = genie.rollout(expected["video"][:1, :1], np.zeros((1, 2), np.int32),
                              rng=jax.random.key(0), num_steps=2)
  assert video_BTHWC.shape[:2] == (1, 3)


@pytest.mark.parametrize("stage", ["tokenizer", "dynamics"])
def test_old_workdirs_resume(old, stage, tiny_data_dir):
  genie_dir, _ = old
  workdir = os.path.join(genie_dir, stage)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert ["batch", ["data", "fsdp"]] in json.load(f)["sharding"]["rules"]
  config = config_lib.load_config(workdir)
  # A rerun sends today's rules: the old axis names read as today's, so it resumes...
  with config.unlocked():
    config.sharding.rules = [list(rule) for rule in sharding.DEFAULT_RULES]
  checkpointing.check_resume_config(workdir, tasks.resolve_config(config),
                                    tasks.derived_keys((stage,)))
  # ...and training continues from its checkpoint, on this machine's copy of the data.
  with config.unlocked():
    config.total_steps = 3
    config.data.data_dir = tiny_data_dir
    config.log_every_steps = 1
  trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  assert sorted(read_metrics(workdir)) == [3]
