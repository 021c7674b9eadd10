"""The shared trainer: one loop for every stage, read top to bottom.

Sections: config checks, mesh, input, model and optimizer (shapes first, then sharded init),
checkpoint restore, compiled update step, evaluators, loop (log, images, evals, checkpoints).
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
from absl import logging

import data_pipelines
from genie_jax import checkpointing
from genie_jax import evaluators as evaluators_lib
from genie_jax import metric_writers
from genie_jax import optim
from genie_jax import profiling
from genie_jax import sharding
from genie_jax import tasks
from genie_jax import train_state
from genie_jax import visualize
from genie_jax.data import input_pipeline


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Fails fast, naming the key, on configs that cannot run on this mesh."""
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % dp:
    raise ValueError(
        f"config.batch_size={config.batch_size} is not divisible by the data-parallel size "
        f"{dp} (config.mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); "
        f"use a multiple of {dp}")
  if config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  for key, value in (("total_steps", config.total_steps),
                     ("log_every_steps", config.log_every_steps),
                     ("checkpoint.every_steps", config.checkpoint.every_steps)):
    if value <= 0:
      raise ValueError(f"config.{key}={value} must be positive")
  optim.learning_rate_schedule(config.optimizer, config.total_steps)


def _check_finite(loss: float, step: int) -> None:
  if not np.isfinite(loss):
    raise FloatingPointError(
        f"training loss is {loss} at step {step}; the state of this step was not saved "
        "(the last checkpoint is the latest finite one)")


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
  task = tasks.get_task(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  check_config(config, mesh)
  checkpointing.check_resume_config(workdir, config)
  logging.info("Mesh %s over %d devices in %d processes", dict(mesh.shape), mesh.size,
               jax.process_count())

  # --- Model and optimizer shapes and shardings (nothing allocated yet), and evaluators, whose
  # settings are checked here rather than at the first evaluation.
  spec = train_state.make_state_spec(task, config, mesh)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(spec.abstract["params"]))
  logging.info("Model %s: %.2fM parameters", config.stage, num_params / 1e6)
  evaluators = evaluators_lib.build_evaluators(config, task, spec)

  # --- Input: this process's share of each global batch, as a checkpointable Grain iterator.
  data_pipelines.get_builder(config.data, prepare=True)
  train_iter = iter(input_pipeline.make_dataset(
      config.data, "train", seed=config.seed, global_batch_size=config.batch_size))

  # --- State: a sharded init, or the latest checkpoint with the iterator restored in place.
  checkpointing.save_config(workdir, config)
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint, config)
  if ckpt.latest_step() is not None:
    _, state = ckpt.restore(None, spec.abstract, train_iter)
  else:
    # Earlier stages' weights enter on a fresh start only: on resume the checkpoint has them.
    state = task.init_from_pretrained(spec.init(jax.random.key(config.seed)), spec)
  first_step = int(jax.device_get(state["step"]))

  # --- The update step, compiled once; its cost is printed before training starts.
  local_batch = next(train_iter)
  t0 = time.perf_counter()
  compiled = train_state.jit_train_step(task, spec, config.seed).lower(
      spec.abstract, train_state.abstract_batch(spec, local_batch)).compile()
  logging.info("Compiled train step in %.1fs: %s", time.perf_counter() - t0,
               profiling.format_stats(profiling.compiled_stats(compiled)))

  # --- Pictures and metrics. Only the first examples are shown, so only they are computed.
  n_images = config.num_images
  visualize_fn = jax.jit(
      lambda s, b: task.visualize(spec.model(s), jax.tree.map(lambda x: x[:n_images], b)),
      out_shardings=sharding.replicated(mesh))
  writer = metric_writers.MetricWriter(workdir, first_step=first_step)
  progress = metric_writers.Progress(first_step, config.total_steps, config.batch_size)

  def run_evals(step):
    for evaluator in evaluators:
      scalars, images = evaluator.run(state)
      writer.write_scalars(step, {f"{evaluator.name}/{k}": v for k, v in scalars.items()})
      writer.write_images(step, {f"{evaluator.name}_{k}": v for k, v in images.items()})
      logging.info("[step %d] eval %s: %s", step, evaluator.name,
                   " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

  # --- Loop. `local_batch` always holds the batch for step `step`.
  pending: list[dict[str, jax.Array]] = []
  last_metrics: dict[str, float] = {}
  step = first_step
  last = config.total_steps
  try:
    while step < last:
      batch = input_pipeline.to_global_batch(local_batch, spec.batch_sharding)
      state, metrics = compiled(state, batch)
      pending.append(metrics)
      step += 1
      if _due(step, config.checkpoint.every_steps, last):
        # A non-finite state never becomes the latest checkpoint. Saved before the next
        # batch is drawn, so the saved iterator state matches the saved train state.
        _check_finite(float(jax.device_get(metrics["loss"])), step)
        ckpt.save(step, state, train_iter, force=step == last)

      if _due(step, config.log_every_steps, last):
        # One device->host transfer per interval; the mean smooths over the interval.
        fetched = jax.device_get(pending)
        pending = []
        last_metrics = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        _check_finite(last_metrics["loss"], step)
        scalars = {f"train/{k}": v for k, v in last_metrics.items()}
        scalars.update(progress.update(step))
        writer.write_scalars(step, scalars)
        progress.log_line(step, scalars)
      if _due(step, config.images_every_steps, last):
        rows = jax.device_get(visualize_fn(state, batch))
        writer.write_images(step, {"train": visualize.video_grid(rows)})
        writer.write_videos(step, {"train": visualize.side_by_side_video([r[0] for r in rows])})
      if _due(step, config.eval_every_steps, last):
        run_evals(step)
      if step < last:
        local_batch = next(train_iter)
  finally:
    # Lets an in-flight asynchronous save finish even when the loop fails.
    ckpt.close()
    writer.close()
  return last_metrics
