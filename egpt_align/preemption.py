"""Stopping cleanly on SIGINT / SIGTERM, agreed across processes."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from absl import logging


class TrainingInterrupted(RuntimeError):
  """Raised after SIGINT/SIGTERM once the checkpoint is saved."""

  def __init__(self, signum: int, step: int):
    super().__init__(
      f"training interrupted by signal {signum} at step {step}; checkpoint "
      "saved, run the same command again to resume"
    )
    self.signum = signum
    self.step = step


class SignalFlag:
  """Turns SIGINT/SIGTERM into a flag checked between steps."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop without saving
    self.signum = signum
    logging.warning(
      "signal %d: saving a checkpoint after this step (several processes: "
      "at the next step where they check; config.distributed."
      "stop_check_every_steps)",
      signum,
    )

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


class AgreedStop:
  """A signal on any process, seen by all of them at the same step.

  One process stops at the step after its signal. Several agree: every
  `every` steps they all-gather their flags (a collective of one int each,
  which waits for the step to finish), so all leave the loop at the same
  step and save one consistent checkpoint instead of waiting in a collective
  that a departed process never joins.
  """

  def __init__(self, flag: SignalFlag, every: int):
    if every < 1:
      raise ValueError(
        f"config.distributed.stop_check_every_steps must be >= 1, got {every}"
      )
    self.flag = flag
    self.every = every if jax.process_count() > 1 else 1
    self.signum = None

  def check(self, step: int, *, now: bool = False) -> int | None:
    """The agreed signal number (None: go on), checked at `step`."""
    if self.signum is not None or not (now or step % self.every == 0):
      return self.signum
    if jax.process_count() == 1:
      self.signum = self.flag.signum
      return self.signum
    from jax.experimental import multihost_utils

    local = np.int32(self.flag.signum or 0)
    flags = np.asarray(multihost_utils.process_allgather(local)).ravel()
    if np.any(flags):
      self.signum = int(flags[np.flatnonzero(flags)[0]])
      logging.warning(
        "stopping at step %d: signal %d on process(es) %s",
        step,
        self.signum,
        np.flatnonzero(flags).tolist(),
      )
    return self.signum
