"""The host memory allocator of a genie_jax process, chosen by `--malloc` before any work.

XLA:CPU allocates and frees several GB of temporaries on every step. glibc's default malloc
serves each buffer over 32 MB with its own mmap and unmaps it when freed, and trims its heaps
back to the OS, so every step page-faults the same memory in again (a large share of the
run's time goes to the kernel). Two ways out, each set before the process starts, so the
entry point re-executes itself once with the environment below:

  tcmalloc  preload Debian's libtcmalloc-minimal4, which keeps freed memory for reuse.
  glibc     glibc's own malloc told to keep it: no mmap'd chunks (`mmap_max=0`), one arena
            (thread arenas are heaps of at most 64 MB that are trimmed apart from the main
            one), and no trimming of the main heap. Needs nothing installed.
  system    the process as started.

`auto` (the default) takes tcmalloc where it is installed and glibc's tuned malloc otherwise.
The default comes from $GENIE_JAX_MALLOC where set. README "Benchmark" compares them.

The same entry point also picks XLA:CPU's matmul library (`--cpu_dots`), which must be set
before the CPU backend starts: `eigen` hands XLA:CPU's dots to Eigen and only its
reductions to YNNPACK (`--xla_cpu_experimental_ynn_fusion_type=reduce`); `xla` leaves
XLA's default, under which YNNPACK also takes the dots and runs a batched matmul (the
attention's) on one thread. Other backends ignore it.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable
from typing import Any

from absl import flags
from absl import logging

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
GLIBC_KEEP = ("glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:"
              "glibc.malloc.trim_threshold=68719476736")
CHOICES = ("auto", "tcmalloc", "glibc", "system")
_ENV = "GENIE_JAX_MALLOC"
# Set in the re-executed process: a loader that drops LD_PRELOAD or GLIBC_TUNABLES (secure-
# execution mode, e.g. a binary with file capabilities) must not make it re-execute again.
_REEXECUTED = "_GENIE_JAX_MALLOC_REEXECUTED"


CPU_DOTS = ("eigen", "xla")
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
_CPU_DOTS_XLA_FLAGS = {"eigen": f"{_YNN_FLAG}=reduce", "xla": ""}


def define_flags() -> None:
  if "cpu_dots" not in flags.FLAGS:
    flags.DEFINE_enum(
        "cpu_dots", "eigen", list(CPU_DOTS),
        "XLA:CPU's matmul library: eigen (Eigen's dots, YNNPACK's reductions) or xla (XLA's "
        f"default). A {_YNN_FLAG} already in $XLA_FLAGS wins.")
  if "malloc" not in flags.FLAGS:
    default = os.environ.get(_ENV, "auto")
    if default not in CHOICES:
      raise ValueError(f"${_ENV}={default!r}: expected one of {', '.join(CHOICES)}")
    flags.DEFINE_enum(
        "malloc", default, list(CHOICES),
        "Host allocator: tcmalloc (Debian: apt-get install libtcmalloc-minimal4), glibc "
        "(glibc's malloc set to keep freed memory), system (as started), auto (tcmalloc "
        f"where installed, else glibc). Default from ${_ENV}.")


def resolve(name: str) -> str:
  """The allocator `name` means on this machine."""
  if name not in CHOICES:
    raise ValueError(f"malloc={name!r}: expected one of {', '.join(CHOICES)}")
  if name == "auto":
    return "tcmalloc" if os.path.exists(TCMALLOC) else "glibc"
  if name == "tcmalloc" and not os.path.exists(TCMALLOC):
    raise ValueError(f"malloc=tcmalloc needs {TCMALLOC} "
                     "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4); "
                     "malloc=glibc needs nothing installed")
  return name


def environment(name: str, env: dict[str, str]) -> dict[str, str]:
  """`env` changed so that a process started with it uses allocator `name` (resolved)."""
  env = dict(env)
  preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p and p != TCMALLOC]
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":")
              if t and t not in GLIBC_KEEP.split(":")]
  if name == "tcmalloc":
    preload.insert(0, TCMALLOC)
  elif name == "glibc":
    tunables.append(GLIBC_KEEP)
  for key, parts in (("LD_PRELOAD", preload), ("GLIBC_TUNABLES", tunables)):
    if parts:
      env[key] = ":".join(parts)
    else:
      env.pop(key, None)
  env[_ENV] = name
  return env


def _own_preload() -> str | None:
  """An allocator the user preloaded themselves (jemalloc, another tcmalloc build, ...)."""
  for path in os.environ.get("LD_PRELOAD", "").split(":"):
    if path != TCMALLOC and "malloc" in os.path.basename(path):
      return path
  return None


def in_use() -> str:
  """The allocator this process was started with."""
  if _own_preload():
    return f"LD_PRELOAD={_own_preload()}"
  if TCMALLOC in os.environ.get("LD_PRELOAD", "").split(":"):
    return "tcmalloc"
  if GLIBC_KEEP in os.environ.get("GLIBC_TUNABLES", ""):
    return "glibc"
  return "system"


def use(name: str) -> None:
  """Re-executes this process (same command line) with allocator `name`, unless it already
  runs with it. Call only from a command-line entry point, before any expensive work. An
  allocator the user preloaded themselves is kept."""
  if _own_preload():
    return
  name = resolve(name)
  if name == in_use():
    return
  if os.environ.get(_REEXECUTED):
    logging.warning("Host allocator %s requested, but the re-executed process runs with %s "
                    "(the loader dropped LD_PRELOAD/GLIBC_TUNABLES); continuing with it.",
                    name, in_use())
    return
  env = environment(name, dict(os.environ))
  env[_REEXECUTED] = "1"
  argv = list(getattr(sys, "orig_argv", [sys.executable] + sys.argv))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + argv[1:], env)


def xla_flags(cpu_dots: str, current: str) -> str:
  """$XLA_FLAGS (`current`) with the setting `cpu_dots` names, unless it sets that already."""
  if cpu_dots not in CPU_DOTS:
    raise ValueError(f"cpu_dots={cpu_dots!r}: expected one of {', '.join(CPU_DOTS)}")
  extra = _CPU_DOTS_XLA_FLAGS[cpu_dots]
  if not extra or _YNN_FLAG in current:
    return current
  return f"{current} {extra}".strip()


def use_cpu_dots(cpu_dots: str) -> None:
  """Sets $XLA_FLAGS for `cpu_dots`; before JAX starts its backends, which read it once."""
  if jax_backends_started():
    raise RuntimeError("use_cpu_dots must run before JAX initialises its backends")
  flags_now = xla_flags(cpu_dots, os.environ.get("XLA_FLAGS", ""))
  if flags_now:
    os.environ["XLA_FLAGS"] = flags_now


def jax_backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def entry_point(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """`main` for `app.run`, starting with the allocator `--malloc` names and XLA:CPU's
  matmul library `--cpu_dots` names."""
  def wrapped(argv: list[str]) -> Any:
    use(flags.FLAGS.malloc)
    use_cpu_dots(flags.FLAGS.cpu_dots)
    logging.info("Host allocator: %s; XLA_FLAGS=%s", in_use(), os.environ.get("XLA_FLAGS", ""))
    return main(argv)
  return wrapped


def peak_rss_mib() -> float:
  """This process's peak resident memory so far, in MiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
