#!/usr/bin/env python3
r"""Runs N genie_jax.cli.train processes on this machine as one multi-process JAX job.

  launch/multiprocess_local.py [--num_processes=2] [--devices_per_process=4] [--port=0]
      [--timeout=600] [--log_dir=DIR] [--platform=cpu] [--dry_run] -- MAIN_FLAGS...

  launch/multiprocess_local.py --num_processes=2 -- \
      --config=configs/tokenizer.py:runlocal --workdir=workdirs/tok_2proc

Each process runs `python -m genie_jax.cli.train MAIN_FLAGS --coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=I` (process 0 hosts JAX's coordinator; a free port is picked
when --port=0). Environment given to each process: JAX_PLATFORMS=<--platform> and, on cpu,
$XLA_FLAGS with --xla_force_host_platform_device_count=<--devices_per_process> (CPU
collectives use gloo, chosen by genie_jax.distributed). PYTHON (default: this interpreter)
runs the processes. Process I's output goes to LOG_DIR/process_I.log (default: a temporary
folder); the last lines of every log are printed when a process fails. If one process fails or
--timeout seconds pass, the others are killed, so the job never hangs; so are they when this
launcher gets SIGTERM. Exit status: 0 if every process succeeded.
--dry_run prints the commands (with their environment) and starts nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def cpu_xla_flags(devices_per_process: int) -> str:
  """This process's $XLA_FLAGS with the CPU device count replaced by `devices_per_process`."""
  kept = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
          if flag.split("=")[0] != _DEVICE_COUNT_FLAG]
  return " ".join(kept + [f"{_DEVICE_COUNT_FLAG}={devices_per_process}"])


def commands(args: argparse.Namespace, main_flags: list[str]) -> list[tuple[dict, list[str]]]:
  """(extra environment, argv) of every process."""
  python = os.environ.get("PYTHON", sys.executable)
  env = {"JAX_PLATFORMS": args.platform}
  if args.platform == "cpu":
    env["XLA_FLAGS"] = cpu_xla_flags(args.devices_per_process)
  return [(env, [python, "-m", args.module, *main_flags,
                 f"--coordinator_address=127.0.0.1:{args.port}",
                 f"--num_processes={args.num_processes}", f"--process_id={i}"])
          for i in range(args.num_processes)]


def _tail(path: str, lines: int = 30) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def run(args: argparse.Namespace, main_flags: list[str]) -> int:
  """Starts every process, waits for all; kills the rest on the first failure or timeout."""
  log_dir = args.log_dir or tempfile.mkdtemp(prefix="genie_multiprocess_")
  os.makedirs(log_dir, exist_ok=True)
  procs, logs = [], []
  status = 0
  try:
    for i, (env, argv) in enumerate(commands(args, main_flags)):
      logs.append(os.path.join(log_dir, f"process_{i}.log"))
      with open(logs[-1], "w", encoding="utf-8") as log:
        # A new session per process: killing it takes Grain workers and other children along.
        procs.append(subprocess.Popen(argv, env={**os.environ, **env}, stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True))
    deadline = time.monotonic() + args.timeout
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs if p.returncode not in (None, 0)]
      if failed or time.monotonic() > deadline:
        status = failed[0].returncode if failed else 124
        print(f"multiprocess_local: {'a process failed' if failed else 'timeout'}; "
              "stopping the others", file=sys.stderr)
        break
      time.sleep(0.2)
    status = status or next((p.returncode for p in procs if p.returncode), 0)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, 9)
        p.wait()
  if status:
    for i, path in enumerate(logs):
      print(f"--- process {i} ({path}), last lines:\n{_tail(path)}", file=sys.stderr)
  else:
    print(f"multiprocess_local: {len(procs)} processes succeeded; logs in {log_dir}")
  return status


def main() -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4,
                      help="fake CPU devices per process (--platform=cpu only)")
  parser.add_argument("--platform", default="cpu", help="JAX_PLATFORMS of every process")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--timeout", type=float, default=600.0,
                      help="seconds before every process is killed")
  parser.add_argument("--log_dir", default=None)
  parser.add_argument("--dry_run", action="store_true", help="print the commands only")
  parser.add_argument("--module", default="genie_jax.cli.train",
                      choices=["genie_jax.cli.train", "genie_jax.cli.pipeline", "genie_jax.cli.evaluate",
                               "genie_jax.cli.generate"],
                      help="the entry point every process runs")
  parser.add_argument("main_flags", nargs="*", help="flags for genie_jax.cli.train, after --")
  args = parser.parse_args()
  if args.num_processes < 1:
    parser.error(f"--num_processes={args.num_processes} must be at least 1")
  needs_config = args.module in ("genie_jax.cli.train", "genie_jax.cli.pipeline")
  if (needs_config and not any(f.startswith("--config=") for f in args.main_flags)) or not any(
      f.startswith("--workdir=") for f in args.main_flags):
    parser.error(f"pass at least {'--config=... and ' if needs_config else ''}--workdir=... "
                 f"for {args.module} after --")
  if not args.port:
    args.port = free_port()
  # SIGTERM (e.g. a test's timeout) unwinds through run()'s `finally`, which kills the processes.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  if args.dry_run:
    for env, argv in commands(args, args.main_flags):
      print(" ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] +
                     [shlex.quote(a) for a in argv]))
    return 0
  return run(args, args.main_flags)


if __name__ == "__main__":
  sys.exit(main())
