"""Preemption: a SIGTERM (or JAX's preemption service in a multi-process job) becomes a
checkpoint at a step every process agrees on, then an exit the scheduler can retry."""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class Preempted(SystemExit):
  """Raised once the state of a preempted run is checkpointed; a SystemExit, so that main and
  the pipeline stop without a traceback, with status config.checkpoint.preemption_exit_code."""

  def __init__(self, step: int, directory: str, exit_code: int):
    super().__init__(exit_code)
    self.step = step
    self.directory = directory


def _jax_preemption_service_running() -> bool:
  """Whether jax.distributed runs JAX's preemption sync manager, which then owns SIGTERM: it
  starts with every job jax.distributed.initialize joins, unless
  jax_enable_preemption_service is off."""
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class PreemptionNotice:
  """Whether this job got a preemption notice (SIGTERM), agreed by all processes at a step.

  * Under jax.distributed with JAX's preemption service (multi-process TPU/GPU jobs): the
    service catches SIGTERM on any process and picks the step at which all processes save;
    Orbax's CheckpointManager.reached_preemption(step) says when it is reached (called every
    step, as the protocol requires).
  * Otherwise a Python SIGTERM handler sets a flag. One process reads it every step; several
    processes (service disabled) OR their flags with one small all-gather every
    config.checkpoint.preemption_check_every_steps steps, so they all stop at the same step.
  """

  def __init__(self, manager: Any, check_every_steps: int):
    self._manager = manager
    self._every = check_every_steps
    self._flag = False
    self._installed = False
    self._previous_handler = None
    self.uses_jax_service = _jax_preemption_service_running()
    if not self.uses_jax_service:
      if threading.current_thread() is threading.main_thread():
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True
      else:
        logging.warning("Not in the main thread: SIGTERM is not handled, a preemption loses "
                        "the steps since the last checkpoint")

  def _on_sigterm(self, signum, frame):
    del signum, frame
    if not self._flag:
      logging.warning("SIGTERM received: checkpointing at the next agreed step, then exiting")
    self._flag = True

  def reached(self, step: int) -> bool:
    if self.uses_jax_service:
      return bool(self._manager.reached_preemption(step))
    if jax.process_count() == 1:
      return self._flag
    if step % self._every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self._flag))
    return bool(np.any(flags))

  def close(self) -> None:
    if self._installed:
      # signal.signal gives None for a handler not installed from Python: the default then,
      # so that a SIGTERM after training (between pipeline stages) still ends the process.
      previous = self._previous_handler
      signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
      self._installed, self._previous_handler = False, None
