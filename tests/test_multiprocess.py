"""Several JAX processes: 2 processes x 4 CPU devices train and checkpoint; the checkpoint then
continues in 1 process x 8 devices and in 1 process x 1 device with the losses of an
uninterrupted 1-process run.

The 2-process job runs through launch/multiprocess_local.py and genie_jax.main (coordinator on
127.0.0.1, gloo collectives), with images and an evaluation at its last step, so the
process-0-only writing is exercised too.
"""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np

import data_pipelines
from genie_jax import train
from test_train import REPO, read_metrics, tiny_config

FIRST_STEPS = 2  # Trained by 2 processes, checkpointed at the end.
TOTAL_STEPS = 4  # Continued in 1 process.


def _main_flags(config, workdir):
  """genie_jax.main flags giving `config` (a tiny_config) in `workdir`."""
  overrides = {
      "data.data_dir": config.data.data_dir, "data.image_size": 32, "data.clip_len": 8,
      "data.num_train_episodes": 8, "data.num_val_episodes": 4, "data.episode_len": 40,
      "model.image_size": 32, "model.max_frames": 8, "batch_size": 8,
      "total_steps": FIRST_STEPS, "log_every_steps": 1, "images_every_steps": FIRST_STEPS,
      "eval_every_steps": FIRST_STEPS, "evals.reconstruction.num_batches": 1,
      "checkpoint.every_steps": FIRST_STEPS, "checkpoint.max_to_keep": 5,
      "optimizer.warmup_steps": 2,
  }
  return (["--config=configs/tokenizer.py:size=tiny,runlocal", f"--workdir={workdir}"] +
          [f"--config.{k}={v}" for k, v in overrides.items()])


def _continuation_config(data_dir):
  # Images and evaluations were checked in the 2-process run; they are skipped here for time.
  return tiny_config(data_dir, total_steps=TOTAL_STEPS, images_every_steps=0,
                     eval_every_steps=0, **{"checkpoint.every_steps": FIRST_STEPS})


def test_two_processes_checkpoint_continues_in_one(tmp_path, tiny_data_dir):
  data_config = _continuation_config(tiny_data_dir)
  # Generated here, so that the 2-process run spends its time training.
  data_pipelines.get_builder(data_config.data, prepare=True, process_index=0)
  two = str(tmp_path / "two_processes")
  proc = subprocess.run(
      [sys.executable, "launch/multiprocess_local.py", "--num_processes=2",
       "--devices_per_process=4", "--timeout=240", f"--log_dir={tmp_path / 'logs'}", "--",
       *_main_flags(data_config, two)],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-6000:]
  saved = sorted(os.listdir(os.path.join(two, "checkpoints", str(FIRST_STEPS), "data")))
  assert saved == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  images = os.listdir(os.path.join(two, "images"))
  assert any(name.startswith("train_") for name in images)
  assert any(name.startswith("reconstruction_") for name in images)

  # The uninterrupted run: 1 process, 8 devices.
  reference = str(tmp_path / "reference")
  train.train_and_evaluate(_continuation_config(tiny_data_dir), reference)
  expected = read_metrics(reference)
  assert sorted(expected) == list(range(1, TOTAL_STEPS + 1))

  # The 2-process steps already match: the global batches do not depend on the process count.
  first = read_metrics(two)
  assert sorted(first) == list(range(1, FIRST_STEPS + 1))
  np.testing.assert_allclose([first[s] for s in sorted(first)],
                             [expected[s] for s in sorted(first)], rtol=2e-5)

  for name, devices in (("one_process_8_devices", jax.devices()),
                        ("one_process_1_device", jax.devices()[:1])):
    workdir = str(tmp_path / name)
    shutil.copytree(two, workdir)
    train.train_and_evaluate(_continuation_config(tiny_data_dir), workdir, devices=devices)
    losses = read_metrics(workdir)
    assert sorted(losses) == list(range(1, TOTAL_STEPS + 1)), name
    continued = range(FIRST_STEPS + 1, TOTAL_STEPS + 1)
    np.testing.assert_allclose([losses[s] for s in continued], [expected[s] for s in continued],
                               rtol=2e-5, err_msg=name)
