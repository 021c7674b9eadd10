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


_DOTS_PROGRAM = textwrap.dedent("""\
    import os
    from absl import app
    import jax
    import jax.numpy as jnp
    from genie_jax import allocator

    def main(argv):
      x = jnp.ones((4, 64, 32))
      hlo = jax.jit(lambda a: a @ jnp.swapaxes(a, 1, 2)).lower(x).compile().as_text()
      sums = jax.jit(lambda a: jnp.sum(a, axis=(0, 1))).lower(x).compile().as_text()
      print("RESULT", os.environ.get("XLA_FLAGS", ""), "__ynn_fusion" in hlo,
            "__ynn_fusion" in sums, sep="|")

    if __name__ == "__main__":
      allocator.define_flags()
      app.run(allocator.entry_point(main))
    """)


@pytest.mark.parametrize("args,env_flags,ynn_dots", [
    (["--cpu_dots=eigen"], "", False),
    ([], "", False),  # eigen is the default
    (["--cpu_dots=xla"], "", True),
    # The user's own setting of the same XLA flag wins.
    (["--cpu_dots=eigen"], "--xla_cpu_experimental_ynn_fusion_type=dot", True),
])
def test_cpu_dots_reach_xla_before_the_backend_starts(tmp_path, args, env_flags, ynn_dots):
  program = tmp_path / "dots.py"
  program.write_text(_DOTS_PROGRAM)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"GENIE_JAX_MALLOC": "system"}
  if env_flags:
    env["XLA_FLAGS"] = env_flags
  out = subprocess.run([sys.executable, str(program), *args], env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  (result,) = [line.split("|")[1:] for line in out.stdout.splitlines()
               if line.startswith("RESULT")]
  assert result[1] == str(ynn_dots), result
  if not env_flags:
    assert result[2] == "True", result  # Reductions stay with YNNPACK either way.
  assert result[0].count("ynn_fusion_type") == (0 if args == ["--cpu_dots=xla"] else 1)


def test_cpu_dots_flags_compose_with_the_users_and_bad_values_are_named():
  assert allocator.xla_flags("eigen", "--a=1") == (
      "--a=1 --xla_cpu_experimental_ynn_fusion_type=reduce")
  assert allocator.xla_flags("xla", "--a=1") == "--a=1"
  with pytest.raises(ValueError, match="cpu_dots='mkl'"):
    allocator.xla_flags("mkl", "")
