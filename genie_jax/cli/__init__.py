"""The command-line entry points, one module each, all run by `run`:

  python -m genie_jax.cli.train      one stage (configs/<stage>.py)
  python -m genie_jax.cli.pipeline   tokenizer -> LAM -> dynamics, evaluation, report
  python -m genie_jax.cli.evaluate   a workdir's evaluators on a checkpoint
  python -m genie_jax.cli.generate   rollout videos of a world model
  python -m genie_jax.cli.play       the play page
  python -m genie_jax.cli.aot        compile a stage for a TPU topology, on CPU

Each module defines its own flags in `define_flags()` and its work in `main()` (reading
absl's FLAGS); `run` adds the flags every entry point shares and starts every one the same
way.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from absl import app
from absl import flags

from genie_jax import allocator
from genie_jax import distributed

# How an entry point stands to a multi-process job.
PROCESSES = ("job", "one", "none")


def run(define_flags: Callable[[], None], main: Callable[[], None], *,
        processes: str = "job") -> None:
  """Defines the shared flags and the entry point's own, then runs `main` as the program.

  Args:
    define_flags: defines the entry point's flags (marks the required ones).
    main: the work; reads flags.FLAGS.
    processes: 'job': one process of a job (--distributed, --coordinator_address, ...), which
      every process joins before any JAX computation. 'one': refuses, before loading
      anything, to run as one of several processes (one page, one server). 'none': no JAX
      computation on this host's devices (compiling for a TPU topology): neither the
      allocator's re-exec nor the distributed flags.
  """
  if processes not in PROCESSES:
    raise ValueError(f"processes={processes!r}; expected one of {PROCESSES}")
  if processes != "none":
    allocator.define_flags()
    distributed.define_flags()
  define_flags()

  def program(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if processes == "one":
      _refuse_several_processes()
    if processes != "none":
      distributed.initialize_from_flags()
    if processes == "one" and jax.process_count() > 1:
      raise app.UsageError(f"{_ONE}; this job has {jax.process_count()} processes")
    main()

  app.run(program if processes == "none" else allocator.entry_point(program))


_ONE = ("this command serves one page from one process; run it on one host with "
        "--distributed=no (the workdir may be on gs://)")


def _refuse_several_processes() -> None:
  f = flags.FLAGS
  if f.distributed != "no" and ((distributed.num_processes_requested(f) or 1) > 1
                                or distributed.cluster_detected()):
    raise app.UsageError(_ONE)
