"""The host allocator an entry point re-executes itself with (genie_jax.allocator)."""

import os
import subprocess
import sys
import textwrap

import pytest

from genie_jax import allocator

_PROGRAM = textwrap.dedent("""\
    import os
    from absl import app
    from genie_jax import allocator

    def main(argv):
      maps = open("/proc/self/maps").read()
      print("RESULT", allocator.in_use(), os.getpid(), "tcmalloc" in maps,
            os.environ.get("GLIBC_TUNABLES", ""), argv[1:], sep="|")

    if __name__ == "__main__":
      allocator.define_flags()
      print("STARTED", os.getpid())
      app.run(allocator.entry_point(main))
    """)


def _run(tmp_path, *args, env=None):
  program = tmp_path / "program.py"
  program.write_text(_PROGRAM)
  env = {k: v for k, v in (env or os.environ).items()
         if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", "GENIE_JAX_MALLOC")} | (env or {})
  out = subprocess.run([sys.executable, str(program), *args], env=env, capture_output=True,
                       text=True, timeout=60)
  return out


def _result(out):
  assert out.returncode == 0, out.stderr
  started = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("STARTED")]
  (result,) = [line.split("|")[1:] for line in out.stdout.splitlines()
               if line.startswith("RESULT")]
  return started, result


def test_glibc_keeps_memory_and_reexecutes_in_the_same_process(tmp_path):
  started, (name, pid, mapped, tunables, rest) = _result(_run(tmp_path, "--malloc=glibc", "x"))
  assert name == "glibc" and mapped == "False"
  assert "glibc.malloc.mmap_max=0" in tunables
  assert started == [pid, pid]  # execve: one process, started twice
  assert rest == "['x']"  # the command line survives the re-exec


def test_system_runs_as_started(tmp_path):
  started, (name, pid, mapped, tunables, _) = _result(_run(tmp_path, "--malloc=system"))
  assert (name, mapped, tunables) == ("system", "False", "")
  assert started == [pid]


@pytest.mark.skipif(not os.path.exists(allocator.TCMALLOC), reason="libtcmalloc-minimal4 absent")
def test_tcmalloc_is_preloaded_and_auto_prefers_it(tmp_path):
  for args in (["--malloc=tcmalloc"], []):
    _, (name, _, mapped, _, _) = _result(_run(tmp_path, *args))
    assert (name, mapped) == ("tcmalloc", "True")


def test_default_from_environment_and_bad_values_named(tmp_path):
  _, (name, *_) = _result(_run(tmp_path, env={"GENIE_JAX_MALLOC": "system"}))
  assert name == "system"
  out = _run(tmp_path, env={"GENIE_JAX_MALLOC": "jemalloc"})
  assert out.returncode != 0 and "$GENIE_JAX_MALLOC='jemalloc'" in out.stderr


def test_environment_composes_with_the_users_settings():
  env = allocator.environment("glibc", {"GLIBC_TUNABLES": "glibc.rtld.x=1",
                                        "LD_PRELOAD": allocator.TCMALLOC + ":/lib/other.so"})
  assert env["GLIBC_TUNABLES"] == "glibc.rtld.x=1:" + allocator.GLIBC_KEEP
  assert env["LD_PRELOAD"] == "/lib/other.so"
  env = allocator.environment("tcmalloc", env)
  assert env["LD_PRELOAD"] == allocator.TCMALLOC + ":/lib/other.so"
  assert env["GLIBC_TUNABLES"] == "glibc.rtld.x=1"
  assert "GLIBC_TUNABLES" not in allocator.environment("system", {"GLIBC_TUNABLES":
                                                                  allocator.GLIBC_KEEP})


def test_a_loader_that_drops_the_setting_does_not_loop(tmp_path):
  # As after a re-exec whose loader dropped GLIBC_TUNABLES: the process carries on as is.
  out = _run(tmp_path, "--malloc=glibc", env={"_GENIE_JAX_MALLOC_REEXECUTED": "1"})
  started, (name, *_) = _result(out)
  assert name == "system" and len(started) == 1
  assert "re-executed process runs with system" in out.stderr
