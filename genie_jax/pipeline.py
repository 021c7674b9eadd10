r"""Trains and evaluates a whole Genie: tokenizer, LAM, dynamics; then writes a report.

  python -m genie_jax.pipeline --config=configs/genie.py:runlocal --workdir=workdirs/genie

Stages train in WORKDIR/tokenizer, WORKDIR/lam and WORKDIR/dynamics through the shared
trainer, exactly as `genie_jax.main` would train them one by one (so each can be resumed,
evaluated, or retrained alone). Running the same command again resumes: a finished stage is
not retrained, an interrupted one continues from its last checkpoint, and a stage workdir
trained with another config (other than the keys a resume may change, such as total_steps)
is refused with the keys that differ, before anything trains. Then every stage is
evaluated (`genie_jax.evaluate`), rollouts are written as GIFs (`genie_jax.generate`), and
WORKDIR/report/ receives report.md, report.json and the pictures.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import ml_collections
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from genie_jax import checkpointing
from genie_jax import evaluators as evaluators_lib
from genie_jax import evaluate as evaluate_lib
from genie_jax import generate as generate_lib
from genie_jax import tasks
from genie_jax import train



def define_flags() -> None:
  """The command-line flags (only when this module is the program; see genie_jax.evaluate)."""
  config_flags.DEFINE_config_file(
      "config", None, "Pipeline config, e.g. configs/genie.py:runlocal.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Root of the three stage workdirs and report.")
  flags.mark_flags_as_required(["config", "workdir"])

STAGES = ("tokenizer", "lam", "dynamics")


def stage_configs(config: ml_collections.ConfigDict, workdir: str
                  ) -> dict[str, tuple[str, ml_collections.ConfigDict]]:
  """{stage: (its workdir, its config)}, the dynamics config pointed at the other two."""
  dirs = {stage: os.path.join(workdir, stage) for stage in STAGES}
  dynamics = config.dynamics
  with dynamics.unlocked():
    dynamics.tokenizer_workdir = dirs["tokenizer"]
    dynamics.lam_workdir = dirs["lam"]
  return {stage: (dirs[stage], config[stage]) for stage in STAGES}


def _finished(workdir: str, config: ml_collections.ConfigDict) -> bool:
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return False
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint, read_only=True)
  try:
    return ckpt.latest_step() == config.total_steps
  finally:
    ckpt.close()


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict[str, object]:
  """Trains what is not trained yet, evaluates everything, writes WORKDIR/report."""
  stages = stage_configs(config, workdir)
  # What can be checked before stage 1 trains is checked now: the stage-1/2 tasks, every
  # evaluator's settings. (The dynamics task itself needs the trained stages' configs.)
  for stage, (stage_dir, stage_config) in stages.items():
    if stage != "dynamics":
      tasks.get_task(stage_config)
    evaluators_lib.check_configs(stage_config)
    # A stage workdir is reused or continued only with the config it was trained with (a
    # finished 256-code tokenizer must not stand in for the 64 codes asked for).
    checkpointing.check_resume_config(stage_dir, stage_config)
  timings = {}
  for stage, (stage_dir, stage_config) in stages.items():
    if _finished(stage_dir, stage_config):
      logging.info("Stage %s: already trained in %s", stage, stage_dir)
      continue
    logging.info("Stage %s: training in %s", stage, stage_dir)
    t0 = time.perf_counter()
    train.train_and_evaluate(stage_config, stage_dir)
    timings[f"{stage}_train_s"] = time.perf_counter() - t0

  report_dir = os.path.join(workdir, "report")
  os.makedirs(report_dir, exist_ok=True)
  metrics = {}
  for stage, (stage_dir, _) in stages.items():
    t0 = time.perf_counter()
    metrics[stage] = evaluate_lib.evaluate(stage_dir, num_batches=config.report.num_batches or None)
    timings[f"{stage}_eval_s"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  videos = {}
  for actions in ("inferred", "random"):
    out = os.path.join(report_dir, f"rollouts_{actions}")
    result = generate_lib.generate(stages["dynamics"][0], actions=actions,
                                   num_videos=config.report.num_videos, out_dir=out,
                                   num_steps=config.dynamics.evals.controllability.maskgit_steps,
                                   temperature=config.dynamics.evals.controllability.temperature)
    videos[actions] = [os.path.relpath(f, report_dir) for f in result["files"]
                       if f.endswith(".gif")]
  timings["generate_s"] = time.perf_counter() - t0

  if jax.process_index() == 0:
    pictures = {}
    for stage, (stage_dir, _) in stages.items():
      eval_dir = os.path.join(stage_dir, "eval")
      for name in sorted(os.listdir(eval_dir)):
        if name.endswith(".png"):
          shutil.copy(os.path.join(eval_dir, name), os.path.join(report_dir, f"{stage}_{name}"))
          pictures.setdefault(stage, []).append(f"{stage}_{name}")
    report = dict(metrics=metrics, timings=timings, videos=videos, pictures=pictures,
                  checks=_checks(metrics, config))
    with open(os.path.join(report_dir, "report.json"), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2, sort_keys=True)
    with open(os.path.join(report_dir, "report.md"), "w", encoding="utf-8") as f:
      f.write(render_markdown(report))
    logging.info("Wrote %s", os.path.join(report_dir, "report.md"))
    for line in _summary_lines(report):
      logging.info("%s", line)
    return report
  return {}


def _checks(metrics, config) -> dict[str, bool]:
  dyn = metrics["dynamics"]
  dtpsnr = dyn.get("controllability/dtpsnr", float("nan"))
  stderr = dyn.get("controllability/dtpsnr_stderr", float("inf"))
  # Positive, and by more than noise: two standard errors over the evaluated clips.
  checks = {f"dtpsnr > {config.report.min_dtpsnr:g} dB": dtpsnr > config.report.min_dtpsnr,
            "dtpsnr > 2 standard errors": dtpsnr > 2 * stderr}
  if "controllability/nmi" in dyn:
    # Chance NMI for a finite sample is small but positive; 'well above' means > 0.1.
    checks["LAM-vs-true NMI > 0.1"] = dyn["controllability/nmi"] > 0.1
  return checks


_HEADLINE = (
    ("tokenizer", "reconstruction/psnr", "Tokenizer reconstruction PSNR (dB)"),
    ("tokenizer", "reconstruction/ssim", "Tokenizer reconstruction SSIM"),
    ("tokenizer", "reconstruction/codebook_usage", "Tokenizer codebook usage"),
    ("lam", "latent_actions/nmi", "LAM NMI vs true actions (LAM stage)"),
    ("lam", "latent_actions/codebook_usage", "LAM codebook usage"),
    ("dynamics", "controllability/masked_accuracy", "Dynamics masked-token accuracy"),
    ("dynamics", "controllability/masked_accuracy_random_actions",
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
  lines += [f"check {name}: {'PASS' if ok else 'FAIL'}" for name, ok in report["checks"].items()]
  return lines


def render_markdown(report) -> str:
  """report.md: headline metrics, checks, timings, then every picture and rollout."""
  out = ["# Genie pipeline report", "", "| metric | value |", "|---|---|"]
  for stage, key, label in _HEADLINE:
    value = report["metrics"][stage].get(key)
    if value is not None:
      out.append(f"| {label} | {value:.4g} |")
  out += ["", "## Checks", ""]
  out += [f"- {name}: **{'PASS' if ok else 'FAIL'}**" for name, ok in report["checks"].items()]
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  run_pipeline(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
