r"""Compiles a stage's train step ahead of time for a TPU topology, on this (CPU) machine, and
says whether it fits in HBM: the sharding and the memory plan are known before a pod is held.
With --rollout (dynamics configs) the cached rollout of `genie_jax.genie` is compiled too, and
with --evaluators every per-batch function of the config's evaluators.

  pip install --no-deps --target /tmp/libtpu_pkg "libtpu==0.0.42.*"  # jax 0.10's pin; no TPU
  PYTHONPATH=/tmp/libtpu_pkg JAX_PLATFORMS=cpu python -m genie_jax.aot \
      --config=configs/tokenizer.py --topology=v5p:2x4x4 --config.mesh.fsdp=-1 \
      --config.mesh.data=1

--topology is libtpu's name, TYPE:CHIPS (v4:2x2x4, v5p:2x4x4 = v5p-64, v5e:16x16 = v5e-256,
v6e:16x16); --num_slices > 1 compiles for that many such slices joined by DCN, with
config.mesh_dcn as the mesh of slices. libtpu (a PyPI wheel) is needed only to describe the
chips and compile for them: it runs offline without a TPU. The config goes through the
trainer's checks first, so a config that the trainer would refuse fails here too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from flax import nnx
from ml_collections import config_flags

from genie_jax import evaluators
from genie_jax import genie as genie_lib
from genie_jax import profiling
from genie_jax import sharding
from genie_jax import tasks
from genie_jax import train
from genie_jax import train_state
from genie_jax.data import input_pipeline

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
  stats: dict[str, float]  # profiling.compiled_stats: flops, argument/temp/output bytes...
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
  train.check_config(task.config, mesh)
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
  compiled = train_state.jit_train_step(task, spec, config.seed).lower(
      spec.abstract, abstract_batch(task.config, spec)).compile()
  return _report(compiled, mesh, hbm_bytes)


def _report(compiled: Any, mesh: jax.sharding.Mesh, hbm_bytes: float | None) -> AotReport:
  kind = mesh.devices.flat[0].device_kind
  return AotReport(mesh=dict(mesh.shape), device_kind=kind,
                   stats=profiling.compiled_stats(compiled),
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


_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "libtpu topology name, e.g. v5p:2x4x4.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined by DCN.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "HBM per device in GiB (0: by device kind).")
_ROLLOUT = flags.DEFINE_bool("rollout", False,
                             "Also compile the rollout (dynamics configs), batch 1, 4 frames.")
_EVALUATORS = flags.DEFINE_bool("evaluators", False,
                                "Also compile every evaluator's per-batch functions.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  devices = topology_devices(_TOPOLOGY.value, _NUM_SLICES.value)
  report = compile_for(_CONFIG.value, devices, _HBM_GIB.value * 2**30 or None)
  print(f"{_CONFIG.value.stage} on {_TOPOLOGY.value} x {_NUM_SLICES.value} slice(s), "
        f"{len(devices)} devices: {report.summary()}")
  if _ROLLOUT.value:
    report = compile_rollout_for(_CONFIG.value, devices, hbm_bytes=_HBM_GIB.value * 2**30 or None)
    print(f"rollout on {_TOPOLOGY.value} x {_NUM_SLICES.value} slice(s), {len(devices)} "
          f"devices: {report.summary()}")
  if _EVALUATORS.value:
    for name, report in compile_evaluators_for(
        _CONFIG.value, devices, _HBM_GIB.value * 2**30 or None).items():
      print(f"evaluator {name} on {_TOPOLOGY.value} x {_NUM_SLICES.value} slice(s), "
            f"{len(devices)} devices: {report.summary()}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
