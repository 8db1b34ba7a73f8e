"""Exact host-side statistics of per-position evaluation arrays.

The evaluator's device step reduces each position to a cosine and a token
rank; everything here is float64 arithmetic on those [N, S] arrays:
per-reading metrics, per-position curves, bootstrap confidence intervals
(resampling samples) and the speculative-decoding speedup entries.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from egpt_align import metrics as metrics_lib
from egpt_align import speedup as speedup_lib

THRESHOLDS = metrics_lib.THRESHOLDS
COS_MATCH_THRESHOLDS = (0.80, 0.85, 0.90, 0.92, 0.95, 0.98)
TOPK = (1, 5, 10)
_tag = metrics_lib.threshold_key


def leading_run(ok_NS: np.ndarray, valid_NS: np.ndarray) -> np.ndarray:
  """Length of the leading run of (ok & valid) from position 0, per sample."""
  return np.asarray(metrics_lib.leading_run(ok_NS, valid_NS))


def describe(x: np.ndarray, prefix: str) -> dict[str, float | None]:
  """{prefix}_{mean,std,min,max,median} of x (None when x is empty)."""
  if x.size == 0:
    return {
      f"{prefix}_{k}": None for k in ("mean", "std", "min", "max", "median")
    }
  x = x.astype(np.float64)
  return {
    f"{prefix}_mean": float(x.mean()),
    f"{prefix}_std": float(x.std()),
    f"{prefix}_min": float(x.min()),
    f"{prefix}_max": float(x.max()),
    f"{prefix}_median": float(np.median(x)),
  }


def _safe_div(a, b):
  return float(a) / float(b) if b else None


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
  """Pearson correlation; None when either side is constant or empty."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.size < 2 or x.std() == 0 or y.std() == 0:
    return None
  return float(np.mean((x - x.mean()) * (y - y.mean())) / (x.std() * y.std()))


def reading_metrics(
  cos_NS: np.ndarray | None,
  rank_NS: np.ndarray | None,
  valid_NS: np.ndarray,
  *,
  match_NS: np.ndarray | None = None,
) -> tuple[dict, list, dict]:
  """(metrics, per-position list, per-sample sums) of one prediction/reading.

  `rank_NS` gives token ranks (top-k = rank < k); `match_NS` gives top-1
  matches directly (for token-only baselines such as the drafter's tokens).
  """
  valid = np.asarray(valid_NS, bool)
  n_valid = valid.sum(1)
  has = n_valid > 0
  m: dict[str, Any] = {
    "valid_positions": int(valid.sum()),
    "num_samples": int(has.sum()),
  }
  sums: dict[str, np.ndarray] = {
    "n": n_valid.astype(np.float64),
    "has": has.astype(np.float64),
  }
  # Positions until none is valid (as position_stats.json).
  last = int(np.max(np.nonzero(valid.any(0))[0], initial=-1)) + 1
  per_pos = [
    {"position": t, "num_samples": int(valid[:, t].sum())} for t in range(last)
  ]
  if cos_NS is not None:
    cos = np.where(valid, cos_NS, 0.0).astype(np.float64)
    flat = cos[valid]
    m.update(describe(flat, "cos_sim"))
    sums["cos"] = cos.sum(1)
    for t in THRESHOLDS:
      ok = (cos > t) & valid
      m[f"accept_{_tag(t)}"] = _safe_div(ok.sum(), valid.sum())
      sums[f"accept_{_tag(t)}"] = ok.sum(1).astype(np.float64)
      run = leading_run(ok, valid)
      m.update(describe(run[has], f"consecutive_{_tag(t)}"))
      # Renamed to the reference's key order: consecutive_{stat}_{tau}.
      for stat in ("mean", "std", "min", "max", "median"):
        m[f"consecutive_{stat}_{_tag(t)}"] = m.pop(
          f"consecutive_{_tag(t)}_{stat}"
        )
      sums[f"consecutive_{_tag(t)}"] = run * has
    for t in range(last):
      col = cos[valid[:, t], t]
      per_pos[t]["cos_mean"] = float(col.mean()) if col.size else None
      per_pos[t]["cos_std"] = float(col.std()) if col.size else None
      for th in THRESHOLDS:
        per_pos[t][f"accept_{_tag(th)}"] = (
          float((col > th).mean()) if col.size else None
        )
  if rank_NS is not None or match_NS is not None:
    if match_NS is None:
      rank = np.asarray(rank_NS)
      in_k = {k: (rank < k) & (rank >= 0) & valid for k in TOPK}
    else:
      in_k = {1: np.asarray(match_NS, bool) & valid}
    match = in_k[1]
    for k, ok in in_k.items():
      m[f"token_top{k}"] = _safe_div(ok.sum(), valid.sum())
      sums[f"token_top{k}"] = ok.sum(1).astype(np.float64)
    run = leading_run(match, valid)
    m.update(describe(run[has], "token_consecutive"))
    sums["token_consecutive"] = run * has
    for t in range(last):
      v = valid[:, t]
      for k, ok in in_k.items():
        per_pos[t][f"token_top{k}"] = (
          float(ok[v, t].mean()) if v.any() else None
        )
    if cos_NS is not None:
      flat_cos = cos[valid]
      flat_match = match[valid]
      cond = {}
      for t in COS_MATCH_THRESHOLDS:
        sel = flat_cos > t
        cond[_tag(t)] = {
          "p_match": _safe_div(flat_match[sel].sum(), sel.sum()),
          "count": int(sel.sum()),
        }
      m["p_match_given_cos"] = cond
      m["cos_token_pearson_r"] = pearson(flat_cos, flat_match)
  return m, per_pos, sums


# Headline metrics: name -> (numerator key, denominator key) of per-sample
# sums, so each is a ratio of sums and resamples exactly.
HEADLINE = {
  "cos_sim_mean": ("cos", "n"),
  "accept_90": ("accept_90", "n"),
  "consecutive_mean_90": ("consecutive_90", "has"),
  "token_top1": ("token_top1", "n"),
  "token_top5": ("token_top5", "n"),
  "token_top10": ("token_top10", "n"),
  "token_consecutive_mean": ("token_consecutive", "has"),
}


def resampling(groups) -> dict:
  """How a result's CIs resample, as results record it (evaluate's
  settings, the live benchmark's config): 'group' with the number of groups
  when `groups` [N] labels the samples, else 'sample'."""
  if groups is None:
    return {"ci_resampling": "sample", "num_groups": None}
  return {
    "ci_resampling": "group",
    "num_groups": len(set(np.asarray(groups).tolist())),
  }


def resampling_text(record: dict) -> str:
  """The unit a `resampling` record's CIs draw, in words."""
  if record.get("ci_resampling") == "group":
    return (
      f"whole groups ({record['num_groups']} groups of the samples file's "
      "`group` field)"
    )
  return "single samples (the samples file has no `group` field)"


def ratio_bootstrap(
  columns: dict[str, np.ndarray],
  ratios: dict[str, tuple[str, str]],
  *,
  num_resamples: int,
  seed: int = 0,
  level: float = 0.95,
  groups: np.ndarray | None = None,
  chunk: int = 100,
) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
  """Percentile CIs of ratios of sums, resampling samples (or groups).

  `columns`: per-sample values [N]; `ratios`: {name: (numerator column,
  denominator column)}. Every resample draws N samples with replacement
  (or, with `groups` [N] of group labels, as many groups as there are, each
  with all its samples); a ratio is sum(w * num) / sum(w * den) with w the
  draw counts, so all ratios share the same draws. Returns ({name: [lo,
  hi]}, {name: resampled values}); a ratio with no finite value is absent.
  """
  keys = [k for k, (a, b) in ratios.items() if a in columns and b in columns]
  if not keys or num_resamples <= 0:
    return {}, {}
  cols = sorted({c for k in keys for c in ratios[k]})
  mat = np.stack([np.asarray(columns[c], np.float64) for c in cols], axis=1)
  n = mat.shape[0]
  if groups is None:
    member = None
  else:
    _, member = np.unique(np.asarray(groups), return_inverse=True)
    member = member.reshape(-1)
  units = n if member is None else int(member.max()) + 1
  rng = np.random.default_rng(seed)
  parts = []
  for start in range(0, num_resamples, chunk):
    r = min(chunk, num_resamples - start)
    draws = rng.integers(0, units, size=(r, units))
    flat = (draws + np.arange(r)[:, None] * units).ravel()
    w = np.bincount(flat, minlength=r * units).reshape(r, units)
    w = w.astype(np.float64)
    if member is not None:
      w = w[:, member]  # every sample of a drawn group, as often as drawn
    parts.append(w @ mat)  # [r, C]
  tot = np.concatenate(parts)
  col = {c: i for i, c in enumerate(cols)}
  lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
  cis, samples = {}, {}
  for k in keys:
    num, den = ratios[k]
    with np.errstate(invalid="ignore", divide="ignore"):
      vals = tot[:, col[num]] / tot[:, col[den]]
    vals = vals[np.isfinite(vals)]
    samples[k] = vals
    if vals.size:
      cis[k] = [
        float(np.percentile(vals, lo_q)),
        float(np.percentile(vals, hi_q)),
      ]
  return cis, samples


def bootstrap_ci(
  sums: dict[str, np.ndarray],
  *,
  num_resamples: int,
  seed: int = 0,
  level: float = 0.95,
  groups: np.ndarray | None = None,
  chunk: int = 100,
) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
  """Percentile CIs of the headline ratios (HEADLINE), resampling samples
  (or, with `groups`, whole groups).

  Returns ({metric: [lo, hi]}, {metric: resampled values}); see
  `ratio_bootstrap`.
  """
  return ratio_bootstrap(
    sums,
    HEADLINE,
    num_resamples=num_resamples,
    seed=seed,
    level=level,
    groups=groups,
    chunk=chunk,
  )


def speedup_entry(
  alpha: float | None,
  alpha_samples: np.ndarray | None,
  match_NS: np.ndarray | None,
  lengths_N: np.ndarray | None,
  *,
  gamma: int,
  costs: dict,
) -> dict | None:
  if alpha is None:
    return None
  c, v = costs["draft_cost"], costs["verify_cost"]
  tau = float(speedup_lib.tokens_per_cycle(alpha, gamma))
  entry = {
    "alpha": alpha,
    "tokens_per_cycle": tau,
    "speedup": float(speedup_lib.expected_speedup(alpha, gamma, c, v)),
  }
  if alpha_samples is not None and alpha_samples.size:
    sp = speedup_lib.expected_speedup(np.clip(alpha_samples, 0, 1), gamma, c, v)
    entry["speedup_ci"] = [
      float(np.percentile(sp, 2.5)),
      float(np.percentile(sp, 97.5)),
    ]
  best_g, best_s = speedup_lib.best_gamma(alpha, c, v)
  entry["best_gamma"] = best_g
  entry["best_gamma_speedup"] = best_s
  if match_NS is not None:
    sim = speedup_lib.simulated_tokens_per_cycle(match_NS, lengths_N, gamma)
    entry["simulated_tokens_per_cycle"] = sim
    entry["simulated_speedup"] = sim / (gamma * c + v)
  return entry


def valid_masks(lengths: np.ndarray) -> dict[str, np.ndarray]:
  """{'same', 'next'}: [N, S_max] masks of the positions each reading has."""
  s_max = int(lengths.max())
  return {
    "same": np.arange(s_max)[None] < lengths[:, None],
    "next": np.arange(s_max)[None] < (lengths[:, None] - 1),
  }


def all_readings(
  arrays: dict[str, np.ndarray],
  readings: dict[str, tuple],
  lengths: np.ndarray,
  *,
  settings,
  costs: dict,
  seed: int,
  groups: np.ndarray | None = None,
) -> tuple[dict, dict, dict]:
  """(results, positions, plot arrays) of every prediction and reading; CIs
  resample samples, or whole groups when `groups` [N] labels them."""
  valid = valid_masks(lengths)
  results: dict[str, dict] = {}
  positions: dict[str, dict] = {}
  plot_arrays: dict[str, Any] = {}
  for pname, reads in readings.items():
    for r in reads:
      cos = arrays[f"{pname}/{r}/cos"]
      rank = arrays.get(f"{pname}/{r}/rank")
      m, per_pos, sums = reading_metrics(cos, rank, valid[r])
      cis, samples = bootstrap_ci(
        sums, num_resamples=settings.bootstrap, seed=seed, groups=groups
      )
      m["ci"] = cis
      match = None if rank is None else (rank == 0) & valid[r]
      m["speedup"] = speedup_entry(
        m.get("token_top1"),
        samples.get("token_top1"),
        match,
        lengths - (r == "next"),
        gamma=settings.gamma,
        costs=costs,
      )
      results.setdefault(pname, {})[r] = m
      positions.setdefault(pname, {})[r] = per_pos
      plot_arrays[f"{pname}/{r}/cos"] = cos[valid[r]]
      if match is not None:
        plot_arrays[f"{pname}/{r}/match"] = match[valid[r]]
  return results, positions, plot_arrays


def depth_sums(match_steps: list[np.ndarray], lengths: np.ndarray) -> dict:
  """Per-sample counts of chain drafting's acceptance at depth 1..gamma.

  `match_steps[d-1]` [N, S] says whether draft d made at position p (the
  chain that starts at t = p - d + 1) is the target's token p + 1. Chains
  start at t = 0 .. L - 1 - gamma (every one of their gamma tokens exists),
  the same positions for every depth. Returns 'starts' (chains per sample),
  'depth_{d}' (chains whose first d drafts all match) and 'tau' (starts +
  the sum over d, so tau / starts = 1 + sum_d share_d).
  """
  gamma = len(match_steps)
  n, s = match_steps[0].shape
  starts = np.maximum(np.asarray(lengths) - gamma, 0)
  ok = np.arange(s)[None] < starts[:, None]
  out = {"starts": starts.astype(np.float64)}
  tau = out["starts"].copy()
  for d in range(1, gamma + 1):
    shifted = np.zeros((n, s), bool)
    shifted[:, : s - d + 1] = np.asarray(match_steps[d - 1], bool)[:, d - 1 :]
    ok = ok & shifted
    out[f"depth_{d}"] = ok.sum(1).astype(np.float64)
    tau += out[f"depth_{d}"]
  out["tau"] = tau
  return out


def depth_entry(
  match_steps: list[np.ndarray],
  lengths: np.ndarray,
  *,
  settings,
  costs: dict,
  seed: int,
  groups: np.ndarray | None = None,
) -> dict:
  """Acceptance at depth d = 1..gamma, expected tau and speedup, with CIs.

  share_d = the share of chain starts whose first d drafts all match the
  target's tokens; tau = 1 + sum_d share_d is the expected tokens per
  verification cycle of chain drafting gamma tokens from those positions;
  the speedup is tau / (gamma * c + v). CIs resample samples, or whole
  groups when `groups` labels them (`ratio_bootstrap`).
  """
  gamma = len(match_steps)
  sums = depth_sums(match_steps, lengths)
  total = float(sums["starts"].sum())
  entry: dict[str, Any] = {"chain_starts": int(total)}
  ratios = {f"depth_{d}": (f"depth_{d}", "starts") for d in range(1, gamma + 1)}
  ratios["tau"] = ("tau", "starts")
  for key, (num, _) in ratios.items():
    entry[key] = _safe_div(sums[num].sum(), total)
  c, v = costs["draft_cost"], costs["verify_cost"]
  tau = entry["tau"]
  entry["speedup"] = None if tau is None else tau / (gamma * c + v)
  cis, _ = ratio_bootstrap(
    sums, ratios, num_resamples=settings.bootstrap, seed=seed, groups=groups
  )
  entry["ci"] = cis
  return entry


def depth_acceptance(
  arrays: dict[str, np.ndarray],
  lengths: np.ndarray,
  *,
  gamma: int,
  fed_back: bool,
  settings,
  costs: dict,
  seed: int,
  groups: np.ndarray | None = None,
) -> dict:
  """Chain drafting's acceptance at depth, free-running and teacher-forced.

  Free-running: draft d comes from the adapter fed its own earlier drafts'
  states (`adapter/step{d}/rank`, d >= 2); for an adapter that is never fed
  its own states (L5) every draft is the teacher-forced one. Teacher-forced:
  draft d is the prediction at t + d - 1 from the true states
  (`adapter/next/rank`), what a per-position reading promises.
  """
  valid = valid_masks(lengths)["next"]
  tf = (arrays["adapter/next/rank"] == 0) & valid
  free = [tf]
  for d in range(2, gamma + 1):
    rank = arrays[f"adapter/step{d}/rank"] if fed_back else None
    free.append(tf if rank is None else (rank == 0) & valid)
  kw = {"settings": settings, "costs": costs, "seed": seed, "groups": groups}
  return {
    "gamma": gamma,
    "fed_back": fed_back,
    "free_running": depth_entry(free, lengths, **kw),
    "teacher_forced": depth_entry([tf] * gamma, lengths, **kw),
  }


def drafter_tokens(
  draft_NS: np.ndarray,
  target_NS: np.ndarray,
  lengths: np.ndarray,
  *,
  settings,
  costs: dict,
  seed: int,
  groups: np.ndarray | None = None,
) -> tuple[dict, list]:
  """(metrics, per-position list) of the drafter's own greedy tokens."""
  valid = valid_masks(lengths)["same"]
  match = (draft_NS == target_NS) & valid
  m, per_pos, sums = reading_metrics(None, None, valid, match_NS=match)
  cis, samples = bootstrap_ci(
    sums, num_resamples=settings.bootstrap, seed=seed, groups=groups
  )
  m["ci"] = cis
  drafter_costs = dict(costs)
  if settings.bench_json:
    try:
      drafter_costs = speedup_lib.costs_from_bench(
        settings.bench_json, "drafter", settings.gamma
      )
    except ValueError:
      pass  # No 'drafter' entry: the adapter's costs (it drafts too).
  elif settings.draft_cost is None:
    drafter_costs["draft_cost"] = speedup_lib.DEFAULT_DRAFTER_COST
  m["costs"] = drafter_costs
  m["speedup"] = speedup_entry(
    m["token_top1"],
    samples.get("token_top1"),
    match,
    lengths,
    gamma=settings.gamma,
    costs=drafter_costs,
  )
  return m, per_pos
