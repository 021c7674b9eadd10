"""Joins this process to a multi-process JAX job (jax.distributed), from flags or environment.

JAX's own multi-controller runtime does the work; this module only decides whether and how to
call `jax.distributed.initialize`:

* Cloud TPU pod slices, GKE/xpk, SLURM and Open MPI: JAX finds the coordinator, the process
  count and this process's id itself (`initialize()` with no arguments).
* Anywhere else (e.g. several processes on one machine): an explicit coordinator, from the flags
  --coordinator_address/--num_processes/--process_id or the environment variables
  GENIE_COORDINATOR/GENIE_NUM_PROCESSES/GENIE_PROCESS_ID.

On CPU, processes exchange collectives through gloo, which must be chosen before the backend
starts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
from absl import flags
from absl import logging

COORDINATOR_ENV = "GENIE_COORDINATOR"
NUM_PROCESSES_ENV = "GENIE_NUM_PROCESSES"
PROCESS_ID_ENV = "GENIE_PROCESS_ID"

# Environment variables by which cluster managers announce a job of several processes; JAX
# reads the details itself. A single process on a single host needs no initialization.
_CLUSTER_SIZE_ENVS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines --distributed, --coordinator_address, --num_processes and --process_id."""
  flags.DEFINE_enum(
      "distributed", "auto", ["auto", "yes", "no"],
      "Join a multi-process JAX job. auto: if a coordinator is given (flag or "
      f"{COORDINATOR_ENV}) or a SLURM/Open MPI/multi-host TPU job is detected; yes: always "
      "(JAX auto-detects TPU pods, SLURM and Open MPI when no coordinator is given); no: never.",
      flag_values=flag_values)
  flags.DEFINE_string(
      "coordinator_address", None,
      f"host:port of process 0's coordinator (default: ${COORDINATOR_ENV}); only for clusters "
      "JAX does not detect, e.g. local multi-process runs on 127.0.0.1.",
      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None,
                       f"Number of processes (default: ${NUM_PROCESSES_ENV}).",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None,
                       f"This process's id in [0, num_processes) (default: ${PROCESS_ID_ENV}).",
                       flag_values=flag_values)


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def cluster_detected() -> bool:
  """Whether the environment announces a job of several processes that JAX can detect."""
  for name in _CLUSTER_SIZE_ENVS:
    size = _env_int(name)
    if size is not None and size > 1:
      return True
  # GKE TPU pods list every worker; multi-slice jobs name a megascale coordinator.
  return ("," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
          or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: int | Sequence[int] | None = None) -> None:
  """Calls `jax.distributed.initialize`; with no arguments JAX detects the cluster.

  An explicit coordinator needs `num_processes` and `process_id` too. Gloo is selected for CPU
  collectives first: CPU arrays spanning processes need it, and it must precede the backend.

  Raises:
    ValueError: an incomplete or inconsistent explicit coordinator setting.
  """
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise ValueError(
          f"--coordinator_address={coordinator_address} needs --num_processes and --process_id "
          f"(or ${NUM_PROCESSES_ENV} and ${PROCESS_ID_ENV})")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                       f"{num_processes})")
  elif num_processes is not None or process_id is not None:
    raise ValueError("--num_processes/--process_id need --coordinator_address (or "
                     f"${COORDINATOR_ENV}); leave all three unset for TPU pods and SLURM")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("jax.distributed.initialize(coordinator_address=%s, num_processes=%s, "
               "process_id=%s, local_device_ids=%s)", coordinator_address, num_processes,
               process_id, local_device_ids)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)
  logging.info("Process %d of %d: %d local devices of %d", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def num_processes_requested(flag_values: flags.FlagValues = flags.FLAGS) -> int | None:
  """The process count --num_processes or $GENIE_NUM_PROCESSES names (None: neither)."""
  if flag_values.num_processes is not None:
    return flag_values.num_processes
  return _env_int(NUM_PROCESSES_ENV)


def initialize_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
  """Initializes as --distributed and the coordinator flags/environment say (see module doc);
  the flags are those of `define_flags`, parsed.

  Returns:
    Whether jax.distributed was initialized.
  """
  values = flag_values
  coordinator = values.coordinator_address or os.environ.get(COORDINATOR_ENV) or None
  num_processes = num_processes_requested(values)
  process_id = values.process_id if values.process_id is not None else _env_int(PROCESS_ID_ENV)
  mode = values.distributed
  if mode == "no" or (mode == "auto" and coordinator is None and not cluster_detected()):
    if coordinator is not None:
      logging.warning("--distributed=no: ignoring coordinator %s", coordinator)
    return False
  initialize(coordinator, num_processes, process_id)
  return True
