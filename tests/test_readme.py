"""README's commands name entry points, flags and config keys that exist.

Every `python -m MODULE ...` or `python SCRIPT.py ...` in README's shell blocks and inline
code is checked: the module runs (`--helpfull`), each `--flag` is one it defines, and each
`--config.a.b=...` override names a key of the config its `--config=FILE:ARG` builds.
Values are not checked (README uses placeholders such as W and S).
"""

import concurrent.futures
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commands(markdown: str) -> list[str]:
  """The python command lines of `markdown`'s sh blocks and inline code."""
  found = []
  for block in re.findall(r"```sh\n(.*?)```", markdown, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = re.sub(r"\s#.*$", "", line).strip()
      if line.startswith("#"):
        continue
      found += [part.strip() for part in re.split(r"&&|;|\|", line) if "python" in part]
  # Inline code may wrap across lines.
  found += re.findall(r"`((?:[A-Z_]+=\S+ )*python3? [^`]+)`", re.sub(r"\s*\n\s*", " ", markdown))
  return found


def parse(command: str) -> tuple[str, list[str]] | None:
  """(module or script, its arguments), or None for pytest and non-entry points."""
  match = re.search(r"python3? (?:-m (\S+)|(\S+\.py))(.*)", command)
  if not match or match.group(1) == "pytest":
    return None
  try:
    args = shlex.split(match.group(3))
  except ValueError:  # An unbalanced quote in prose.
    args = match.group(3).split()
  return match.group(1) or match.group(2), args


def defined_flags(entry_point: str) -> frozenset[str]:
  argv = [sys.executable] + (
      [entry_point] if entry_point.endswith(".py") else ["-m", entry_point]) + ["--helpfull"]
  # `system`: no re-execution with another allocator just to print the flags.
  out = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=_ROOT,
                       env=dict(os.environ, GENIE_JAX_MALLOC="system"), check=False)
  return frozenset(re.findall(r"^\s+--(?:\[no\])?([\w.]+):", out.stdout + out.stderr, re.M))


def _config(spec: str):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("readme_config", os.path.join(_ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def problems(command: str, flags: frozenset[str]) -> list[str]:
  """What in `command` its entry point (defining `flags`) would refuse."""
  entry_point, args = parse(command)
  if not flags:
    return [f"{entry_point} did not start (--helpfull listed no flags)"]
  found, config = [], None
  for arg in args:
    if not arg.startswith("--"):
      continue
    name = arg[2:].partition("=")[0]
    if not name.startswith("config."):
      if name not in flags and not (name.startswith("no") and name[2:] in flags):
        found.append(f"{entry_point} has no flag --{name}")
      continue
    if "config" not in flags:
      found.append(f"{entry_point} has no --config for {arg}")
      continue
    spec = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if spec is None:
      continue  # The entry point's default config: not loadable from here.
    if config is None:
      config = _config(spec)
    node = config
    for key in name.split(".")[1:]:
      if not hasattr(node, "keys") or key not in node.keys():
        found.append(f"--config={spec} has no key {name[len('config.'):]}")
        break
      node = node[key]
  return found


def test_a_stale_flag_and_config_key_are_reported():
  readme = ("```sh\npython -m genie_jax.cli.train --config=configs/tokenizer.py:runlocal "
            "--config.model.no_such_key=1 --workdir=W --no_such_flag\n```\n")
  (command,) = commands(readme)
  assert problems(command, frozenset({"config", "workdir"})) == [
      "--config=configs/tokenizer.py:runlocal has no key model.no_such_key",
      "genie_jax.cli.train has no flag --no_such_flag"]


def test_every_readme_command_names_real_flags_and_config_keys():
  with open(os.path.join(_ROOT, "README.md"), encoding="utf-8") as f:
    parsed = [(c, parse(c)) for c in commands(f.read())]
  parsed = [(c, p) for c, p in parsed if p]
  entry_points = sorted({p[0] for _, p in parsed})
  assert len(entry_points) >= 10, entry_points  # The parser still finds README's commands.
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
    flags = dict(zip(entry_points, pool.map(defined_flags, entry_points)))
  found = [f"{p}  [{c[:120]}]" for c, (e, _) in parsed for p in problems(c, flags[e])]
  if found:
    pytest.fail("README commands that would not run as written:\n" + "\n".join(found))
