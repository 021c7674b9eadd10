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
  if config.total_steps <= 0:
    raise ValueError(f"config.total_steps={config.total_steps} must be positive")


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
  logging.info("Mesh %s over %d devices in %d processes", dict(mesh.shape), mesh.size,
               jax.process_count())

  # --- Input: this process's share of each global batch, as a checkpointable Grain iterator.
  data_pipelines.get_builder(config.data, prepare=True)
  train_iter = iter(input_pipeline.make_dataset(
      config.data, "train", seed=config.seed, global_batch_size=config.batch_size))

  # --- Model and optimizer: shapes and shardings first, then a sharded init or a restore.
  spec = train_state.make_state_spec(task, config, mesh)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(spec.abstract["params"]))
  logging.info("Model %s: %.2fM parameters", config.stage, num_params / 1e6)

  checkpointing.save_config(workdir, config)
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint, config)
  if ckpt.latest_step() is not None:
    _, state = ckpt.restore(None, spec.abstract, train_iter)
  else:
    state = spec.init(jax.random.key(config.seed))
  first_step = int(jax.device_get(state["step"]))

  # --- The update step, compiled once; its cost is printed before training starts.
  local_batch = next(train_iter)
  t0 = time.perf_counter()
  compiled = train_state.jit_train_step(task, spec, config.seed).lower(
      spec.abstract, train_state.abstract_batch(spec, local_batch)).compile()
  logging.info("Compiled train step in %.1fs: %s", time.perf_counter() - t0,
               profiling.format_stats(profiling.compiled_stats(compiled)))

  # --- Evaluators and pictures.
  evaluators = evaluators_lib.build_evaluators(config, task, spec)
  visualize_fn = jax.jit(lambda s, b: task.visualize(spec.model(s), b),
                         out_shardings=sharding.replicated(mesh))
  writer = metric_writers.MetricWriter(workdir)
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
  while step < config.total_steps:
    batch = input_pipeline.to_global_batch(local_batch, spec.batch_sharding)
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      state, metrics = compiled(state, batch)
    pending.append(metrics)
    step += 1
    # Saved before the next batch is drawn, so the iterator state matches the train state.
    if step % config.checkpoint.every_steps == 0 or step == config.total_steps:
      ckpt.save(step, state, train_iter, force=step == config.total_steps)

    if step % config.log_every_steps == 0 or step == config.total_steps:
      # One device->host transfer per interval; the mean smooths over the interval.
      fetched = jax.device_get(pending)
      pending = []
      last_metrics = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      if not np.isfinite(last_metrics["loss"]):
        raise FloatingPointError(f"loss is {last_metrics['loss']} at step {step}")
      scalars = {f"train/{k}": v for k, v in last_metrics.items()}
      scalars.update(progress.update(step))
      writer.write_scalars(step, scalars)
      progress.log_line(step, scalars)
    if config.images_every_steps and (step % config.images_every_steps == 0 or
                                      step == config.total_steps):
      rows = jax.device_get(visualize_fn(state, batch))
      writer.write_images(step, {"train": visualize.video_grid(
          [r[:config.num_images] for r in rows])})
      writer.write_videos(step, {"train": visualize.side_by_side_video([r[0] for r in rows])})
    if config.eval_every_steps and (step % config.eval_every_steps == 0 or
                                    step == config.total_steps):
      run_evals(step)
    if step < config.total_steps:
      local_batch = next(train_iter)

  writer.flush()
  ckpt.close()
  writer.close()
  return last_metrics

