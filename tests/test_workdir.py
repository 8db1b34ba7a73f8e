"""One training run owns a workdir: egpt_align.workdir.owned."""

import errno
import os

import pytest

from egpt_align import workdir


def test_a_second_owner_is_refused_and_the_lock_is_released(tmp_path):
  path = str(tmp_path)
  with workdir.owned(path):
    with pytest.raises(workdir.WorkdirBusy) as info:
      with workdir.owned(path):
        pass
    assert f"(pid {os.getpid()} on " in str(info.value)
  with workdir.owned(path):  # released when the first block ended
    pass


def test_a_filesystem_without_flock_warns_and_trains(tmp_path, monkeypatch):
  def no_flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(workdir.fcntl, "flock", no_flock)
  warnings = []
  monkeypatch.setattr(
    workdir.logging, "warning", lambda msg, *args: warnings.append(msg % args)
  )
  with workdir.owned(str(tmp_path)):
    pass
  assert "does not support flock (No locks available)" in warnings[0]

  def broken(fd, operation):
    raise OSError(errno.EIO, "I/O error")

  monkeypatch.setattr(workdir.fcntl, "flock", broken)
  with pytest.raises(OSError, match="I/O error"):
    with workdir.owned(str(tmp_path)):
      pass
