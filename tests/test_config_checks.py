"""Bad configs fail before any work: before data is generated, the workdir is written, the
model's shapes are built or anything is compiled, with a message naming the config key and
the fix."""

import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import dynamics as dynamics_config
from configs import genie as genie_config
from configs import lam as lam_config
from configs import tokenizer as tokenizer_config
from genie_jax import config_lib
from genie_jax.training import pipeline
from genie_jax.training import train_state
from genie_jax.training import trainer
from conftest import REPO, tiny_config


@pytest.fixture(autouse=True)
def no_model_or_compile(monkeypatch):
  """Makes reaching the model's shapes (or a compile) a test failure, not a slow success."""
  def reached(*args, **kwargs):
    del args, kwargs
    raise AssertionError("the config checks let the trainer reach the model and compiler")
  monkeypatch.setattr(trainer.train_state, "make_state_spec", reached)
  monkeypatch.setattr(trainer.train_state, "jit_train_step", reached)


def _set(config, key, value):
  *path, last = key.split(".")
  target = config
  for part in path:
    target = target[part]
  target[last] = value


def _fails(config, tmp_path, *patterns):
  """Runs the trainer on `config`; it must raise ValueError matching every pattern, having
  written nothing."""
  workdir = tmp_path / "work"
  with pytest.raises(ValueError) as info:
    trainer.train_and_evaluate(config, str(workdir))
  for pattern in patterns:
    assert pattern in str(info.value), (pattern, str(info.value))
  assert not workdir.exists()
  assert not (tmp_path / "data").exists()  # No dataset generated either.
  return str(info.value)


# (key, value, what the message must contain: the key with its value, and the fix). 8 devices.
TRAINER_CASES = [
    ("mesh", dict(data=3, fsdp=1, tensor=1),
     ["config.mesh={'data': 3, 'fsdp': 1, 'tensor': 1}", "there are 8",
      "change config.mesh"]),
    ("mesh", dict(data=-1, fsdp=-1, tensor=1), ["config.mesh", "at most one axis may be -1"]),
    ("mesh", dict(data=-1, pipeline=2), ["config.mesh", "unknown axes ['pipeline']"]),
    ("mesh_dcn", dict(data=3, fsdp=1, tensor=1),
     ["config.mesh_dcn=", "3 slices", "set config.mesh_dcn to the job's number of slices"]),
    ("mesh_dcn", dict(data=-1, fsdp=1, tensor=1), ["config.mesh_dcn=", "-1 is not allowed"]),
    ("microbatches", 3, ["config.microbatches=3", "config.batch_size=8",
                         "8 data-parallel devices", "use a divisor of 1"]),
    ("batch_size", 12,
     ["config.batch_size=12", "data-parallel size 8", "use a multiple of 8"]),
    ("model.patch_size", 5,
     ["config.model.patch_size=5 does not divide config.model.image_size=32"]),
    ("model.image_size", 48,
     ["config.model.image_size=48", "config.data.image_size=32",
      "set both to the dataset's frame size"]),
    ("model.code_restart_sampling", "farthest",
     ["config.model.code_restart_sampling='farthest'", "expected 'uniform' or 'distance'"]),
    ("stage", "tokeniser", ["config.stage='tokeniser'", "choose one of"]),
    ("total_steps", 0, ["config.total_steps=0 must be positive"]),
    ("eval_every_steps", -1, ["config.eval_every_steps=-1 must not be negative (0: never)"]),
    ("checkpoint.max_to_keep", 0, ["config.checkpoint.max_to_keep=0 must be at least 1"]),
    ("checkpoint.keep_period", -5, ["config.checkpoint.keep_period=-5 must not be negative"]),
    ("seed", -1, ["config.seed=-1 must be in [0, 2**32)"]),
    ("batch_size", -8, ["config.batch_size=-8 must be positive"]),
    ("data.prefetch", -1, ["config.data.prefetch=-1 must be at least 0"]),
    ("data.clip_len", 0, ["config.data.clip_len=0 must be positive"]),
    ("data.name", "atari", ["config.data.name='atari' is not a dataset", "builtin_world"]),
    ("model.dtype", "int32", ["config.model.dtype='int32'", "expected a floating type"]),
    ("optimizer.lr", -1e-3, ["config.optimizer.lr=-0.001 must be positive"]),
    ("optimizer.grad_clip_norm", -1.0,
     ["config.optimizer.grad_clip_norm=-1.0 must not be negative"]),
    ("optimizer.b2", 1.0, ["config.optimizer.b2=1.0 must be in [0, 1)"]),
    ("optimizer.decay_fraction", 3.0, ["config.optimizer.decay_fraction=3.0 must be in [0, 1]"]),
]


@pytest.mark.parametrize("key,value,patterns", TRAINER_CASES,
                         ids=[f"{c[0]}={c[1]}" for c in TRAINER_CASES])
def test_bad_trainer_config(tmp_path, key, value, patterns):
  config = tiny_config(str(tmp_path / "data"))
  _set(config, key, value)
  _fails(config, tmp_path, *patterns)


def test_a_clip_longer_than_any_record_fails_before_the_data_is_made(tmp_path):
  config = tiny_config(str(tmp_path / "data"), **{"data.clip_len": 48, "model.max_frames": 48})
  _fails(config, tmp_path, "config.data.clip_len=48: records hold at most 40 frames",
         "config.data.episode_len=40")


# The model split is checked on the weights' shapes (jax.eval_shape: nothing allocated, no
# compile), so these reach the model's shapes.
_MAKE_STATE_SPEC = train_state.make_state_spec


def test_tensor_parallel_must_divide_heads(tmp_path, monkeypatch):
  monkeypatch.setattr(trainer.train_state, "make_state_spec", _MAKE_STATE_SPEC)
  # 4-way tensor parallelism of a 2-head model would replicate the heads.
  config = tiny_config(str(tmp_path / "data"))
  config.mesh = dict(data=2, fsdp=1, tensor=4)
  _fails(config, tmp_path, "config.mesh.tensor = 4 does not divide the 'heads' axis of the weights (2)",
         "choose config.mesh.tensor among [1, 2]")


def test_fsdp_must_divide_model_width(tmp_path, monkeypatch):
  monkeypatch.setattr(trainer.train_state, "make_state_spec", _MAKE_STATE_SPEC)
  config = tiny_config(str(tmp_path / "data"))
  config.model.d_model = 36
  config.mesh = dict(data=1, fsdp=8, tensor=1)
  _fails(config, tmp_path, "config.mesh.fsdp = 8 does not divide the 'embed' axis of the weights",
         "choose config.mesh.fsdp among [1, 2, 3, 4, 6, 9, 12, 18, 36]")


# --- The dynamics stage: its stage-1 and stage-2 workdirs ----------------------------------


@pytest.fixture(name="lam_workdir")
def fixture_lam_workdir(tmp_path):
  """A LAM workdir holding only its config.json (enough for the config checks)."""
  workdir = str(tmp_path / "lam")
  config = lam_config.get_config("size=tiny,runlocal")
  config_lib.save_config(workdir, config)
  return workdir


def _dynamics(tmp_path, tokenizer_workdir, lam_workdir):
  config = dynamics_config.get_config(
      f"size=tiny,runlocal,tokenizer_workdir={tokenizer_workdir},lam_workdir={lam_workdir}")
  config.data.data_dir = str(tmp_path / "data")
  return config


def test_dynamics_tokenizer_workdir_without_config_json(tmp_path, lam_workdir):
  empty = tmp_path / "tok"
  empty.mkdir()
  message = _fails(_dynamics(tmp_path, str(empty), lam_workdir), tmp_path,
                   f"config.tokenizer_workdir={str(empty)!r} holds no config.json")
  assert "config.json" in message


def test_dynamics_tokenizer_workdir_missing(tmp_path, lam_workdir):
  missing = str(tmp_path / "nowhere")
  _fails(_dynamics(tmp_path, missing, lam_workdir), tmp_path,
         f"config.tokenizer_workdir={missing!r} does not exist",
         "train the tokenizer stage there first")
  config = _dynamics(tmp_path, missing, lam_workdir)
  config.tokenizer_workdir = ""
  _fails(config, tmp_path, "config.tokenizer_workdir is empty",
         "set it to the workdir of a trained tokenizer")


def test_dynamics_workdir_of_the_wrong_stage(tmp_path, lam_workdir):
  _fails(_dynamics(tmp_path, lam_workdir, lam_workdir), tmp_path,
         f"config.tokenizer_workdir={lam_workdir!r} holds a 'lam' stage, not a 'tokenizer'")


@pytest.mark.parametrize("key,value,pattern", [
    ("mask_rate_per", "batch", "config.mask_rate_per='batch'; expected one of"),
    ("min_mask_rate", 1.5, "config.min_mask_rate=1.5 must be in [0, 1.0]"),
    ("rare_token_weight", -0.5, "config.rare_token_weight=-0.5 must be in [0, 1]"),
])
def test_dynamics_training_mask_keys(tmp_path, lam_workdir, key, value, pattern):
  tokenizer_workdir = str(tmp_path / "tok")
  config_lib.save_config(tokenizer_workdir, tokenizer_config.get_config("size=tiny,runlocal"))
  config = _dynamics(tmp_path, tokenizer_workdir, lam_workdir)
  config[key] = value
  _fails(config, tmp_path, pattern)


def test_checks_run_before_the_workdir_is_touched(tmp_path):
  """An existing workdir is left as it was (no config.json written over it)."""
  config = tiny_config(str(tmp_path / "data"), batch_size=12)
  workdir = tmp_path / "existing"
  workdir.mkdir()
  (workdir / "marker").write_text("x")
  with pytest.raises(ValueError, match="config.batch_size=12"):
    trainer.train_and_evaluate(config, str(workdir))
  assert os.listdir(workdir) == ["marker"]


def test_stage_configs_are_read_without_the_checkpointer():
  # Resolving a stage's dependencies reads their config.json (config_lib); Orbax and Grain,
  # the checkpointer's, load only where a run trains or restores.
  code = ("import sys, genie_jax.tasks, genie_jax.config_lib, configs.dynamics; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'orbax', 'grain'}))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "[]", out.stdout


def _parsed_config(argv: list[str]):
  """The config `argv` gives, parsed as the command line's flags are (config_flags reads its
  overrides from the argv it is defined with)."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def test_new_dataset_recipe_reaches_every_model(tmp_path):
  """README "Data", the recipe for a new dataset: a frame size and clip length given on the
  command line for each stage's data carry into the stages' models (the LAM's patch with
  them), and every check the pipeline makes before training passes; a model key given
  explicitly wins."""
  argv = ["pipeline",
          f"--config={REPO}/configs/genie.py:runlocal,data=video_folder,video_dir={tmp_path}",
          *[f"--config.{stage}.data.image_size=48" for stage in ("tokenizer", "lam", "dynamics")],
          *[f"--config.{stage}.data.clip_len=8" for stage in ("tokenizer", "dynamics")]]
  stages = pipeline.checked_stage_configs(_parsed_config(argv), str(tmp_path / "genie"))
  tokenizer, lam, dynamics = (stages[name][1].model for name in ("tokenizer", "lam", "dynamics"))
  assert (tokenizer.image_size, tokenizer.max_frames) == (48, 8)
  assert (lam.image_size, lam.max_frames, lam.patch_size) == (48, 4, 12)
  assert dynamics.max_frames == 8
  config = _parsed_config(argv + ["--config.lam.model.patch_size=8"])
  assert (config.lam.model.patch_size, config.lam.data.image_size) == (8, 48)


def test_a_workdir_without_a_checkpoint_takes_a_new_config(tmp_path):
  """config.json alone (a run stopped before its first save, e.g. by an error found at
  compile time) binds nothing; once a checkpoint exists, a changed config is refused."""
  from genie_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "work")
  config = tiny_config(str(tmp_path / "data"))
  config_lib.save_config(workdir, config)
  changed = tiny_config(str(tmp_path / "data"), **{"model.num_codes": 16})
  checkpointing.check_resume_config(workdir, changed)
  (tmp_path / "work" / "checkpoints" / "3").mkdir(parents=True)
  with pytest.raises(ValueError, match="config.model.num_codes: 32 -> 16"):
    checkpointing.check_resume_config(workdir, changed)
  # How the same weights are computed may change (a run moved from GPUs to TPUs).
  checkpointing.check_resume_config(workdir, tiny_config(
      str(tmp_path / "data"), **{"model.attention_impl": "cudnn", "model.remat": True}))


def test_the_pipeline_checks_every_stage_before_training_any(tmp_path):
  """A later stage's bad trainer setting fails the pipeline before the first stage trains,
  naming the stage."""
  config = genie_config.get_config("size=tiny,runlocal")
  config.dynamics.total_steps = 0
  workdir = tmp_path / "genie"
  with pytest.raises(ValueError, match=r"config.dynamics.total_steps=0 must be positive"):
    pipeline.run_pipeline(config, str(workdir))
  assert not workdir.exists()
