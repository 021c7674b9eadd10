r"""Every stage's train step, the rollout and the input pipeline, timed on this machine.

  python benchmarks/suite.py                                   # runlocal + readme shapes
  python benchmarks/suite.py --only=train --shapes=readme --steps=5
  python benchmarks/suite.py --only=rollout --shapes=appf --rollout_frames=16,64
  python benchmarks/suite.py --only=rollout --temporal_positions=rope --sink_frames=1 \
      --tokenizer_positions=rope --tokenizer_sinks=1     # streaming: both caches roll
  python benchmarks/suite.py --malloc=system                   # glibc's malloc as it comes
  python benchmarks/suite.py --only=train --breakdown          # and where each step's time goes
  python benchmarks/suite.py --only=train --microbatches=4     # each batch in 4 microbatches
  python benchmarks/suite.py --dynamics=diffusion --diffusion_steps=8   # the diffusion family
  python benchmarks/suite.py --only=train --dtype=bfloat16     # every model computing in bf16
  python benchmarks/suite.py --only=train --shapes=appf --batch_size=16 --count_only  # FLOPs only

One table, one row per measurement:
  train    the whole train step (forward, backward, clipping, AdamW; for dynamics also the
           frozen tokenizer's encoder and the LAM) on random frames: median seconds per step,
           frames/s, XLA's FLOPs per step (of the program before compilation, per device:
           `profiling.program_flops`) and model-FLOPs utilisation against the best
           matmul throughput measured here (float32, or --dtype's operands).
  rollout  `Genie.rollout` (prompt encoding, MaskGIT per frame, decoding) of N generated
           frames from a 1-frame prompt at --maskgit_steps (`DiffusionGenie.rollout` at
           --diffusion_steps Euler steps with --dynamics=diffusion): ms per generated frame
           and frames/s of the second call; the first call's extra time is its compile time.
  input    clips/s of training batches read from the prepared ArrayRecord files through
           Grain (the built-in world, generated into --data_dir on first use).
Train rows also give XLA's estimate of the step's temporary memory (`--microbatches` cuts
it). Every row also gives the process's peak RSS so far. Weights are random: the figures are the
programs', not a trained model's.

--dynamics=diffusion measures the diffusion family instead (genie_jax/models/diffusion.py): a
'kl' tokenizer of the same shape and the diffusion-forcing dynamics model of the MaskGIT
model's (its train row is the "dynamics" stage's).

Shapes:
  runlocal  the three stages exactly as README command 1 trains them (32x32 frames).
  readme    README "Benchmark": 64x64x16 clips, patch 4 (256 tokens/frame), d 256, 4 heads,
            4(+4) blocks, 1024 codes, batch 4; the LAM with patch 16 and 6 codes.
  appf      Genie App. F: tokenizer d 512 8+8 blocks, LAM d 1024 8+8 blocks, dynamics d 512
            12 blocks, 8 heads, 256 tokens/frame; batch cut to 2 (rollout: 1) for a CPU.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import data_pipelines
from configs import diffusion as diffusion_config
from configs import dynamics as dynamics_config
from configs import genie as genie_config
from configs import lam as lam_config
from configs import tokenizer as tokenizer_config
from genie_jax import allocator
from genie_jax import config_lib
from genie_jax import profiling
from genie_jax import sharding
from genie_jax import tasks
from genie_jax.data import input_pipeline
from genie_jax.inference import diffusion as diffusion_sampling
from genie_jax.inference import genie as genie_lib
from genie_jax.training import pipeline
from genie_jax.training import train_state
# pylint: enable=g-import-not-at-top,wrong-import-position

STAGES = ("tokenizer", "lam", "dynamics")
KINDS = ("train", "rollout", "input")
SHAPES = ("runlocal", "readme", "appf")
_README = dict(d_model=256, num_heads=4)

_ONLY = flags.DEFINE_list("only", list(KINDS), f"Which of {list(KINDS)} to measure.")
_SHAPES = flags.DEFINE_list("shapes", ["runlocal", "readme"], f"Of {list(SHAPES)}.")
_STAGES = flags.DEFINE_list("stages", list(STAGES), "Train steps of these stages.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed train steps (after one warm-up step).")
_BREAKDOWN = flags.DEFINE_bool(
    "breakdown", False, "After each train and rollout row, where its time goes: XLA's ops "
    "from a jax.profiler trace (train: --steps more steps; rollout: one call of a rollout of "
    "up to 20 frames, per generated frame), matmuls apart from the rest by kind (XLA:CPU, "
    "whose trace names the HLO ops).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Batch of every stage's train step and input "
                              "rows (0: the shape's; e.g. Genie's own batches on an "
                              "accelerator at --shapes=appf).", lower_bound=0)
_BREAKDOWN_FRAMES = 20  # Frames of the rollout --breakdown traces (past a 16-frame window).
_MICROBATCHES = flags.DEFINE_integer(
    "microbatches", 1, "Train rows: each step's batch in this many microbatches, their "
    "gradients accumulated (config.microbatches).", lower_bound=1)
_COUNT_ONLY = flags.DEFINE_bool(
    "count_only", False, "With --only=train: only lower each step and give its FLOPs per device "
    "(profiling.program_flops, as the trainer logs them); nothing compiled or timed, so a step "
    "too big for this machine can be counted (e.g. --shapes=appf --batch_size=16).")
_FRAMES = flags.DEFINE_list("rollout_frames", ["16", "64"], "Generated frames per rollout.")
_MASKGIT = flags.DEFINE_integer("maskgit_steps", 25, "MaskGIT steps per generated frame.")
_FAMILY = flags.DEFINE_enum("dynamics", "maskgit", ["maskgit", "diffusion"],
                            "The dynamics family (module docstring).")
_DIFFUSION_STEPS = flags.DEFINE_integer("diffusion_steps", 8, "--dynamics=diffusion: Euler "
                                        "steps per generated frame.")
_SHORTCUT = flags.DEFINE_integer("shortcut_steps", 0, "--dynamics=diffusion: the model's "
                                 "shortcut_steps (a shortcut model's step-size input).")
_INPUT_BATCHES = flags.DEFINE_integer("input_batches", 50, "Timed input batches.")
_POSITIONS = flags.DEFINE_string(
    "temporal_positions", None, "Override the dynamics model's temporal_positions (learned: "
    "the cache is rebuilt past the window; rope: it rolls).")
_SINKS = flags.DEFINE_integer("sink_frames", None, "Override the dynamics' sink_frames.")
_TOKENIZER_POSITIONS = flags.DEFINE_string(
    "tokenizer_positions", None, "Override the tokenizer's temporal_positions (learned: each "
    "frame past the decoder's window is decoded from the window ending at it; rope: the "
    "decoder's cache rolls).")
_TOKENIZER_SINKS = flags.DEFINE_integer("tokenizer_sinks", None,
                                        "Override the tokenizer's sink_frames.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Override every model's "
                           "compute dtype (model.dtype; parameters stay float32); MFU is "
                           "then against the matmul peak in that dtype.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the built-in world is prepared "
                                "(default: the data config's).")


def _configs(shape: str, root: str) -> dict:
  """{stage: config} at `shape`; the dynamics config reads its stages from `root`."""
  diffusion = _FAMILY.value == "diffusion"
  if shape == "runlocal":
    configs = {s: c for s, (_, c) in pipeline.stage_configs(genie_config.get_config(
        "runlocal" + (",dynamics=diffusion" if diffusion else "")), root).items()}
  else:
    arg = "size=appf"
    configs = dict(tokenizer=tokenizer_config.get_config(
        arg + (",quantizer=kl" if diffusion else "")), lam=lam_config.get_config(arg))
    if shape == "readme":
      configs["tokenizer"].model.update(_README, enc_layers=4, dec_layers=4)
      configs["lam"].model.update(_README, enc_layers=4, dec_layers=4, num_actions=6)
  for key, value in (("temporal_positions", _TOKENIZER_POSITIONS.value),
                     ("sink_frames", _TOKENIZER_SINKS.value)):
    if value is not None:
      configs["tokenizer"].model[key] = value
  for stage in ("tokenizer", "lam"):
    if _DTYPE.value:  # Before saving: the dynamics step's frozen stages read these.
      configs[stage].model.dtype = _DTYPE.value
    config_lib.save_config(os.path.join(root, stage), configs[stage])
  if shape != "runlocal":
    configs["dynamics"] = (diffusion_config if diffusion else dynamics_config).get_config(
        f"{arg},tokenizer_workdir={os.path.join(root, 'tokenizer')},"
        f"lam_workdir={os.path.join(root, 'lam')}")
    if shape == "readme":
      configs["dynamics"].model.update(_README, num_layers=4)
  for key, value in (("temporal_positions", _POSITIONS.value),
                     ("sink_frames", _SINKS.value)):
    if value is not None:
      configs["dynamics"].model[key] = value
  if _DTYPE.value:
    configs["dynamics"].model.dtype = _DTYPE.value
  if diffusion and _SHORTCUT.value:
    configs["dynamics"].model.shortcut_steps = _SHORTCUT.value
  batch = _BATCH.value or dict(runlocal=None, readme=4, appf=2)[shape]
  for config in configs.values():
    config.mesh = sharding.single_device_mesh_shape()
    config.microbatches = _MICROBATCHES.value
    if batch:
      config.batch_size = batch
  return configs


def _random_batch(config) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  b, t, s = config.batch_size, config.data.clip_len, config.data.image_size
  return dict(video=rng.integers(0, 256, (b, t, s, s, 3), dtype=np.uint8),
              actions=rng.integers(0, 4, (b, t), dtype=np.int32))


def bench_train(config, peak: float) -> dict[str, float]:
  task = tasks.get_task(config)
  spec = train_state.make_state_spec(task, config, sharding.make_mesh(config.mesh,
                                                                      jax.devices()[:1]))
  local = _random_batch(config)
  shapes = train_state.abstract_batch(spec, local)
  if _COUNT_ONLY.value:
    whole = train_state.jit_train_step(task, spec, config.seed).lower(spec.abstract, shapes)
    flops = profiling.program_flops(whole, None, spec.mesh.size)
    return dict(gflop=float("nan") if flops is None else flops / 1e9, batch=config.batch_size)
  batch = jax.device_put(local, spec.batch_sharding)
  t0 = time.perf_counter()
  lowered = train_state.jit_train_step(task, spec, config.seed,
                                       microbatches=config.microbatches).lower(
      spec.abstract, shapes)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  step_s, state, _ = profiling.time_steps(compiled, spec.init(jax.random.key(config.seed)),
                                          batch, _STEPS.value)
  stats = train_state.step_stats(lowered, compiled, task, spec, config.seed, shapes,
                                 config.microbatches)
  flops = stats.get("flops", float("nan"))
  temp = stats.get("temp_bytes", float("nan"))
  frames = config.batch_size * config.data.clip_len
  result = dict(compile_s=compile_s, ms=1e3 * step_s, rate=frames / step_s, unit="frames/s",
                gflop=flops / 1e9, mfu=flops / step_s / peak, batch=config.batch_size,
                temp_mib=temp / 2**20)
  if _BREAKDOWN.value:
    result["breakdown"] = profiling.step_breakdown(compiled, state, batch, _STEPS.value)
  return result


def _breakdown_lines(b: dict, per: str, ms: float | None, peak: float) -> list[str]:
  """The breakdown of a call that took `ms` (None: a call of another length was traced)."""
  total = b["total_ms"]
  kinds = ", ".join(f"{k} {v:.1f} ({v / total:.0%})" for k, v in b["kinds"].most_common(6))
  top = ", ".join(f"{k} {v:.1f}" for k, v in b["top"])
  lines = [f"    XLA ops, ms per {per} (traced; sum {total:.1f}): {kinds}",
           f"    largest ops: {top}"]
  if jax.default_backend() == "cpu":  # Elsewhere the matmuls are library calls, not dots.
    untimed = ("2d",) if flags.FLAGS.cpu_dots == "eigen" else ()
    lines.append("    " + profiling.format_matmuls(b["matmuls"], per, ms, peak, untimed))
  return lines


def _genie(config) -> genie_lib.Generator:
  generator = (diffusion_sampling.DiffusionGenie if config.stage == "diffusion"
               else genie_lib.Genie)
  return generator(tasks.get_task(config).make_model(nnx.Rngs(0)))


def _steps_per_frame() -> int:
  return _DIFFUSION_STEPS.value if _FAMILY.value == "diffusion" else _MASKGIT.value


def bench_rollout(config, num_frames: int, peak: float) -> dict[str, float]:
  del peak
  genie = _genie(config)
  b = 1
  s = config.data.image_size
  prompt = np.random.default_rng(0).integers(0, 256, (b, 1, s, s, 3), dtype=np.uint8)
  actions = np.random.default_rng(1).integers(0, genie.num_actions, (b, num_frames))
  times = []
  for i in range(2):
    t0 = time.perf_counter()
    jax.block_until_ready(genie.rollout(prompt, actions, rng=jax.random.key(i),
                                        num_steps=_steps_per_frame()))
    times.append(time.perf_counter() - t0)
  result = dict(compile_s=times[0] - times[1], ms=1e3 * times[1] / num_frames,
                rate=b * num_frames / times[1], unit="frames/s", batch=b)
  if _BREAKDOWN.value:
    # The profiler keeps a bounded number of events: a long rollout's trace loses ops.
    traced = min(num_frames, _BREAKDOWN_FRAMES)
    args = (genie._state, jax.numpy.asarray(prompt),  # pylint: disable=protected-access
            jax.numpy.asarray(actions[:, :traced], np.int32), jax.random.key(0))
    static = (dict(noise_scale=1.0) if config.stage == "diffusion"
              else dict(temperature=1.0, prior_weight=genie.prior_weight))
    compiled = genie._rollout.lower(  # pylint: disable=protected-access
        *args, num_steps=_steps_per_frame(), cached=True, **static).compile()
    run = lambda: jax.block_until_ready(compiled(*args))
    run()
    result["breakdown"] = profiling.op_breakdown(compiled, run, 1, per=traced)
  return result


def bench_input(config) -> dict[str, float]:
  data = config.data
  if _DATA_DIR.value:
    data.data_dir = _DATA_DIR.value
  data_pipelines.get_builder(data, prepare=True)
  it = iter(input_pipeline.make_dataset(data, "train", seed=0,
                                        global_batch_size=config.batch_size))
  next(it)  # Opens the files and starts any workers.
  t0 = time.perf_counter()
  for _ in range(_INPUT_BATCHES.value):
    next(it)
  seconds = time.perf_counter() - t0
  clips = _INPUT_BATCHES.value * config.batch_size
  return dict(ms=1e3 * seconds / _INPUT_BATCHES.value, rate=clips / seconds, unit="clips/s",
              batch=config.batch_size)


def _row(kind, what, shape, r) -> str:
  cells = [kind, what, shape, str(r.get("batch", "")),
           f"{r['compile_s']:.1f}" if "compile_s" in r else "",
           f"{r['ms']:.1f}" if "ms" in r else "",
           f"{r['rate']:.4g} {r['unit']}" if "rate" in r else "",
           f"{r['gflop']:.1f}" if "gflop" in r else "",
           f"{r['mfu']:.2f}" if "mfu" in r else "",
           f"{r['temp_mib']:.0f}" if "temp_mib" in r else "",
           f"{allocator.peak_rss_mib():.0f}"]
  return "| " + " | ".join(cells) + " |"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for name, values, known in (("only", _ONLY.value, KINDS), ("shapes", _SHAPES.value, SHAPES),
                              ("stages", _STAGES.value, STAGES)):
    if set(values) - set(known):
      raise app.UsageError(f"--{name}: unknown {sorted(set(values) - set(known))}; "
                           f"known: {list(known)}")
  if _COUNT_ONLY.value and _ONLY.value != ["train"]:
    raise app.UsageError("--count_only counts train steps only: add --only=train")
  dtype = _DTYPE.value or "float32"
  peak = float("nan") if _COUNT_ONLY.value else profiling.matmul_peak_flops(dtype=dtype)
  print(f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), "
        f"{os.cpu_count()} cores, jax {jax.__version__}, {dtype}, malloc "
        f"{allocator.in_use()}, cpu dots {flags.FLAGS.cpu_dots}, matmul peak {peak / 1e9:.1f} "
        f"GFLOP/s, train steps in {_MICROBATCHES.value} microbatch(es)")
  if _BREAKDOWN.value and jax.default_backend() == "cpu" and flags.FLAGS.cpu_dots == "eigen":
    print("note: Eigen's 2-D dots run asynchronously, past the end of their trace events, so "
          "the breakdowns' matmul time is nearly all the batched ones' (--cpu_dots=xla times "
          "every dot)")
  header = ("| kind | what | shape | batch | compile s | ms (per step / frame / batch) | "
            "rate | GFLOP/step | MFU | XLA temp MiB | peak RSS MiB |")
  print(header)
  print("|" + "---|" * (header.count("|") - 1), flush=True)
  with tempfile.TemporaryDirectory() as root:
    for shape in _SHAPES.value:
      configs = _configs(shape, os.path.join(root, shape))
      if "train" in _ONLY.value:
        for stage in _STAGES.value:
          r = bench_train(configs[stage], peak)
          print(_row("train", stage, shape, r), flush=True)
          if "breakdown" in r:
            print("\n".join(_breakdown_lines(r["breakdown"], "step", r["ms"], peak)),
                  flush=True)
      if "rollout" in _ONLY.value:
        for n in _FRAMES.value:
          r = bench_rollout(configs["dynamics"], int(n), peak)
          print(_row("rollout", f"{n} frames, {_steps_per_frame()} steps", shape, r),
                flush=True)
          if "breakdown" in r:
            # Its trace is of another compiled rollout (of at most _BREAKDOWN_FRAMES frames).
            print("\n".join(_breakdown_lines(r["breakdown"], "frame", None, peak)),
                  flush=True)
      if "input" in _ONLY.value and shape == "runlocal":
        for stage in STAGES:
          print(_row("input", f"{stage} batches", shape, bench_input(configs[stage])),
                flush=True)


if __name__ == "__main__":
  allocator.define_flags()
  app.run(allocator.entry_point(main))
