"""README's commands name entry points, flags and config keys that exist.

Every `python -m MODULE ...` or `python SCRIPT.py ...` in README's shell blocks and inline
code is checked: the module runs (`--helpfull`, or `--help` for an argparse script), each
`--flag` is one it defines, and each
`--config.a.b=...` override names a key of the config its `--config=FILE:ARG` builds.
Values are not checked (README uses placeholders such as W and S).
"""

import concurrent.futures
import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_ENTRY_POINT = re.compile(r"(?:^|\s)python3?(?:\s+-[uOBI]+)*\s+(?:-m\s+(\S+)|(\S+\.py))(.*)")
_SHELL_SEPARATOR = re.compile(r"\s(?:&&|\|\||;|\|)\s")


def commands(markdown: str) -> list[str]:
  """The python command lines of `markdown`: in sh (or unmarked) code blocks, and in inline
  code outside code blocks."""
  found = []
  for language, block in _FENCE.findall(markdown):
    if language not in ("", "sh", "bash", "shell"):
      continue
    for line in block.replace("\\\n", " ").splitlines():
      line = re.sub(r"\s#.*$", "", line).strip().removeprefix("$ ")
      if not line.startswith("#"):
        found += [part.strip() for part in _SHELL_SEPARATOR.split(line)
                  if _ENTRY_POINT.search(part)]
  # Inline code may wrap across lines.
  prose = re.sub(r"\s*\n\s*", " ", _FENCE.sub("", markdown))
  found += [code for code in re.findall(r"`([^`]+)`", prose) if _ENTRY_POINT.search(code)]
  return found


def parse(command: str) -> tuple[str, list[str]] | None:
  """(module or script, its arguments, optional [...] ones unwrapped), or None for pytest."""
  match = _ENTRY_POINT.search(command)
  if match.group(1) == "pytest":
    return None
  try:
    args = shlex.split(match.group(3))
  except ValueError:  # An unbalanced quote in prose.
    args = match.group(3).split()
  return match.group(1) or match.group(2), [a.strip("[]") for a in args if a != "..."]


def _help(argv: list[str]) -> str:
  # `system`: no re-execution with another allocator just to print the flags.
  out = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=_ROOT,
                       env=dict(os.environ, GENIE_JAX_MALLOC="system"), check=False)
  return out.stdout + out.stderr


def defined_flags(entry_point: str) -> tuple[frozenset[str], frozenset[str], str]:
  """(its flags, those of them that are booleans, the end of its output if it failed), from
  absl's --helpfull, or argparse's --help for the scripts that use argparse."""
  argv = [sys.executable] + (
      [entry_point] if entry_point.endswith(".py") else ["-m", entry_point])
  try:
    text = _help(argv + ["--helpfull"])
    listed = re.findall(r"^\s+(?:-\w+,)?--(\[no\])?([\w.]+):", text, re.M)
    if not listed and "unrecognized arguments: --helpfull" in text:
      text = _help(argv + ["--help"])
      listed = [("", name) for name in re.findall(r"^\s+(?:-\w+, )?--([\w-]+)", text, re.M)]
  except subprocess.TimeoutExpired:
    return frozenset(), frozenset(), "--helpfull did not finish in 120 s"
  return (frozenset(name for _, name in listed),
          frozenset(name for no, name in listed if no), text[-600:])


@functools.lru_cache(maxsize=None)
def _config(spec: str):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("readme_config", os.path.join(_ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def problems(entry_point: str, args: list[str],
             flags: tuple[frozenset[str], frozenset[str], str]) -> list[str]:
  """What in a `parse`d command its entry point (with `defined_flags` `flags`) would refuse."""
  names, booleans, output = flags
  if not names:
    return [f"{entry_point} did not start; --helpfull ended with: {output}"]
  found, config = [], None
  spec = None
  for i, arg in enumerate(args):
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(args):
      spec = args[i + 1]
  for arg in args:
    if not arg.startswith("--"):
      continue
    name = arg[2:].partition("=")[0]
    if not name.startswith("config."):
      if name not in names and not (name.startswith("no") and name[2:] in booleans):
        found.append(f"{entry_point} has no flag --{name}")
      continue
    if "config" not in names:
      found.append(f"{entry_point} has no --config for {arg}")
      continue
    key = name[len("config."):]
    # The entry point's default config is not loadable from here; KEY, lam.KEY and {a,b}
    # are README's placeholders.
    if spec is None or "{" in spec or key.split(".")[-1].isupper():
      continue
    if config is None:
      path = spec.partition(":")[0]
      if not os.path.isfile(os.path.join(_ROOT, path)):
        found.append(f"--config={spec}: no file {path}")
        break
      config = _config(spec)
    node = config
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node.keys():
        found.append(f"--config={spec} has no key {key}")
        break
      node = node[part]
  return found


def test_a_stale_flag_and_config_key_are_reported():
  readme = """
```sh
python -m genie_jax.cli.train --config=configs/tokenizer.py:runlocal --workdir=A|B \\
  --config.model.no_such_key=1 [--no_such_flag=N] --noworkdir  # a comment --not_a_flag
```
```
$ python benchmarks/suite.py --steps=3
```
```python
print("python -m not.a.command")
```
Then `/usr/bin/time python -m genie_jax.cli.play
--workdir=W --nobreakdown`.
"""
  train, suite, play = commands(readme)
  flags = (frozenset({"config", "workdir", "breakdown", "steps"}), frozenset({"breakdown"}), "")
  assert problems(*parse(train), flags) == [
      "--config=configs/tokenizer.py:runlocal has no key model.no_such_key",
      "genie_jax.cli.train has no flag --no_such_flag",
      "genie_jax.cli.train has no flag --noworkdir"]
  assert parse(suite) == ("benchmarks/suite.py", ["--steps=3"])
  assert problems(*parse(play), flags) == []
  assert problems(*parse(play), (frozenset(), frozenset(), "Traceback")) == [
      "genie_jax.cli.play did not start; --helpfull ended with: Traceback"]


def test_every_readme_command_names_real_flags_and_config_keys():
  with open(os.path.join(_ROOT, "README.md"), encoding="utf-8") as f:
    parsed = [(c, parse(c)) for c in commands(f.read())]
  parsed = [(c, p) for c, p in parsed if p]
  entry_points = sorted({p[0] for _, p in parsed})
  assert len(entry_points) >= 10, entry_points  # The parser still finds README's commands.
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
    flags = dict(zip(entry_points, pool.map(defined_flags, entry_points)))
  found = [f"{p}  [{c[:120]}]" for c, (e, args) in parsed for p in problems(e, args, flags[e])]
  if found:
    pytest.fail("README commands that would not run as written:\n" + "\n".join(found))
