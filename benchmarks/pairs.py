r"""`benchmarks/suite.py` on two versions of the code, in alternating runs.

  python benchmarks/pairs.py --before=00d4e42 --harness=ef7f2a6 --pairs=6 \
      --suite_args="--only=train --shapes=readme --stages=tokenizer,dynamics --steps=4" \
      --before_args="--malloc=system --cpu_dots=xla"

Each pair runs the suite on --before (a git revision, checked out in a temporary worktree)
and right after it on --after (another revision, or this working tree when unset), with
--suite_args plus each side's own (--before_args, --after_args). A machine's speed drifts
over minutes (this one's by tens of percent), so only runs made side by side compare. With
--harness, the checked-out revisions (one older than the suite, say) take the suite and the
modules it measures with (the files in --harness_files) from that revision. Prints each
run's table, then per suite row the two sides' ms in every pair, the speed-up (before /
after), and the means and the median pair.
"""

from __future__ import annotations

import collections
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

_BEFORE = flags.DEFINE_string("before", None, "Git revision measured first in each pair.",
                              required=True)
_AFTER = flags.DEFINE_string("after", None, "Git revision measured second in each pair "
                             "(default: this working tree, as it is).")
_HARNESS = flags.DEFINE_string("harness", None, "Git revision whose --harness_files replace "
                               "those of the checked-out revisions (for revisions older than "
                               "the suite).")
_HARNESS_FILES = flags.DEFINE_list(
    "harness_files", ["benchmarks/suite.py", "genie_jax/profiling.py", "genie_jax/allocator.py"],
    "Files taken from --harness.")
_PAIRS = flags.DEFINE_integer("pairs", 3, "Pairs of runs.")
_SUITE_ARGS = flags.DEFINE_string("suite_args", "", "Flags of benchmarks/suite.py, both sides.")
_BEFORE_ARGS = flags.DEFINE_string("before_args", "", "Suite flags for --before only.")
_AFTER_ARGS = flags.DEFINE_string("after_args", "", "Suite flags for --after only.")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A suite started from this process must choose its own allocator: the allocator's re-exec
# marker or preload inherited from here would keep it from doing so.
_ALLOCATOR_ENV = ("LD_PRELOAD", "GLIBC_TUNABLES", "GENIE_JAX_MALLOC",
                  "_GENIE_JAX_MALLOC_REEXECUTED")
Key = tuple[str, str, str]


def parse_rows(table: str) -> dict[Key, float]:
  """{(kind, what, shape): ms} of the suite's result rows in `table`."""
  rows = {}
  for line in table.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) >= 6 and cells[0] in ("train", "rollout", "input") and cells[5]:
      rows[(cells[0], cells[1], cells[2])] = float(cells[5])
  return rows


def summary(runs: list[tuple[dict[Key, float], dict[Key, float]]]) -> str:
  """A markdown table: per row of the suite, each pair's ms before and after and the
  speed-up, then the mean ms, the speed-up of the means and the median pair's."""
  lines = ["| row | pair | before ms | after ms | speed-up |", "|---|---|---|---|---|"]
  pairs: dict[Key, list[tuple[float, float]]] = collections.defaultdict(list)
  for before, after in runs:
    for key in before.keys() & after.keys():
      pairs[key].append((before[key], after[key]))
  for key in sorted(pairs):
    name = " ".join(key)
    for i, (b, a) in enumerate(pairs[key], 1):
      lines.append(f"| {name} | {i} | {b:.1f} | {a:.1f} | {b / a:.2f}x |")
    mean_b = statistics.fmean(b for b, _ in pairs[key])
    mean_a = statistics.fmean(a for _, a in pairs[key])
    median = statistics.median(b / a for b, a in pairs[key])
    lines.append(f"| {name} | mean | {mean_b:.1f} | {mean_a:.1f} | {mean_b / mean_a:.2f}x "
                 f"(median pair {median:.2f}x) |")
  return "\n".join(lines)


def _git(*args: str, cwd: str = _ROOT) -> str:
  return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                        text=True).stdout


def _checkout(rev: str, where: str) -> str:
  _git("worktree", "add", "--detach", where, rev)
  if _HARNESS.value:
    for path in _HARNESS_FILES.value:
      os.makedirs(os.path.dirname(os.path.join(where, path)), exist_ok=True)
      with open(os.path.join(where, path), "w", encoding="utf-8") as f:
        f.write(_git("show", f"{_HARNESS.value}:{path}"))
  return where


def _run_suite(tree: str, args: list[str], label: str) -> dict[Key, float]:
  env = {k: v for k, v in os.environ.items() if k not in _ALLOCATOR_ENV}
  done = subprocess.run([sys.executable, "benchmarks/suite.py", *args], cwd=tree, env=env,
                        capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"{label}: benchmarks/suite.py {' '.join(args)} in {tree} exited "
                       f"{done.returncode}:\n{done.stderr[-3000:]}")
  print(f"{label}:\n{done.stdout.strip()}", flush=True)
  rows = parse_rows(done.stdout)
  if not rows:
    raise RuntimeError(f"{label}: no result rows in the suite's output:\n{done.stdout}")
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]} (suite flags go in --suite_args)")
  suite_args = shlex.split(_SUITE_ARGS.value)
  if _PAIRS.value < 1:
    raise app.UsageError(f"--pairs={_PAIRS.value} must be at least 1")
  # Before any run: every revision and harness file exists.
  for flag, rev in (("before", _BEFORE.value), ("after", _AFTER.value),
                    ("harness", _HARNESS.value)):
    if rev and subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                              cwd=_ROOT, capture_output=True, check=False).returncode:
      raise app.UsageError(f"--{flag}={rev}: not a git revision of {_ROOT}")
  for path in _HARNESS_FILES.value if _HARNESS.value else ():
    if subprocess.run(["git", "cat-file", "-e", f"{_HARNESS.value}:{path}"], cwd=_ROOT,
                      capture_output=True, check=False).returncode:
      raise app.UsageError(f"--harness_files: {path} is not in --harness={_HARNESS.value}")
  worktrees = []
  with tempfile.TemporaryDirectory() as root:
    try:
      before = _checkout(_BEFORE.value, os.path.join(root, "before"))
      worktrees.append(before)
      after = _ROOT
      if _AFTER.value:
        after = _checkout(_AFTER.value, os.path.join(root, "after"))
        worktrees.append(after)
      runs = []
      for i in range(1, _PAIRS.value + 1):
        runs.append((
            _run_suite(before, suite_args + shlex.split(_BEFORE_ARGS.value),
                       f"pair {i}, before ({_BEFORE.value})"),
            _run_suite(after, suite_args + shlex.split(_AFTER_ARGS.value),
                       f"pair {i}, after ({_AFTER.value or 'working tree'})")))
      print(summary(runs))
    finally:
      for tree in worktrees:
        _git("worktree", "remove", "--force", tree)


if __name__ == "__main__":
  app.run(main)
