r"""The single XLA:CPU ops behind `--cpu_dots`, `layers.dense`'s tall kernels and
`genie_jax.reductions`, timed alone; also weight gradients computed in two halves of the
rows (README "Benchmark": faster alone, not in the step) and the attention's batched
matmuls cut into parts (no consistent gain alone or in the step); neither is used.

  python benchmarks/cpu_ops.py                    # --cpu_dots=eigen, the default
  python benchmarks/cpu_ops.py --cpu_dots=xla     # XLA's default dot library

One row per op at the README "Benchmark" tokenizer's sizes (16384 tokens, d 256, FFN 1024,
4 heads of 64; spatial attention: 256 products of 256 x 64 by 64 x 256, temporal: 4096 of
16 x 64 by 64 x 16; the index reductions over the 1024 codes of 16384 tokens, and over the
1024 codes of one frame's 256 tokens, a MaskGIT step's draw): best-of-7 milliseconds, GFLOP/s
(the reductions: one per element), and the process's CPU time over wall time while it runs
(2.0: both cores of a 2-core machine busy).
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from genie_jax import allocator
from genie_jax import reductions
from genie_jax.models import layers
# pylint: enable=g-import-not-at-top,wrong-import-position

_REPEATS = 7


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _time(fn, *args) -> tuple[float, float]:
  """(best seconds of `_REPEATS` calls, CPU time over wall time across them)."""
  jax.block_until_ready(fn(*args))
  best, cpu0, wall0 = float("inf"), _cpu_seconds(), time.perf_counter()
  for _ in range(_REPEATS):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best, (_cpu_seconds() - cpu0) / (time.perf_counter() - wall0)


def _value_and_vjp(fn, cotangent, *args):
  value, vjp = jax.vjp(fn, *args)
  return value, vjp(cotangent)


def _attention(shape, causal):
  """layers.attention_core's forward and backward over random q, k, v of `shape` (batch
  axes, then the sequence attended over and the head width), and its FLOPs (two products
  forward, four backward; the causal mask computes them whole)."""
  q, k, v, do = jax.random.normal(jax.random.key(1), (4, *shape))
  fn = jax.jit(lambda q, k, v, do: _value_and_vjp(
      lambda q, k, v: layers.attention_core(causal, q, k, v), do, q, k, v))
  *batch, s, e = shape
  return fn, (q, k, v, do), 6 * 2 * math.prod(batch) * s * s * e


def _ops():
  m, d, f, g, s, e = 16384, 256, 1024, 256, 256, 64
  ones = lambda *shape: jnp.ones(shape, jnp.float32)
  # One array per pair of rows: a VQ's distances, one frame's logits.
  distances, logits = (jax.random.normal(jax.random.key(3), shape)
                       for shape in ((m, f), (g, f)))
  contract_rows = lambda a, b: jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())))

  def in_halves(a, b):  # The rows in two halves, one batched matmul, the two results summed.
    halves = lambda x: x.reshape(2, -1, x.shape[1])
    return jax.lax.dot_general(halves(a), halves(b), (((1,), (1,)), ((0,), (0,)))).sum(0)

  def in_parts(product, parts=8):  # Independent batched matmuls over parts of the batch.
    return jax.jit(lambda a, b: [product(*pair) for pair in zip(jnp.split(a, parts),
                                                                 jnp.split(b, parts))])

  qk = lambda q, k: jnp.einsum("gse,gte->gst", q, k)
  pd = lambda p, d_out: jnp.einsum("gst,gse->gte", p, d_out)

  return [
      ("2-D matmul x @ W (feed-forward up)", jax.jit(lambda x, w: x @ w),
       (ones(m, d), ones(d, f)), 2 * m * d * f),
      ("batched matmul q k^T (spatial attention)", jax.jit(qk),
       (ones(g, s, e), ones(g, s, e)), 2 * g * s * s * e),
      ("the same as 8 independent batched matmuls", in_parts(qk),
       (ones(g, s, e), ones(g, s, e)), 2 * g * s * s * e),
      ("batched matmul P^T dO, dO the output's gradient (the attention's value gradient; "
       "the key gradient's product has the same form: contracted over the query axis)",
       jax.jit(pd), (ones(g, s, s), ones(g, s, e)), 2 * g * s * s * e),
      ("the same as 8 independent batched matmuls", in_parts(pd),
       (ones(g, s, s), ones(g, s, e)), 2 * g * s * s * e),
      ("spatial attention (layers.attention_core), forward and backward",
       *_attention((4, 16, 4, s, e), causal=False)),
      ("temporal attention, causal as in the models (layers.attention_core), forward and "
       "backward", *_attention((4, s, 4, 16, e), causal=True)),
      ("weight gradient x^T dy into [1024, 256]", jax.jit(contract_rows),
       (ones(m, f), ones(m, d)), 2 * m * f * d),
      ("weight gradient dy^T x into [256, 1024]", jax.jit(contract_rows),
       (ones(m, d), ones(m, f)), 2 * m * f * d),
      ("the same in two halves of the rows", jax.jit(in_halves), (ones(m, d), ones(m, f)),
       2 * m * f * d),
      ("weight gradient x^T dy into [256, 256] (an attention's output kernel)",
       jax.jit(contract_rows), (ones(m, d), ones(m, d)), 2 * m * d * d),
      ("the same in two halves of the rows", jax.jit(in_halves), (ones(m, d), ones(m, d)),
       2 * m * d * d),
      ("feed-forward down projection, forward and backward (layers.dense)",
       jax.jit(lambda x, w, dy: _value_and_vjp(layers.dense, dy, x, w)),
       (ones(m, f), ones(f, d), jax.random.normal(jax.random.key(0), (m, d))),
       3 * 2 * m * f * d),
      ("column sum over 16384 rows", jax.jit(lambda x: jnp.sum(x, axis=0)), (ones(m, f),),
       m * f),
      ("jnp.argmax over 1024 columns, 16384 rows", jax.jit(lambda x: jnp.argmax(x, -1)),
       (distances,), m * f),
      ("reductions.argmax, the same", jax.jit(reductions.argmax), (distances,), m * f),
      ("jax.random.categorical, 256 rows of 1024", jax.jit(jax.random.categorical),
       (jax.random.key(2), logits), g * f),
      ("reductions.categorical, the same", jax.jit(reductions.categorical),
       (jax.random.key(2), logits), g * f),
  ]


def main(argv):
  del argv
  print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} cores, "
        f"jax {jax.__version__}, malloc {allocator.in_use()}, cpu dots "
        f"{flags.FLAGS.cpu_dots}")
  print("| op | ms | GFLOP/s | CPU time / wall time |")
  print("|---|---|---|---|")
  for name, fn, args, flop in _ops():
    seconds, busy = _time(fn, *args)
    print(f"| {name} | {1e3 * seconds:.2f} | {flop / seconds / 1e9:.0f} | {busy:.2f} |",
          flush=True)


if __name__ == "__main__":
  allocator.define_flags()
  app.run(allocator.entry_point(main))
