"""The standard speculative-decoding speedup model.

With per-token acceptance probability alpha (independent tokens), draft
length gamma, draft cost c per drafted token and verify cost v per cycle (both
relative to one target decode step):

  tokens per cycle  tau = (1 - alpha^(gamma+1)) / (1 - alpha)
                        = 1 + alpha + ... + alpha^gamma      (-> gamma+1 at 1)
  speedup               = tau / (gamma * c + v)

No output length enters: the model is per generated token (D10 fixed).

Costs come from a live benchmark's JSON (`tools/benchmark_sd.py --out`) when
given, else from flags. The keys read (all times in milliseconds):

  {"costs": {
     "target_decode_ms": 14.6,                  # one target decode step
     "draft_ms_per_token": {"l5": 1.2, "drafter": 10.0, ...} | 10.0,
                                                # cost of one drafted token,
                                                # per adapter name (or one
                                                # number for all)
     "verify_ms": {"5": 16.1, ...} | 16.1       # one target forward that
                                                # verifies GAMMA drafts
                                                # (GAMMA+1 positions), keyed
                                                # by str(GAMMA), or one number
  }}

c = draft_ms_per_token[name] / target_decode_ms and
v = verify_ms[str(gamma)] / target_decode_ms.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

# Fallback costs (relative to one target decode step) when no benchmark JSON
# is given. A drafter-driven adapter needs one 7B drafter decode per draft
# token (EventGPT 10.0 ms vs Video-LLaVA 14.6 ms per token, so c ~ 0.7); a
# self-drafting head (B1) is an EAGLE-sized layer, c ~ 0.05. Verifying a few
# tokens reads the target's weights once, so v ~ 1.
DEFAULT_DRAFT_COST = {"b1": 0.05}
DEFAULT_DRAFTER_COST = 0.7
DEFAULT_VERIFY_COST = 1.0


def tokens_per_cycle(alpha: Any, gamma: int) -> np.ndarray:
  """Expected tokens per draft-verify cycle, (1 - a^(g+1)) / (1 - a)."""
  if gamma < 0:
    raise ValueError(f"gamma must be >= 0, got {gamma}")
  alpha = np.asarray(alpha, np.float64)
  if np.any((alpha < 0) | (alpha > 1)):
    raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
  # The geometric sum is exact at alpha = 1 (gamma + 1) and stable near it,
  # where the closed form divides 0 by 0.
  powers = alpha[..., None] ** np.arange(gamma + 1)
  return powers.sum(-1)


def expected_speedup(
  alpha: Any, gamma: int, draft_cost: float, verify_cost: float
) -> np.ndarray:
  """tau / (gamma * c + v): speedup over plain target decoding."""
  if draft_cost < 0 or verify_cost <= 0:
    raise ValueError(
      f"need draft_cost >= 0 and verify_cost > 0, got c={draft_cost}, "
      f"v={verify_cost}"
    )
  return tokens_per_cycle(alpha, gamma) / (gamma * draft_cost + verify_cost)


def best_gamma(
  alpha: float, draft_cost: float, verify_cost: float, max_gamma: int = 16
) -> tuple[int, float]:
  """The draft length in 1..max_gamma with the highest expected speedup."""
  gammas = range(1, max_gamma + 1)
  s = [
    float(expected_speedup(alpha, g, draft_cost, verify_cost)) for g in gammas
  ]
  i = int(np.argmax(s))
  return i + 1, s[i]


def simulated_tokens_per_cycle(
  match_NS: np.ndarray, lengths_N: np.ndarray, gamma: int
) -> float:
  """Tokens per cycle replaying teacher-forced matches, no independence.

  Each cycle starting at position p accepts the leading run of matches in
  p..p+gamma-1 (at most gamma) plus the target's own next token, so it covers
  run + 1 positions. Returns total positions / total cycles.
  """
  match_NS = np.asarray(match_NS, bool)
  n, s = match_NS.shape
  lengths_N = np.minimum(np.asarray(lengths_N), s)
  # run_from[i, p] = leading run of matches starting at p (vectorised over
  # samples, one backward pass over positions).
  run_from = np.zeros((n, s + 1), np.int64)
  for p in range(s - 1, -1, -1):
    run_from[:, p] = np.where(match_NS[:, p], run_from[:, p + 1] + 1, 0)
  pos = np.zeros(n, np.int64)
  cycles = np.zeros(n, np.int64)
  active = pos < lengths_N
  while active.any():
    run = np.minimum(run_from[np.arange(n), np.minimum(pos, s)], gamma)
    run = np.minimum(run, np.maximum(lengths_N - pos, 0))
    cycles += active
    pos = np.where(active, pos + run + 1, pos)
    active = pos < lengths_N
  total = int(np.sum(np.maximum(lengths_N, 0)))
  return total / max(int(cycles.sum()), 1)


def costs_from_bench(
  bench: str | os.PathLike | dict,
  name: str,
  gamma: int,
  *,
  fallback: str | None = None,
) -> dict[str, Any]:
  """Relative costs {draft_cost, verify_cost, source, ...} from bench JSON.

  The draft cost is draft_ms_per_token[name], else [fallback] when given
  (e.g. 'drafter' for an adapter that needs one drafter decode per token).
  """
  where = "bench JSON"
  if not isinstance(bench, dict):
    where = os.fspath(bench)
    with open(where) as f:
      try:
        bench = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
  if not isinstance(bench, dict):
    raise ValueError(f"{where}: expected a JSON object (see speedup.py)")
  costs = bench.get("costs")
  if not isinstance(costs, dict):
    raise ValueError(f"{where}: missing object 'costs' (see speedup.py)")
  for key in ("target_decode_ms", "draft_ms_per_token", "verify_ms"):
    if key not in costs:
      raise ValueError(f"{where}: missing field 'costs.{key}'")
  base = float(costs["target_decode_ms"])
  if base <= 0:
    raise ValueError(f"{where}: costs.target_decode_ms must be > 0")
  draft = costs["draft_ms_per_token"]
  draft_key = name
  if isinstance(draft, dict):
    if name not in draft and fallback in draft:
      draft_key = fallback
    elif name not in draft:
      raise ValueError(
        f"{where}: costs.draft_ms_per_token has no entry {name!r} "
        f"(has {sorted(draft)})"
      )
    draft = draft[draft_key]
  verify = costs["verify_ms"]
  if isinstance(verify, dict):
    if str(gamma) not in verify:
      raise ValueError(
        f"{where}: costs.verify_ms has no entry for gamma {str(gamma)!r} "
        f"(has {sorted(verify)})"
      )
    verify = verify[str(gamma)]
  out = {
    "draft_cost": float(draft) / base,
    "verify_cost": float(verify) / base,
    "source": where,
    "draft_key": draft_key,
    "target_decode_ms": base,
    "draft_ms_per_token": float(draft),
    "verify_ms": float(verify),
  }
  if draft_key != name:
    out["note"] = (
      f"{where} has no run of {name!r}; its draft cost is the "
      f"{draft_key!r} entry's per-token cost, which leaves out the "
      f"adapter's own cost: benchmark {name!r} for a complete figure"
    )
  return out


def resolve_costs(
  name: str,
  gamma: int,
  *,
  bench_json: str | None = None,
  draft_cost: float | None = None,
  verify_cost: float | None = None,
  fallback: str | None = None,
) -> dict[str, Any]:
  """Costs from the bench JSON if given, else flags, else the defaults."""
  if bench_json:
    return costs_from_bench(bench_json, name, gamma, fallback=fallback)
  c_default = DEFAULT_DRAFT_COST.get(name, DEFAULT_DRAFTER_COST)
  return {
    "draft_cost": float(c_default if draft_cost is None else draft_cost),
    "verify_cost": float(
      DEFAULT_VERIFY_COST if verify_cost is None else verify_cost
    ),
    "source": "flags"
    if draft_cost is not None or verify_cost is not None
    else "defaults",
    "default_draft_cost": c_default,
    "default_verify_cost": DEFAULT_VERIFY_COST,
  }
