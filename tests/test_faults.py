"""Faults in training: kill -9, SIGTERM (preemption), damaged checkpoints, NaN updates.

launch/fault_injection.py runs the end-to-end scenarios in subprocesses (kill -9 at a random
step, SIGTERM at a later one, a truncated file in the latest checkpoint, each followed by a
rerun of the same command) against an uninterrupted reference run; it starts first and runs on
one core while the in-process tests here use the other.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import logging as absl_logging

import data_pipelines
from genie_jax import config_lib
from genie_jax.training import checkpointing
from genie_jax.training import preemption
from genie_jax.training import train_state
from genie_jax.training import trainer
from conftest import REPO, read_metrics, restore_setup, tiny_config

SCRIPT = os.path.join(REPO, "launch", "fault_injection.py")
TOTAL_STEPS = 16
CHECKPOINT_EVERY = 4
TIMEOUT_S = 240


class _Script:
  """launch/fault_injection.py running in the background; `result()` waits for it."""

  def __init__(self, root, data_dir, seed):
    self.root = root
    self.seed = seed
    self.proc = subprocess.Popen(
        [sys.executable, SCRIPT, f"--root={root}", f"--data_dir={data_dir}",
         f"--total_steps={TOTAL_STEPS}", f"--checkpoint_every={CHECKPOINT_EVERY}",
         f"--seed={seed}", f"--timeout={TIMEOUT_S - 40}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    self._out = None

  def result(self):
    if self._out is None:
      self._out, _ = self.proc.communicate(timeout=TIMEOUT_S)
    return self.proc.returncode, self._out

  def stop(self):
    if self.proc.poll() is None:
      os.killpg(self.proc.pid, signal.SIGKILL)
      self.proc.wait()


@pytest.fixture(scope="module")
def fault_script(tmp_path_factory, tiny_data_dir):
  # Data generated here, so that the script's runs do not race to generate it.
  data_pipelines.get_builder(tiny_config(tiny_data_dir).data, prepare=True, process_index=0)
  seed = random.SystemRandom().randrange(10**6)
  script = _Script(str(tmp_path_factory.mktemp("faults")), tiny_data_dir, seed)
  yield script
  script.stop()


# --- Non-finite updates (in process, while the script runs) ---------------------------------


class _PoisonedTask:
  """The task, with a NaN loss (hence NaN gradients) at one (1-based) step."""

  def __init__(self, task, step):
    self._task = task
    self._step = step

  def __getattr__(self, name):
    return getattr(self._task, name)

  def loss(self, model, batch, rng):
    batch = dict(batch)
    step = batch.pop("_step")  # The state's step: 0-based.
    loss, metrics, aux = self._task.loss(model, batch, rng)
    return loss * jnp.where(step + 1 == self._step, jnp.nan, 1.0), metrics, aux


@pytest.fixture
def poison_step(monkeypatch):
  """poison_step(k): training runs get a NaN loss at step k (test-only, by monkeypatch)."""
  make_train_step = train_state.make_train_step

  def poison(k):
    def make(task, spec, seed, nonfinite="stop", microbatches=1):
      inner = make_train_step(_PoisonedTask(task, k), spec, seed, nonfinite, microbatches)
      return lambda state, batch: inner(state, dict(batch, _step=state["step"]))
    monkeypatch.setattr(train_state, "make_train_step", make)

  return poison


def _nan_config(data_dir, **overrides):
  return tiny_config(data_dir, images_every_steps=0, eval_every_steps=0, **overrides)


def test_nonfinite_stop_names_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_data_dir, poison_step, fault_script):
  del fault_script  # Started, to run meanwhile.
  poison_step(5)
  # Logged at 3 and 6, checkpointed at 2 and 4: the NaN of step 5 is found at step 6.
  config = _nan_config(tiny_data_dir, log_every_steps=3, total_steps=6)
  config.checkpoint.every_steps = 2
  workdir = str(tmp_path / "stop")
  with pytest.raises(FloatingPointError, match=r"loss is nan.* at step 5 .*checkpoint is step 4"):
    trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint, read_only=True)
  assert ckpt.all_steps() == [2, 4]
  assert sorted(read_metrics(workdir)) == [3]


def test_nonfinite_skip_drops_the_update_and_counts_it(tmp_path, tiny_data_dir, poison_step):
  poison_step(3)
  config = _nan_config(tiny_data_dir, total_steps=4, nonfinite="skip")
  config.checkpoint.every_steps = 2
  workdir = str(tmp_path / "skip")
  trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  skipped = read_metrics(workdir, "train/skipped_updates")
  assert skipped == {1: 0, 2: 0, 3: 1, 4: 0}
  norms = read_metrics(workdir, "train/param_norm")
  assert norms[3] == norms[2]  # The parameters of step 2, kept as they were.
  assert norms[4] != norms[3]
  assert np.isfinite(read_metrics(workdir)[4])
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint, read_only=True)
  assert ckpt.all_steps() == [2, 4]


def test_bad_nonfinite_setting_fails_before_work(tmp_path, tiny_data_dir):
  config = _nan_config(str(tmp_path / "data"), nonfinite="ignore")
  with pytest.raises(ValueError, match="config.nonfinite='ignore'"):
    trainer.train_and_evaluate(config, str(tmp_path / "work"), devices=jax.devices()[:1])
  assert not os.path.exists(tmp_path / "data")


# --- SIGTERM handling in one process --------------------------------------------------------


def test_sigterm_sets_the_flag_and_the_handler_is_restored():
  previous = signal.getsignal(signal.SIGTERM)
  notice = preemption.PreemptionNotice(manager=None, check_every_steps=10)
  assert not notice.uses_jax_service
  assert not notice.reached(1)
  os.kill(os.getpid(), signal.SIGTERM)  # Handled in this (main) thread: the test lives on.
  assert notice.reached(2)
  notice.close()
  assert signal.getsignal(signal.SIGTERM) is previous


def test_a_handler_installed_outside_python_gives_way_to_the_default(monkeypatch):
  """signal.signal returns None for a handler Python did not install; closing the notice
  then leaves SIGTERM at its default (ending the process), not at the notice's handler."""
  install = signal.signal
  calls = []

  def first_returns_none(signum, handler):
    calls.append(handler)
    old = install(signum, handler)
    return None if len(calls) == 1 else old

  previous = signal.getsignal(signal.SIGTERM)
  monkeypatch.setattr(signal, "signal", first_returns_none)
  try:
    notice = preemption.PreemptionNotice(manager=None, check_every_steps=10)
    assert signal.getsignal(signal.SIGTERM) == notice._on_sigterm  # pylint: disable=protected-access
    notice.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  finally:
    install(signal.SIGTERM, previous)


# --- End to end: kill -9, SIGTERM, a damaged checkpoint (launch/fault_injection.py) ---------


def test_fault_injection_script_loses_nothing(fault_script):
  code, out = fault_script.result()
  print(out)
  assert code == 0, f"seed {fault_script.seed}:\n{out[-4000:]}"
  for line in ("kill9: kill -9 once step", "sigterm: SIGTERM once step",
               "corrupt: truncated checkpoints/", "[ok] sigterm: every process exited with status 0",
               "[ok] kill9: the rerun restored step", "[ok] corrupt: the rerun restored step",
               f"[ok] loss bitwise equal to the uninterrupted run at {TOTAL_STEPS}/{TOTAL_STEPS}",
               "fault_injection: nothing lost"):
    assert line in out, (fault_script.seed, line)
  assert "FAILED" not in out


def test_fault_injection_help():
  proc = subprocess.run([sys.executable, SCRIPT, "-h"], cwd=REPO, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0
  assert "kill9" in proc.stdout and "--scenarios" in proc.stdout
  proc = subprocess.run([sys.executable, SCRIPT, "--scenarios=kill9,flood"], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0 and "flood" in proc.stderr


# --- Damaged checkpoints, in process, on the script's finished reference run ----------------


def _files(directory):
  return sorted(os.path.relpath(os.path.join(d, n), directory)
                for d, _, names in os.walk(directory) for n in names)


@pytest.fixture
def reference_copy(fault_script, tmp_path):
  code, out = fault_script.result()
  assert code == 0, out[-4000:]
  workdir = str(tmp_path / "ref")
  shutil.copytree(os.path.join(fault_script.root, "reference"), workdir)
  return workdir


class _Warnings:
  def __init__(self):
    self.lines = []

  def __call__(self, record):
    if record.levelname == "WARNING":
      self.lines.append(record.getMessage())
    return True


@pytest.fixture
def absl_warnings():
  """Warnings logged through absl (its handler does not propagate to caplog)."""
  warnings = _Warnings()
  logger = absl_logging.get_absl_logger()
  logger.addFilter(warnings)
  yield warnings.lines
  logger.removeFilter(warnings)


def test_damaged_latest_checkpoint_restores_the_previous_and_keeps_it(
    reference_copy, absl_warnings):
  config, spec, iterator = restore_setup(reference_copy)
  ckpt_dir = os.path.join(reference_copy, "checkpoints")
  latest, previous = TOTAL_STEPS, TOTAL_STEPS - CHECKPOINT_EVERY
  step_dir = os.path.join(ckpt_dir, str(latest))
  before = _files(step_dir)
  with open(os.path.join(step_dir, "data", "process_0-of-1.json"), "r+b") as f:
    f.truncate(5)
  # As a save cut short by kill -9 leaves it: Orbax's temporary directory, never a step.
  shutil.copytree(os.path.join(ckpt_dir, str(previous)),
                  os.path.join(ckpt_dir, f"{latest + 1}.orbax-checkpoint-tmp-1"))

  ckpt = checkpointing.Checkpointer(reference_copy, config.checkpoint, config)
  step, state = ckpt.restore(None, spec.abstract, iterator)
  assert step == previous
  assert any(f"Checkpoint {step_dir} cannot be restored" in w for w in absl_warnings), \
      absl_warnings
  # Nothing deleted: renamed out of Orbax's sight so that the run can save that step again.
  aside = [n for n in os.listdir(ckpt_dir) if n.startswith(checkpointing.SET_ASIDE_PREFIX)]
  assert len(aside) == 1 and aside[0].startswith(f"unreadable_step_{latest}_")
  assert _files(os.path.join(ckpt_dir, aside[0])) == before
  assert ckpt.latest_step() == previous
  ckpt.save(latest, state, iterator, force=True)
  ckpt.close()
  assert str(latest) in os.listdir(ckpt_dir)

  # The step restored is the previous checkpoint's, iterator included.
  ckpt = checkpointing.Checkpointer(reference_copy, config.checkpoint, read_only=True)
  _, again = ckpt.restore(previous, spec.abstract)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(again))
  def iterator_state(step):
    with open(os.path.join(ckpt_dir, str(step), "data", "process_0-of-1.json"),
              encoding="utf-8") as f:
      return json.load(f)
  assert iterator_state(latest) == iterator_state(previous)


def test_no_readable_checkpoint_raises_and_renames_nothing(reference_copy):
  config, spec, _ = restore_setup(reference_copy)
  ckpt_dir = os.path.join(reference_copy, "checkpoints")
  for name in os.listdir(ckpt_dir):
    os.remove(os.path.join(ckpt_dir, name, "state", "manifest.ocdbt"))
  before = sorted(os.listdir(ckpt_dir))
  ckpt = checkpointing.Checkpointer(reference_copy, config.checkpoint, config)
  with pytest.raises(RuntimeError, match=r"none of the checkpoints .* can be restored"):
    ckpt.restore(None, spec.abstract)
  ckpt.close()
  assert sorted(os.listdir(ckpt_dir)) == before


def test_read_only_fallback_renames_nothing(reference_copy, absl_warnings):
  config, spec, _ = restore_setup(reference_copy)
  step_dir = os.path.join(reference_copy, "checkpoints", str(TOTAL_STEPS))
  os.remove(os.path.join(step_dir, "state", "_METADATA"))
  ckpt = checkpointing.Checkpointer(reference_copy, config.checkpoint, read_only=True)
  step, _ = ckpt.restore_model(None, {k: spec.abstract[k] for k in ("params", "model_state")})
  assert step == TOTAL_STEPS - CHECKPOINT_EVERY
  assert os.path.isdir(step_dir)
  assert any("Read-only" in w for w in absl_warnings)


def _change_one_parameter_silently(workdir, step, spec, iterator):
  """Rewrites the step's array files with one parameter element changed, as flipped bits
  that every decoder still reads would: the files are well-formed, only a value differs."""
  config = config_lib.load_config(workdir)
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint, read_only=True)
  _, state = ckpt.restore(step, spec.abstract, iterator)
  ckpt.close()
  leaves, treedef = jax.tree.flatten(state["params"])
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].add(1.0)
  state = {**state, "params": jax.tree.unflatten(treedef, leaves)}
  rewritten = os.path.join(workdir, "rewritten")
  with ocp.StandardCheckpointer() as writer:
    writer.save(rewritten, state)
  step_state = os.path.join(workdir, "checkpoints", str(step), "state")
  shutil.rmtree(step_state)
  shutil.copytree(rewritten, step_state)
  shutil.rmtree(rewritten)


@pytest.mark.parametrize("what", ["train_state", "model_only"])
def test_changed_array_bytes_are_caught_and_the_previous_checkpoint_restores(
    reference_copy, absl_warnings, what):
  config, spec, iterator = restore_setup(reference_copy)
  step_dir = os.path.join(reference_copy, "checkpoints", str(TOTAL_STEPS))
  _change_one_parameter_silently(reference_copy, TOTAL_STEPS, spec, iterator)
  ckpt = checkpointing.Checkpointer(reference_copy, config.checkpoint, read_only=True)
  if what == "train_state":
    step, _ = ckpt.restore(None, spec.abstract, iterator)
  else:
    step, _ = ckpt.restore_model(None, {k: spec.abstract[k] for k in ("params", "model_state")})
  ckpt.close()
  assert step == TOTAL_STEPS - CHECKPOINT_EVERY
  assert any(f"Checkpoint {step_dir} cannot be restored (ChecksumMismatchError: {step_dir}: "
             "1 restored array(s) differ" in w for w in absl_warnings), absl_warnings


def test_array_checksums_do_not_depend_on_sharding_and_see_any_one_changed_element():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8, 6, 4)).astype(np.float32)
  tree = {"x": jax.numpy.asarray(x), "i": jax.numpy.arange(7), "key": jax.random.key(3),
          "half": jax.numpy.ones((5,), jax.numpy.bfloat16), "flag": jax.numpy.ones((2,), bool)}
  base = checkpointing.array_checksums(tree)
  mesh = jax.make_mesh((4, 2), ("a", "b"))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
  assert checkpointing.array_checksums({**tree, "x": sharded}) == base
  for index, bit in [((0, 0, 0), 0), ((7, 5, 3), 31), ((3, 2, 1), 17)]:
    y = x.copy()
    y.view(np.uint32)[index] ^= np.uint32(1 << bit)
    assert checkpointing.array_checksums({**tree, "x": jax.numpy.asarray(y)})["['x']"] != \
        base["['x']"], (index, bit)
  swapped = x.copy()
  swapped[0, 0, 0], swapped[0, 0, 1] = x[0, 0, 1], x[0, 0, 0]
  assert checkpointing.array_checksums({**tree, "x": jax.numpy.asarray(swapped)}) != base
  with pytest.raises(checkpointing.ChecksumMismatchError, match=r"where: 1 restored .*\['x'\]"):
    checkpointing.verify_checksums({**tree, "x": jax.numpy.asarray(swapped)}, base, "where")


def test_a_failed_save_names_the_checkpoint_folder(tmp_path):
  cfg = ml_collections.ConfigDict(dict(max_to_keep=2, keep_period=0, async_save=True))
  ckpt = checkpointing.Checkpointer(str(tmp_path), cfg)
  ckpt.save(1, {"x": jnp.ones(3)})
  ckpt.manager.wait_until_finished()
  # The folder is gone under the run and a file stands in its place: the next save cannot
  # create its step folder, which it finds out at once or in the background (then at close).
  folder = os.path.join(str(tmp_path), "checkpoints")
  shutil.rmtree(folder)
  open(folder, "w").close()
  with pytest.raises(NotADirectoryError) as raised:
    try:
      ckpt.save(2, {"x": jnp.ones(3)})
    finally:
      ckpt.close()
  assert any(note.startswith(f"could not write {folder}: a checkpoint save failed")
             for note in getattr(raised.value, "__notes__", [])), raised.value
