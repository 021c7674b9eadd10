"""The shared trainer end to end: configs, sharding equivalence, checkpoints, resume, evaluate."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax._src import xla_bridge

from configs import tokenizer as tokenizer_config
from genie_jax import config_lib
from genie_jax import profiling
from genie_jax import sharding
from genie_jax import tasks
from genie_jax.inference import evaluate
from genie_jax.training import checkpointing
from genie_jax.training import optim
from genie_jax.training import train_state
from genie_jax.training import trainer
from conftest import REPO, read_metrics, tiny_config

def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  t, s = config.data.clip_len, config.data.image_size
  return dict(video=rng.integers(0, 256, (config.batch_size, t, s, s, 3), dtype=np.uint8),
              actions=rng.integers(0, 5, (config.batch_size, t), dtype=np.int32))


# --- Config handling ------------------------------------------------------------------------


def test_locked_config_rejects_unknown_key(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "genie_jax.cli.train", "--config=configs/tokenizer.py:size=tiny",
       "--config.model.d_modle=64", f"--workdir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "d_modle" in proc.stderr
  assert not os.listdir(tmp_path)  # Nothing was written.


def test_config_argument_typo_is_an_error():
  with pytest.raises(ValueError, match="runlcoal"):
    tokenizer_config.get_config("runlcoal")


@pytest.mark.parametrize("key,value,message", [
    ("batch_size", 12, "config.batch_size=12"),
    ("model.image_size", 48, "config.model.image_size=48"),
    ("model.patch_size", 5, "config.model.patch_size"),
    ("stage", "tokeniser", "config.stage='tokeniser'"),
    ("mesh", dict(data=3, fsdp=1, tensor=1), "config.mesh"),
])
def test_bad_config_fails_before_work(tmp_path, key, value, message):
  config = tiny_config(str(tmp_path / "data"))
  target = config.model if key.startswith("model.") else config
  target[key.split(".")[-1]] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    trainer.train_and_evaluate(config, str(tmp_path / "work"))
  assert not os.path.exists(tmp_path / "data")  # Failed before generating any data.


def test_evaluation_data_is_checked_before_training(tmp_path, tiny_data_dir):
  workdir = tmp_path / "work"
  # 4 validation episodes of 40 frames: 20 clips of 8.
  for overrides, message in [
      ({"evals.reconstruction.split": "nope"},
       r"config.evals.reconstruction.split='nope': Split 'nope' not in"),
      ({"evals.reconstruction.batch_size": 24},
       r"config.evals.reconstruction.batch_size=24: split 'validation' has 20 clips")]:
    with pytest.raises(ValueError, match=message):
      trainer.train_and_evaluate(tiny_config(tiny_data_dir, **overrides), str(workdir))
    assert not os.path.exists(workdir / "checkpoints")


# --- Sharding: DP and FSDP give the single-device losses ------------------------------------


def _losses_on_mesh(config, mesh_shape, devices, steps=3):
  config = config.copy_and_resolve_references()
  config.mesh = mesh_shape
  task = tasks.get_task(config)
  spec = train_state.make_state_spec(task, config, sharding.make_mesh(config.mesh, devices))
  state = spec.init(jax.random.key(0))
  step_fn = None
  losses = []
  for i in range(steps):
    local = random_batch(config, seed=i)
    step_fn = step_fn or train_state.jit_train_step(task, spec, config.seed)
    batch = jax.device_put(local, spec.batch_sharding)
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state["params"]), spec


def test_data_parallel_fsdp_and_tensor_parallel_match_one_device(tmp_path):
  config = tiny_config(str(tmp_path))
  devices = jax.devices()
  assert len(devices) == 8
  base, base_params, _ = _losses_on_mesh(config, dict(data=1, fsdp=1, tensor=1), devices[:1])
  for mesh_shape in (dict(data=8, fsdp=1, tensor=1), dict(data=1, fsdp=8, tensor=1),
                     dict(data=2, fsdp=4, tensor=1), dict(data=2, fsdp=2, tensor=2)):
    losses, params, spec = _losses_on_mesh(config, mesh_shape, devices)
    np.testing.assert_allclose(losses, base, rtol=2e-5, err_msg=str(mesh_shape))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 params, base_params)
    if mesh_shape["fsdp"] == 8:
      # FSDP really shards the weights: some parameter is split over the fsdp axis.
      specs = [s.spec for s in jax.tree.leaves(spec.shardings["params"])]
      assert any("fsdp" in str(p) for p in specs)
    if mesh_shape["tensor"] == 2:
      specs = [s.spec for s in jax.tree.leaves(spec.shardings["params"])]
      assert any("tensor" in str(p) for p in specs)
  assert base[-1] < base[0]


# --- Microbatches: one update from a batch computed in parts ----------------------------------


class _ToyState(nnx.Variable):
  """Model state of `_ToyTask`."""


class _ToyModel(nnx.Module):

  def __init__(self):
    self.w = nnx.Param(jnp.linspace(-1.0, 1.0, 3))
    self.frozen = nnx.Param(jnp.full((4,), 0.1))  # Not trained: model state.
    self.calls = _ToyState(jnp.asarray(0, jnp.int32))
    self.mean_x = _ToyState(jnp.asarray(0.0, jnp.float32))


class _ToyTask(tasks.base.Task):
  """Least squares on x . w; its model state counts the loss's calls and averages x; its aux
  is the batch's x, whose order `after_update` reads."""

  trainable = nnx.All(nnx.Param, nnx.PathContains("w"))

  def make_model(self, rngs):
    del rngs
    return _ToyModel()

  def loss(self, model, batch, rng):
    model.calls[...] += 1
    model.mean_x[...] = 0.5 * model.mean_x[...] + 0.5 * jnp.mean(batch["x"])
    del rng
    error = batch["x"] @ model.w[...] - batch["y"] + jnp.sum(model.frozen[...])
    return jnp.mean(jnp.square(error)), dict(error=jnp.mean(error)), batch["x"]

  def after_update(self, model, aux, rng):
    del model, rng
    return dict(order=jnp.sum(aux * jnp.arange(aux.shape[0])[:, None]))


def _toy_steps(microbatches, mesh_shape, devices, task_cls=_ToyTask):
  config = tiny_config("/unused", mesh=mesh_shape)
  task = task_cls(config)
  spec = train_state.make_state_spec(task, config, sharding.make_mesh(config.mesh, devices))
  step = train_state.jit_train_step(task, spec, config.seed, microbatches=microbatches)
  rng = np.random.default_rng(0)
  batch = dict(x=rng.normal(size=(8, 3)).astype(np.float32),
               y=rng.normal(size=(8,)).astype(np.float32))
  state, history = spec.init(jax.random.key(0)), []
  for _ in range(2):
    state, metrics = step(state, jax.device_put(batch, spec.batch_sharding))
    history.append(jax.device_get(metrics))
  hlo = step.lower(spec.abstract, train_state.abstract_batch(spec, batch)).compile().as_text()
  return jax.device_get(state), history, hlo


def test_microbatches_give_the_whole_batch_update():
  one = jax.devices()[:1]
  whole, whole_metrics, _ = _toy_steps(1, dict(data=1, fsdp=1, tensor=1), one)
  for microbatches in (2, 4):
    state, metrics, _ = _toy_steps(microbatches, dict(data=1, fsdp=1, tensor=1), one)
    np.testing.assert_allclose(state["params"]["w"], whole["params"]["w"], rtol=1e-6)
    for got, want in zip(metrics, whole_metrics):
      # The gradient's norm tells a mean over the parts from a sum or from one part.
      for key in ("loss", "grad_norm", "error"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
      assert got["order"] == want["order"]  # aux back in batch order for after_update.
    # Every microbatch starts from the step's state: the counter moves once per step, the
    # average by the batch's mean, as without microbatches.
    assert int(state["model_state"]["calls"]) == 2
    np.testing.assert_array_equal(state["model_state"]["frozen"], whole["model_state"]["frozen"])
    assert float(state["model_state"]["mean_x"]) == pytest.approx(
        float(whole["model_state"]["mean_x"]), rel=1e-6)
  # The second step moved w (the first has learning rate 0, warm-up).
  assert np.abs(whole["params"]["w"] - np.linspace(-1.0, 1.0, 3)).max() > 1e-4


def test_microbatches_stay_on_their_devices():
  mesh = dict(data=4, fsdp=1, tensor=1)
  local, local_metrics, _ = _toy_steps(2, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  state, metrics, hlo = _toy_steps(2, mesh, jax.devices()[:4])
  # The same microbatches on every mesh: clips i, i + 2, ... (one per device here).
  np.testing.assert_allclose(state["params"]["w"], local["params"]["w"], rtol=1e-5)
  assert metrics[1]["loss"] == pytest.approx(local_metrics[1]["loss"], rel=1e-5)
  _, _, whole_hlo = _toy_steps(1, mesh, jax.devices()[:4])
  for collective in ("all-gather", "all-to-all", "collective-permute"):
    assert hlo.count(f" {collective}(") == whole_hlo.count(f" {collective}("), collective


@pytest.mark.parametrize("mesh", [dict(data=1, fsdp=1, tensor=1), dict(data=4, fsdp=1, tensor=1)])
def test_step_stats_count_every_microbatch(tmp_path, mesh):
  config = tiny_config(str(tmp_path), mesh=mesh)
  task = tasks.get_task(config)
  spec = train_state.make_state_spec(task, config, sharding.make_mesh(
      config.mesh, jax.devices()[:mesh["data"]]))
  batch = train_state.abstract_batch(spec, random_batch(config))
  flops = {}
  for microbatches in (1, 2):
    lowered = train_state.jit_train_step(task, spec, config.seed,
                                         microbatches=microbatches).lower(spec.abstract, batch)
    flops[microbatches] = train_state.step_stats(lowered, lowered.compile(), task, spec,
                                                 config.seed, batch, microbatches)["flops"]
  # XLA's own count for the loop is one part's; the step's is the whole batch's, per device.
  assert flops[2] == pytest.approx(flops[1], rel=0.02)
  if mesh["data"] > 1:
    one = dict(mesh, data=1)
    spec1 = train_state.make_state_spec(task, config, sharding.make_mesh(one, jax.devices()[:1]))
    batch1 = train_state.abstract_batch(spec1, random_batch(config))
    lowered = train_state.jit_train_step(task, spec1, config.seed).lower(spec1.abstract, batch1)
    whole = train_state.step_stats(lowered, lowered.compile(), task, spec1, config.seed,
                                   batch1, 1)["flops"]
    assert flops[1] == pytest.approx(whole / mesh["data"], rel=0.01)


class _CostOf:
  """A program stage whose cost analysis says `flops` (None: no estimate)."""

  def __init__(self, flops):
    self.flops = flops

  def cost_analysis(self):
    return None if self.flops is None else {"flops": self.flops}


def test_program_flops_count_the_matmuls(monkeypatch):
  m, k, n = 64, 32, 48
  mesh = jax.make_mesh((4,), ("d",), devices=jax.devices()[:4])
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  lowered = jax.jit(jnp.matmul, out_shardings=rows).lower(
      jax.ShapeDtypeStruct((m, k), jnp.float32, sharding=rows),
      jax.ShapeDtypeStruct((k, n), jnp.float32, sharding=whole))
  compiled = lowered.compile()
  per_device = pytest.approx(2 * m * k * n / 4, rel=1e-3)
  assert profiling.program_flops(lowered, compiled, 4) == per_device
  # A compiled count that misses the matmul (XLA:GPU's: a few FLOPs per output element)
  # does not replace the lowered program's...
  assert profiling.program_flops(lowered, _CostOf(m * n / 4), 4) == per_device
  # Backends loaded as PJRT plugins (the CUDA wheels, TPUs) count no lowered program; the
  # CPU client counts it for them.
  monkeypatch.setattr(xla_bridge, "using_pjrt_c_api", lambda backend=None: True)
  assert lowered.cost_analysis() is None
  assert profiling.program_flops(lowered, _CostOf(m * n / 4), 4) == per_device
  # Where nothing counts the lowered program, the compiled count is taken.
  assert profiling.program_flops(_CostOf(None), compiled, 4) == per_device
  assert profiling.program_flops(_CostOf(None), None, 4) is None


class _ScalarAuxTask(_ToyTask):

  def loss(self, model, batch, rng):
    loss, metrics, x = super().loss(model, batch, rng)
    return loss, metrics, jnp.sum(x)


def test_microbatches_need_an_aux_with_the_batch_first():
  with pytest.raises(ValueError, match=r"config.microbatches=2 every leaf of the task's aux"):
    _toy_steps(2, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], _ScalarAuxTask)


def test_trainer_steps_in_microbatches(tmp_path, tiny_data_dir, monkeypatch):
  asked = set()
  real = train_state.jit_train_step

  def recording(*args, **kwargs):
    asked.add(args[4] if len(args) > 4 else kwargs.get("microbatches", 1))
    return real(*args, **kwargs)

  monkeypatch.setattr(trainer.train_state, "jit_train_step", recording)
  losses = {}
  for microbatches in (1, 4):
    config = tiny_config(tiny_data_dir, total_steps=3, eval_every_steps=0,
                         images_every_steps=0, microbatches=microbatches,
                         mesh=dict(data=2, fsdp=1, tensor=1))
    workdir = str(tmp_path / str(microbatches))
    asked.clear()
    trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:2])
    losses[microbatches] = read_metrics(workdir)
    # The step in parts, and for the logged FLOPs the whole batch's lowered (not run).
    assert asked == {1, microbatches}
  assert losses[4] == pytest.approx(losses[1], rel=1e-4)


# --- Checkpoints and exact resume -----------------------------------------------------------


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, tiny_data_dir):
  """6 steps on 8 devices (data parallel), checkpoints at steps 3 and 6."""
  workdir = str(tmp_path_factory.mktemp("work") / "tok")
  trainer.train_and_evaluate(tiny_config(tiny_data_dir), workdir)
  return workdir


def test_checkpoint_holds_model_optimizer_iterator_and_config(trained_workdir):
  ckpt = checkpointing.Checkpointer(trained_workdir, tiny_config("").checkpoint, read_only=True)
  assert ckpt.all_steps() == [3, 6]
  step_dir = os.path.join(ckpt.directory, "6")
  assert {"state", "data", "config"} <= set(os.listdir(step_dir))
  saved = config_lib.load_config(trained_workdir)
  assert saved.stage == "tokenizer" and saved.model.d_model == 32
  with pytest.raises(AttributeError):
    saved.model.d_modle = 3  # Loaded configs are locked too.


def test_resume_is_exact(trained_workdir, tmp_path, tiny_data_dir):
  """As if killed after step 6 was logged but before its checkpoint landed: rerunning the
  same command restarts from step 3 and repeats steps 4..6 bit for bit, logging each once."""
  resumed = str(tmp_path / "resumed")
  shutil.copytree(trained_workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
  # Rows of steps 1..3 get a marker: a run restarting from scratch would drop them.
  path = os.path.join(resumed, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(dict(row, marker=1) if row["step"] <= 3 else row) + "\n")

  trainer.train_and_evaluate(tiny_config(tiny_data_dir), resumed)

  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if "train/loss" in line]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert [r.get("marker") for r in rows] == [1, 1, 1, None, None, None]
  original = read_metrics(trained_workdir)
  for row in rows[3:]:
    assert row["train/loss"] == original[row["step"]], row["step"]


def test_a_finished_run_trains_and_compiles_nothing(trained_workdir, tmp_path, tiny_data_dir,
                                                    monkeypatch, caplog):
  workdir = str(tmp_path / "finished")
  shutil.copytree(trained_workdir, workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    logged = f.read()

  def no_compile(*args, **kwargs):
    raise AssertionError("compiled a train step with nothing to train")

  monkeypatch.setattr(train_state, "jit_train_step", no_compile)
  for total_steps in (6, 4):
    caplog.clear()
    assert trainer.train_and_evaluate(tiny_config(tiny_data_dir, total_steps=total_steps),
                                      workdir) == {}
    assert (f"checkpoint of step 6 in {os.path.join(workdir, 'checkpoints')} already reaches "
            f"config.total_steps={total_steps}: nothing to train") in caplog.text
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    assert f.read() == logged


def test_train_steps_never_draw_from_an_initialisers_key():
  init_key, train_key = train_state.root_keys(0)
  rngs = nnx.Rngs(init_key)
  data = lambda key: tuple(np.asarray(jax.random.key_data(key)).tolist())
  drawn = {data(rngs.params()) for _ in range(64)}
  used = {data(jax.random.fold_in(train_key, s)) for s in range(64)}
  used |= {data(k) for s in range(64) for k in train_state.step_keys(train_key, s)}
  assert len(drawn) == 64 and len(used) == 3 * 64 and not drawn & used


def test_resume_refuses_a_changed_config(trained_workdir, tmp_path, tiny_data_dir):
  workdir = str(tmp_path / "changed")
  shutil.copytree(trained_workdir, workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  config = tiny_config(tiny_data_dir, **{"model.d_model": 64, "seed": 1})
  with pytest.raises(ValueError, match=r"config.model.d_model: 32 -> 64.*config.seed: 0 -> 1"):
    trainer.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
  assert config_lib.load_config(workdir).model.d_model == 32
  # Schedules and intervals may change: that continues the run.
  checkpointing.check_resume_config(
      workdir, tiny_config(tiny_data_dir, total_steps=9, eval_every_steps=4))
  # Grain's worker processes shape the saved iterator state: their number may not change.
  with pytest.raises(ValueError, match=r"config.data.worker_count: 0 -> 2"):
    checkpointing.check_resume_config(
        workdir, tiny_config(tiny_data_dir, **{"data.worker_count": 2}))


def test_resume_compares_derived_keys_only_where_both_configs_hold_them(tmp_path):
  assert "tokenizer_model" in tasks.derived_keys()
  derived = tasks.derived_keys()
  (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # A trained workdir.
  saved = ml_collections.ConfigDict(dict(seed=0, tokenizer_model=dict(num_codes=64)))
  config_lib.save_config(str(tmp_path), saved)
  # Not filled in yet (a fresh config), or written before the key existed: no difference.
  checkpointing.check_resume_config(
      str(tmp_path), ml_collections.ConfigDict(dict(seed=0, tokenizer_model={})), derived)
  config_lib.save_config(str(tmp_path), ml_collections.ConfigDict(dict(seed=0)))
  checkpointing.check_resume_config(str(tmp_path), saved, derived)
  # Both hold it and it differs: the stage the run was built on changed.
  config_lib.save_config(str(tmp_path), saved)
  changed = ml_collections.ConfigDict(dict(seed=0, tokenizer_model=dict(num_codes=256)))
  with pytest.raises(ValueError, match=r"config.tokenizer_model.num_codes: 64 -> 256"):
    checkpointing.check_resume_config(str(tmp_path), changed, derived)


def test_resume_reads_a_model_key_added_later_as_what_the_model_assumed(tmp_path):
  (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # A trained workdir.
  config_lib.save_config(str(tmp_path), ml_collections.ConfigDict(
      dict(seed=0, model=dict(d_model=32))))
  later = dict(d_model=32, temporal_positions="learned", sink_frames=0)
  checkpointing.check_resume_config(str(tmp_path), ml_collections.ConfigDict(
      dict(seed=0, model=later)))
  with pytest.raises(ValueError, match=r"config.model.temporal_positions: 'learned' -> 'rope'"):
    checkpointing.check_resume_config(str(tmp_path), ml_collections.ConfigDict(
        dict(seed=0, model=dict(later, temporal_positions="rope"))))
  # Task keys too: a MaskGIT run from before its training options had Genie's...
  checkpointing.check_resume_config(str(tmp_path), ml_collections.ConfigDict(
      dict(seed=0, model=later, context_noise=0.0, mask_rate_per="example", min_mask_rate=0.5,
           rare_token_weight=0.0, unbias_sampling=True)))
  # ...and a diffusion run from before clean frames trained with none.
  checkpointing.check_resume_config(str(tmp_path), ml_collections.ConfigDict(
      dict(seed=0, model=later, clean_frame_fraction=0.0)))
  with pytest.raises(ValueError, match=r"config.clean_frame_fraction: 0.0 -> 0.5"):
    checkpointing.check_resume_config(str(tmp_path), ml_collections.ConfigDict(
        dict(seed=0, model=later, clean_frame_fraction=0.5)))


def test_restore_onto_other_meshes(trained_workdir):
  config = config_lib.load_config(trained_workdir)
  task = tasks.get_task(config)
  ckpt = checkpointing.Checkpointer(trained_workdir, config.checkpoint, read_only=True)
  restored = []
  for mesh_shape, devices in ((dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                              (dict(data=1, fsdp=8, tensor=1), jax.devices()),
                              (dict(data=2, fsdp=2, tensor=2), jax.devices())):
    spec = train_state.make_state_spec(task, config, sharding.make_mesh(mesh_shape, devices))
    step, state = ckpt.restore(None, spec.abstract)
    assert step == 6
    leaf = jax.tree.leaves(state["params"])[0]
    assert leaf.sharding.mesh.shape == spec.mesh.shape
    restored.append(jax.device_get(state))
  for other in restored[1:]:
    jax.tree.map(np.testing.assert_array_equal, restored[0], other)


# --- A real short run: the loss falls, validation PSNR rises, evaluate reports it -----------


def test_short_training_run_learns_then_evaluates(tmp_path, tiny_data_dir, monkeypatch, caplog):
  # Patch 4 and width 64 learn visibly within 120 steps; a fast usage EMA lets dead codes
  # restart within the run. Genie's encoder context: with 'patch' (runlocal's) a grid cell's
  # content is one code, and the tiny world has fewer distinct cells than codes.
  config = tiny_config(tiny_data_dir, total_steps=120, eval_every_steps=20,
                       images_every_steps=60, log_every_steps=10, **{
                           "model.patch_size": 4, "model.d_model": 64,
                           "model.code_usage_decay": 0.9, "model.encoder_context": "clip"})
  config.checkpoint.every_steps = 60
  config.mesh = dict(data=1, fsdp=1, tensor=1)
  config.evals.reconstruction.num_batches = 2
  workdir = str(tmp_path / "tok")
  caplog.set_level(logging.INFO)
  trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])

  losses = read_metrics(workdir)
  assert losses[120] < 0.5 * losses[10], losses
  psnr = read_metrics(workdir, "reconstruction/psnr")
  assert sorted(psnr) == [20, 40, 60, 80, 100, 120]
  assert psnr[120] > psnr[20] + 1.0, psnr
  usage = read_metrics(workdir, "reconstruction/codebook_usage")
  assert usage[120] > 0.5, usage
  assert sum(read_metrics(workdir, "train/restarted_codes").values()) > 0
  # Each interval's TFLOP/s is its step rate times the step's FLOPs the trainer logged.
  logged_gflop = float(re.search(r"Compiled train step in [0-9.]+s: ([0-9.]+) GFLOP/step/device",
                                 caplog.text).group(1))
  tflops = read_metrics(workdir, "tflops_per_sec_per_device")
  steps_per_sec = read_metrics(workdir, "steps_per_sec")
  assert sorted(tflops) == list(range(10, 121, 10))
  for step, rate in tflops.items():
    assert rate / steps_per_sec[step] * 1e3 == pytest.approx(logged_gflop, abs=0.05), step
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(name.endswith(".gif") for name in os.listdir(os.path.join(workdir, "images")))

  # Evaluation restores the model's weights only: no optimizer is built (nor its state read).
  monkeypatch.setattr(optim, "make_optimizer", _no_optimizer)
  results = evaluate.evaluate(workdir)
  with open(os.path.join(workdir, "eval", "metrics.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved == pytest.approx(results)
  assert saved["step"] == 120
  assert saved["reconstruction/psnr"] == pytest.approx(psnr[120], abs=0.5)
  assert 0.0 < saved["reconstruction/ssim"] <= 1.0
  assert 0.0 < saved["reconstruction/codebook_usage"] <= 1.0
  assert os.path.exists(os.path.join(workdir, "eval", "reconstruction_reconstructions.png"))

  # Other evaluator settings, another folder: one batch instead of eight.
  other = evaluate.evaluate(workdir, out_dir=str(tmp_path / "other"),
                            eval_settings=["num_images=1"], num_batches=1)
  assert other["reconstruction/num_frames"] < saved["reconstruction/num_frames"]
  assert os.path.exists(tmp_path / "other" / "metrics.json")


def _no_optimizer(*args, **kwargs):
  raise AssertionError(f"an optimizer was built: make_optimizer{args, kwargs}")


def test_eval_settings_are_typed_and_unknown_keys_named():
  config = tokenizer_config.get_config("size=tiny,runlocal")
  evaluate.apply_eval_settings(config, ["num_images=2", "split=train"])
  assert config.evals.reconstruction.num_images == 2
  assert config.evals.reconstruction.split == "train"
  with pytest.raises(ValueError, match="temperature"):
    evaluate.apply_eval_settings(config, ["temperature=0"])
  with pytest.raises(ValueError, match="KEY=VALUE"):
    evaluate.apply_eval_settings(config, ["num_images"])


def test_step_breakdown_finds_the_matmuls_of_a_step():
  """XLA's own ops in a profiler trace, matmuls told from the rest, as the benchmark prints."""
  from genie_jax import profiling  # pylint: disable=import-outside-toplevel

  def step(w, x):
    # The only matmuls are inside a loop whose carry is a 6-tuple (printed with comments).
    def body(_, carry):
      a, b, c, d, e, f = carry
      return (jax.numpy.tanh(x @ a) [:256] * 2.0, b + 1, c * 2, d - 1, e, f)
    carry = jax.lax.fori_loop(0, 3, body, (w, w, w, w, x, x))
    return carry[0], {"loss": jax.numpy.mean(carry[0])}

  w, x = jax.numpy.ones((256, 256)), jax.numpy.ones((256, 256))
  compiled = jax.jit(step).lower(w, x).compile()
  compiled(w, x)
  b = profiling.step_breakdown(compiled, w, x, num_steps=2)
  assert b["kinds"]["matmul"] > 0
  assert "while" not in b["kinds"], "a loop's time is counted through its body's ops, once"
  assert set(b["kinds"]) - {"matmul"}, "the elementwise work is an op of its own kind"
  assert b["top"] and all(ms > 0 for _, ms in b["top"])
  m = b["matmuls"]
  assert m["2d"]["gflop"] == pytest.approx(3 * 2 * 256**3 / 1e9) and m["batched"]["gflop"] == 0
  # Every dot is put to an op that has trace events: the fusion or dot that runs it.
  assert m["2d"]["traced_gflop"] == pytest.approx(m["2d"]["gflop"])
  m["2d"].update(traced_gflop=0.1, traced_ms=1.0)
  line = profiling.format_matmuls(m, "step", 2.0, peak=200e9)
  assert "2-D 0.1 GFLOP (at the measured peak 1 ms of its 2 ms; traced: 1 ms, 100 GFLOP/s)" in line
  assert line.endswith("batched 0.0 GFLOP (no trace events)")
  assert "not timed" in profiling.format_matmuls(m, "frame", None, 200e9, untimed=("2d",))
  assert "not counted" in profiling.format_matmuls(None, "step", 2.0, 200e9)


def test_matmul_flops_counts_each_dot_by_kind_and_run():
  """Each dot of the compiled program once per run of the loops around it, 2-D and batched
  apart, a conditional's cheapest branch; None where a loop's trip count is unknown."""
  from genie_jax import profiling  # pylint: disable=import-outside-toplevel
  np_ = jax.numpy

  def program(x, w, q, p):
    def outer(_, c):
      return jax.lax.fori_loop(0, 3, lambda _, c: np_.tanh(c @ w), c)
    y = jax.lax.fori_loop(0, 4, outer, x)
    scores = np_.einsum("bse,bte->bst", q, q)
    z = jax.lax.cond(p > 0, lambda: y @ w, lambda: (y @ w) @ w)
    return z @ w.T, scores

  x, w, q = np_.ones((64, 32)), np_.ones((32, 32)), np_.ones((6, 8, 16))
  text = jax.jit(program).lower(x, w, q, 1.0).compile().as_text()
  per_op = profiling.matmul_flops(text)
  matmul = 2 * 64 * 32 * 32
  assert sum(f["2d"] for f in per_op.values()) == (4 * 3 + 1 + 1) * matmul
  assert sum(f["batched"] for f in per_op.values()) == 2 * 6 * 8 * 8 * 16
  # Each under the op its trace events name: not a fusion's inner dot, not a loop.
  _, body = profiling._parse_hlo(text)  # pylint: disable=protected-access
  fused = {c for instrs in body.values() for _, _, line in instrs
           for c in re.findall(r"calls=%?([\w.\-]+)", line)}
  assert set(per_op) <= {name for c, instrs in body.items() if c not in fused
                         for name, op, _ in instrs if op not in ("while", "conditional")}

  def unknown_trips(x, w):
    return jax.lax.while_loop(lambda c: np_.sum(c) < 1e6, lambda c: c @ w + 1.0, x)

  def dot_in_condition(x, w):
    return jax.lax.while_loop(lambda c: np_.sum(c @ w) < 1e6, lambda c: c + 1.0, x)

  for program in (unknown_trips, dot_in_condition):
    assert profiling.matmul_flops(jax.jit(program).lower(x, w).compile().as_text()) is None
  assert profiling.matmul_flops("not HLO") is None


def test_profile_traces_the_named_train_steps(tmp_path, tiny_data_dir):
  """config.profile writes a jax.profiler trace of exactly the steps it names, each step's
  annotation around the compiled train step, and a resume is not refused for it."""
  import glob  # pylint: disable=import-outside-toplevel

  from genie_jax import profiling  # pylint: disable=import-outside-toplevel

  config = tiny_config(tiny_data_dir, total_steps=5, eval_every_steps=0, images_every_steps=0,
                       **{"profile.start_step": 2, "profile.num_steps": 2})
  config.mesh = dict(data=1, fsdp=1, tensor=1)
  workdir = str(tmp_path / "tok")
  trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])

  profile_dir = os.path.join(workdir, "profile")

  def latest_trace():
    assert glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True)
    events = [e for e in profiling.read_trace_events(profile_dir) if e.get("ph") == "X"]
    steps = {int(e["args"]["step_num"]) for e in events
             if e["name"] == "train" and "step_num" in e.get("args", {})}
    return steps, events

  steps, events = latest_trace()
  assert steps == {3, 4}
  assert any("train_step" in e["name"] for e in events), "the compiled step is in the trace"

  # Resumed from step 5 inside a window of steps 5..7: the rest of the window is traced.
  config.total_steps = 8
  config.profile.start_step, config.profile.num_steps = 4, 3
  trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  assert max(read_metrics(workdir)) == 8
  assert latest_trace()[0] == {6, 7}


@pytest.mark.parametrize("key", ["start_step", "num_steps"])
def test_negative_profile_steps_fail_before_work(tmp_path, key):
  config = tiny_config(str(tmp_path / "data"), **{f"profile.{key}": -1})
  with pytest.raises(ValueError, match=f"config.profile.{key}=-1 must not be negative"):
    trainer.train_and_evaluate(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")
