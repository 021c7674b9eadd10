"""Ahead-of-time compilation of a train step for other devices, with an HBM verdict."""

import os
import subprocess
import sys

import jax
import pytest

from configs import lam as lam_config
from configs import tokenizer as tokenizer_config
from genie_jax import config_lib
from genie_jax.training import aot
from conftest import REPO, tiny_config

# A folder holding the libtpu wheel (pip install --no-deps --target DIR "libtpu==0.0.42.*"),
# kept out of the test environment: with libtpu importable, jax looks for a TPU at start-up.
# .ci/run installs it and sets this.
LIBTPU_DIR = os.environ.get("GENIE_LIBTPU_DIR", "")


def test_compile_for_devices_reports_memory_and_fit():
  # The 8 fake CPU devices stand in for a topology: the same path as a TPU's compile-only
  # devices, without libtpu.
  config = tiny_config("")
  config.mesh = dict(data=2, fsdp=2, tensor=2)
  report = aot.compile_for(config, jax.devices(), hbm_bytes=2**40)
  assert report.mesh == dict(data=2, fsdp=2, tensor=2)
  assert 0 < report.peak_bytes < 2**40
  assert report.fits
  small = aot.AotReport(report.mesh, report.device_kind, report.stats,
                        hbm_bytes=report.peak_bytes / 2)
  assert small.fits is False and "DOES NOT FIT" in small.summary()


def test_config_checks_run_before_compiling():
  config = tiny_config("", batch_size=12)
  with pytest.raises(ValueError, match="config.batch_size=12"):
    aot.compile_for(config, jax.devices())


def test_rollout_compiles_for_devices_with_shapes_only(tmp_path):
  config = _tiny_dynamics_config(tmp_path)
  report = aot.compile_rollout_for(config, jax.devices()[:4], batch_size=4, hbm_bytes=2**40)
  assert report.mesh == {"batch": 4} and report.fits
  with pytest.raises(ValueError, match="a rollout needs a dynamics config"):
    aot.compile_rollout_for(tiny_config(""), jax.devices()[:4])


def _tiny_stage_workdirs(tmp_path):
  """Workdirs holding only the config.json of a tiny tokenizer and LAM: what the dynamics
  task reads its sizes from (compiling needs no weights)."""
  dirs = {}
  for name, module in (("tokenizer", tokenizer_config), ("lam", lam_config)):
    dirs[name] = str(tmp_path / name)
    config_lib.save_config(dirs[name], module.get_config("size=tiny,runlocal"))
  return dirs


def _tiny_dynamics_config(tmp_path):
  from configs import dynamics as dynamics_config  # pylint: disable=g-import-not-at-top
  dirs = _tiny_stage_workdirs(tmp_path)
  return dynamics_config.get_config(
      f"size=tiny,runlocal,tokenizer_workdir={dirs['tokenizer']},lam_workdir={dirs['lam']}")


@pytest.mark.skipif(not os.path.isdir(os.path.join(LIBTPU_DIR, "libtpu")),
                    reason="set GENIE_LIBTPU_DIR to a folder with the libtpu wheel installed "
                           "(pip install --no-deps --target DIR; .ci/run does)")
def test_every_stage_and_the_rollout_lower_for_a_tpu_topology(tmp_path):
  """genie_jax.cli.aot with libtpu, one process per stage side by side: a change that breaks
  lowering for TPU (an op, a sharding, a Pallas kernel) fails here, without a TPU."""
  dirs = _tiny_stage_workdirs(tmp_path)
  configs = {
      "tokenizer": "configs/tokenizer.py:size=tiny,runlocal",
      "lam": "configs/lam.py:size=tiny,runlocal",
      "dynamics": (f"configs/dynamics.py:size=tiny,runlocal,tokenizer_workdir="
                   f"{dirs['tokenizer']},lam_workdir={dirs['lam']}"),
  }
  # libtpu otherwise asks the Cloud metadata server what it runs on.
  env = {**os.environ, "PYTHONPATH": LIBTPU_DIR, "JAX_PLATFORMS": "cpu",
         "TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4",
         "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0",
         # Side by side, not one at a time behind libtpu's lockfile.
         "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  env.pop("XLA_FLAGS", None)
  procs = {
      stage: subprocess.Popen(
          [sys.executable, "-m", "genie_jax.cli.aot", f"--config={config}", "--topology=v5e:2x2",
           "--config.mesh.data=4", "--config.batch_size=8", "--evaluators"] +
          (["--rollout"] if stage == "dynamics" else []),
          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for stage, config in configs.items()}
  # Two slices joined by DCN (aot.topology_devices' multi-slice devices), data across them.
  two_slices = subprocess.Popen(
      [sys.executable, "-m", "genie_jax.cli.aot", f"--config={configs['tokenizer']}",
       "--topology=v5e:2x2", "--num_slices=2", "--config.mesh.data=1", "--config.mesh.fsdp=2",
       "--config.mesh.tensor=2", "--config.mesh_dcn.data=2", "--config.batch_size=8"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  out, _ = two_slices.communicate(timeout=600)
  assert two_slices.returncode == 0, out[-4000:]
  assert "tokenizer on v5e:2x2 x 2 slice(s), 8 devices" in out and "TPU v5 lite" in out, out
  assert "-> FITS" in out, out
  for stage, proc in procs.items():
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert f"{stage} on v5e:2x2 x 1 slice(s), 4 devices" in out and "TPU v5 lite" in out, out
    assert "-> FITS" in out, out
    evaluator_lines = [l for l in out.splitlines() if l.startswith("evaluator ")]
    # One evaluator per stage (reconstruction, latent_actions, controllability), two
    # per-batch functions each.
    assert len(evaluator_lines) == 2, out
    assert all("on v5e:2x2 x 1 slice(s), 4 devices" in l and "TPU v5 lite" in l
               for l in evaluator_lines), out
  assert "rollout on v5e:2x2 x 1 slice(s), 4 devices: mesh {'batch': 4} on TPU v5 lite" in out


def test_evaluators_compile_for_devices_with_shapes_only(tmp_path):
  # Every stage's evaluators on a data x fsdp x tensor mesh of the 8 fake devices.
  for config in (tiny_config(""), _tiny_dynamics_config(tmp_path)):
    config.mesh = dict(data=2, fsdp=2, tensor=2)
    config.batch_size = 4
    for eval_cfg in config.evals.values():
      eval_cfg.batch_size = 4
    reports = aot.compile_evaluators_for(config, jax.devices(), hbm_bytes=2**40)
    if config.stage == "dynamics":
      expected = {"controllability": ["infer_actions", "rollouts"]}
    else:
      expected = {name: ["stats", "predict"] for name in config.evals}
    assert sorted(reports) == sorted(f"{e}/{f}" for e, fs in expected.items() for f in fs)
    for report in reports.values():
      assert report.mesh == dict(data=2, fsdp=2, tensor=2) and report.fits
