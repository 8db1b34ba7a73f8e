"""Named timing spans of the live SD runtime, without syncs inside the loop.

Every model call is a named span, timed with CUDA events on the stream it
ran on (no host sync until `collect`) or with perf_counter on CPU. Span
names: target_prefill, target_decode, target_verify[L] (L positions),
draft_prefill, draft_decode (one token), draft_catchup (several accepted
tokens at once), adapter:NAME (decode adapter step, LM head included;
draft trees time theirs as tree_adapter:NAME), and
prefill_draft_decode / prefill_adapter:NAME inside the prefill region.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch


class Timer:
  """Named spans: CUDA events on the current stream, or perf_counter on CPU.

  A model wrapper binds it to its device once (`on`), and the timer then
  watches that device (`sync`, `collect`); a span is recorded on the stream
  that is the device's current one when it opens (a side worker's own).
  """

  def __init__(self, devices: Sequence[torch.device] = ()):
    self.cuda_devices: list[torch.device] = []
    for d in devices:
      self.watch(d)
    self._pending: list[tuple[str, int, Any, Any]] = []
    self._lock = threading.Lock()
    self.totals: dict[str, list[float]] = {}  # name -> [ms, units, calls]

  def watch(self, device: torch.device) -> torch.device:
    """Adds `device` to the devices this timer waits for; returns it."""
    device = torch.device(device)
    if device.type == "cuda" and device not in self.cuda_devices:
      self.cuda_devices = sorted([*self.cuda_devices, device], key=str)
    return device

  def on(self, device: torch.device):
    """`span` bound to one device, then watched: `on(device)(name, units)`."""
    return functools.partial(self.span, device=self.watch(device))

  def sync(self) -> None:
    """Waits for every device this timer watches."""
    for d in self.cuda_devices:
      torch.cuda.synchronize(d)

  def _add(self, name: str, ms: float, units: int) -> None:
    t = self.totals.setdefault(name, [0.0, 0, 0])
    t[0] += ms
    t[1] += units
    t[2] += 1

  @contextlib.contextmanager
  def span(self, name: str, device: torch.device, units: int = 1):
    """Times the work enqueued inside the block (units: tokens or steps);
    its device is watched from then on (`sync`, `collect` wait for it)."""
    device = self.watch(device)
    if device.type != "cuda":
      t0 = time.perf_counter()
      yield
      with self._lock:
        self._add(name, (time.perf_counter() - t0) * 1e3, units)
      return
    stream = torch.cuda.current_stream(device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record(stream)
    yield
    end.record(stream)
    with self._lock:
      self._pending.append((name, units, start, end))

  def collect(self) -> dict[str, dict[str, float]]:
    """Syncs, resolves the CUDA events and returns {name: ms, units, calls}."""
    self.sync()
    for name, units, start, end in self._pending:
      self._add(name, start.elapsed_time(end), units)
    self._pending.clear()
    return {
      k: {"ms": v[0], "units": int(v[1]), "calls": int(v[2])}
      for k, v in self.totals.items()
    }
