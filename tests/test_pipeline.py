"""Stage 1 -> 2 -> 3 -> evaluate -> report, chained with tiny configs (genie_jax.cli.pipeline)."""

import copy
import json
import os

import pytest

from configs import genie as genie_config
from genie_jax import tasks
from genie_jax.training import pipeline
from conftest import STAGES, tiny_pipeline_config

@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_data_dir):
  workdir = str(tmp_path_factory.mktemp("genie"))
  config = tiny_pipeline_config(tiny_data_dir)
  report = pipeline.run_pipeline(config, workdir)
  return workdir, config, report


def test_stages_are_chained_and_the_report_is_written(pipeline_run):
  workdir, _, report = pipeline_run
  for stage in STAGES:
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
  for name in ("noop", "left", "right", "up", "down"):
    assert dyn[f"controllability/plurality_latent_{name}"] in range(-1, 6), name
  # The thresholds set, and only those, are checked (and cannot fail here).
  assert report["checks"] == {
      "dtpsnr >= -100 dB": True, "nmi >= 0": True, "dtpsnr_true >= -100 dB": True,
      **{f"recon_psnr_t1 - psnr_inferred_t{k} <= 100 dB": True for k in range(1, 5)}}
  assert on_disk["check_details"]["dtpsnr >= -100 dB"] == dict(
      measured=f"dtpsnr = {dyn['controllability/dtpsnr']:.4g} dB",
      config="config.report.min_dtpsnr")
  with open(os.path.join(report_dir, "report.md"), encoding="utf-8") as f:
    markdown = f.read()
  assert "Delta_t PSNR" in markdown
  assert "- nmi >= 0: **PASS** (nmi = " in markdown
  for names in report["pictures"].values():
    for name in names:
      assert os.path.getsize(os.path.join(report_dir, name)) > 0
  assert "dynamics_controllability_dtpsnr_curve.png" in report["pictures"]["dynamics"]
  assert "dynamics_controllability_confusion.png" in report["pictures"]["dynamics"]
  for gifs in report["videos"].values():
    assert len(gifs) == 2
    for gif in gifs:
      assert os.path.getsize(os.path.join(report_dir, gif)) > 0


def test_rerun_skips_finished_stages_and_a_missed_threshold_fails_the_command(pipeline_run):
  # One rerun for both (evaluating and generating again is most of this file's time).
  workdir, config, _ = pipeline_run
  mtimes = {stage: os.path.getmtime(os.path.join(workdir, stage, "metrics.jsonl"))
            for stage in STAGES}
  report_json = os.path.join(workdir, "report", "report.json")
  os.remove(report_json)
  strict = copy.deepcopy(config)
  # The built-in world's targets, and a Delta_t PSNR no 4-step model reaches.
  strict.report.update(genie_config.get_config().report)
  strict.report.min_dtpsnr = 50.0
  with pytest.raises(SystemExit) as failed:
    pipeline.run_and_check(strict, workdir)
  message = str(failed.value.code)  # A string code: the process exits with status 1.
  assert "dtpsnr >= 50 dB: dtpsnr = " in message
  assert "(set by config.report.min_dtpsnr)" in message
  assert "config.report.fail_on_check=False" in message

  # The whole report was written first, with the failed check and what it measured.
  with open(report_json, encoding="utf-8") as f:
    report = json.load(f)
  assert report["checks"]["dtpsnr >= 50 dB"] is False
  dtpsnr = report["metrics"]["dynamics"]["controllability/dtpsnr"]
  assert report["check_details"]["dtpsnr >= 50 dB"]["measured"] == f"dtpsnr = {dtpsnr:.4g} dB"
  assert "dtpsnr_stderr < 0.2 x dtpsnr" in report["checks"]
  assert "plurality latent actions of noop, left, right, up, down all differ" in report["checks"]
  for name, passed in report["checks"].items():
    assert (f"{name}: " in message) == (not passed), name
  assert report["videos"] and report["pictures"]

  assert not any(k.endswith("_train_s") for k in report["timings"])
  for stage in STAGES:
    assert os.path.getmtime(os.path.join(workdir, stage, "metrics.jsonl")) == mtimes[stage]


def _report(checks):
  return dict(checks={name: passed for name, passed in checks.items()},
              check_details={name: dict(measured=f"measured {name}", config=f"config.report.{name}")
                             for name in checks})


def test_the_command_exits_only_when_a_check_fails_and_fail_on_check(monkeypatch, tmp_path):
  config = genie_config.get_config()
  reports = []
  monkeypatch.setattr(pipeline, "run_pipeline", lambda config, workdir: reports[-1])
  reports.append(_report(dict(a=True, b=True)))
  assert pipeline.run_and_check(config, str(tmp_path)) is reports[-1]
  reports.append(_report(dict(a=True, b=False)))
  with pytest.raises(SystemExit, match=r"1 of the report's 2 checks failed.*\n  b: measured b "
                                       r"\(set by config.report.b\)"):
    pipeline.run_and_check(config, str(tmp_path))
  config.report.fail_on_check = False
  assert pipeline.run_and_check(config, str(tmp_path)) is reports[-1]


def _metrics(**values):
  return dict(dynamics={f"controllability/{k}": v for k, v in values.items()})


def test_checks_read_the_thresholds_and_none_or_nan_switches_one_off():
  report = genie_config.get_config().report
  metrics = _metrics(dtpsnr=1.2, dtpsnr_stderr=0.2, dtpsnr_t1=0.5, dtpsnr_t2=-0.1,
                     nmi=0.6, recon_psnr_t1=30.0, psnr_inferred_t1=29.0, psnr_inferred_t2=27.5,
                     psnr_inferred_t3=28.0, psnr_inferred_t4=28.5)
  checks = {c.name: c.passed for c in pipeline.evaluate_checks(metrics, report)}
  assert checks == {
      "dtpsnr >= 1 dB": True,
      "dtpsnr_stderr < 0.2 x dtpsnr": True,  # 0.2 < 0.24.
      "Delta_t PSNR > 0 at every t = 1..2": False,
      "nmi >= 0.5": True,
      # No plurality metrics and no dtpsnr_true: those checks are left out.
      "recon_psnr_t1 - psnr_inferred_t1 <= 2 dB": True,
      "recon_psnr_t1 - psnr_inferred_t2 <= 2 dB": False,
      "recon_psnr_t1 - psnr_inferred_t3 <= 2 dB": True,
      "recon_psnr_t1 - psnr_inferred_t4 <= 2 dB": True}
  report.update(dict(min_dtpsnr=None, max_dtpsnr_stderr_fraction=float("nan"),
                     require_positive_curve=False, min_nmi=0.7, rollout_gap_frames=0))
  checks = {c.name: c.passed for c in pipeline.evaluate_checks(metrics, report)}
  assert checks == {"nmi >= 0.7": False}
  # Without true actions (no NMI), no check against them; a missing metric fails.
  report.min_dtpsnr = 1.0
  checks = pipeline.evaluate_checks(_metrics(), report)
  assert [(c.name, c.passed, c.measured) for c in checks] == [
      ("dtpsnr >= 1 dB", False, "dtpsnr = missing")]


@pytest.mark.parametrize("key, value, message", [
    ("min_nmi", "high", r"config.report.min_nmi='high' must be a number, or None / nan"),
    ("max_dtpsnr_stderr_fraction", 0.0, r"config.report.max_dtpsnr_stderr_fraction=0.0 must "
                                        r"be positive"),
    ("rollout_gap_frames", 6, r"config.report.rollout_gap_frames=6 exceeds the rollouts' "
                              r"horizon 5 \(config.dynamics.evals.controllability.horizon"),
    ("rollout_gap_frames", -1, r"config.report.rollout_gap_frames=-1 must be an int >= 0"),
    ("require_positive_curve", "yes", r"config.report.require_positive_curve='yes' must be "
                                      r"True or False"),
    ("distinct_true_actions", ["noop"], r"config.report.distinct_true_actions=\['noop'\]"),
])
def test_bad_report_settings_name_the_key_before_any_training(tiny_data_dir, tmp_path, key,
                                                               value, message):
  config = tiny_pipeline_config(tiny_data_dir)
  # A key set to None takes a value of any type (ConfigDict checks the others' types).
  config.report[key] = None
  config.report[key] = value
  with pytest.raises(ValueError, match=message):
    pipeline.run_pipeline(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_bad_evaluator_settings_name_the_key(tiny_data_dir, tmp_path):
  config = tiny_pipeline_config(tiny_data_dir)
  config.dynamics.evals.controllability.dt = 9
  with pytest.raises(ValueError, match=r"config.dynamics.evals.controllability.dt=9"):
    pipeline.run_pipeline(config, str(tmp_path))


def test_the_dynamics_config_is_checked_before_the_first_stage_trains(tiny_data_dir, tmp_path):
  config = tiny_pipeline_config(tiny_data_dir)
  # Its sizes come from the tokenizer and LAM sections, before either is trained.
  config.dynamics.model.num_codes = 7
  with pytest.raises(ValueError, match=r"config.dynamics.model.num_codes=7 differs from "
                                       f"{config.tokenizer.model.num_codes}"):
    pipeline.run_pipeline(config, str(tmp_path))
  config.dynamics.model.num_codes = 0
  config.dynamics.mask_rate_per = "batch"
  with pytest.raises(ValueError, match=r"config.dynamics.mask_rate_per='batch'"):
    pipeline.run_pipeline(config, str(tmp_path))
  assert not os.listdir(tmp_path)


class _Builds(tasks.Task):
  """A stand-in stage that builds on the stage named by its subclass."""

  def make_model(self, rngs):
    raise NotImplementedError

  def loss(self, model, batch, rng):
    raise NotImplementedError


def test_stages_train_after_the_stages_they_build_on(monkeypatch):
  assert pipeline.stage_names(genie_config.get_config("runlocal")) == [
      "tokenizer", "lam", "dynamics"]
  order = tasks.stage_order(dict(dynamics="dynamics", lam="lam", tokenizer="tokenizer"))
  assert order.index("dynamics") > max(order.index("lam"), order.index("tokenizer"))
  with pytest.raises(ValueError, match="stage 'dynamics' builds on a 'lam' stage, which is "
                                       "not among"):
    tasks.stage_order(dict(tokenizer="tokenizer", dynamics="dynamics"))

  builds_on = dict(a=("b",), b=("c",), c=("a",), d=())
  classes = {name: type(name, (_Builds,), dict(depends_on=tuple(
      tasks.Dependency(dep, dep) for dep in deps))) for name, deps in builds_on.items()}
  monkeypatch.setattr(tasks, "task_class", classes.__getitem__)
  with pytest.raises(ValueError, match="stages a -> b -> c -> a build on each other"):
    tasks.stage_order(dict(a="a", b="b", c="c"))
  classes["c"].depends_on = ()
  assert tasks.stage_order(dict(d="d", a="a", b="b", c="c")) == ["d", "c", "b", "a"]


def test_a_stage_trained_with_another_config_is_refused_before_any_training(pipeline_run,
                                                                            tmp_path):
  workdir, config, _ = pipeline_run
  changed = copy.deepcopy(config)
  changed.lam.model.num_actions = 5
  mtimes = {stage: os.path.getmtime(os.path.join(workdir, stage, "metrics.jsonl"))
            for stage in STAGES}
  with pytest.raises(ValueError, match=r"lam.*config.lam.model.num_actions: 6 -> 5"):
    pipeline.run_pipeline(changed, workdir)
  for stage in STAGES:
    assert os.path.getmtime(os.path.join(workdir, stage, "metrics.jsonl")) == mtimes[stage]


def test_runlocal_is_one_recipe_and_video_dir_reaches_every_stage():
  builtin = genie_config.get_config("runlocal")
  videos = genie_config.get_config("runlocal,data=video_folder,video_dir=/some/videos")
  for stage in STAGES:
    assert videos[stage].data.video_dir == "/some/videos"
    assert builtin[stage].data.video_dir == ""
    # Only what follows from the frame size differs between datasets.
    assert videos[stage].total_steps == builtin[stage].total_steps
  assert videos.tokenizer.model.num_codes == builtin.tokenizer.model.num_codes == 64
  assert videos.tokenizer.model.encoder_context == "patch"
  assert videos.lam.model.num_actions == builtin.lam.model.num_actions == 8
  assert (videos.lam.model.patch_size, builtin.lam.model.patch_size) == (16, 8)
  full_size = genie_config.get_config("data=video_folder,video_dir=/some/videos")
  assert all(full_size[stage].data.video_dir == "/some/videos" for stage in STAGES)
