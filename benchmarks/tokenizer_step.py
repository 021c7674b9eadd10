r"""Benchmarks the tokenizer's train step (forward, backward, AdamW) on this machine.

  python benchmarks/tokenizer_step.py                       # all shapes
  python benchmarks/tokenizer_step.py --shapes=jasmine_ref --steps=5
  python benchmarks/tokenizer_step.py --shapes=jasmine_ref --malloc=system
  python benchmarks/tokenizer_step.py --shapes=runlocal --encoder_context=clip

For each shape it prints compile time, median step time, steps/s, images/s (frames/s), XLA's
FLOPs per step, model FLOPs utilisation against the best float32 matmul throughput measured
here, XLA's memory estimate and the process's peak resident memory. Inputs are random frames,
so the figures are the model's, not the data pipeline's.
"""

from __future__ import annotations

import resource
import sys
import time

import jax
import numpy as np
from absl import app
from absl import flags

from configs import tokenizer as tokenizer_config
from genie_jax import allocator
from genie_jax import profiling
from genie_jax import sharding
from genie_jax import tasks
from genie_jax.training import train_state

# name -> (config arguments, overrides). 16-frame clips; 64x64 frames except `runlocal`.
SHAPES = {
    # README command 1's tokenizer: the built-in world's runlocal model (32x32, patch 4).
    "runlocal": ("runlocal", dict(batch_size=8, num_codes=64)),
    # The CPU-sized model (`size=cpu`: patch 8 on these 64x64 frames, as runlocal on CoinRun).
    "small": ("size=cpu", dict(batch_size=8)),
    # The shape at which the peer Jasmine's step was measured on this kind of CPU (README,
    # "Benchmark": the tokenizer step against the peer).
    "jasmine_ref": ("size=appf", dict(batch_size=4, d_model=256, num_heads=4, enc_layers=4,
                                      dec_layers=4)),
    # Genie App. F tokenizer (d 512, 8+8 blocks, patch 4); batch cut from 48 to fit a CPU.
    "appf": ("size=appf", dict(batch_size=2)),
}

_SHAPES = flags.DEFINE_list("shapes", [n for n in SHAPES if n != "runlocal"],
                            f"Which of {list(SHAPES)} to run.")
_ENCODER_CONTEXT = flags.DEFINE_enum(
    "encoder_context", None, ["clip", "frame", "patch"],
    "Override every shape's config.model.encoder_context (default: the shape's config).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per shape (after one warm-up step).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Override every shape's batch size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise each block.")
def bench_shape(name: str, peak: float) -> dict[str, float]:
  """Compiles and times the train step at shape `name` on one device."""
  config_arg, overrides = SHAPES[name]
  overrides = dict(overrides)
  config = tokenizer_config.get_config(config_arg)
  config.batch_size = _BATCH.value or overrides.pop("batch_size")
  config.model.update({k: v for k, v in overrides.items() if k != "batch_size"})
  config.model.dtype = _DTYPE.value
  config.model.remat = _REMAT.value
  if _ENCODER_CONTEXT.value:
    config.model.encoder_context = _ENCODER_CONTEXT.value
  config.mesh = sharding.single_device_mesh_shape()

  task = tasks.get_task(config)
  spec = train_state.make_state_spec(task, config, sharding.make_mesh(config.mesh,
                                                                      jax.devices()[:1]))
  rng = np.random.default_rng(0)
  t, s = config.data.clip_len, config.data.image_size
  local = dict(video=rng.integers(0, 256, (config.batch_size, t, s, s, 3), dtype=np.uint8),
               actions=np.zeros((config.batch_size, t), np.int32))
  batch = jax.device_put(local, spec.batch_sharding)

  t0 = time.perf_counter()
  shapes = train_state.abstract_batch(spec, local)
  lowered = train_state.jit_train_step(task, spec, config.seed).lower(spec.abstract, shapes)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  stats = train_state.step_stats(lowered, compiled, task, spec, config.seed, shapes, 1)

  step_s, _, losses = profiling.time_steps(compiled, spec.init(jax.random.key(0)), batch,
                                           _STEPS.value)
  flops = stats.get("flops", float("nan"))
  return dict(
      compile_s=compile_s, step_s=step_s, steps_per_s=1 / step_s,
      images_per_s=config.batch_size * t / step_s, gflop_per_step=flops / 1e9,
      mfu=flops / step_s / peak,
      xla_peak_mib=stats.get("peak_bytes_estimate", float("nan")) / 2**20,
      rss_peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      params_m=sum(x.size for x in jax.tree.leaves(spec.abstract["params"])) / 1e6,
      batch=config.batch_size, first_loss=losses[0], last_loss=losses[-1])


def main(argv):
  del argv
  unknown = set(_SHAPES.value) - set(SHAPES)
  if unknown:
    raise app.UsageError(f"--shapes: unknown {sorted(unknown)}; known: {list(SHAPES)}")
  malloc = allocator.in_use()
  peak = profiling.matmul_peak_flops()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} "
        f"({jax.default_backend()}), jax {jax.__version__}, dtype {_DTYPE.value}, "
        f"remat {_REMAT.value}, malloc {malloc}, cpu dots {flags.FLAGS.cpu_dots}")
  print(f"float32 matmul peak measured: {peak / 1e9:.1f} GFLOP/s")
  columns = ("shape", "batch", "params_m", "compile_s", "step_s", "steps_per_s", "images_per_s",
             "gflop_per_step", "mfu", "xla_peak_mib", "rss_peak_mib", "first_loss", "last_loss")
  print(" | ".join(columns))
  for name in _SHAPES.value:
    r = bench_shape(name, peak)
    print(" | ".join([name] + [f"{r[c]:.4g}" for c in columns[1:]]), flush=True)
  sys.stdout.flush()


if __name__ == "__main__":
  allocator.define_flags()
  app.run(allocator.entry_point(main))
