"""One training run owns a workdir at a time.

Two trainings on one workdir would interleave metrics.jsonl, race on the
plots and checkpoints and leave temporary files behind. `owned(workdir)`
takes an exclusive `flock` on WORKDIR/.lock for the run's lifetime: a second
run is refused with one line naming the holder. The kernel drops the lock
when its process ends, however it ends (SIGKILL, a crash), so a stale lock
file never blocks a later run. The processes of one multi-process run share
the lock: process 0 takes it and tells the others whether it got it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging

LOCK_FILE = ".lock"


class WorkdirBusy(ValueError):
  """Another training run holds the workdir."""


def _holder(fd: int) -> str:
  """What the holder wrote into the lock file ('pid N on HOST since T')."""
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode(errors="replace").strip()
  return text or "holder unknown"


def _lock(path: str) -> int | None:
  """An open fd of `path` holding an exclusive flock; WorkdirBusy if taken
  (None, with a warning, on a filesystem without flock)."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _holder(fd)
    os.close(fd)
    workdir = os.path.dirname(path)
    raise WorkdirBusy(
      f"{workdir} is in use by another training run ({holder}; lock "
      f"{path}); wait for it to end or pass another --workdir"
    ) from None
  except OSError as e:
    os.close(fd)
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
      raise
    logging.warning(
      "%s: the filesystem does not support flock (%s); nothing stops a "
      "second training run on this workdir",
      path,
      e.strerror,
    )
    return None
  except BaseException:
    os.close(fd)
    raise
  stamp = time.strftime("%Y-%m-%d %H:%M:%S")
  line = f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n"
  os.ftruncate(fd, 0)
  os.pwrite(fd, line.encode(), 0)
  return fd


def _agree(ok: bool) -> bool:
  """Process 0's `ok`, on every process (as is with one process)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


@contextlib.contextmanager
def owned(workdir: str) -> Iterator[None]:
  """Holds WORKDIR/.lock while the block runs (process 0 for all)."""
  fd, busy = None, None
  if jax.process_index() == 0:
    try:
      fd = _lock(os.path.join(workdir, LOCK_FILE))
    except WorkdirBusy as e:
      busy = e
  try:
    if not _agree(busy is None):
      raise busy or WorkdirBusy(
        f"{workdir} is in use by another training run (process 0 could not "
        "lock it; its error names the holder)"
      )
    yield
  finally:
    if fd is not None:
      os.close(fd)  # releases the flock
