"""Stage 1 -> 2 -> 3 -> evaluate -> report, chained with tiny configs (genie_jax.pipeline)."""

import copy
import json
import os

import pytest

from configs import genie as genie_config
from genie_jax import pipeline

IMAGE_SIZE, CLIP_LEN = 32, 8


def tiny_pipeline_config(data_dir):
  config = genie_config.get_config("runlocal,size=tiny")
  for stage in pipeline.STAGES:
    c = config[stage]
    c.data.data_dir = data_dir
    c.data.image_size = IMAGE_SIZE
    # The LAM learns on shorter clips than the others, as in runlocal, so that evaluation and
    # generation must read its actions of longer clips in windows.
    clip_len = 4 if stage == "lam" else CLIP_LEN
    c.data.clip_len = clip_len
    c.data.num_train_episodes = 8
    c.data.num_val_episodes = 4
    c.data.episode_len = 40
    c.model.max_frames = clip_len
    if "image_size" in c.model:
      c.model.image_size = IMAGE_SIZE
    c.batch_size = 8
    c.total_steps = 4
    c.log_every_steps = 2
    c.images_every_steps = 4
    c.eval_every_steps = 100  # Evaluated once, by the pipeline.
    c.checkpoint.every_steps = 4
    c.optimizer.warmup_steps = 1
    for eval_cfg in c.evals.values():
      eval_cfg.num_batches = 1
  config.dynamics.evals.controllability.update(maskgit_steps=2, horizon=5)
  config.report.num_batches = 1
  config.report.num_videos = 2
  return config


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_data_dir):
  workdir = str(tmp_path_factory.mktemp("genie"))
  config = tiny_pipeline_config(tiny_data_dir)
  report = pipeline.run_pipeline(config, workdir)
  return workdir, config, report


def test_stages_are_chained_and_the_report_is_written(pipeline_run):
  workdir, _, report = pipeline_run
  for stage in pipeline.STAGES:
    assert os.path.exists(os.path.join(workdir, stage, "eval", "metrics.json")), stage
  with open(os.path.join(workdir, "dynamics", "config.json"), encoding="utf-8") as f:
    dyn_config = json.load(f)
  assert dyn_config["tokenizer_workdir"] == os.path.join(workdir, "tokenizer")
  assert dyn_config["lam_workdir"] == os.path.join(workdir, "lam")

  report_dir = os.path.join(workdir, "report")
  with open(os.path.join(report_dir, "report.json"), encoding="utf-8") as f:
    on_disk = json.load(f)
  assert on_disk["checks"] == report["checks"]
  dyn = report["metrics"]["dynamics"]
  for key in ("masked_accuracy", "masked_accuracy_random_actions", "nmi", "accuracy",
              "dtpsnr", "dtpsnr_true", "psnr_inferred_t5", "ssim_random_t1", "recon_psnr_t1",
              "lam_codebook_usage", "dtpsnr_stderr"):
    assert f"controllability/{key}" in dyn, key
  assert 0.0 <= dyn["controllability/masked_accuracy"] <= 1.0
  assert 0.0 <= dyn["controllability/masked_accuracy_random_actions"] <= 1.0
  # Delta_t PSNR is the difference of the two rollouts' PSNRs, at t = dt = 4.
  assert dyn["controllability/dtpsnr"] == pytest.approx(
      dyn["controllability/psnr_inferred_t4"] - dyn["controllability/psnr_random_t4"])
  assert dyn["controllability/dtpsnr"] == dyn["controllability/dtpsnr_t4"]
  assert dyn["controllability/dtpsnr_stderr"] > 0
  assert report["checks"]["dtpsnr > 2 standard errors"] == (
      dyn["controllability/dtpsnr"] > 2 * dyn["controllability/dtpsnr_stderr"])
  with open(os.path.join(report_dir, "report.md"), encoding="utf-8") as f:
    markdown = f.read()
  assert "Delta_t PSNR" in markdown
  for names in report["pictures"].values():
    for name in names:
      assert os.path.getsize(os.path.join(report_dir, name)) > 0
  assert "dynamics_controllability_dtpsnr_curve.png" in report["pictures"]["dynamics"]
  assert "dynamics_controllability_confusion.png" in report["pictures"]["dynamics"]
  for gifs in report["videos"].values():
    assert len(gifs) == 2
    for gif in gifs:
      assert os.path.getsize(os.path.join(report_dir, gif)) > 0


def test_rerun_skips_finished_stages(pipeline_run):
  workdir, config, _ = pipeline_run
  mtimes = {stage: os.path.getmtime(os.path.join(workdir, stage, "metrics.jsonl"))
            for stage in pipeline.STAGES}
  report = pipeline.run_pipeline(config, workdir)
  assert not any(k.endswith("_train_s") for k in report["timings"])
  for stage in pipeline.STAGES:
    assert os.path.getmtime(os.path.join(workdir, stage, "metrics.jsonl")) == mtimes[stage]


def test_bad_evaluator_settings_name_the_key(tiny_data_dir, tmp_path):
  config = tiny_pipeline_config(tiny_data_dir)
  config.dynamics.evals.controllability.dt = 9
  with pytest.raises(ValueError, match=r"config.evals.controllability.dt=9"):
    pipeline.run_pipeline(config, str(tmp_path))


def test_a_stage_trained_with_another_config_is_refused_before_any_training(pipeline_run,
                                                                            tmp_path):
  workdir, config, _ = pipeline_run
  changed = copy.deepcopy(config)
  changed.lam.model.num_actions = 5
  mtimes = {stage: os.path.getmtime(os.path.join(workdir, stage, "metrics.jsonl"))
            for stage in pipeline.STAGES}
  with pytest.raises(ValueError, match=r"lam.*config.model.num_actions: 6 -> 5"):
    pipeline.run_pipeline(changed, workdir)
  for stage in pipeline.STAGES:
    assert os.path.getmtime(os.path.join(workdir, stage, "metrics.jsonl")) == mtimes[stage]
