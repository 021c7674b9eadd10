r"""`benchmarks/suite.py` on two versions of the code, in alternating runs.

  python benchmarks/pairs.py --before=00d4e42 --harness=ef7f2a6 --pairs=6 \
      --suite_args="--only=train --shapes=readme --stages=tokenizer,dynamics --steps=4" \
      --before_args="--malloc=system --cpu_dots=xla"

Each pair runs the suite once on --before (a git revision, checked out in a temporary
worktree) and once on --after (another revision, or this working tree as it is when unset),
with --suite_args plus each side's own flags (--before_args, --after_args); odd pairs run
"before" first, even pairs "after" first, so that a drift of the machine's speed within a
pair (this one's drifts by tens of percent over minutes) does not always favour one side.
With --harness, the --before checkout (a revision older than the suite, say) takes the suite
and the modules it measures with (--harness_files) from that revision. Each run imports the
code of its own tree: this repository's editable install (whose finder would lend this
tree's modules to an import an older revision cannot satisfy) and this tree's root are taken
off the import path.
Input rows read --data_dir (put it in --suite_args, absolute, so that both sides read the same
files). Prints each run's table, then per suite row both sides' ms in every pair, the
speed-up (before / after), the means and the median of the pairs' speed-ups.
"""

from __future__ import annotations

import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging

_BEFORE = flags.DEFINE_string("before", None, "Git revision measured on one side.",
                              required=True)
_AFTER = flags.DEFINE_string("after", None, "Git revision measured on the other side "
                             "(default: this working tree, as it is).")
_HARNESS = flags.DEFINE_string("harness", None, "Git revision whose --harness_files replace "
                               "those of the --before checkout (one older than the suite).")
_HARNESS_FILES = flags.DEFINE_list(
    "harness_files", ["benchmarks/suite.py", "genie_jax/profiling.py", "genie_jax/allocator.py"],
    "Files taken from --harness.")
_PAIRS = flags.DEFINE_integer("pairs", 3, "Pairs of runs.", lower_bound=1)
_SUITE_ARGS = flags.DEFINE_string("suite_args", "", "Flags of benchmarks/suite.py, both sides.")
_BEFORE_ARGS = flags.DEFINE_string("before_args", "", "Suite flags for --before only.")
_AFTER_ARGS = flags.DEFINE_string("after_args", "", "Suite flags for --after only.")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Set by the allocator in a process it re-executed: inherited, it would keep the suite from
# choosing its own allocator.
_REEXECUTED = "_GENIE_JAX_MALLOC_REEXECUTED"
# Runs the suite of the current directory with this repository's editable install (the
# finder setuptools puts on sys.meta_path, from its `__editable___genie_jax_*` module) and
# this tree's root off the import path: the tree's root, which the suite puts first on
# sys.path, then serves every import of its packages.
_BOOTSTRAP = ("import os, runpy, sys\n"
              "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(\n"
              "    f, '__module__', '').startswith('__editable___genie_jax')]\n"
              f"sys.path[:] = [p for p in sys.path if os.path.abspath(p) != {_ROOT!r}]\n"
              "sys.argv = ['benchmarks/suite.py'] + sys.argv[1:]\n"
              "runpy.run_path('benchmarks/suite.py', run_name='__main__')\n")
# suite.KINDS, which every revision of the suite prints as a row's first cell (importing the
# suite for it would load jax and the framework into this process).
_KINDS = ("train", "rollout", "input")
Key = tuple[str, str, str]


def parse_rows(table: str) -> dict[Key, float]:
  """{(kind, what, shape): ms} of the suite's result rows in `table`, in its order."""
  rows = {}
  for line in table.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) >= 6 and cells[0] in _KINDS and cells[5]:
      key = (cells[0], cells[1], cells[2])
      if key in rows:
        raise ValueError(f"the suite printed row {' '.join(key)!r} twice")
      rows[key] = float(cells[5])
  return rows


def summary(runs: list[tuple[dict[Key, float], dict[Key, float]]]) -> str:
  """A markdown table: per row of the suite that both sides printed, each pair's ms before
  and after and the speed-up, then the mean ms, the speed-up of the means and the median
  of the pairs' speed-ups."""
  lines = ["| row | pair | before ms | after ms | speed-up |", "|---|---|---|---|---|"]
  pairs: dict[Key, list[tuple[float, float]]] = {}
  for before, after in runs:
    for key in before:
      if key in after:
        pairs.setdefault(key, []).append((before[key], after[key]))
  for key, values in pairs.items():
    name = " ".join(key)
    for i, (b, a) in enumerate(values, 1):
      lines.append(f"| {name} | {i} | {b:.1f} | {a:.1f} | {b / a:.2f}x |")
    mean_b = statistics.fmean(b for b, _ in values)
    mean_a = statistics.fmean(a for _, a in values)
    median = statistics.median(b / a for b, a in values)
    lines.append(f"| {name} | mean | {mean_b:.1f} | {mean_a:.1f} | {mean_b / mean_a:.2f}x "
                 f"(median of the pairs {median:.2f}x) |")
  return "\n".join(lines)


def _git(*args: str, cwd: str = _ROOT, check: bool = True) -> subprocess.CompletedProcess:
  done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
  if check and done.returncode:
    raise RuntimeError(f"git {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
  return done


def _split(flag: str, value: str) -> list[str]:
  try:
    return shlex.split(value)
  except ValueError as e:
    raise app.UsageError(f"--{flag}={value!r}: {e}") from e


def _check() -> None:
  """Every revision and harness file exists; before any checkout or run."""
  for flag, rev in (("before", _BEFORE.value), ("after", _AFTER.value),
                    ("harness", _HARNESS.value)):
    if rev and _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}",
                    check=False).returncode:
      raise app.UsageError(f"--{flag}={rev}: not a git revision of {_ROOT}")
  for path in _HARNESS_FILES.value if _HARNESS.value else ():
    kind = _git("cat-file", "-t", f"{_HARNESS.value}:{path}", check=False).stdout.strip()
    if kind != "blob":
      raise app.UsageError(f"--harness_files: {path} is not a file in --harness="
                           f"{_HARNESS.value}")


def _run_suite(tree: str, args: list[str], label: str) -> dict[Key, float]:
  env = {k: v for k, v in os.environ.items() if k != _REEXECUTED}
  done = subprocess.run([sys.executable, "-c", _BOOTSTRAP, *args], cwd=tree, env=env,
                        capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"{label}: benchmarks/suite.py {' '.join(args)} in {tree} exited "
                       f"{done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
  print(f"{label}:\n{done.stdout.strip()}", flush=True)
  rows = parse_rows(done.stdout)
  if not rows:
    raise RuntimeError(f"{label}: no result rows in the suite's output:\n{done.stdout}")
  return rows


def _measure(trees: dict[str, str], args: dict[str, list[str]], revs: dict[str, str]
             ) -> None:
  runs = []
  try:
    for i in range(1, _PAIRS.value + 1):
      order = ("before", "after") if i % 2 else ("after", "before")
      rows = {side: _run_suite(trees[side], args[side], f"pair {i}, {side} ({revs[side]})")
              for side in order}
      alone = rows["before"].keys() ^ rows["after"].keys()
      if alone == rows["before"].keys() | rows["after"].keys():
        raise RuntimeError("the two sides printed no row in common (the same kind, what and "
                           "shape): compare runs of the same measurements")
      if alone:
        logging.warning("rows printed by one side only, left out: %s",
                        ", ".join(" ".join(key) for key in sorted(alone)))
      runs.append((rows["before"], rows["after"]))
  finally:
    if runs:
      try:
        print(summary(runs), flush=True)
      except Exception:  # pylint: disable=broad-exception-caught
        logging.exception("no summary of the finished pairs")  # The run's own error wins.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]} (suite flags go in --suite_args)")
  suite_args = _split("suite_args", _SUITE_ARGS.value)
  args = {"before": suite_args + _split("before_args", _BEFORE_ARGS.value),
          "after": suite_args + _split("after_args", _AFTER_ARGS.value)}
  _check()
  # A kill (`timeout`, a scheduler) then still removes the worktrees.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
  revs = {"before": _BEFORE.value, "after": _AFTER.value or "working tree"}
  worktrees = []
  with tempfile.TemporaryDirectory() as root:
    try:
      trees = {"after": _ROOT}
      for side, rev in (("before", _BEFORE.value), ("after", _AFTER.value)):
        if not rev:
          continue
        trees[side] = os.path.join(root, side)
        worktrees.append(trees[side])  # Before `add`, which may be cut short.
        _git("worktree", "add", "--detach", trees[side], rev)
        if side == "before" and _HARNESS.value:
          _git("checkout", _HARNESS.value, "--", *_HARNESS_FILES.value, cwd=trees[side])
      _measure(trees, args, revs)
    finally:
      for sig in (signal.SIGTERM, signal.SIGINT):  # Let the cleanup finish.
        signal.signal(sig, signal.SIG_IGN)
      for tree in worktrees:
        # Twice forced: also a worktree left locked by an interrupted `add`.
        done = _git("worktree", "remove", "--force", "--force", tree, check=False)
        if done.returncode and os.path.exists(tree):
          logging.warning("could not remove the worktree %s: %s", tree, done.stderr.strip())


if __name__ == "__main__":
  app.run(main)
