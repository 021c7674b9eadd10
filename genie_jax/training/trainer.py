"""The shared trainer: one loop for every stage, read top to bottom.

Sections: config checks, mesh, input, model and optimizer (shapes first, then sharded init),
checkpoint restore, compiled update step, evaluators, loop (log, images, evals, checkpoints).

Faults:
* Preemption (SIGTERM): the state of the step reached is checkpointed, every process agreeing on
  that step, and `Preempted` (a SystemExit, exit status config.checkpoint.preemption_exit_code)
  ends the run; the same command continues it.
* Non-finite loss or gradients: config.nonfinite="stop" raises FloatingPointError naming the
  first bad step, before that state can be checkpointed; "skip" drops such updates on device and
  logs how many were dropped (train/skipped_updates).
* Kill -9 and broken checkpoints: see checkpointing.Checkpointer.restore.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

import data_pipelines
from genie_jax import config_lib
from genie_jax import evaluators as evaluators_lib
from genie_jax import paths
from genie_jax import profiling
from genie_jax import sharding
from genie_jax import tasks
from genie_jax import visualize
from genie_jax.data import input_pipeline
from genie_jax.inference import stages
from genie_jax.training import checkpointing
from genie_jax.training import metric_writers
from genie_jax.training import optim
from genie_jax.training import preemption
from genie_jax.training import train_state


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Fails fast, naming the key, on configs that cannot run on this mesh."""
  if config.batch_size < 1:
    raise ValueError(f"config.batch_size={config.batch_size} must be positive")
  rules = sharding.rules_of(config)
  dp = sharding.data_parallel_size(mesh, rules)
  if config.batch_size % dp:
    axes = sharding.data_parallel_axes(rules)
    raise ValueError(
        f"config.batch_size={config.batch_size} is not divisible by the data-parallel size "
        f"{dp} (config.mesh {' x '.join(axes)} = "
        f"{' x '.join(str(mesh.shape[a]) for a in axes)}); use a multiple of {dp}")
  microbatches = config.get("microbatches", 1)
  if microbatches < 1 or config.batch_size % (microbatches * dp):
    raise ValueError(
        f"config.microbatches={microbatches}: each of the microbatches must hold an equal "
        f"share of config.batch_size={config.batch_size} for each of the {dp} data-parallel "
        f"devices; use a divisor of {config.batch_size // dp}")
  if config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  input_pipeline.check_process_rows(sharding.batch_sharding(mesh, rules), config.batch_size,
                                    "config.batch_size")
  for key, value in (("total_steps", config.total_steps),
                     ("log_every_steps", config.log_every_steps),
                     ("checkpoint.every_steps", config.checkpoint.every_steps)):
    if value <= 0:
      raise ValueError(f"config.{key}={value} must be positive")
  for key, value in (("images_every_steps", config.images_every_steps),
                     ("eval_every_steps", config.eval_every_steps)):
    if value < 0:
      raise ValueError(f"config.{key}={value} must not be negative (0: never)")
  keep, period = config.checkpoint.max_to_keep, config.checkpoint.keep_period
  if keep is not None and keep < 1:
    # Orbax would delete every checkpoint, those of earlier runs in the workdir too.
    raise ValueError(f"config.checkpoint.max_to_keep={keep} must be at least 1, or None "
                     "(keep all)")
  if period is not None and period < 0:
    raise ValueError(f"config.checkpoint.keep_period={period} must not be negative (0: off)")
  _check_data_config(config.data)
  if not 0 <= config.seed < 2**32:
    raise ValueError(f"config.seed={config.seed} must be in [0, 2**32)")
  optim.learning_rate_schedule(config.optimizer, config.total_steps)
  metric_writers.check_wandb_config(config.get("wandb"))
  profile = config.get("profile")
  if profile is not None:
    for key in ("start_step", "num_steps"):
      if profile[key] < 0:
        raise ValueError(f"config.profile.{key}={profile[key]} must not be negative")
    if profile.num_steps and profile.start_step + profile.num_steps > config.total_steps:
      logging.warning("config.profile names steps %d..%d, past config.total_steps=%d: the "
                      "trace ends with the run", profile.start_step + 1,
                      profile.start_step + profile.num_steps, config.total_steps)


def _check_data_config(data: ml_collections.ConfigDict) -> None:
  """What config.data can be found wrong in before its dataset is generated or read."""
  if data.name not in data_pipelines.DATASET_NAMES:
    raise ValueError(f"config.data.name={data.name!r} is not a dataset; known: "
                     f"{', '.join(data_pipelines.DATASET_NAMES)}")
  for key, least in (("read_threads", 1), ("prefetch", 0), ("worker_count", 0)):
    if data[key] < least:
      raise ValueError(f"config.data.{key}={data[key]} must be at least {least}")
  if data.clip_len < 1:
    raise ValueError(f"config.data.clip_len={data.clip_len} must be positive")
  # Records hold at most chunk_len frames of an episode, and episode_len (where set) caps
  # an episode (a video).
  capped = data.episode_len > 0
  longest = min(data.chunk_len, data.episode_len) if capped else data.chunk_len
  if data.clip_len > longest:
    raise ValueError(
        f"config.data.clip_len={data.clip_len}: records hold at most {longest} frames "
        f"(config.data.chunk_len={data.chunk_len}"
        + (f", config.data.episode_len={data.episode_len})" if capped else ")"))


def check_fault_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the key, on fault-handling settings that cannot work."""
  if config.nonfinite not in train_state.NONFINITE_POLICIES:
    raise ValueError(f"config.nonfinite={config.nonfinite!r}; choose one of "
                     f"{train_state.NONFINITE_POLICIES}")
  if config.checkpoint.preemption_check_every_steps <= 0:
    raise ValueError("config.checkpoint.preemption_check_every_steps="
                     f"{config.checkpoint.preemption_check_every_steps} must be positive")


def _check_finite(steps: list[int], metrics: list[dict[str, Any]],
                  last_checkpoint: int | None) -> None:
  """Raises FloatingPointError naming the first step whose loss or gradient norm is not
  finite (config.nonfinite="stop")."""
  for step, m in zip(steps, metrics):
    bad = {k: float(m[k]) for k in ("loss", "grad_norm") if not np.isfinite(m[k])}
    if bad:
      where = (f"the latest checkpoint is step {last_checkpoint}" if last_checkpoint is not None
               else "there is no checkpoint yet")
      raise FloatingPointError(
          f"training {' and '.join(f'{k} is {v}' for k, v in bad.items())} at step {step} "
          f"(config.nonfinite='stop'); no state from step {step} on was saved ({where}). "
          "Rerunning continues from that checkpoint; --config.nonfinite=skip drops such updates")


def _mean_metrics(fetched: list[dict[str, Any]]) -> dict[str, float]:
  """Interval means; `skipped_updates` is summed, and the other metrics average over the
  updates that were applied (all steps when every update was skipped)."""
  kept = [m for m in fetched if not m.get("skipped_updates", 0)] or fetched
  out = {k: float(np.mean([m[k] for m in kept])) for k in fetched[0]}
  if "skipped_updates" in fetched[0]:
    out["skipped_updates"] = float(sum(int(m["skipped_updates"]) for m in fetched))
  return out


def _due(step: int, every: int, last: int) -> bool:
  return bool(every) and (step % every == 0 or step == last)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: list[jax.Device] | None = None) -> dict[str, float]:
  """Trains `config.stage` in `workdir`, resuming from its latest checkpoint if any.

  Args:
    config: a stage config (configs/<stage>.py).
    workdir: checkpoints, config.json, metrics and images go here.
    devices: the devices of the mesh; default all devices of all processes.

  Returns:
    The last logged training metrics (handy for tests and sweeps).
  """
  # --- Task and config checks: everything that can be wrong is found before work starts.
  paths.check_bucket(workdir, "workdir")
  # The task's config holds what it takes from the stages it builds on; it is the one saved.
  task = tasks.get_task(config)
  config = task.config
  mesh = sharding.mesh_from_config(config, devices)
  check_config(config, mesh)
  check_fault_config(config)
  checkpointing.check_resume_config(workdir, config, tasks.derived_keys((config.stage,)))
  logging.info("Mesh %s over %d devices in %d processes", dict(mesh.shape), mesh.size,
               jax.process_count())

  # --- Model and optimizer shapes and shardings (nothing allocated yet), and evaluators, whose
  # settings are checked here rather than at the first evaluation.
  spec = train_state.make_state_spec(task, config, mesh)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(spec.abstract["params"]))
  logging.info("Model %s: %.2fM parameters", config.stage, num_params / 1e6)
  evaluators = evaluators_lib.build_evaluators(config, task, spec)

  # --- Input: this process's share of each global batch, as a checkpointable Grain iterator.
  builder = data_pipelines.get_builder(config.data, prepare=True)
  train_iter = iter(input_pipeline.make_dataset(
      config.data, "train", seed=config.seed, global_batch_size=config.batch_size,
      builder=builder))
  if config.eval_every_steps:
    for evaluator in evaluators:
      evaluator.check_data()

  # --- State: a sharded init, or the latest checkpoint with the iterator restored in place.
  config_lib.save_config(workdir, config)
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint, config)
  if ckpt.latest_step() is not None:
    _, state = ckpt.restore(None, spec.abstract, train_iter)
  else:
    # Earlier stages' weights enter on a fresh start only: on resume the checkpoint has them.
    init_key = train_state.root_keys(config.seed)[0]
    state = stages.init_from_dependencies(task, spec.init(init_key), spec)
  first_step = int(jax.device_get(state["step"]))
  if first_step >= config.total_steps:
    ckpt.close()
    logging.warning("The checkpoint of step %d in %s already reaches config.total_steps=%d: "
                    "nothing to train (a larger config.total_steps continues the run).",
                    first_step, ckpt.directory, config.total_steps)
    return {}

  # --- The update step, compiled once; its cost is printed before training starts.
  local_batch = next(train_iter)
  t0 = time.perf_counter()
  microbatches = config.get("microbatches", 1)
  batch_shapes = train_state.abstract_batch(spec, local_batch)
  lowered = train_state.jit_train_step(
      task, spec, config.seed, config.nonfinite, microbatches).lower(
          spec.abstract, batch_shapes)
  compiled = lowered.compile()
  stats = train_state.step_stats(lowered, compiled, task, spec, config.seed, batch_shapes,
                                 microbatches)
  logging.info("Compiled train step in %.1fs: %s", time.perf_counter() - t0,
               profiling.format_stats(stats))

  # --- Pictures and metrics. Only the first examples are shown, so only they are computed.
  n_images = config.num_images
  visualize_fn = jax.jit(
      lambda s, b: task.visualize(spec.model(s), jax.tree.map(lambda x: x[:n_images], b)),
      out_shardings=sharding.replicated(mesh))
  writer = metric_writers.MetricWriter(workdir, first_step=first_step,
                                       wandb_config=config.get("wandb"),
                                       run_config=config_lib.config_to_dict(config))
  progress = metric_writers.Progress(first_step, config.total_steps, config.batch_size,
                                     stats.get("flops"))

  def run_evals(step):
    for evaluator in evaluators:
      scalars, images = evaluator.run(state)
      writer.write_scalars(step, {f"{evaluator.name}/{k}": v for k, v in scalars.items()})
      writer.write_images(step, {f"{evaluator.name}_{k}": v for k, v in images.items()})
      logging.info("[step %d] eval %s: %s", step, evaluator.name,
                   " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

  # --- Loop. `local_batch` always holds the batch for step `step`.
  pending: list[dict[str, jax.Array]] = []  # Metrics of the steps not logged yet...
  pending_steps: list[int] = []  # ...and their step numbers.
  last_metrics: dict[str, float] = {}
  step = first_step
  last = config.total_steps
  stop_on_nonfinite = config.nonfinite == "stop"
  preempted = False
  notice = preemption.PreemptionNotice(ckpt.manager, config.checkpoint.preemption_check_every_steps)
  profiler = profiling.StepProfiler(config.get("profile"), workdir)
  try:
    while step < last:
      with profiler.step(step, state):
        batch = input_pipeline.to_global_batch(local_batch, spec.batch_sharding)
        state, metrics = compiled(state, batch)
      pending.append(metrics)
      step += 1
      profiler.after(step, metrics)
      pending_steps.append(step)
      preempted = notice.reached(step) and step < last
      saved = False
      if _due(step, config.checkpoint.every_steps, last) or preempted:
        # A non-finite state never becomes a checkpoint. Saved before the next batch is
        # drawn, so the saved iterator state matches the saved train state.
        if stop_on_nonfinite:
          _check_finite(pending_steps, jax.device_get(
              [{k: m[k] for k in ("loss", "grad_norm")} for m in pending]), ckpt.latest_step())
        saved = ckpt.save(step, state, train_iter, force=step == last or preempted)

      if _due(step, config.log_every_steps, last) or preempted:
        # One device->host transfer per interval; the mean smooths over the interval.
        fetched = jax.device_get(pending)
        if stop_on_nonfinite:
          _check_finite(pending_steps, fetched, ckpt.latest_step())
        pending, pending_steps = [], []
        last_metrics = _mean_metrics(fetched)
        scalars = {f"train/{k}": v for k, v in last_metrics.items()}
        scalars.update(progress.update(step))
        writer.write_scalars(step, scalars)
        progress.log_line(step, scalars)
      if saved:
        # The rows up to a checkpoint are in the workdir with it (a gs:// workdir uploads
        # them now, not a minute later): a run resumed from it has every step logged.
        writer.flush()
      if preempted:
        break
      if _due(step, config.images_every_steps, last):
        rows = jax.device_get(visualize_fn(state, batch))
        writer.write_images(step, {"train": visualize.video_grid(rows)})
        writer.write_videos(step, {"train": visualize.side_by_side_video([r[0] for r in rows])})
      if _due(step, config.eval_every_steps, last):
        run_evals(step)
      if step < last:
        local_batch = next(train_iter)
  finally:
    notice.close()
    failing = sys.exc_info()[0] is not None
    try:
      # Lets an in-flight asynchronous save finish even when the loop fails (and the
      # preemption checkpoint land before the process exits).
      ckpt.close()
    except Exception:  # pylint: disable=broad-except
      if not failing:
        raise
      # A save that failed as well must not hide why the loop ended.
      logging.exception("Could not finish writing checkpoints to %s", ckpt.directory)
    finally:
      writer.close()  # Even when a save failed: the logged rows reach the workdir.
      try:
        profiler.close()
      except Exception:  # pylint: disable=broad-except
        # A trace that cannot be written must not hide why the loop ended.
        logging.exception("Could not write the profile to %s", profiler.directory)
  if preempted:
    logging.warning("Preempted at step %d: its checkpoint is in %s; run the same command to "
                    "continue. Exiting with status %d.", step, ckpt.directory,
                    config.checkpoint.preemption_exit_code)
    raise preemption.Preempted(step, ckpt.directory, config.checkpoint.preemption_exit_code)
  return last_metrics
