"""Checks that the Bazel BUILD file describes the whole source tree.

(a) BUILD is evaluated in a small restricted Python environment (Starlark's
    syntax, as used in BUILD, is a subset of Python's) with stub rules and a
    Bazel-compatible glob(), and we assert that every tests/**/test_*.py has its
    own py_test target and that every .py file of the packages is in the srcs of
    a py_library.
(b) When a `bazel` binary is on PATH (Debian's bazel-bootstrap), `bazel query`
    must succeed offline and list the expected targets and source files. When
    bazel is missing the check is skipped locally, but fails under CI (CI set).
"""

import builtins
import fnmatch
import functools
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD_FILE = ROOT / "BUILD"

# Directories whose every .py file must be in some py_library's srcs.
LIBRARY_DIRS = ("genie_jax", "data_pipelines", "configs", "launch", "benchmarks")
EXPECTED_LIBRARIES = ("genie_jax", "data_pipelines", "configs")
BUILD_FILE_NAMES = ("BUILD", "BUILD.bazel")


# --------------------------------------------------------------------------
# (a) Restricted evaluation of BUILD.
# --------------------------------------------------------------------------

def _segment_regex(segment):
    return re.compile(fnmatch.translate(segment), re.DOTALL)


def _match(pattern_segments, path_segments):
    """Bazel glob matching: '**' matches zero or more whole path segments."""
    if not pattern_segments:
        return not path_segments
    head, rest = pattern_segments[0], pattern_segments[1:]
    if head == "**":
        return any(_match(rest, path_segments[i:]) for i in range(len(path_segments) + 1))
    if not path_segments:
        return False
    return bool(_segment_regex(head).match(path_segments[0])) and _match(rest, path_segments[1:])


def _is_subpackage(directory):
    return any((directory / name).is_file() for name in BUILD_FILE_NAMES)


def _walk_files(start):
    """Files under `start` (relative to ROOT), not entering sub-packages, like Bazel."""
    start_path = ROOT / start if start else ROOT
    if start_path.is_file():
        yield start
        return
    if not start_path.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(start_path):
        current = pathlib.Path(dirpath)
        kept = []
        for d in dirnames:
            sub = current / d
            if sub.is_symlink() or _is_subpackage(sub) or d.startswith("bazel-"):
                continue
            if current == ROOT and d in (".git", ".venv", "venv"):
                continue
            kept.append(d)
        dirnames[:] = kept
        for f in filenames:
            yield (current / f).relative_to(ROOT).as_posix()


def _glob_one(pattern):
    segments = pattern.split("/")
    prefix = []
    for seg in segments:
        if any(c in seg for c in "*?["):
            break
        prefix.append(seg)
    if len(prefix) == len(segments):  # no wildcard: a plain file name
        return {pattern} if (ROOT / pattern).is_file() else set()
    start = "/".join(prefix)
    return {p for p in _walk_files(start) if _match(segments, p.split("/"))}


def _glob(include, exclude=(), exclude_directories=1, allow_empty=True):
    del exclude_directories, allow_empty
    result = set()
    for pattern in include:
        result |= _glob_one(pattern)
    for pattern in exclude:
        result -= _glob_one(pattern)
    return sorted(result)


class _Rules:
    def __init__(self):
        self.targets = {}

    def rule(self, kind):
        def record(name, **kwargs):
            assert name not in self.targets, f"duplicate target {name!r} in BUILD"
            self.targets[name] = dict(kind=kind, name=name, **kwargs)
        return record


@functools.lru_cache(maxsize=None)
def evaluate_build():
    """Evaluates BUILD with stub rules; returns {name: {kind, name, **attrs}}."""
    source = BUILD_FILE.read_text()
    assert not re.search(r"^\s*load\(", source, re.M), (
        "BUILD must not load() external rules: `bazel query` has to work offline "
        "with bazel-bootstrap and no rules_python")
    rules = _Rules()
    safe_builtins = {name: getattr(builtins, name)
                     for name in ("len", "sorted", "list", "dict", "str", "range",
                                  "enumerate", "zip", "True", "False", "None")}
    env = {
        "__builtins__": safe_builtins,
        "glob": _glob,
        "package": lambda **kwargs: None,
        "exports_files": lambda *args, **kwargs: None,
        "select": lambda d: d.get("//conditions:default", next(iter(d.values()))),
    }
    for kind in ("py_library", "py_test", "py_binary", "filegroup", "sh_test",
                 "sh_binary", "test_suite", "genrule"):
        env[kind] = rules.rule(kind)
    exec(compile(source, str(BUILD_FILE), "exec"), env)  # pylint: disable=exec-used
    return rules.targets


def _targets_of_kind(kind):
    return [t for t in evaluate_build().values() if t["kind"] == kind]


def _files_on_disk(top, pattern):
    """Independent of _glob: plain pathlib walk, skipping caches and hidden dirs."""
    files = []
    for path in sorted((ROOT / top).rglob(pattern)):
        rel = path.relative_to(ROOT)
        if any(part == "__pycache__" or part.startswith(".") for part in rel.parts):
            continue
        if path.is_file():
            files.append(rel.as_posix())
    return files


def _test_files():
    return _files_on_disk("tests", "test_*.py")


def _expected_test_name(test_file):
    return test_file[len("tests/"):-len(".py")]


def test_workspace_present_and_offline():
    workspace = ROOT / "WORKSPACE"
    assert workspace.is_file(), "WORKSPACE is missing at the repository root"
    text = workspace.read_text()
    for fetcher in ("http_archive", "git_repository", "http_file"):
        assert fetcher not in text, f"WORKSPACE uses {fetcher}: `bazel query` must work offline"


def test_build_defines_expected_libraries():
    libraries = {t["name"]: t for t in _targets_of_kind("py_library")}
    for name in EXPECTED_LIBRARIES:
        assert name in libraries, f"BUILD has no py_library {name!r}"
        assert libraries[name]["srcs"], f"py_library {name!r} has no srcs"


def test_every_test_file_has_a_py_test():
    test_files = _test_files()
    assert "tests/test_build.py" in test_files
    by_src = {}
    for target in _targets_of_kind("py_test"):
        for src in target["srcs"]:
            by_src.setdefault(src, []).append(target)
    missing = [f for f in test_files if f not in by_src]
    assert not missing, f"test files without a py_test target in BUILD: {missing}"
    for test_file in test_files:
        targets = by_src[test_file]
        assert len(targets) == 1, f"{test_file} is in several py_tests: {[t['name'] for t in targets]}"
        target = targets[0]
        assert target["name"] == _expected_test_name(test_file), (test_file, target["name"])
        assert target["srcs"] == [test_file], (
            f"py_test {target['name']!r} must have exactly one test file as srcs")
        assert target.get("main", test_file) == test_file


def test_every_library_file_is_in_a_py_library():
    covered = set()
    for target in _targets_of_kind("py_library"):
        covered.update(target["srcs"])
    for top in LIBRARY_DIRS:
        files = _files_on_disk(top, "*.py")
        if top in EXPECTED_LIBRARIES:
            assert files, f"{top}/ has no .py files"
        missing = [f for f in files if f not in covered]
        assert not missing, (
            f"{top}/ files not in any py_library srcs (check the glob patterns and "
            f"for stray BUILD files in subdirectories): {missing}")


def test_no_subpackages_cut_the_globs():
    """A BUILD file in a subdirectory would silently remove its files from the globs."""
    offenders = []
    for top in LIBRARY_DIRS + ("tests",):
        for name in BUILD_FILE_NAMES:
            offenders += [p.relative_to(ROOT).as_posix() for p in (ROOT / top).rglob(name)]
    assert not offenders, f"unexpected BUILD files (keep one top-level BUILD): {offenders}"


def test_glob_matcher_semantics():
    """Sanity checks of the glob() used by the restricted evaluation."""
    assert _match("genie_jax/**/*.py".split("/"), "genie_jax/a.py".split("/"))
    assert _match("genie_jax/**/*.py".split("/"), "genie_jax/m/n/a.py".split("/"))
    assert not _match("genie_jax/**/*.py".split("/"), "genie_jax/a.pyc".split("/"))
    assert not _match("tests/test_*.py".split("/"), "tests/sub/test_a.py".split("/"))
    assert _match("tests/**/test_*.py".split("/"), "tests/sub/test_a.py".split("/"))
    assert "tests/test_build.py" in _glob(["tests/**/test_*.py"])
    assert "genie_jax/__init__.py" in _glob(["genie_jax/**/*.py"])
    assert "genie_jax/__init__.py" not in _glob(["genie_jax/**/*.py"],
                                                exclude=["genie_jax/*.py"])


# --------------------------------------------------------------------------
# (b) The real thing: `bazel query //...`.
# --------------------------------------------------------------------------

def _ci():
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def bazel_startup_args():
    """Startup flags: an explicit output root when $HOME can't hold ~/.cache/bazel."""
    explicit = os.environ.get("BAZEL_OUTPUT_USER_ROOT")
    if explicit:
        return [f"--output_user_root={explicit}"]
    home = os.environ.get("HOME", "")
    cache = pathlib.Path(home) / ".cache" if home else None
    if home and os.path.isdir(home) and (
            (cache.is_dir() and os.access(cache, os.W_OK)) or
            (not cache.exists() and os.access(home, os.W_OK))):
        return []
    root = pathlib.Path(tempfile.gettempdir()) / f"bazel_output_user_root_{os.getuid()}"
    return [f"--output_user_root={root}"]


@pytest.fixture(scope="module")
def bazel():
    path = shutil.which("bazel")
    if path is None:
        message = ("`bazel` is not on PATH (install Debian's bazel-bootstrap: "
                   "apt-get install bazel-bootstrap)")
        if _ci():
            pytest.fail(message + "; CI is set, so this check may not be skipped")
        pytest.skip(message + "; skipped because CI is not set (CI=true makes it fail)")
    return path


def _run_bazel_query(bazel_path, expression):
    # Not --nosystem_rc: Debian's /etc/bazel/bazelrc sets the install base.
    cmd = [bazel_path, *bazel_startup_args(), "--batch", "--nohome_rc",
           "query", expression, "--output=label", "--noshow_progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed with exit code {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return set(proc.stdout.split())


def _all_source_labels():
    labels = set()
    for top in LIBRARY_DIRS + ("tests",):
        labels |= {f"//:{f}" for f in _files_on_disk(top, "*.py")}
    return labels


@pytest.fixture(scope="module")
def bazel_snapshot(bazel):
    """(files on disk, labels from bazel query); the disk is listed first so that
    files added while the query runs (e.g. during development) cause no false alarm."""
    sources = _all_source_labels()
    test_files = _test_files()
    labels = _run_bazel_query(bazel, "//... union labels(srcs, //...)")
    return sources, test_files, labels


def test_bazel_query_lists_expected_targets(bazel_snapshot):
    _, test_files, queried_labels = bazel_snapshot
    expected = {f"//:{name}" for name in EXPECTED_LIBRARIES}
    expected |= {f"//:{_expected_test_name(f)}" for f in test_files}
    missing = sorted(expected - queried_labels)
    assert not missing, f"`bazel query //...` does not list: {missing}"
    # The restricted evaluation of BUILD (part a) must agree with real Bazel.
    evaluated = {f"//:{name}" for name in evaluate_build()}
    assert evaluated <= queried_labels, sorted(evaluated - queried_labels)


def test_bazel_query_covers_all_sources(bazel_snapshot):
    sources, _, queried_labels = bazel_snapshot
    missing = sorted(sources - queried_labels)
    assert not missing, f"source files not in any target's srcs per `bazel query`: {missing}"
