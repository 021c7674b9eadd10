r"""Parallelism strategies side by side on 8 fake CPU devices: memory per device and step time.

  python benchmarks/strategies.py                          # tokenizer, size=cpu
  python benchmarks/strategies.py --stages=tokenizer,lam --strategies=dp8,fsdp8 --steps=3

For each stage and strategy (config.mesh, and config.mesh_dcn for the two-"slice" one) it
prints the parameter + optimizer bytes each device holds (counted from the arrays'
addressable shards), the compiled step's memory plan per device (compiled.memory_analysis()),
compile time and the median step time. The 8 devices are fake (XLA_FLAGS
--xla_force_host_platform_device_count=8) and share this machine's cores: step times show
the cost of the partitioned program and its collectives, not a speed-up. The dynamics stage
runs on a tokenizer and LAM of the same size with fresh weights (their workdirs hold only
config.json).
"""

from __future__ import annotations

import os
import sys

# Before jax is imported: 8 CPU devices.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import dynamics as dynamics_config
from configs import lam as lam_config
from configs import tokenizer as tokenizer_config
from genie_jax import allocator
from genie_jax import config_lib
from genie_jax import profiling
from genie_jax import sharding
from genie_jax import tasks
from genie_jax.training import train_state
from genie_jax.training import trainer
# pylint: enable=g-import-not-at-top,wrong-import-position

# name -> (config.mesh, config.mesh_dcn). size=cpu models have 4 heads: tensor <= 4.
STRATEGIES = {
    "1dev": (sharding.single_device_mesh_shape(), None),
    "dp8": (dict(data=8, fsdp=1, tensor=1), None),
    "fsdp8": (dict(data=1, fsdp=8, tensor=1), None),
    "dp2_tp4": (dict(data=2, fsdp=1, tensor=4), None),
    "dp4_tp2": (dict(data=4, fsdp=1, tensor=2), None),
    "dp2_fsdp4": (dict(data=2, fsdp=4, tensor=1), None),
    "fsdp4_tp2": (dict(data=1, fsdp=4, tensor=2), None),
    "dp2_fsdp2_tp2": (dict(data=2, fsdp=2, tensor=2), None),
    "dcn2_fsdp2_tp2": (dict(data=1, fsdp=2, tensor=2), dict(data=2, fsdp=1, tensor=1)),
}

_STAGES = flags.DEFINE_list("stages", ["tokenizer"], "Of tokenizer, lam, dynamics.")
_STRATEGIES = flags.DEFINE_list("strategies", list(STRATEGIES), f"Of {list(STRATEGIES)}.")
_SIZE = flags.DEFINE_string("size", "cpu", "Model size argument of the stage configs.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps (after one warm-up step).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch size.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 64, "Frame size (runlocal's built-in world is 32x32; the README's table is "
    "64x64 with patch 8, as here by default).")


def stage_configs(size: str, batch_size: int, root: str, image_size: int = 64) -> dict:
  """The three stages' runlocal configs at `size` on image_size^2 frames (patch 8 at 64);
  dynamics points at config-only workdirs."""
  arg = f"size={size},runlocal"
  configs = dict(tokenizer=tokenizer_config.get_config(arg), lam=lam_config.get_config(arg))
  for stage, config in configs.items():
    if config.data.image_size != image_size:
      config.data.image_size = config.model.image_size = image_size
      if size != "tiny":
        config.model.patch_size = 8 if image_size == 64 else 4
    config_lib.save_config(os.path.join(root, stage), config)
  configs["dynamics"] = dynamics_config.get_config(
      f"{arg},tokenizer_workdir={os.path.join(root, 'tokenizer')},"
      f"lam_workdir={os.path.join(root, 'lam')}")
  configs["dynamics"].data.image_size = image_size
  for config in configs.values():
    config.batch_size = batch_size
  return configs


def host_state(abstract, seed: int = 0):
  """A state drawn on the host (no compiled init); the optimizer state is zero as at init."""
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if not np.issubdtype(x.dtype, np.floating) or "opt_state" in jax.tree_util.keystr(path):
      return np.zeros(x.shape, x.dtype)
    scale = 1.0 / np.sqrt(x.shape[0]) if x.ndim >= 2 else 0.1
    return (scale * rng.standard_normal(x.shape)).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def random_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  b, t, s = config.batch_size, config.data.clip_len, config.data.image_size
  return dict(video=rng.integers(0, 256, (b, t, s, s, 3), dtype=np.uint8),
              actions=rng.integers(0, 4, (b, t), dtype=np.int32))


def measure(config, name: str) -> dict[str, float]:
  mesh_shape, mesh_dcn = STRATEGIES[name]
  config = config.copy_and_resolve_references()
  config.mesh = mesh_shape
  config.mesh_dcn = mesh_dcn or sharding.single_device_mesh_shape()
  devices = jax.devices()[:1] if name == "1dev" else jax.devices()
  task = tasks.get_task(config)
  config = task.config
  mesh = sharding.mesh_from_config(config, devices)
  trainer.check_config(config, mesh)
  spec = train_state.make_state_spec(task, config, mesh)
  state = jax.device_put(host_state(spec.abstract), spec.shardings)
  held = sharding.bytes_per_device({k: state[k] for k in ("params", "opt_state")})
  batch = jax.device_put(random_batch(config), spec.batch_sharding)

  t0 = time.perf_counter()
  step = train_state.jit_train_step(task, spec, config.seed).lower(
      spec.abstract, train_state.abstract_batch(spec, batch)).compile()
  compile_s = time.perf_counter() - t0
  stats = profiling.compiled_stats(step)
  step_s, _, losses = profiling.time_steps(step, state, batch, _STEPS.value)
  return dict(state_mib=max(held.values()) / 2**20, argument_mib=stats["argument_bytes"] / 2**20,
              temp_mib=stats["temp_bytes"] / 2**20,
              peak_mib=stats["peak_bytes_estimate"] / 2**20,
              gflops=stats.get("flops", float("nan")) / 1e9, compile_s=compile_s,
              step_s=step_s, loss=losses[-1])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{os.cpu_count()} cores, size={_SIZE.value}, batch {_BATCH.value}, malloc "
        f"{allocator.in_use()}, cpu dots {flags.FLAGS.cpu_dots}")
  with tempfile.TemporaryDirectory() as root:
    configs = stage_configs(_SIZE.value, _BATCH.value, root, _IMAGE_SIZE.value)
    header = ("| stage | strategy | mesh | params+opt MiB/device | XLA args MiB | XLA temp MiB | "
              "XLA peak MiB | GFLOP/device | compile s | step s (median) | loss |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for stage in _STAGES.value:
      for name in _STRATEGIES.value:
        r = measure(configs[stage], name)
        mesh = "x".join(str(v) for v in STRATEGIES[name][0].values())
        if STRATEGIES[name][1]:
          mesh = "dcn " + "x".join(str(v) for v in STRATEGIES[name][1].values()) + " * " + mesh
        print(f"| {stage} | {name} | {mesh} | {r['state_mib']:.2f} | {r['argument_mib']:.2f} | "
              f"{r['temp_mib']:.1f} | {r['peak_mib']:.1f} | {r['gflops']:.2f} | "
              f"{r['compile_s']:.1f} | {r['step_s']:.3f} | {r['loss']:.5f} |", flush=True)


if __name__ == "__main__":
  allocator.define_flags()
  app.run(allocator.entry_point(main))
