"""Stopping a long run cleanly: a preemption notice (SIGTERM) and non-finite training.

Preemptible TPU VMs and spot GPU hosts announce their end with SIGTERM, some seconds ahead.
`StopOnSigterm` turns the signal into a request that the training loop honours at the end of
the step it is in: it saves a checkpoint and raises `Preempted` (the command line exits with
status 143, as a process ended by SIGTERM, so that a scheduler runs it again and no later
stage starts), and the same command later resumes from that step exactly (data order and RNG included, as after any checkpoint). In a multi-host run
the processes agree on the step to stop at (a request on any host stops all of them), so that
they all save the same step.

`check_finite` stops a run whose loss or gradient is NaN or infinite before that state is
saved anywhere: the last good checkpoint stays the latest one.
"""

import math
import signal
from typing import Any, Mapping

import jax
from jax.experimental import multihost_utils
import numpy as np


class Preempted(Exception):
  """The run stopped at a preemption notice after saving its state (resume: same command)."""


class NonFiniteError(ArithmeticError):
  """The loss or the gradient of a step is not finite."""


class StopOnSigterm:
  """Context manager: while active, SIGTERM sets a request instead of killing the process.

      with StopOnSigterm() as stop:
        for step in ...:
          ...train...
          if stop.requested():   # the same answer in every process
            save(step); break

  The previous handler is restored on exit. Outside the main thread (where Python cannot
  install signal handlers) it does nothing: `requested()` is then always False.
  """

  def __init__(self):
    self._flag = False
    self._previous = None

  def __enter__(self) -> "StopOnSigterm":
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread.
      self._previous = None
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self._flag = True

  def request(self) -> None:
    """As if SIGTERM had arrived (tests, or a caller with its own notion of preemption)."""
    self._flag = True

  def requested(self) -> bool:
    """Whether any process got a stop request; every process returns the same answer."""
    if jax.process_count() == 1:
      return self._flag
    flags = multihost_utils.process_allgather(np.array([self._flag]))
    return bool(np.any(flags))


def check_finite(step: int, metrics: Mapping[str, Any], keys=("loss", "grad_norm")) -> None:
  """Raises NonFiniteError naming the step and the values when a metric of `keys` is not
  finite (metrics without those keys pass)."""
  bad = {k: float(metrics[k]) for k in keys
         if k in metrics and not math.isfinite(float(metrics[k]))}
  if bad:
    values = ", ".join(f"{k}={v}" for k, v in bad.items())
    raise NonFiniteError(f"step {step}: non-finite {values}")
