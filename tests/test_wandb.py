"""Weights & Biases beside TensorBoard (config.wandb), in offline mode: nothing leaves the
machine, and the run's records are read back from the files W&B writes."""

import glob
import json
import os
import struct

import jax
import pytest

from genie_jax.training import metric_writers
from genie_jax.training import trainer
from conftest import read_metrics
from conftest import tiny_config

_BLOCK = 32768  # W&B's run file: a LevelDB-style log of protobuf records in 32 KiB blocks.
_FILE_HEADER = 7  # ":W&B", magic, version.


def _records(path):
  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel
  data = open(path, "rb").read()
  assert data.startswith(b":W&B")
  pos, pending, records = _FILE_HEADER, b"", []
  while pos + 7 <= len(data):
    left = _BLOCK - pos % _BLOCK
    if left < 7:
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0 and length == 0:  # Zero padding to the block's end.
      pos += left
      continue
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # A whole record, or the last piece of one.
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      records.append(record)
      pending = b""
  return records


def _history(workdir):
  """{step: {key: value}} over every offline W&B run file under the workdir, and the runs'
  (id, group)."""
  history, runs = {}, set()
  for path in sorted(glob.glob(os.path.join(workdir, "wandb", "wandb", "offline-run-*",
                                            "run-*.wandb"))):
    for record in _records(path):
      if record.WhichOneof("record_type") == "run":
        runs.add((record.run.run_id, record.run.run_group))
      if record.WhichOneof("record_type") == "history":
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
               for item in record.history.item}
        history.setdefault(row["_step"], {}).update(row)
  return history, runs


def test_offline_runs_hold_the_metrics_and_a_resume_joins_the_group(tmp_path, tiny_data_dir,
                                                                   monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
  config = tiny_config(tiny_data_dir, total_steps=3,
                       **{"wandb.enabled": True, "wandb.mode": "offline"})
  config.mesh = dict(data=1, fsdp=1, tensor=1)
  workdir = str(tmp_path / "tok")
  trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  config.total_steps = 5
  trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])

  history, runs = _history(workdir)
  # W&B cannot resume an offline run: each job is a run of its own, in the workdir's group.
  label = "/".join(workdir.split("/")[-2:])  # The workdir's last two folders.
  assert len(runs) == 2 and {group for _, group in runs} == {label}
  losses = read_metrics(workdir)
  assert sorted(losses) == [1, 2, 3, 4, 5]
  assert {step: history[step]["train/loss"] for step in losses} == losses
  media = {row[k] for row in history.values() for k in row if k.endswith("/_type")}
  assert media == {"image-file", "video-file"}, media  # Image grids and side-by-side GIFs.


def test_wandb_settings_are_checked_before_any_work(tmp_path, monkeypatch):
  config = tiny_config(str(tmp_path / "data"), **{"wandb.enabled": True,
                                                  "wandb.mode": "cloud"})
  with pytest.raises(ValueError, match="config.wandb.mode='cloud'"):
    trainer.train_and_evaluate(config, str(tmp_path / "w"))
  config.wandb.mode = "offline"
  monkeypatch.setattr(metric_writers.importlib.util, "find_spec",
                      lambda name: None if name == "wandb" else object())
  with pytest.raises(ValueError, match=r"needs the wandb package: pip install wandb=="):
    trainer.train_and_evaluate(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w") and not os.path.exists(tmp_path / "data")
