"""Compiling a stage's train step, its evaluators and the rollout ahead of time for a TPU
topology, on this (CPU) machine, and whether each fits in HBM: the sharding and the memory
plan are known before a pod is held. The command: genie_jax/cli/aot.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from genie_jax import evaluators
from genie_jax import profiling
from genie_jax import sharding
from genie_jax import tasks
from genie_jax.data import input_pipeline
from genie_jax.inference import genie as genie_lib
from genie_jax.training import train_state
from genie_jax.training import trainer

# HBM per JAX device (one chip; v4/v5p in megacore mode), by device_kind, from Google Cloud's
# TPU system-architecture pages.
HBM_BYTES = {
    "TPU v4": 32 * 2**30,
    "TPU v5": 95 * 2**30,  # v5p
    "TPU v5 lite": 16 * 2**30,  # v5e
    "TPU v6 lite": 32 * 2**30,  # v6e (Trillium)
}


@dataclasses.dataclass(frozen=True)
class AotReport:
  """What the compiler planned for one device."""
  mesh: dict[str, int]
  device_kind: str
  stats: dict[str, float]  # train_state.step_stats or profiling.compiled_stats.
  hbm_bytes: float | None  # Capacity of one device; None when unknown.

  @property
  def peak_bytes(self) -> float:
    return self.stats.get("peak_bytes_estimate", float("nan"))

  @property
  def fits(self) -> bool | None:
    if self.hbm_bytes is None or "peak_bytes_estimate" not in self.stats:
      return None
    return self.peak_bytes <= self.hbm_bytes

  def summary(self) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    verdict = {True: "FITS", False: "DOES NOT FIT", None: "unknown capacity"}[self.fits]
    capacity = gib(self.hbm_bytes) if self.hbm_bytes else "?"
    return (f"mesh {self.mesh} on {self.device_kind}: peak {gib(self.peak_bytes)} of "
            f"{capacity} HBM per device -> {verdict} "
            f"({profiling.format_stats(self.stats)})")


def abstract_batch(config: ml_collections.ConfigDict, spec: train_state.StateSpec
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch of the input pipeline (genie_jax/data/input_pipeline.py), as shapes."""
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=spec.batch_sharding)
          for k, (shape, dtype) in input_pipeline.batch_shapes(
              config.data, config.batch_size).items()}


def _stage_spec(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]):
  """(task, mesh, spec) of a stage config on `devices`, after the trainer's checks; the
  task's config is the one filled in from the stages it builds on."""
  task = tasks.get_task(config)
  mesh = sharding.mesh_from_config(task.config, list(devices))
  trainer.check_config(task.config, mesh)
  return task, mesh, train_state.make_state_spec(task, task.config, mesh)


def compile_for(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
                hbm_bytes: float | None = None) -> AotReport:
  """Compiles config's train step for `devices` (real or compile-only) and reports its memory.

  Args:
    config: a stage config; its mesh and mesh_dcn are resolved against `devices`.
    devices: e.g. `jax.experimental.topologies.get_topology_desc(...).devices`.
    hbm_bytes: memory of one device; default from `HBM_BYTES` by device kind.
  """
  task, mesh, spec = _stage_spec(config, devices)
  microbatches = config.get("microbatches", 1)
  batch = abstract_batch(task.config, spec)
  lowered = train_state.jit_train_step(task, spec, config.seed,
                                       microbatches=microbatches).lower(spec.abstract, batch)
  compiled = lowered.compile()
  return _report(compiled, mesh, hbm_bytes, train_state.step_stats(
      lowered, compiled, task, spec, config.seed, batch, microbatches))


def _report(compiled: Any, mesh: jax.sharding.Mesh, hbm_bytes: float | None,
            stats: dict[str, float] | None = None) -> AotReport:
  kind = mesh.devices.flat[0].device_kind
  return AotReport(mesh=dict(mesh.shape), device_kind=kind,
                   stats=stats if stats is not None else profiling.compiled_stats(compiled),
                   hbm_bytes=hbm_bytes if hbm_bytes is not None else HBM_BYTES.get(kind))


def compile_rollout_for(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], *,
                        batch_size: int = 1, num_frames: int = 4, num_steps: int = 2,
                        hbm_bytes: float | None = None) -> AotReport:
  """Compiles the cached MaskGIT rollout (one prompt frame, `num_frames` generated) of a
  dynamics config for `devices`, weights replicated and batch split over them as far as it
  divides; no weights are needed (shapes only)."""
  if config.stage != "dynamics":
    raise ValueError(f"a rollout needs a dynamics config; config.stage={config.stage!r}")
  task = tasks.get_task(config)
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: task.make_model(nnx.Rngs(0))))
  mesh = jax.sharding.Mesh(np.asarray(devices).reshape(-1), ("batch",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  split = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("batch" if batch_size % len(devices) == 0 else None))
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                       abstract_state)
  s = config.data.image_size
  prompt = jax.ShapeDtypeStruct((batch_size, 1, s, s, 3), np.uint8, sharding=split)
  actions = jax.ShapeDtypeStruct((batch_size, num_frames), np.int32, sharding=split)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)

  def rollout(state, prompt, actions, rng):
    return genie_lib._rollout(nnx.merge(graphdef, state), prompt, actions, rng,  # pylint: disable=protected-access
                              num_steps=num_steps, temperature=1.0, cached=True)

  compiled = jax.jit(rollout).lower(state, prompt, actions, rng).compile()
  return _report(compiled, mesh, hbm_bytes)


def compile_evaluators_for(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
                           hbm_bytes: float | None = None) -> dict[str, AotReport]:
  """Compiles every per-batch function of config's evaluators (`config.evals`) for
  `devices`, on the mesh and shardings training uses; {'<evaluator>/<function>': report}."""
  task, mesh, spec = _stage_spec(config, devices)
  reports = {}
  for evaluator in evaluators.build_evaluators(task.config, task, spec):
    for name, lowered in evaluator.lower(spec.abstract).items():
      reports[f"{evaluator.name}/{name}"] = _report(lowered.compile(), mesh, hbm_bytes)
  return reports


def topology_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
  """Compile-only devices of `num_slices` slices of the TPU `topology` (needs libtpu)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = dict(num_slices=num_slices) if num_slices > 1 else {}
  return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                           **kwargs).devices)
