#!/usr/bin/env python3
r"""Breaks a tiny training job on purpose and checks that nothing is lost.

  launch/fault_injection.py [--root=DIR] [--total_steps=40] [--checkpoint_every=5]
      [--scenarios=kill9,sigterm,corrupt] [--num_processes=1] [--devices_per_process=1]
      [--seed=N] [--timeout=300]

Runs the same genie_jax.cli.train command (tiny tokenizer, tiny builtin_world data, one log row per
step) in ROOT/faulty, disturbed by each scenario in turn, then once more to the end:

  kill9    kill -9 (every process) once a random step is logged; the next run must restore the
           latest checkpoint that existed then (an asynchronous save cut short must not count).
  sigterm  SIGTERM (to the last process only: JAX's preemption service tells the others) once
           a random later step is logged; the run must checkpoint the step it stopped at, agreed
           by all processes, and exit with status 0; the next run must restore that step.
  corrupt  truncate the biggest array file of the latest checkpoint; the next run must warn
           naming it, restore the previous checkpoint, and keep the damaged files (renamed).

Meanwhile the same command runs undisturbed in ROOT/reference. At the end, every step's loss in
ROOT/faulty/metrics.jsonl must equal the reference's bit for bit, every step must be logged
exactly once and every checkpoint step must be there. Prints what it did and the verdict; exit
status 0 if every check passed. Logs of every run: ROOT/logs/. ROOT defaults to a new
temporary folder. With --num_processes > 1 each run is a local multi-process job (processes as
launch/multiprocess_local.py starts them).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = ("kill9", "sigterm", "corrupt")


def main_flags(data_dir: str, workdir: str, total_steps: int, checkpoint_every: int,
               **overrides) -> list[str]:
  """genie_jax.cli.train flags of the tiny job (tests/conftest.py's tiny_config, without images
  and evaluations, keeping every checkpoint)."""
  values = {
      "data.data_dir": data_dir, "data.image_size": 32, "data.clip_len": 8,
      "data.num_train_episodes": 8, "data.num_val_episodes": 4, "data.episode_len": 40,
      "model.image_size": 32, "model.max_frames": 8, "batch_size": 8, "log_every_steps": 1,
      "images_every_steps": 0, "eval_every_steps": 0, "optimizer.warmup_steps": 2,
      "total_steps": total_steps, "checkpoint.every_steps": checkpoint_every,
      "checkpoint.max_to_keep": 1000, **overrides}
  return (["--config=configs/tokenizer.py:size=tiny,runlocal", f"--workdir={workdir}"] +
          [f"--config.{k}={v}" for k, v in values.items()])


def _multiprocess_local():
  spec = importlib.util.spec_from_file_location(
      "multiprocess_local", os.path.join(REPO, "launch", "multiprocess_local.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class Job:
  """One run of the training command: one process, or a local multi-process job."""

  def __init__(self, flags: list[str], log_path: str, *, num_processes: int = 1,
               devices_per_process: int = 1, env: dict[str, str] | None = None):
    mpl = _multiprocess_local()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": mpl.cpu_xla_flags(devices_per_process), **(env or {})}
    if num_processes == 1:
      argvs = [(env, [sys.executable, "-m", "genie_jax.cli.train", *flags])]
    else:
      args = argparse.Namespace(num_processes=num_processes, port=mpl.free_port(),
                                platform="cpu", devices_per_process=devices_per_process)
      argvs = [({**env, **extra}, argv) for extra, argv in mpl.commands(args, flags)]
    self.log_paths = []
    self.procs = []
    for i, (proc_env, argv) in enumerate(argvs):
      path = log_path if num_processes == 1 else f"{log_path[:-4]}_process{i}.log"
      self.log_paths.append(path)
      with open(path, "w", encoding="utf-8") as log:
        # Own session: kill -9 takes every thread and child of the process along.
        self.procs.append(subprocess.Popen(argv, cwd=REPO, env=proc_env, stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True))

  def running(self) -> bool:
    return any(p.poll() is None for p in self.procs)

  def wait(self, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    for p in self.procs:
      try:
        p.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        self.kill()
        raise RuntimeError(f"timeout after {timeout}s; logs: {self.log_paths}") from None
    return [p.returncode for p in self.procs]

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    for p in self.procs:
      p.wait()

  def output(self) -> str:
    return "".join(open(path, encoding="utf-8", errors="replace").read()
                   for path in self.log_paths)


def read_losses(workdir: str, key: str = "train/loss") -> dict[int, list[float]]:
  """step -> every logged value (a step logged twice shows up twice); a row being written
  (no newline yet) is ignored."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows: dict[int, list[float]] = {}
  if not os.path.exists(path):
    return rows
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.endswith("\n"):
        break
      row = json.loads(line)
      if key in row:
        rows.setdefault(row["step"], []).append(row[key])
  return rows


def checkpoint_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps (Orbax renames a step's temporary directory when complete)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def wait_for_step(job: Job, workdir: str, step: int, timeout: float) -> int:
  """Polls metrics.jsonl until `step` is logged; returns the latest logged step."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    logged = max(read_losses(workdir), default=0)
    if logged >= step:
      return logged
    if not job.running():
      raise RuntimeError(f"the run ended before step {step} was logged (last: {logged}); "
                         f"logs: {job.log_paths}")
    time.sleep(0.01)
  job.kill()
  raise RuntimeError(f"step {step} not logged within {timeout}s; logs: {job.log_paths}")


def restored_step(output: str) -> int | None:
  marker = "Restored checkpoint of step "
  if marker not in output:
    return None
  return int(output.rsplit(marker, 1)[1].split()[0])


def corrupt_latest(workdir: str) -> tuple[str, str]:
  """Truncates the biggest array data file of the latest checkpoint to half its size."""
  step_dir = os.path.join(workdir, "checkpoints", str(checkpoint_steps(workdir)[-1]))
  files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(p)]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  return step_dir, path


def files_under(directory: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, n), directory)
                for d, _, names in os.walk(directory) for n in names)


def run(args: argparse.Namespace) -> int:
  root = args.root or tempfile.mkdtemp(prefix="genie_faults_")
  data_dir = args.data_dir or os.path.join(root, "data")
  logs = os.path.join(root, "logs")
  os.makedirs(logs, exist_ok=True)
  rng = random.Random(args.seed)
  print(f"fault_injection: root={root} seed={args.seed} scenarios={','.join(args.scenarios)} "
        f"processes={args.num_processes} steps={args.total_steps} "
        f"checkpoint_every={args.checkpoint_every}")
  # Later runs load the compiled step from here instead of compiling it again.
  env = {"JAX_COMPILATION_CACHE_DIR": os.path.join(root, "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  faulty, reference = os.path.join(root, "faulty"), os.path.join(root, "reference")

  def start(workdir, name):
    return Job(main_flags(data_dir, workdir, args.total_steps, args.checkpoint_every),
               os.path.join(logs, f"{name}.log"), num_processes=args.num_processes,
               devices_per_process=args.devices_per_process, env=env)

  failures = []

  def check(ok, what):
    print(f"  [{'ok' if ok else 'FAILED'}] {what}")
    if not ok:
      failures.append(what)

  ref_job = start(reference, "reference")
  jobs = [ref_job]
  try:
    # The reference generates the data; the faulty runs start once it trains.
    wait_for_step(ref_job, reference, 1, args.timeout)
    expect = None  # (scenario, step) that the next run must restore.
    corrupted = None
    for i, scenario in enumerate(args.scenarios):
      if scenario == "corrupt":
        steps = checkpoint_steps(faulty)
        if len(steps) < 2:
          check(False, f"corrupt: needs two checkpoints, found {steps}")
          continue
        before = files_under(os.path.join(faulty, "checkpoints", str(steps[-1])))
        step_dir, path = corrupt_latest(faulty)
        print(f"corrupt: truncated {os.path.relpath(path, faulty)} to half its size "
              f"(checkpoints: {steps})")
        corrupted = (step_dir, before)
        expect = (scenario, steps[-2])
        continue
      job = start(faulty, f"faulty_{i}_{scenario}")
      jobs.append(job)
      # Rows left by an earlier run are dropped only once this one restored: disturb it at a
      # step after all of them.
      # And after the first checkpoint, so that there is something to resume from.
      first = max(max(read_losses(faulty), default=0), args.checkpoint_every) + 1
      target = min(rng.randint(first, first + args.total_steps // 4), args.total_steps - 2)
      logged = wait_for_step(job, faulty, target, args.timeout)
      if expect is not None:
        got = restored_step(job.output())
        check(got == expect[1], f"{expect[0]}: the rerun restored step {got} "
                                f"(expected {expect[1]})")
      if scenario == "kill9":
        job.kill()
        steps = checkpoint_steps(faulty)
        print(f"kill9: kill -9 once step {target} was logged (step {logged} was); "
              f"checkpoints left: {steps}")
        leftovers = [n for n in os.listdir(os.path.join(faulty, "checkpoints"))
                     if not n.isdigit()]
        if leftovers:
          print(f"  unfinished saves left behind (not listed as steps): {leftovers}")
        expect = (scenario, steps[-1] if steps else None)
      else:
        os.kill(job.procs[-1].pid, signal.SIGTERM)
        codes = job.wait(args.timeout)
        stops = {int(o.split("Preempted at step ")[1].split(":")[0])
                 for o in (open(p, encoding="utf-8").read() for p in job.log_paths)
                 if "Preempted at step " in o}
        stopped = min(stops) if stops else None
        print(f"sigterm: SIGTERM once step {target} was logged; exit status {codes}, "
              f"preemption checkpoint at step {stopped}")
        check(codes == [0] * len(codes), "sigterm: every process exited with status 0")
        check(len(stops) == 1, f"sigterm: every process stopped at the same step ({stops})")
        check(stopped in checkpoint_steps(faulty),
              f"sigterm: the step it stopped at ({stopped}) is checkpointed")
        check(stopped == max(read_losses(faulty), default=0),
              "sigterm: it stopped right after the last logged step")
        expect = (scenario, stopped)

    final = start(faulty, "faulty_final")
    jobs.append(final)
    codes = final.wait(args.timeout)
    out = final.output()
    check(codes == [0] * len(codes), f"final run: exit status {codes}")
    if expect is not None:
      check(restored_step(out) == expect[1],
            f"{expect[0]}: the rerun restored step {restored_step(out)} "
            f"(expected {expect[1]})")
    if corrupted is not None:
      step_dir, before = corrupted
      check(f"Checkpoint {step_dir} cannot be restored" in out,
            f"corrupt: the rerun warned naming {step_dir}")
      aside = glob.glob(os.path.join(faulty, "checkpoints", "unreadable_step_" +
                                     os.path.basename(step_dir) + "_*"))
      check(len(aside) == 1 and files_under(aside[0]) == before,
            f"corrupt: the damaged checkpoint kept with all its {len(before)} files as "
            f"{[os.path.basename(a) for a in aside]}")
    ref_codes = ref_job.wait(args.timeout)
    check(ref_codes == [0] * len(ref_codes), f"reference run: exit status {ref_codes}")
  finally:
    for job in jobs:
      job.kill()

  got, want = read_losses(faulty), read_losses(reference)
  steps = list(range(1, args.total_steps + 1))
  check(sorted(want) == steps and sorted(got) == steps,
        f"steps 1..{args.total_steps} logged (faulty: {len(got)}, reference: {len(want)})")
  check(all(len(got.get(s, [])) == 1 for s in steps), "every step logged exactly once")
  same = [s for s in steps if got.get(s) == want.get(s)]
  check(len(same) == len(steps),
        f"loss bitwise equal to the uninterrupted run at {len(same)}/{len(steps)} steps")
  expected_ckpts = sorted(set(range(args.checkpoint_every, args.total_steps + 1,
                                    args.checkpoint_every)) | {args.total_steps})
  have = checkpoint_steps(faulty)
  check(set(expected_ckpts) <= set(have),
        f"checkpoints {expected_ckpts} present (found {have})")
  print(f"fault_injection: {'nothing lost' if not failures else 'FAILED: ' + '; '.join(failures)}"
        f" (logs in {logs})")
  return 1 if failures else 0


def main() -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", default=None, help="working folder (default: a new temp one)")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data_dir of the tiny dataset (default ROOT/data)")
  parser.add_argument("--total_steps", type=int, default=40)
  parser.add_argument("--checkpoint_every", type=int, default=5)
  parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                      help=f"comma-separated, in order, from {SCENARIOS}")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--seed", type=int, default=None,
                      help="picks the steps to disturb (default: random, printed)")
  parser.add_argument("--timeout", type=float, default=300.0,
                      help="seconds any single wait may take")
  args = parser.parse_args()
  args.scenarios = [s for s in args.scenarios.split(",") if s]
  unknown = sorted(set(args.scenarios) - set(SCENARIOS))
  if unknown:
    parser.error(f"--scenarios: unknown {unknown}; choose from {SCENARIOS}")
  if args.checkpoint_every < 1 or args.total_steps < 4 * args.checkpoint_every:
    parser.error("--total_steps must be at least 4 x --checkpoint_every (>= 1), so that every "
                 "scenario happens mid-run")
  if args.seed is None:
    args.seed = random.SystemRandom().randrange(10**6)
  return run(args)


if __name__ == "__main__":
  sys.exit(main())
