"""benchmarks/pairs.py: reading the suite's tables, the side-by-side summary, and bad input
refused before any checkout."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, "benchmarks", "pairs.py")
_spec = importlib.util.spec_from_file_location("benchmarks_pairs", _SCRIPT)
pairs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pairs)

# The suite's output, as it prints it.
_TABLE = "\n".join([
    "cpu x1 (cpu), 2 cores, jax 0.10.2, float32, malloc tcmalloc, cpu dots eigen",
    "| kind | what | shape | batch | compile s | ms (per step / frame / batch) | rate | "
    "GFLOP/step | MFU | XLA temp MiB | peak RSS MiB |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
    "| train | tokenizer | readme | 4 | 6.4 | 6395.5 | 10.01 frames/s | 947.6 | 0.69 | 4437 "
    "| 5385 |",
    "    XLA ops, ms per step (traced; sum 4623.0): matmul 3955.2 (86%)",
    "| train | dynamics | readme | 4 | 5.5 | 4410.2 | 14.51 frames/s | 665.7 | 0.70 | 2376 "
    "| 5390 |",
    "| rollout | 16 frames, 25 steps | readme | 1 | 12.0 | 615.0 | 1.626 frames/s |  |  |  "
    "| 3100 |",
    "| train | lam | appf | 16 |  |  |  | 1638.0 |  |  | 900 |",
    # An older suite's row (ef7f2a6's, the README's "before" harness): fewer columns.
    "| train | lam | runlocal | 16 | 9.0 | 133.1 | 480.9 frames/s | 6.2 | 0.36 | 871 |"])


def test_parse_rows_reads_the_ms_of_each_result_row():
  assert pairs.parse_rows(_TABLE) == {
      ("train", "tokenizer", "readme"): 6395.5,
      ("train", "dynamics", "readme"): 4410.2,
      ("rollout", "16 frames, 25 steps", "readme"): 615.0,  # A count-only row has no ms.
      ("train", "lam", "runlocal"): 133.1}
  with pytest.raises(ValueError, match="printed row 'train lam runlocal' twice"):
    pairs.parse_rows(_TABLE + "\n" + _TABLE.splitlines()[-1])


def test_summary_gives_each_pair_the_means_and_the_median_pair():
  key = ("train", "dynamics", "readme")
  other = ("train", "lam", "readme")
  runs = [({key: 6000.0, other: 100.0}, {key: 4000.0}),  # A row on one side only is left out.
          ({key: 5000.0}, {key: 5000.0}),
          ({key: 5500.0}, {key: 4400.0})]
  lines = pairs.summary(runs).splitlines()
  assert lines[2:] == [
      "| train dynamics readme | 1 | 6000.0 | 4000.0 | 1.50x |",
      "| train dynamics readme | 2 | 5000.0 | 5000.0 | 1.00x |",
      "| train dynamics readme | 3 | 5500.0 | 4400.0 | 1.25x |",
      "| train dynamics readme | mean | 5500.0 | 4466.7 | 1.23x (median of the pairs 1.25x) |"]


_IN_GIT = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=_ROOT, capture_output=True,
                         check=False).returncode == 0
_needs_git = pytest.mark.skipif(not _IN_GIT, reason="needs a git checkout of the repository")


def test_the_bootstrap_runs_a_trees_suite_on_that_trees_code_only(tmp_path):
  # A stand-in tree whose "suite" reports what it runs as and where genie_jax would come
  # from: not from this checkout (which an editable install would lend it).
  os.makedirs(tmp_path / "benchmarks")
  (tmp_path / "benchmarks" / "suite.py").write_text(
      "import importlib.util, json, os, sys\n"
      "spec = importlib.util.find_spec('genie_jax')\n"
      "print(json.dumps([os.path.abspath(__file__), sys.argv, spec and spec.origin]))\n")
  done = subprocess.run([sys.executable, "-c", pairs._BOOTSTRAP, "--steps=3"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=60, check=True)
  file, argv, origin = json.loads(done.stdout)
  assert file == str(tmp_path / "benchmarks" / "suite.py")
  assert argv == ["benchmarks/suite.py", "--steps=3"]
  assert origin is None or not origin.startswith(_ROOT), origin


def _run(tmp_path, *args):
  # Worktrees go under tmp_path; a suite that starts by mistake stops at its unknown --only.
  return subprocess.run([sys.executable, _SCRIPT, "--suite_args=--only=no_such_kind", *args],
                        cwd=_ROOT, capture_output=True, text=True, timeout=300, check=False,
                        env=dict(os.environ, TMPDIR=str(tmp_path)))


def _worktrees_under(path) -> list[str]:
  listed = subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=_ROOT,
                          capture_output=True, text=True, check=True).stdout
  return [line for line in listed.splitlines() if str(path) in line]


@_needs_git
def test_bad_input_is_refused_before_any_checkout(tmp_path):
  cases = [(["--before=no-such-revision"], "--before=no-such-revision: not a git revision"),
           (["--before=HEAD", "--harness=HEAD", "--harness_files=no/such/file.py"],
            "--harness_files: no/such/file.py is not a file in --harness=HEAD"),
           (["--before=HEAD", "--harness=HEAD", "--harness_files=genie_jax"],
            "--harness_files: genie_jax is not a file in --harness=HEAD"),
           (["--before=HEAD", "--pairs=0"], "--pairs"),
           (["--before=HEAD", "--before_args=--malloc='system"], "--before_args="),
           (["--before=HEAD", "--", "--steps=3"], "suite flags go in --suite_args")]
  for args, message in cases:
    done = _run(tmp_path, *args)
    assert done.returncode != 0 and message in done.stderr + done.stdout, (args, done.stderr)
  assert not os.listdir(tmp_path) and not _worktrees_under(tmp_path)


@_needs_git
def test_a_failing_suite_run_leaves_no_worktree(tmp_path):
  done = _run(tmp_path, "--before=HEAD", "--harness=HEAD", "--pairs=1")
  assert done.returncode != 0
  # The checked-out revision's suite itself refused the flag, and said so.
  assert "pair 1, before (HEAD)" in done.stderr and "no_such_kind" in done.stderr, done.stderr
  assert not os.listdir(tmp_path) and not _worktrees_under(tmp_path)
