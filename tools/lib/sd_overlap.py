"""The prefill overlap: the drafter's prefill work beside the target's.

The drafter side runs on a long-lived `SideWorker` (one thread per drafter
device, kept by `sd_models.Models`), on its own GPU when it has one, else
on a second CUDA stream of the same GPU (on CPU: one after the other unless
'thread'). `overlapped` times both sides; afterwards, untimed, each side is
run alone (`SampleModels.measure_overlap`), so the saving is measured:
overlap = target alone + drafter alone - concurrent wall.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

import torch


class SideWorker:
  """One long-lived thread (and, on CUDA, one stream) for a drafter device.

  The drafter's prefill work runs here while the main thread runs the
  target's. The thread lives as long as the `Models`: a fresh thread per
  sample pays CUDA's per-thread set-up (library handles, workspaces) on
  every call, which on H100 added 50-300 ms to the drafter's side.
  """

  def __init__(self, device: torch.device):
    self.device = device
    self.stream = (
      torch.cuda.Stream(device=device) if device.type == "cuda" else None
    )
    self._pool = concurrent.futures.ThreadPoolExecutor(
      max_workers=1, thread_name_prefix=f"drafter-{device}"
    )

  def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
    """Runs fn on the worker (its stream, inference mode); returns a future
    of (output, perf_counter when its stream was done)."""

    def work():
      with torch.inference_mode():  # grad mode is per thread
        if self.stream is None:
          out = fn()
        else:
          with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            out = fn()
          self.stream.synchronize()
      return out, time.perf_counter()

    return self._pool.submit(work)


def overlapped(
  target_fn: Callable[[], Any],
  drafter_fn: Callable[[], Any] | None,
  target_device: torch.device,
  draft_device: torch.device | None,
  mode: str,
  workers: dict,
):
  """Runs target_fn and drafter_fn concurrently; returns outputs + timings.

  The drafter side runs on the drafter device's `SideWorker` (a long-lived
  thread with its own stream, on its own GPU when it lives on another
  device); each side's time runs from the common start to its own stream
  sync, the wall time to the later one. The saving (`overlap_ms`) is
  measured against each side run alone
  (`sd_models.SampleModels.measure_overlap`). Sequentially (CPU,
  or mode 'sequential') the two run one after the other, the alone times
  are the measured ones and the overlap is 0.
  """
  if drafter_fn is None:
    return target_fn(), None, None
  cuda = target_device.type == "cuda"
  if mode == "sequential" or (mode == "auto" and not cuda):
    t0 = time.perf_counter()
    a = target_fn()
    t1 = time.perf_counter()
    b = drafter_fn()
    t2 = time.perf_counter()
    info = {
      "target_ms": (t1 - t0) * 1e3,
      "drafter_ms": (t2 - t1) * 1e3,
      "wall_ms": (t2 - t0) * 1e3,
      "target_alone_ms": (t1 - t0) * 1e3,
      "drafter_alone_ms": (t2 - t1) * 1e3,
      "overlap_ms": 0.0,
      "concurrent": False,
    }
    return a, b, info
  ddev = torch.device(draft_device or target_device)
  key = str(ddev)
  if key not in workers:
    workers[key] = SideWorker(ddev)
  worker = workers[key]
  if cuda:
    for d in {target_device, ddev}:
      torch.cuda.synchronize(d)
  t0 = time.perf_counter()
  future = worker.submit(drafter_fn)
  a = target_fn()
  if cuda:
    torch.cuda.current_stream(target_device).synchronize()
  t_t = time.perf_counter()
  b, t_d = future.result()  # re-raises the drafter's error here
  if worker.stream is not None:
    # Later work on the default stream reads what the side stream wrote.
    torch.cuda.current_stream(ddev).wait_stream(worker.stream)
  info = {
    # Both include any slow-down from contention; the join latency is not
    # part of the region.
    "target_ms": (t_t - t0) * 1e3,
    "drafter_ms": (t_d - t0) * 1e3,
    "wall_ms": (max(t_t, t_d) - t0) * 1e3,
    "concurrent": True,
  }
  return a, b, info
