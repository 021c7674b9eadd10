"""Several JAX processes: 2 processes x 4 CPU devices train and checkpoint; the checkpoint then
continues in 1 process x 8 devices and in 1 process x 1 device with the losses of an
uninterrupted 1-process run.

The 2-process job runs through launch/multiprocess_local.py and genie_jax.cli.train (coordinator on
127.0.0.1, gloo collectives), with images and an evaluation at its last step, so the
process-0-only writing is exercised too. Subprocesses run while this process trains the
reference (and one continuation), to use both cores; every one has a timeout and is killed on
any failure.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags

import data_pipelines
from genie_jax import distributed
from genie_jax.training import checkpointing
from genie_jax.training import trainer
from conftest import REPO, read_metrics, tiny_config
from launch import multiprocess_local

FIRST_STEPS = 2  # Trained by 2 processes, checkpointed at the end.
TOTAL_STEPS = 4  # Continued in 1 process.
TIMEOUT_S = 240


def _main_flags(data_dir, workdir, **overrides):
  """genie_jax.cli.train flags giving tiny_config(data_dir, **overrides) in `workdir`."""
  values = {
      "data.data_dir": data_dir, "data.image_size": 32, "data.clip_len": 8,
      "data.num_train_episodes": 8, "data.num_val_episodes": 4, "data.episode_len": 40,
      "model.image_size": 32, "model.max_frames": 8, "batch_size": 8, "log_every_steps": 1,
      "evals.reconstruction.num_batches": 1, "checkpoint.max_to_keep": 5,
      "optimizer.warmup_steps": 2, **overrides}
  return (["--config=configs/tokenizer.py:size=tiny,runlocal", f"--workdir={workdir}"] +
          [f"--config.{k}={v}" for k, v in values.items()])


# Images and evaluations are checked in the 2-process run; the other runs skip them for time.
CONTINUATION = {"total_steps": TOTAL_STEPS, "images_every_steps": 0, "eval_every_steps": 0,
                "checkpoint.every_steps": FIRST_STEPS}


@contextlib.contextmanager
def _started(argv, **env):
  """Runs argv in the background; yields a function waiting for it (returns its output)."""
  proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                          start_new_session=True)

  def wait():
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, out[-6000:]
    return out

  try:
    yield wait
  finally:
    if proc.poll() is None:
      # SIGTERM first: the launcher then kills its own processes.
      os.killpg(proc.pid, signal.SIGTERM)
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_two_processes_checkpoint_continues_in_one(tmp_path, tiny_data_dir):
  # Generated here, so that the 2-process run spends its time training.
  data_pipelines.get_builder(tiny_config(tiny_data_dir).data, prepare=True, process_index=0)
  two = str(tmp_path / "two_processes")
  reference = str(tmp_path / "reference")
  with _started([sys.executable, "launch/multiprocess_local.py", "--num_processes=2",
                 "--devices_per_process=4", f"--timeout={TIMEOUT_S - 20}",
                 f"--log_dir={tmp_path / 'logs'}", "--",
                 *_main_flags(tiny_data_dir, two, total_steps=FIRST_STEPS,
                              images_every_steps=FIRST_STEPS, eval_every_steps=FIRST_STEPS,
                              **{"checkpoint.every_steps": FIRST_STEPS})]) as wait:
    # Meanwhile, the uninterrupted run: 1 process, 8 devices.
    trainer.train_and_evaluate(tiny_config(tiny_data_dir, **CONTINUATION), reference)
    wait()
  expected = read_metrics(reference)
  assert sorted(expected) == list(range(1, TOTAL_STEPS + 1))
  saved = sorted(os.listdir(os.path.join(two, "checkpoints", str(FIRST_STEPS), "data")))
  assert saved == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  images = os.listdir(os.path.join(two, "images"))
  assert any(name.startswith("train_") for name in images)
  assert any(name.startswith("reconstruction_") for name in images)
  # The 2-process steps already match: the global batches do not depend on the process count.
  first = read_metrics(two)
  assert sorted(first) == list(range(1, FIRST_STEPS + 1))
  np.testing.assert_allclose([first[s] for s in sorted(first)],
                             [expected[s] for s in sorted(first)], rtol=2e-5)

  # Continued by genie_jax.cli.train in 1 process x 1 device, and here in 1 process x 8 devices.
  one_device, eight_devices = str(tmp_path / "one_device"), str(tmp_path / "eight_devices")
  shutil.copytree(two, one_device)
  shutil.copytree(two, eight_devices)
  with _started([sys.executable, "-m", "genie_jax.cli.train",
                 *_main_flags(tiny_data_dir, one_device, **CONTINUATION)],
                JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=1") as wait:
    trainer.train_and_evaluate(tiny_config(tiny_data_dir, **CONTINUATION), eight_devices,
                             devices=jax.devices())
    out = wait()
  assert "over 1 devices in 1 processes" in out
  for workdir in (one_device, eight_devices):
    losses = read_metrics(workdir)
    assert sorted(losses) == list(range(1, TOTAL_STEPS + 1)), workdir
    continued = range(FIRST_STEPS + 1, TOTAL_STEPS + 1)
    np.testing.assert_allclose([losses[s] for s in continued], [expected[s] for s in continued],
                               rtol=2e-5, err_msg=workdir)


def _flag_value(value):
  return "nan" if value is None else value


def test_two_process_pipeline_trains_evaluates_and_generates(tmp_path, tiny_data_dir):
  """genie_jax.cli.pipeline (three stages, evaluate, generate, report) as one 2-process job, then
  genie_jax.cli.evaluate of its dynamics stage in 1 process against the job's evaluation."""
  import conftest  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "genie")
  overrides = conftest.tiny_pipeline_overrides(tiny_data_dir)
  launcher = [sys.executable, "launch/multiprocess_local.py", "--num_processes=2",
              "--devices_per_process=2", f"--timeout={TIMEOUT_S - 20}"]
  with _started(launcher + [f"--log_dir={tmp_path / 'logs'}", "--module=genie_jax.cli.pipeline",
                            "--", "--config=configs/genie.py:runlocal,size=tiny",
                            f"--workdir={workdir}"] +
                [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()]) as wait:
    wait()
  with open(os.path.join(workdir, "report", "report.json"), encoding="utf-8") as f:
    report = json.load(f)
  assert all(report["checks"].values()), report["checks"]
  for gifs in report["videos"].values():
    assert len(gifs) == 2 and all(os.path.getsize(os.path.join(workdir, "report", g)) > 0
                                  for g in gifs)

  # The same 4 devices as 1 process x 4 against the pipeline's evaluation in 2 processes x 2
  # (one batch, as report.num_batches): each device then computes the same rows, so the
  # metrics must agree (an untrained model's codes sit near ties, which other device counts'
  # reduction orders could flip).
  assert "Process 1 of 2" in (tmp_path / "logs" / "process_1.log").read_text()
  dynamics = os.path.join(workdir, "dynamics")
  with _started([sys.executable, "-m", "genie_jax.cli.evaluate", f"--workdir={dynamics}",
                 "--num_batches=1", f"--out={tmp_path / 'eval1'}"], JAX_PLATFORMS="cpu",
                XLA_FLAGS=multiprocess_local.cpu_xla_flags(4)) as wait_one:
    wait_one()
  results = {}
  for name, folder in (("eval1", tmp_path / "eval1"), ("eval2", os.path.join(dynamics, "eval"))):
    with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as f:
      results[name] = json.load(f)
  assert results["eval2"].keys() == results["eval1"].keys()
  for key, value in results["eval1"].items():
    np.testing.assert_allclose(results["eval2"][key], value, rtol=1e-4, atol=1e-5, err_msg=key)


# --- Small pieces ---------------------------------------------------------------------------


def test_iterator_state_of_another_process_count(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), tiny_config("").checkpoint)
  data_dir = tmp_path / "checkpoints" / "5" / "data"
  data_dir.mkdir(parents=True)
  for p in range(2):
    (data_dir / f"process_{p}-of-2.json").write_text(json.dumps({"next_index": 7}))
  assert ckpt._iterator_state_of_other_process_count(5) == {"next_index": 7}
  (data_dir / "process_1-of-2.json").write_text(json.dumps({"next_index": 8}))
  with pytest.raises(ValueError, match=r"process_0-of-1.json.*differ.*process count"):
    ckpt._iterator_state_of_other_process_count(5)
  (data_dir / "process_0-of-1.json").write_text(json.dumps({"next_index": 3}))
  assert ckpt._iterator_state_of_other_process_count(5) is None  # Grain reads its own file.
  ckpt.close()


@pytest.mark.parametrize("kwargs,message", [
    (dict(coordinator_address="127.0.0.1:1234", process_id=0), "needs --num_processes"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2),
     "--process_id=2 must be in"),
    (dict(num_processes=2, process_id=0), "need --coordinator_address"),
])
def test_bad_coordinator_settings_fail_before_jax(kwargs, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize(**kwargs)


def test_cluster_detection_from_environment(monkeypatch):
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
               "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  assert not distributed.cluster_detected()
  monkeypatch.setenv("SLURM_NTASKS", "1")  # One task: nothing to join.
  assert not distributed.cluster_detected()
  monkeypatch.setenv("SLURM_NTASKS", "16")
  assert distributed.cluster_detected()
  monkeypatch.delenv("SLURM_NTASKS")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
  assert distributed.cluster_detected()


@pytest.mark.parametrize("argv,env,expected", [
    ([], {}, None),  # A plain single-process run joins nothing.
    (["--coordinator_address=127.0.0.1:5", "--num_processes=2", "--process_id=1"], {},
     ("127.0.0.1:5", 2, 1)),
    ([], {"GENIE_COORDINATOR": "h:6", "GENIE_NUM_PROCESSES": "4", "GENIE_PROCESS_ID": "3"},
     ("h:6", 4, 3)),
    (["--process_id=0"], {"GENIE_COORDINATOR": "h:6", "GENIE_NUM_PROCESSES": "4",
                          "GENIE_PROCESS_ID": "3"}, ("h:6", 4, 0)),  # Flags win.
    (["--distributed=no"], {"GENIE_COORDINATOR": "h:6"}, None),
    (["--distributed=yes"], {}, (None, None, None)),  # JAX auto-detects TPU pods, SLURM.
    ([], {"SLURM_NTASKS": "8"}, (None, None, None)),
])
def test_initialize_from_flags_and_environment(monkeypatch, argv, env, expected):
  for name in ("GENIE_COORDINATOR", "GENIE_NUM_PROCESSES", "GENIE_PROCESS_ID", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  calls = []
  monkeypatch.setattr(distributed, "initialize", lambda *args: calls.append(args))
  flag_values = flags.FlagValues()
  distributed.define_flags(flag_values)
  flag_values(["main"] + argv)
  assert distributed.initialize_from_flags(flag_values) == (expected is not None)
  assert calls == ([expected] if expected else [])
