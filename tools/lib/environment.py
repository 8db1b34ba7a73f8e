"""The software and hardware a measurement ran on: one record for all.

Every results file (live SD benchmark, the study, the scenes pair, the
benchmarks under tools/benchmarks) records the Python and package versions,
the git commit and the device through `environment`, so they read alike.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
from collections.abc import Sequence


def git_commit(where: str | None = None) -> str | None:
  """The HEAD commit of the checkout holding `where` (default: this
  file), with "+dirty" appended when its tracked files differ from that
  commit (so a results file never names code that did not run); None
  outside a git checkout."""
  where = where or os.path.dirname(os.path.abspath(__file__))

  def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
      ["git", *args], cwd=where, capture_output=True, text=True, timeout=30
    )

  try:
    head = git("rev-parse", "HEAD").stdout.strip()
    if not head:
      return None
    # Exit status 1: a tracked file differs from HEAD (0: none).
    dirty = git("diff", "--quiet", "HEAD", "--").returncode == 1
  except (OSError, subprocess.SubprocessError):
    return None
  return head + "+dirty" if dirty else head


def _version(module: str) -> str | None:
  try:
    return getattr(importlib.import_module(module), "__version__", None)
  except ImportError:
    return None


def environment(
  modules: Sequence[str] = ("torch", "transformers"),
  *,
  device=None,
) -> dict:
  """{python, MODULE: version (None if absent), git_commit[, device, num_gpus]}.

  `device`: a torch device (or its string): its name is recorded, a CUDA
  device's by the driver, with the number of GPUs.
  """
  env = {"python": platform.python_version()}
  env.update({m: _version(m) for m in modules})
  env["git_commit"] = git_commit()
  if device is not None:
    import torch

    device = torch.device(device)
    env["device"] = str(device)
    if device.type == "cuda":
      env["device"] = torch.cuda.get_device_name(device)
      env["num_gpus"] = torch.cuda.device_count()
  return env
