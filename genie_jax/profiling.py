"""What XLA says about a compiled step: FLOPs and memory."""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp


def compiled_stats(compiled: Any) -> dict[str, float]:
  """FLOPs per call and memory (bytes), both per device, of a `jax.stages.Compiled`.

  Either figure is left out when the backend does not report it.
  """
  stats: dict[str, float] = {}
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax returned one dict per device.
    cost = cost[0] if cost else None
  if cost and "flops" in cost:
    stats["flops"] = float(cost["flops"])
  mem = compiled.memory_analysis()
  if mem is not None:
    for field in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                  "temp_size_in_bytes", "generated_code_size_in_bytes"):
      if hasattr(mem, field):
        stats[field.replace("_size_in_bytes", "_bytes")] = float(getattr(mem, field))
    if "temp_bytes" in stats and "argument_bytes" in stats:
      # Donated (aliased) outputs reuse argument buffers.
      stats["peak_bytes_estimate"] = (stats["argument_bytes"] + stats["temp_bytes"] +
                                      stats.get("output_bytes", 0) - stats.get("alias_bytes", 0))
  return stats


def format_stats(stats: dict[str, float]) -> str:
  parts = []
  if "flops" in stats:
    # XLA counts the FLOPs of the partitioned program: per device.
    parts.append(f"{stats['flops'] / 1e9:.1f} GFLOP/step/device")
  for key in ("argument_bytes", "temp_bytes", "output_bytes", "peak_bytes_estimate"):
    if key in stats:
      parts.append(f"{key.replace('_bytes', '')}={stats[key] / 2**20:.1f} MiB")
  return ", ".join(parts) or "no cost analysis from this backend"


def matmul_peak_flops(sizes=(1024, 2048, 3072), repeats=5) -> float:
  """Best float32 matmul throughput (FLOP/s) jax reaches on the default device: the
  denominator of the benchmarks' model-FLOPs utilisation."""
  best = 0.0
  for n in sizes:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    for _ in range(repeats):
      t0 = time.perf_counter()
      f(a, a).block_until_ready()
      best = max(best, 2 * n**3 / (time.perf_counter() - t0))
  return best


def time_steps(step: Any, state: Any, batch: Any, num_steps: int
               ) -> tuple[float, Any, list[float]]:
  """(median seconds, final state, losses) of `num_steps` calls of a compiled train step
  after one untimed call (which also allocates and warms caches); losses include its."""
  times, losses = [], []
  for i in range(num_steps + 1):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    if i:
      times.append(time.perf_counter() - t0)
    losses.append(float(metrics["loss"]))
  return statistics.median(times), state, losses
