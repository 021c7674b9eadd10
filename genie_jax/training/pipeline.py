"""Trains and evaluates a whole Genie: tokenizer, LAM, dynamics; then writes a report. The
command: genie_jax/cli/pipeline.py.

Stages train in WORKDIR/tokenizer, WORKDIR/lam and WORKDIR/dynamics through the shared
trainer, exactly as `genie_jax.cli.train` would train them one by one (so each can be resumed,
evaluated, or retrained alone). Running the same command again resumes: a finished stage is
not retrained, an interrupted one continues from its last checkpoint, and a stage workdir
trained with another config (other than the keys a resume may change, such as total_steps)
is refused with the keys that differ, before anything trains. Then every stage is
evaluated (`genie_jax.cli.evaluate`), rollouts are written as GIFs (`genie_jax.cli.generate`), and
WORKDIR/report/ receives report.md, report.json and the pictures.

The report checks the metrics against the thresholds of `config.report` (configs/genie.py:
Delta_t PSNR and its standard error, the Delta_t PSNR curve, NMI and distinct latent actions
against true actions, the rollouts' gap to the tokenizer's reconstruction). When a check
fails, the command still writes the whole report, logs each failed check with its measured
values and the config key that set it, then exits non-zero (`config.report.fail_on_check`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import time

import jax
import ml_collections
from absl import logging

from genie_jax import evaluators as evaluators_lib
from genie_jax import paths
from genie_jax import sharding
from genie_jax import tasks
from genie_jax.evaluators import controllability as controllability_lib
from genie_jax.inference import evaluate as evaluate_lib
from genie_jax.inference import generate as generate_lib
from genie_jax.training import checkpointing
from genie_jax.training import trainer


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
  """The pipeline config's stage sections (those holding a `stage` key), every one after
  the stages it builds on (`Task.depends_on`)."""
  return tasks.stage_order({name: value.stage for name, value in config.items()
                            if isinstance(value, ml_collections.ConfigDict) and "stage" in value})


def stage_configs(config: ml_collections.ConfigDict, workdir: str
                  ) -> dict[str, tuple[str, ml_collections.ConfigDict]]:
  """{stage: (its workdir WORKDIR/<stage>, its config)} in training order, each stage's
  config pointed at the workdirs of the stages it builds on."""
  names = stage_names(config)
  dirs = {name: paths.join(workdir, name) for name in names}
  for name in names:
    stage_config = config[name]
    with stage_config.unlocked():
      for dep in tasks.task_class(stage_config.stage).depends_on:
        stage_config[dep.workdir_key] = dirs[dep.name]
  return {name: (dirs[name], config[name]) for name in names}


def _upstream_models(stages: dict[str, tuple[str, ml_collections.ConfigDict]], name: str,
                     resolved: dict[str, ml_collections.ConfigDict]
                     ) -> dict[str, ml_collections.ConfigDict]:
  """The model configs of the stages `name` builds on that have no trained workdir yet: the
  pipeline's own, as resolved (`resolved`: {earlier stage: its resolved config}); a trained
  one's config.json is read, as training will read it."""
  stage_config = stages[name][1]
  return {dep.name: resolved[dep.name].model
          for dep in tasks.task_class(stage_config.stage).depends_on
          if not checkpointing.has_checkpoint(stages[dep.name][0])}


def _finished(workdir: str, config: ml_collections.ConfigDict) -> bool:
  if not checkpointing.has_checkpoint(workdir):
    return False
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint, read_only=True)
  try:
    return ckpt.latest_step() == config.total_steps
  finally:
    ckpt.close()


_CONFIG_KEY = re.compile(r"\bconfig\.(?!json\b)")


@contextlib.contextmanager
def _keys_of(stage: str):
  """Re-raises a stage's ValueError with its keys named as the pipeline config's: a stage's
  checks say config.total_steps, the command line config.dynamics.total_steps."""
  try:
    yield
  except ValueError as e:
    raise ValueError(_CONFIG_KEY.sub(f"config.{stage}.", str(e))) from e


def checked_stage_configs(config: ml_collections.ConfigDict, workdir: str
                          ) -> dict[str, tuple[str, ml_collections.ConfigDict]]:
  """`stage_configs`, after everything that can be checked before the first stage trains:
  the report's thresholds, every stage's task (a later stage's on the configs of the stages
  it builds on), every evaluator's settings, and each trained workdir's config."""
  check_report_config(config)
  stages = stage_configs(config, workdir)
  resolved_configs = {}
  for stage, (stage_dir, stage_config) in stages.items():
    with _keys_of(stage):
      resolved = tasks.get_task(stage_config,
                                _upstream_models(stages, stage, resolved_configs)).config
      resolved_configs[stage] = resolved
      trainer.check_config(resolved, sharding.mesh_from_config(resolved))
      trainer.check_fault_config(resolved)
      evaluators_lib.check_configs(resolved)
      # A stage workdir is reused or continued only with the config it was trained with (a
      # finished 256-code tokenizer must not stand in for the 64 codes asked for).
      checkpointing.check_resume_config(stage_dir, resolved,
                                        tasks.derived_keys((resolved.stage,)))
  return stages


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict[str, object]:
  """Trains what is not trained yet, evaluates everything, writes WORKDIR/report."""
  paths.check_bucket(workdir, "workdir")
  stages = checked_stage_configs(config, workdir)
  timings = {}
  for stage, (stage_dir, stage_config) in stages.items():
    if _finished(stage_dir, stage_config):
      logging.info("Stage %s: already trained in %s", stage, stage_dir)
      continue
    logging.info("Stage %s: training in %s", stage, stage_dir)
    t0 = time.perf_counter()
    trainer.train_and_evaluate(stage_config, stage_dir)
    timings[f"{stage}_train_s"] = time.perf_counter() - t0

  report_dir = paths.join(workdir, "report")
  metrics = {}
  for stage, (stage_dir, _) in stages.items():
    t0 = time.perf_counter()
    metrics[stage] = evaluate_lib.evaluate(stage_dir, num_batches=config.report.num_batches or None)
    timings[f"{stage}_eval_s"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  videos = {}
  for actions in ("inferred", "random"):
    out = paths.join(report_dir, f"rollouts_{actions}")
    result = generate_lib.generate(stages["dynamics"][0], actions=actions,
                                   num_videos=config.report.num_videos, out_dir=out,
                                   num_steps=controllability_lib.sampling_steps(
                                       config.dynamics.evals.controllability,
                                       config.dynamics.stage),
                                   temperature=config.dynamics.evals.controllability.temperature)
    videos[actions] = [f"rollouts_{actions}/{os.path.basename(f)}" for f in result["files"]
                       if f.endswith(".gif")]
  timings["generate_s"] = time.perf_counter() - t0

  if jax.process_index() == 0:
    pictures = {}
    for stage, (stage_dir, _) in stages.items():
      for picture in sorted(paths.path(stage_dir).joinpath("eval").glob("*.png"),
                            key=lambda p: p.name):
        paths.write_bytes(paths.join(report_dir, f"{stage}_{picture.name}"),
                          picture.read_bytes())
        pictures.setdefault(stage, []).append(f"{stage}_{picture.name}")
    checks = evaluate_checks(metrics, config.report)
    report = dict(metrics=metrics, timings=timings, videos=videos, pictures=pictures,
                  checks={c.name: c.passed for c in checks},
                  check_details={c.name: dict(measured=c.measured, config=c.keys)
                                 for c in checks})
    paths.write_text(paths.join(report_dir, "report.json"),
                     json.dumps(report, indent=2, sort_keys=True))
    paths.write_text(paths.join(report_dir, "report.md"), render_markdown(report))
    logging.info("Wrote %s", paths.join(report_dir, "report.md"))
    for line in _summary_lines(report):
      logging.info("%s", line)
    return report
  return {}


_CONTROLLABILITY = "controllability"
# The thresholds of config.report that are numbers; None or nan switches a check off.
_NUMERIC_THRESHOLDS = ("min_dtpsnr", "max_dtpsnr_stderr_fraction", "min_nmi",
                       "min_dtpsnr_true", "max_rollout_gap_db")


def _off(value) -> bool:
  """Whether a threshold switches its check off: None, or nan (which the command line can
  write where it cannot write None)."""
  return value is None or (isinstance(value, float) and math.isnan(value))


def check_report_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the config.report key whose setting cannot work.

  Needs only the config, so the pipeline checks before any stage trains.
  """
  report = config.report
  for key in _NUMERIC_THRESHOLDS:
    value = report[key]
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
      raise ValueError(f"config.report.{key}={value!r} must be a number, or None / nan to "
                       f"switch its check off")
  for key in ("require_positive_curve", "fail_on_check"):
    if not isinstance(report[key], bool):
      raise ValueError(f"config.report.{key}={report[key]!r} must be True or False")
  if report.distinct_true_actions is not None and not isinstance(
      report.distinct_true_actions, str):
    raise ValueError(f"config.report.distinct_true_actions={report.distinct_true_actions!r} "
                     f"must be comma-separated true action names, or \"\" to switch it off")
  fraction = report.max_dtpsnr_stderr_fraction
  if not _off(fraction) and fraction <= 0:
    raise ValueError(f"config.report.max_dtpsnr_stderr_fraction={fraction} must be positive "
                     f"(no standard error is below a fraction <= 0 of Delta_t PSNR)")
  frames = report.rollout_gap_frames
  if isinstance(frames, bool) or not isinstance(frames, int) or frames < 0:
    raise ValueError(f"config.report.rollout_gap_frames={frames!r} must be an int >= 0 (0: "
                     f"no gap check)")
  evals = config.dynamics.evals
  if _CONTROLLABILITY not in evals:
    raise ValueError(f"config.dynamics.evals has no {_CONTROLLABILITY!r} evaluator, whose "
                     f"metrics config.report's checks read")
  if frames and not _off(report.max_rollout_gap_db):
    with _keys_of("dynamics"):
      horizon = controllability_lib.ControllabilityEvaluator.check_config(
          _CONTROLLABILITY, evals[_CONTROLLABILITY], config.dynamics)
    if frames > horizon:
      raise ValueError(
          f"config.report.rollout_gap_frames={frames} exceeds the rollouts' horizon "
          f"{horizon} (config.dynamics.evals.{_CONTROLLABILITY}.horizon, or clip_len - 1 "
          f"when 0); lower it, or set it to 0 to switch the gap check off")


@dataclasses.dataclass(frozen=True)
class Check:
  """One check of the report: its name (which says the threshold), whether it passed, what
  was measured, and the config.report key(s) that set it."""
  name: str
  passed: bool
  measured: str
  keys: str


def _fmt(value, unit: str = "") -> str:
  return "missing" if value is None else f"{value:.4g}{unit}"


def _at_least(dyn, metric, threshold, key, unit="") -> Check:
  value = dyn.get(f"{_CONTROLLABILITY}/{metric}")
  # A missing or nan metric fails: the check could not be made.
  return Check(f"{metric} >= {threshold:g}{unit}",
               value is not None and value >= threshold,
               f"{metric} = {_fmt(value, unit)}", f"config.report.{key}")


def _curve(dyn) -> dict[int, float]:
  """Delta_t PSNR at t = 1, 2, ... up to the horizon, as far as the metrics hold it."""
  curve, t = {}, 1
  while f"{_CONTROLLABILITY}/dtpsnr_t{t}" in dyn:
    curve[t] = dyn[f"{_CONTROLLABILITY}/dtpsnr_t{t}"]
    t += 1
  return curve


def distinct_plurality_check(dyn: dict[str, float], names: list[str]) -> Check | None:
  """Whether the named true actions each get a different latent action most often.

  Reads controllability/plurality_latent_<name> (-1: the action never occurred, which
  fails). Names without that metric (not among the dataset's true actions) are ignored with
  a warning; None when none is left, or the dataset has no true actions (no NMI either).
  """
  if f"{_CONTROLLABILITY}/nmi" not in dyn:
    return None
  codes = {}
  for name in names:
    key = f"{_CONTROLLABILITY}/plurality_latent_{name}"
    if key in dyn:
      codes[name] = int(dyn[key])
    else:
      logging.warning("config.report.distinct_true_actions names %r, which is not a true "
                      "action of this dataset (no %s); ignored", name, key)
  if not codes:
    return None
  passed = min(codes.values()) >= 0 and len(set(codes.values())) == len(codes)
  measured = ", ".join(f"{name} -> {code if code >= 0 else 'never occurred'}"
                       for name, code in codes.items())
  return Check(f"plurality latent actions of {', '.join(codes)} all differ", passed,
               f"plurality latent action: {measured}", "config.report.distinct_true_actions")


def evaluate_checks(metrics: dict[str, dict[str, float]],
                    report_config: ml_collections.ConfigDict) -> list[Check]:
  """The report's checks of the dynamics stage's controllability metrics against the
  thresholds of config.report (see configs/genie.py); thresholds that are off are left out,
  and so are the checks against true actions on datasets without them."""
  dyn = metrics["dynamics"]
  cfg = report_config
  checks = []
  if not _off(cfg.min_dtpsnr):
    checks.append(_at_least(dyn, "dtpsnr", cfg.min_dtpsnr, "min_dtpsnr", " dB"))
  if not _off(cfg.max_dtpsnr_stderr_fraction):
    fraction = cfg.max_dtpsnr_stderr_fraction
    dtpsnr = dyn.get(f"{_CONTROLLABILITY}/dtpsnr")
    stderr = dyn.get(f"{_CONTROLLABILITY}/dtpsnr_stderr")
    passed = dtpsnr is not None and stderr is not None and stderr < fraction * dtpsnr
    checks.append(Check(f"dtpsnr_stderr < {fraction:g} x dtpsnr", passed,
                        f"dtpsnr_stderr = {_fmt(stderr, ' dB')}, dtpsnr = {_fmt(dtpsnr, ' dB')}",
                        "config.report.max_dtpsnr_stderr_fraction"))
  if cfg.require_positive_curve:
    curve = _curve(dyn)
    checks.append(Check(
        f"Delta_t PSNR > 0 at every t = 1..{len(curve) or '?'}",
        bool(curve) and all(v > 0 for v in curve.values()),
        "dtpsnr_t<t> = " + (", ".join(f"{_fmt(v, ' dB')} (t={t})" for t, v in curve.items())
                            or "missing"),
        "config.report.require_positive_curve"))
  # Only where the dataset has true actions (the evaluator then measures these).
  if not _off(cfg.min_nmi) and f"{_CONTROLLABILITY}/nmi" in dyn:
    checks.append(_at_least(dyn, "nmi", cfg.min_nmi, "min_nmi"))
  names = [n.strip() for n in (cfg.distinct_true_actions or "").split(",") if n.strip()]
  if names:
    check = distinct_plurality_check(dyn, names)
    if check is not None:
      checks.append(check)
  if not _off(cfg.min_dtpsnr_true) and f"{_CONTROLLABILITY}/dtpsnr_true" in dyn:
    checks.append(_at_least(dyn, "dtpsnr_true", cfg.min_dtpsnr_true, "min_dtpsnr_true",
                            " dB"))
  if not _off(cfg.max_rollout_gap_db):
    recon = dyn.get(f"{_CONTROLLABILITY}/recon_psnr_t1")
    for k in range(1, cfg.rollout_gap_frames + 1):
      generated = dyn.get(f"{_CONTROLLABILITY}/psnr_inferred_t{k}")
      gap = None if recon is None or generated is None else recon - generated
      checks.append(Check(
          f"recon_psnr_t1 - psnr_inferred_t{k} <= {cfg.max_rollout_gap_db:g} dB",
          gap is not None and gap <= cfg.max_rollout_gap_db,
          f"recon_psnr_t1 = {_fmt(recon, ' dB')}, psnr_inferred_t{k} = "
          f"{_fmt(generated, ' dB')}, gap = {_fmt(gap, ' dB')}",
          "config.report.max_rollout_gap_db, config.report.rollout_gap_frames"))
  return checks


def failed_checks(report: dict[str, object]) -> list[str]:
  """One line per failed check of a report: its name, measured values and config keys."""
  details = report.get("check_details", {})
  lines = []
  for name, passed in report["checks"].items():
    if not passed:
      detail = details.get(name, {})
      lines.append(f"{name}: {detail.get('measured', '?')} (set by "
                   f"{detail.get('config', 'config.report')})")
  return lines


_HEADLINE = (
    ("tokenizer", "reconstruction/psnr", "Tokenizer reconstruction PSNR (dB)"),
    ("tokenizer", "reconstruction/ssim", "Tokenizer reconstruction SSIM"),
    ("tokenizer", "reconstruction/codebook_usage", "Tokenizer codebook usage"),
    ("lam", "latent_actions/nmi", "LAM NMI vs true actions (LAM stage)"),
    ("lam", "latent_actions/codebook_usage", "LAM codebook usage"),
    ("dynamics", "controllability/masked_accuracy", "Dynamics masked-token accuracy"),
    ("dynamics", "controllability/masked_accuracy_random_actions",
     "  the same with random actions"),
    ("dynamics", "controllability/denoising_mse",
     "Dynamics denoising MSE of the latents (diffusion)"),
    ("dynamics", "controllability/denoising_mse_random_actions",
     "  the same with random actions"),
    ("dynamics", "controllability/nmi", "LAM NMI vs true actions (as used by dynamics)"),
    ("dynamics", "controllability/accuracy", "LAM best-assignment accuracy"),
    ("dynamics", "controllability/dtpsnr", "Delta_t PSNR, t=4 (inferred vs random), dB"),
    ("dynamics", "controllability/dtpsnr_stderr", "  its standard error over clips, dB"),
    ("dynamics", "controllability/dtpsnr_true", "Delta_t PSNR, t=4 (true vs random), dB"),
    ("dynamics", "controllability/psnr_inferred_t4", "Rollout PSNR at t=4, inferred actions"),
    ("dynamics", "controllability/psnr_random_t4", "Rollout PSNR at t=4, random actions"),
    ("dynamics", "controllability/recon_psnr_t4", "Tokenizer ceiling PSNR at t=4"),
)


def _summary_lines(report) -> list[str]:
  lines = []
  for stage, key, label in _HEADLINE:
    value = report["metrics"][stage].get(key)
    if value is not None:
      lines.append(f"{label}: {value:.4g}")
  details = report.get("check_details", {})
  lines += [f"check {name}: {'PASS' if ok else 'FAIL'} "
            f"({details.get(name, {}).get('measured', '')})"
            for name, ok in report["checks"].items()]
  return lines


def render_markdown(report) -> str:
  """report.md: headline metrics, checks, timings, then every picture and rollout."""
  out = ["# Genie pipeline report", "", "| metric | value |", "|---|---|"]
  for stage, key, label in _HEADLINE:
    value = report["metrics"][stage].get(key)
    if value is not None:
      out.append(f"| {label} | {value:.4g} |")
  out += ["", "## Checks", ""]
  details = report.get("check_details", {})
  for name, ok in report["checks"].items():
    detail = details.get(name, {})
    out.append(f"- {name}: **{'PASS' if ok else 'FAIL'}** ({detail.get('measured', '')}; "
               f"{detail.get('config', 'config.report')})")
  out += ["", "## Time (s)", ""]
  out += [f"- {k}: {v:.0f}" for k, v in sorted(report["timings"].items())]
  for stage, names in report["pictures"].items():
    out += ["", f"## {stage}", ""]
    out += [f"![{name}]({name})" for name in names]
  for actions, gifs in report["videos"].items():
    out += ["", f"## Rollouts, {actions} actions", ""]
    out += [f"![{gif}]({gif})" for gif in gifs]
  out += ["", "All metrics: report.json.", ""]
  return "\n".join(out)


def run_and_check(config: ml_collections.ConfigDict, workdir: str) -> dict[str, object]:
  """`run_pipeline`, then fail loudly: with a failed check, after the whole report is
  written, logs each failed check and raises SystemExit (a non-zero exit) naming them and
  the config keys that set them, unless config.report.fail_on_check is False."""
  report = run_pipeline(config, workdir)
  failures = failed_checks(report) if report else []
  for line in failures:
    logging.error("Check failed: %s", line)
  if failures and config.report.fail_on_check:
    raise SystemExit(
        f"{len(failures)} of the report's {len(report['checks'])} checks failed (the report "
        f"is written in {paths.join(workdir, 'report')}):\n  " + "\n  ".join(failures) +
        "\nChange a threshold with the config.report key named; switch a check off with "
        "None (nan for a number on the command line; distinct_true_actions=\"\", "
        "require_positive_curve=False), or exit 0 with config.report.fail_on_check=False.")
  return report
