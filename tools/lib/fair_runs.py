"""What keeps one timed run from biasing another in the live benchmark: the
order of a sample's runs (a Williams design), Python's garbage collector
kept out of the timed region, and a count of what torch.compile compiles
inside it."""

from __future__ import annotations

import contextlib
import gc


def williams_orders(n: int) -> list[list[int]]:
  """A Williams design: orders of 0..n-1 in which every item takes every
  position equally often and directly follows every other item equally
  often (n orders for even n, 2n for odd n)."""
  first, lo, hi = [0], 1, n - 1
  while len(first) < n:
    first.append(lo)
    lo += 1
    if len(first) < n:
      first.append(hi)
      hi -= 1
  rows = [[(x + i) % n for x in first] for i in range(n)]
  if n % 2:
    rows += [row[::-1] for row in rows]
  return rows


@contextlib.contextmanager
def no_gc():
  """Python's garbage collector off for one timed run (as timeit does): a
  collection pass (milliseconds) lands in whichever run triggers it, not
  in the method's cost. Collected between runs instead."""
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()
    gc.collect(1)


@contextlib.contextmanager
def frozen_heap():
  """What is loaded before the timed runs lives to their end: frozen, the
  collections between runs (`no_gc`) skip it."""
  gc.collect()
  gc.freeze()
  try:
    yield
  finally:
    gc.unfreeze()


def _graphs_compiled() -> int:
  try:
    from torch._dynamo.utils import counters
  except ImportError:  # no torch.compile here: nothing compiles
    return 0
  return int(counters["stats"]["unique_graphs"])


@contextlib.contextmanager
def counting_compiles():
  """Counts the graphs torch.compile makes while open: a dict whose
  "graphs" is set on exit. A timed run that compiles (a shape its warm-up
  did not meet) times the compilation, not the method."""
  made = {"graphs": 0}
  before = _graphs_compiled()
  try:
    yield made
  finally:
    made["graphs"] = _graphs_compiled() - before


def compile_warnings(compiles: list[dict]) -> list[str]:
  """One warning per method whose timed runs compiled (a shape the
  warm-ups did not meet): its times include the compilation."""
  by: dict[str, list[dict]] = {}
  for c in compiles:
    by.setdefault(c["method"], []).append(c)
  return [
    f"{m}: torch.compile compiled {sum(c['graphs'] for c in cs)} graph(s) "
    f"inside its timed runs on {len(cs)} sample(s) "
    f"({', '.join(c['id'] for c in cs[:3])}{', ...' if len(cs) > 3 else ''})"
    ": its times include the compilation"
    for m, cs in by.items()
  ]
