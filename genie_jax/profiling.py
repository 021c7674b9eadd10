"""What XLA says about a compiled step: FLOPs and memory."""

from __future__ import annotations

from typing import Any


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
