"""What XLA says about a step: FLOPs, memory, and where its time goes."""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from genie_jax import paths


def cost_flops(stage: Any) -> float | None:
  """XLA's FLOPs of a `jax.stages.Compiled` (per device) or `Lowered` (the global program),
  or None where the backend does not estimate them."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax returned one dict per device.
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def lowered_flops(lowered: Any) -> float | None:
  """XLA's FLOPs of a `jax.stages.Lowered` (the global program), counted by the CPU client
  where the program's own backend counts none: backends loaded as PJRT plugins (the CUDA
  wheels, TPUs) give None for `Lowered.cost_analysis()`. None where neither counts it."""
  flops = cost_flops(lowered)
  if flops:
    return flops
  try:
    # What Lowered.cost_analysis runs, on the CPU client (a private API: jax has no public
    # one for a module lowered for another platform).
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client,
                                         lowered.compiler_ir("hlo").as_hlo_module())
  except (ImportError, AttributeError, RuntimeError) as e:
    # No CPU backend (JAX_PLATFORMS without cpu), the private API moved, or not a Lowered.
    logging.log_first_n(
        logging.WARNING, "Cannot count the step's FLOPs before compilation (%s: %s); the "
        "compiled count is used, which on GPUs misses library matmuls (put cpu in "
        "JAX_PLATFORMS)", 1, type(e).__name__, e)
    return None
  return float(cost["flops"]) if cost and cost.get("flops") else None


def program_flops(lowered: Any, compiled: Any | None, num_devices: int) -> float | None:
  """FLOPs per device of one call of a program over `num_devices` devices: the lowered
  (global) program's count split evenly over the devices (`lowered_flops`), else the
  compiled program's own per-device count (None to refuse it), else None.

  The lowered count first because XLA:GPU's compiled cost analysis counts a matmul that a
  library kernel runs as a few FLOPs per output element (jax-ml/jax#22249): it misses nearly
  all of a transformer's arithmetic. The two differ in what they count: the even split
  leaves out work a mesh repeats on every device (activations replicated over a tensor
  axis), which a compiled per-device count includes. Neither counts a custom call's work
  (cuDNN attention under model.attention_impl='cudnn').
  """
  flops = lowered_flops(lowered)
  if flops:
    return flops / num_devices
  return cost_flops(compiled) if compiled is not None else None


def compiled_stats(compiled: Any) -> dict[str, float]:
  """FLOPs per call and memory (bytes), both per device, of a `jax.stages.Compiled`.

  Either figure is left out when the backend does not report it.
  """
  stats: dict[str, float] = {}
  flops = cost_flops(compiled)
  if flops is not None:
    stats["flops"] = flops
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
    # Per device, as compiled_stats and step_stats give them.
    parts.append(f"{stats['flops'] / 1e9:.1f} GFLOP/step/device")
  for key in ("argument_bytes", "temp_bytes", "output_bytes", "peak_bytes_estimate"):
    if key in stats:
      parts.append(f"{key.replace('_bytes', '')}={stats[key] / 2**20:.1f} MiB")
  return ", ".join(parts) or "no cost analysis from this backend"


def matmul_peak_flops(sizes=(1024, 2048, 3072), repeats=5, dtype="float32") -> float:
  """Best matmul throughput (FLOP/s) jax reaches on the default device with `dtype`
  operands and float32 results: the denominator of the benchmarks' model-FLOPs utilisation."""
  best = 0.0
  for n in sizes:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
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


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (?:\([^=]*?\)|\S+) (\w[\w\-]*)\(")
_COMMENT = re.compile(r"/\*.*?\*/")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
# Ops whose trace events span the ops they run (a loop's body, a called computation): counted
# through those ops, not twice.
_CONTAINERS = ("while", "conditional", "call")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_MATMUL_OPS = ("dot", "convolution")
_ARRAY = re.compile(r"^\w+\[([\d,]*)\]")
_NAMES = re.compile(r"%([\w.\-]+)")
_DOT_OPERANDS = re.compile(r" dot\(([^)]*)\)")
_CALLED = re.compile(r"\b(calls|body|condition|to_apply)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}|(?:true|false)_computation=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


_Body = dict[str, list[tuple[str, str, str]]]


def _parse_hlo(hlo_text: str) -> tuple[str | None, _Body]:
  """(the ENTRY computation's name, {computation: [(instruction, op, line)]}) of HLO text."""
  body: _Body = collections.defaultdict(list)
  computation, entry = None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      computation = header.group(1)
      if line.startswith("ENTRY"):
        entry = computation
      continue
    m = _INSTRUCTION.match(_COMMENT.sub("", line))
    if m and computation:
      body[computation].append((m.group(1), m.group(2), line))
  return entry, body


def _matmul_instructions(body: _Body) -> tuple[set[str], set[str]]:
  """(all instruction names, those that are a dot or a fusion calling one) of a parsed HLO
  module (`_parse_hlo`)."""
  has_dot = {c: any(op in _MATMUL_OPS for _, op, _ in instrs) for c, instrs in body.items()}
  names, matmuls = set(), set()
  for instrs in body.values():
    for name, op, line in instrs:
      called = _CALLS.search(line)
      if op not in _CONTAINERS:
        names.add(name)
      if op in _MATMUL_OPS or (op == "fusion" and called and has_dot.get(called.group(1))):
        matmuls.add(name)
  return names, matmuls


class _Uncounted(Exception):
  """A dot whose number of runs the HLO text does not say."""


def _dims(instruction: str, key: str) -> tuple[int, ...]:
  found = re.search(rf"\b{key}=\{{([\d,]*)\}}", instruction)
  return tuple(int(d) for d in found.group(1).split(",") if d) if found else ()


def _add(into: dict[str, dict[str, float]], flops: dict[str, dict[str, float]],
         times: float = 1.0) -> None:
  for op, by_kind in flops.items():
    for kind, value in by_kind.items():
      into[op][kind] += value * times


def _per_op() -> dict[str, dict[str, float]]:
  return collections.defaultdict(lambda: {"2d": 0.0, "batched": 0.0})


def matmul_flops(hlo_text: str) -> dict[str, dict[str, float]] | None:
  """FLOPs per call of a compiled HLO module's dots, by the op that runs them (the name its
  trace events carry: the dot, or the fusion holding it) and kind: '2d', or 'batched' (with
  batch dimensions, e.g. attention's per-head products).

  What `cost_analysis` does not say: on XLA:CPU the two kinds run at very different rates
  (the 2-D ones near the measured matmul peak), so the 2-D count over the peak is a floor
  under a step's time. To keep it one, a dot in a loop counts as often as the loop runs and
  a conditional counts its cheapest branch. Convolutions are not counted (the models have
  none), nor a GPU's matmuls (library calls by then, not dots). None where a loop holding a
  dot has no known trip count, or the text is not HLO this reads.
  """
  return _count_matmul_flops(*_parse_hlo(hlo_text))


def _count_matmul_flops(entry: str | None, body: _Body) -> dict[str, dict[str, float]] | None:
  """`matmul_flops` of a parsed HLO module (`_parse_hlo`)."""
  if entry is None:
    return None
  shapes = {computation: {name: tuple(int(d) for d in array.group(1).split(",") if d)
                          for name, _, line in instrs
                          if (array := _ARRAY.match(line.split(" = ", 1)[1]))}
            for computation, instrs in body.items()}

  def walk(computation: str, owner: str | None) -> dict[str, dict[str, float]]:
    """FLOPs of one run of `computation`, by op and kind."""
    found = _per_op()
    for result, op, line in body.get(computation, ()):
      runs_it = owner or (None if op in _CONTAINERS else result)
      if op == "dot":
        lhs = shapes[computation][_NAMES.findall(_DOT_OPERANDS.search(line).group(1))[0]]
        flops = 2.0 * math.prod(shapes[computation][result]) * math.prod(
            lhs[d] for d in _dims(line, "lhs_contracting_dims"))
        found[runs_it]["batched" if _dims(line, "lhs_batch_dims") else "2d"] += flops
      if op == "conditional":
        branches = [walk(name, runs_it) for m in _BRANCHES.finditer(line)
                    for name in (_NAMES.findall(m.group(1)) if m.group(1) else [m.group(2)])]
        if not branches:
          raise _Uncounted(f"{result}: no branch computations read")
        _add(found, min(branches, key=lambda b: sum(sum(k.values()) for k in b.values())))
        continue
      trip = _TRIP_COUNT.search(line)
      for kind, called in _CALLED.findall(line):
        inner = walk(called, runs_it)
        if inner and (kind == "condition" or (kind == "body" and trip is None)):
          raise _Uncounted(f"{result} runs {called} an unknown number of times")
        _add(found, inner, int(trip.group(1)) if kind == "body" and trip else 1)
    return found

  try:
    return dict(walk(entry, None))
  except (_Uncounted, KeyError, IndexError, AttributeError):
    return None


def read_trace_events(trace_dir: str) -> list[dict[str, Any]]:
  """The events of the newest `jax.profiler` trace (its trace.json.gz) under `trace_dir`."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    return json.load(f)["traceEvents"]


def step_breakdown(step: Any, state: Any, batch: Any, num_steps: int, top: int = 8
                   ) -> dict[str, Any]:
  """Where a compiled train step's time goes (`op_breakdown` of `num_steps` steps from
  `state` on `batch`), in ms per step."""
  def run():
    nonlocal state
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
  return op_breakdown(step, run, num_steps, top=top)


def op_breakdown(compiled: Any, run: Any, num_calls: int, per: float = 1.0, top: int = 8
                 ) -> dict[str, Any]:
  """Where a compiled program's time goes, from XLA's own ops in a `jax.profiler` trace of
  `num_calls` calls of `run()` (which calls `compiled` and blocks; after the caller's
  warm-up): ms per call / `per` (e.g. per generated frame) of the ops that are matmuls (a
  dot, or a fusion holding one), of all other ops by kind (the op's name without its
  number: 'multiply_reduce_fusion', 'transpose', ...), the `top` single ops, and its 2-D and
  batched matmuls' GFLOP per call / `per` (`_matmul_summary`; None if uncounted). For
  XLA:CPU, whose trace events carry the HLO instructions' names (a GPU's carry its
  kernels'). Their sum is not the call's time: the runtime works between ops, and may run
  independent ops at once."""
  parsed = _parse_hlo(compiled.as_text())
  names, matmuls = _matmul_instructions(parsed[1])
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(num_calls):
        run()
    events = read_trace_events(trace_dir)
  per_op: collections.Counter[str] = collections.Counter()
  for event in events:
    if event.get("ph") == "X" and event.get("name") in names:
      per_op[event["name"]] += event.get("dur", 0) / 1e3 / num_calls / per
  kinds: collections.Counter[str] = collections.Counter()
  for name, ms in per_op.items():
    kinds["matmul" if name in matmuls else re.sub(r"\.\d+$", "", name)] += ms
  return dict(total_ms=sum(per_op.values()), kinds=kinds, top=per_op.most_common(top),
              matmuls=_matmul_summary(_count_matmul_flops(*parsed), per_op, per))


def _matmul_summary(flops: dict[str, dict[str, float]] | None, traced_ms: dict[str, float],
                    per: float) -> dict[str, dict[str, float]] | None:
  """{'2d' and 'batched': {'gflop': all such matmuls' GFLOP, 'traced_gflop' and
  'traced_ms': those of the ops with trace events}}, per call / `per`; None if uncounted.
  An op holding both kinds (rare) is traced as the kind of most of its FLOPs."""
  if flops is None:
    return None
  summary = {kind: dict(gflop=0.0, traced_gflop=0.0, traced_ms=0.0) for kind in ("2d", "batched")}
  for op, by_kind in flops.items():
    for kind, op_flops in by_kind.items():
      summary[kind]["gflop"] += op_flops / 1e9 / per
    if op in traced_ms:
      kind = max(by_kind, key=by_kind.get)
      summary[kind]["traced_gflop"] += sum(by_kind.values()) / 1e9 / per
      summary[kind]["traced_ms"] += traced_ms[op]
  return summary


def format_matmuls(summary: dict[str, dict[str, float]] | None, per: str, ms: float | None,
                   peak: float, untimed: Sequence[str] = ()) -> str:
  """One line of `op_breakdown`'s matmul summary: the 2-D matmuls' time at a matmul peak of
  `peak` FLOP/s (against the call's `ms` where given), and each kind's rate over its trace
  events, but for the kinds in `untimed`, whose events do not span their work (Eigen's 2-D
  dots on XLA:CPU run asynchronously, past the end of theirs)."""
  if summary is None:
    return (f"matmuls, per {per}: not counted (a loop of unknown trip count, or HLO text "
            "profiling.matmul_flops does not read)")

  def traced(kind: str) -> str:
    gflop, traced_ms = summary[kind]["traced_gflop"], summary[kind]["traced_ms"]
    if kind in untimed:
      return "not timed by their trace events"
    if not traced_ms:
      return "no trace events"
    return f"traced: {traced_ms:.0f} ms, {1e3 * gflop / traced_ms:.0f} GFLOP/s"
  two_d, batched = summary["2d"]["gflop"], summary["batched"]["gflop"]
  of = f" of its {ms:.0f} ms" if ms is not None else ""
  return (f"matmuls, per {per}: 2-D {two_d:.1f} GFLOP (at the measured peak "
          f"{1e12 * two_d / peak:.0f} ms{of}; {traced('2d')}), batched {batched:.1f} GFLOP "
          f"({traced('batched')})")


class StepProfiler:
  """Traces the train steps config.profile names into WORKDIR/profile (jax.profiler), each
  step annotated with its number, so that the profile tools show where one step's time goes.
  A run resumed inside the window traces the rest of it."""

  def __init__(self, profile: ml_collections.ConfigDict | None, workdir: str):
    on = profile is not None and profile.num_steps > 0 and (
        profile.all_processes or jax.process_index() == 0)
    self._first = profile.start_step if on else -1
    self._last = profile.start_step + profile.num_steps if on else -1
    self.directory = paths.join(workdir, "profile")
    if on and profile.all_processes:
      # Processes on one host would write the same host-named file.
      self.directory = paths.join(self.directory, f"process_{jax.process_index()}")
    self._tracing = False
    self._mirror = None

  def step(self, step: int, state: Any) -> Any:
    """A context for the update that takes `state` from `step` to `step + 1`."""
    if not self._tracing and self._first <= step < self._last:
      jax.block_until_ready(state)  # Earlier steps' work stays out of the trace.
      # The profiler writes local files only; a gs:// workdir gets them at the end.
      self._mirror = paths.LocalMirror(self.directory)
      jax.profiler.start_trace(self._mirror.local)
      self._tracing = True
      logging.info("Tracing train steps %d..%d into %s", step + 1, self._last, self.directory)
    if self._tracing:
      return jax.profiler.StepTraceAnnotation("train", step_num=step + 1)
    return contextlib.nullcontext()

  def after(self, step: int, metrics: Any) -> None:
    """Ends the trace once step `step` (just made) is the last traced one and has run."""
    if self._tracing and step >= self._last:
      jax.block_until_ready(metrics)
      self.close()

  def close(self) -> None:
    if self._tracing:
      self._tracing = False
      jax.profiler.stop_trace()
      self._mirror.close()
      logging.info("Wrote the profile to %s", self.directory)
