"""What a live SD benchmark run measured: aggregates and costs.

`aggregate` turns per-sample records of one method into means, the speedup
against a baseline (ratio of mean totals, bootstrap CIs), alpha, tau and the
per-phase breakdown; `costs_block` gives the per-token costs that
`python -m egpt_align.evaluate --bench_json` reads. tools/lib/sd_bench.py
runs the methods and calls these; tools/lib/sd_report.py writes them up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from egpt_align import eval_stats
from tools.lib.sd_methods import parse_method

# ----------------------------------------------------------------------------
# Aggregation.


# Every CI'd statistic is a ratio of sums over the paired samples (a ratio of
# mean totals, never a mean of per-sample ratios): (numerator, denominator).
RATIOS = {
  "speedup": ("base_total_ms", "total_ms"),
  "decode_speedup": ("base_decode_ms", "decode_ms"),
  "alpha": ("accepted", "drafted"),
  # Tokens per verification: accepted drafts + the target's own token.
  "tau": ("verified_tokens", "verify_iterations"),
}


def groups_of(recs: Sequence[dict]) -> np.ndarray | None:
  """The records' `group` labels (from samples.jsonl), or None: per sample."""
  if not recs or "group" not in recs[0]:
    return None
  return np.array([str(r["group"]) for r in recs])


def ratio_cis(
  columns: dict[str, np.ndarray],
  names: Sequence[str],
  *,
  n_boot: int,
  seed: int,
  groups: np.ndarray | None,
) -> dict[str, list[float] | None]:
  """95% percentile bootstrap CIs of RATIOS `names`, by group if given.

  None where fewer than two samples (or groups) exist or nothing is finite.
  """
  units = len(next(iter(columns.values())))
  if groups is not None:
    units = len(set(groups.tolist()))
  cis = {}
  if units >= 2:
    cis, _ = eval_stats.ratio_bootstrap(
      columns,
      {k: RATIOS[k] for k in names},
      num_resamples=n_boot,
      seed=seed,
      groups=groups,
    )
  return {k: cis.get(k) for k in names}


def _ratio(a, b) -> float:
  return float(np.sum(a) / np.sum(b)) if np.sum(b) > 0 else float("nan")


def _phase_ms(rec: dict, prefix: str) -> float:
  return sum(
    v["ms"]
    for k, v in rec["phases"].items()
    if k.startswith(prefix) and not k.startswith("prefill_")
  )


def breakdown(rec: dict) -> dict[str, float]:
  """Per-sample time split: prefill wall, decode-loop parts, overhead (ms)."""
  target = _phase_ms(rec, "target_decode") + _phase_ms(rec, "target_verify")
  drafter = _phase_ms(rec, "draft_decode") + _phase_ms(rec, "draft_catchup")
  adapter = _phase_ms(rec, "adapter:") + _phase_ms(rec, "tree_adapter:")
  return {
    "prefill": rec["prefill_ms"],
    "target_forward": target,
    "drafter": drafter,
    "adapter": adapter,
    "overhead": rec["decode_ms"] - target - drafter - adapter,
  }


def aggregate(
  recs: list[dict],
  base: list[dict],
  *,
  n_boot: int,
  seed: int,
) -> dict:
  """Aggregates of one method over the measured samples it completed."""
  ok = [(r, b) for r, b in zip(recs, base, strict=True) if "error" not in r]
  out: dict[str, Any] = {"n": len(ok), "failed": len(recs) - len(ok)}
  if not ok:
    return out
  rs, bs = [r for r, _ in ok], [b for _, b in ok]
  cols = {
    k: np.array([r[k] for r in rs], np.float64)
    for k in ("total_ms", "decode_ms", "accepted", "drafted")
  }
  cols["base_total_ms"] = np.array([b["total_ms"] for b in bs], np.float64)
  cols["base_decode_ms"] = np.array([b["decode_ms"] for b in bs], np.float64)
  cols["verify_iterations"] = np.array(
    [r["verify_iterations"] for r in rs], np.float64
  )
  cols["verified_tokens"] = cols["accepted"] + cols["verify_iterations"]
  ntok = np.array([len(r["tokens"]) for r in rs])
  sd = cols["drafted"].sum() > 0
  names = list(RATIOS) if sd else ["speedup", "decode_speedup"]
  cis = ratio_cis(cols, names, n_boot=n_boot, seed=seed, groups=groups_of(rs))
  value = {k: _ratio(cols[RATIOS[k][0]], cols[RATIOS[k][1]]) for k in names}
  out.update(
    mean_prefill_ms=float(np.mean([r["prefill_ms"] for r in rs])),
    mean_decode_ms=float(np.mean(cols["decode_ms"])),
    mean_total_ms=float(np.mean(cols["total_ms"])),
    mean_tokens=float(np.mean(ntok)),
    ms_per_token=float(np.sum(cols["total_ms"]) / max(np.sum(ntok), 1)),
  )
  for k in names:
    out[k], out[f"{k}_ci95"] = value[k], cis[k]
  if sd:
    out.update(
      drafted=int(cols["drafted"].sum()),
      accepted=int(cols["accepted"].sum()),
      verify_iterations=int(cols["verify_iterations"].sum()),
    )
    for phase in ("prefill", "decode"):
      it = [x for r in rs for x in r["per_iteration"] if x[0] == phase]
      if it:
        d = sum(x[1] for x in it)
        out[f"alpha_{phase}"] = sum(x[2] for x in it) / d
        out[f"drafted_{phase}"] = d
  parts = [breakdown(r) for r in rs]
  out["breakdown_ms"] = {
    k: float(np.mean([p[k] for p in parts])) for k in parts[0]
  }
  names = sorted({k for r in rs for k in r["phases"]})
  out["phases_ms"] = {
    k: float(np.mean([r["phases"].get(k, {}).get("ms", 0.0) for r in rs]))
    for k in names
  }
  # Only the samples whose saving was measured (BenchSettings.overlap_every).
  ov = [r["overlap"] for r in rs if "overlap_ms" in (r.get("overlap") or {})]
  if ov:
    out["prefill_overlap"] = {
      k: float(np.mean([o[k] for o in ov]))
      for k in (
        "target_alone_ms",
        "drafter_alone_ms",
        "wall_ms",
        "overlap_ms",
        "target_ms",
        "drafter_ms",
      )
    }
    out["prefill_overlap"]["concurrent"] = bool(ov[0]["concurrent"])
    out["prefill_overlap"]["samples"] = len(ov)
  fm = [
    r["first_draft_match"] for r in rs if r["first_draft_match"] is not None
  ]
  if fm:
    out["prefill_first_token_agree"] = float(np.mean(fm))
  out["mismatched_samples"] = int(sum(not r["match"] for r in rs))
  out["near_tie_flips"] = int(sum(bool(r.get("near_tie")) for r in rs))
  return out


def label(method: str, runtime: str, runtimes: Sequence[str]) -> str:
  """The result key of `method` on `runtime`: plain for the first runtime."""
  return method if runtime == runtimes[0] else f"{method}@{runtime}"


def speedups_vs(
  recs: list[dict], bases: dict[str, list[dict]], *, n_boot: int, seed: int
) -> dict[str, dict]:
  """Speedup (ratio of mean totals, CI) against each runtime's baseline."""
  out = {}
  for rt, base in bases.items():
    ok = [(r, b) for r, b in zip(recs, base, strict=True) if "error" not in r]
    cols = {
      "total_ms": np.array([r["total_ms"] for r, _ in ok], np.float64),
      "base_total_ms": np.array([b["total_ms"] for _, b in ok], np.float64),
    }
    groups = groups_of([r for r, _ in ok])
    ci = ratio_cis(cols, ["speedup"], n_boot=n_boot, seed=seed, groups=groups)
    out[rt] = {
      "speedup": _ratio(cols["base_total_ms"], cols["total_ms"]),
      "speedup_ci95": ci["speedup"],
    }
  return out


def _span_rate(records, name_fn, per: str = "calls") -> float | None:
  ms = cnt = 0.0
  for rec in records:
    for k, v in rec["phases"].items():
      if name_fn(k):
        ms += v["ms"]
        cnt += v[per]
  return ms / cnt if cnt else None


def _ms_by_length(ok: dict, methods, prefix: str) -> dict[int, float]:
  """Mean ms per call of the spans `prefix`L], by length L."""
  by_len: dict[int, list[float]] = {}
  for m in methods:
    for rec in ok[m]:
      for k, v in rec["phases"].items():
        if k.startswith(prefix):
          acc = by_len.setdefault(int(k[len(prefix) : -1]), [0.0, 0])
          acc[0] += v["ms"]
          acc[1] += v["calls"]
  return {L: a[0] / a[1] for L, a in sorted(by_len.items()) if a[1]}


def _drafter_prefill_alone(records) -> float | None:
  """The drafter's prefill (its prompt alone), mean ms per call.

  A concurrent prefill's `draft_prefill` span runs beside the target's and
  carries its contention (one GPU, one interpreter lock): it measured the
  scenes drafter at 1.8x the target's prefill. So a concurrent run counts
  only through its overlap record's `drafter_alone_ms` (the drafter side
  timed alone after the run) and only when that side was the prompt alone
  (no prefill adapter's drafts); a run prefilled one after the other
  counts through its span.
  """
  ms = []
  for rec in records:
    ov = rec.get("overlap") or {}
    if not ov.get("concurrent"):
      v = rec["phases"].get("draft_prefill")
      if v and v["calls"]:
        ms.append(v["ms"] / v["calls"])
    elif "drafter_alone_ms" in ov and not any(
      k.startswith("prefill_adapter:") for k in rec["phases"]
    ):
      ms.append(ov["drafter_alone_ms"])
  return float(np.mean(ms)) if ms else None


def costs_block(per_sample: dict, methods: list[str], gamma: int) -> dict:
  """Measured per-phase costs; keys read by egpt_align (speedup.py)."""
  ok = {m: [r for r in per_sample[m] if "error" not in r] for m in methods}
  base = _span_rate(ok.get("baseline", []), lambda k: k == "target_decode")
  verify = _ms_by_length(ok, methods, "target_verify[")
  tree_verify = _ms_by_length(ok, methods, "target_verify_tree[")
  draft_model = _span_rate(
    [r for m in methods for r in ok[m]],
    lambda k: k == "draft_decode",
    per="units",
  )
  adapter_step: dict[str, float] = {}
  for m in methods:
    names = {
      k.split(":", 1)[1]
      for r in ok[m]
      for k in r["phases"]
      if k.startswith("adapter:")
    }
    for a in names:
      # Per position: B1's catch-up and chain are one call of T + γ - 1.
      adapter_step[a] = _span_rate(
        [r for mm in methods for r in ok[mm]],
        lambda k, a=a: k == f"adapter:{a}",
        per="units",
      )
  prefill_adapter: dict[str, float] = {}
  for m in methods:
    for r in ok[m]:
      for k in r["phases"]:
        if k.startswith("prefill_adapter:"):
          a = k.split(":", 1)[1]
          prefill_adapter[a] = _span_rate(
            [r for mm in methods for r in ok[mm]], lambda n, k=k: n == k
          )
  # Drafting cost per drafted token in the decode loop, per method.
  per_token: dict[str, float] = {}
  for m in methods:
    drafted = sum(r["drafted"] for r in ok[m])
    drafted -= sum(
      x[1] for r in ok[m] for x in r["per_iteration"] if x[0] == "prefill"
    )
    if drafted <= 0:
      continue
    ms = sum(
      v["ms"]
      for r in ok[m]
      for k, v in r["phases"].items()
      if k.startswith(
        ("draft_decode", "draft_catchup", "adapter:", "tree_adapter:")
      )
    )
    per_token[m] = ms / drafted
  prefill_overlap = {}
  for m in methods:
    ov = [
      r["overlap"] for r in ok[m] if "overlap_ms" in (r.get("overlap") or {})
    ]
    if ov:
      prefill_overlap[m] = float(np.mean([o["overlap_ms"] for o in ov]))
  # Wall time of the decode loop not covered by any timed model call,
  # per loop iteration (host work, syncs, launch gaps).
  overhead = {}
  for m in methods:
    iters = sum(r["iterations"] for r in ok[m])
    if iters:
      overhead[m] = sum(breakdown(r)["overhead"] for r in ok[m]) / iters
  out: dict[str, Any] = {
    "gamma": gamma,
    "target_prefill_ms": _span_rate(
      ok.get("baseline", []), lambda k: k == "target_prefill"
    ),
    "target_decode_ms": base,
    "target_verify_ms": {
      "gamma+1": verify.get(gamma + 1),
      **{f"{L}": t for L, t in verify.items()},
    },
    # Draft trees: one verification of L tokens (tree mask), by L.
    "target_verify_tree_ms": {f"{L}": t for L, t in tree_verify.items()},
    "draft_model_decode_ms": draft_model,
    "draft_model_prefill_ms": _drafter_prefill_alone(
      [r for m in methods for r in ok[m]]
    ),
    "adapter_step_ms": adapter_step,
    # One call on prefill_gamma + 1 positions, LM head + argmax included.
    "prefill_adapter_call_ms": prefill_adapter,
    "prefill_overlap_ms": prefill_overlap,
    "sd_loop_overhead_ms_per_iteration": overhead,
    "draft_ms_per_token_by_method": per_token,
  }
  if base:
    out["relative"] = {
      "c": {m: t / base for m, t in per_token.items()},
      "v": (verify[gamma + 1] / base) if gamma + 1 in verify else None,
    }
    # egpt_align/speedup.py reads these three keys.
    dpt = {}
    for m, t in per_token.items():
      method = parse_method(m)
      if method.spec.cost_key == "drafter":
        dpt["drafter"] = t
      elif method.spec.cost_key == "adapter":
        dpt[method.adapters[-1]] = t
    out["draft_ms_per_token"] = dpt
    out["verify_ms"] = {str(L - 1): t for L, t in verify.items()}
  return out


# ----------------------------------------------------------------------------
# Fairness: the A/A control, the Amdahl ceiling, the cost model.


def aa_control(
  agg: dict, low: float = 0.98, high: float = 1.02
) -> dict[str, Any]:
  """The A/A control from the aggregate of the baseline's second copy.

  ratio = mean(baseline total) / mean(copy total) over the same samples;
  reliable when it lies in [low, high] and its CI (if any) includes 1.
  """
  ratio, ci = agg.get("speedup"), agg.get("speedup_ci95")
  ok = ratio is not None and low <= ratio <= high
  if ok and ci is not None:
    ok = ci[0] <= 1.0 <= ci[1]
  return {
    "ratio": ratio,
    "ci95": ci,
    "decode_ratio": agg.get("decode_speedup"),
    "decode_ci95": agg.get("decode_speedup_ci95"),
    "range": [low, high],
    "reliable": bool(ok),
  }


def amdahl(base: list[dict]) -> dict[str, float | None]:
  """The baseline's prefill share and the end-to-end ceiling it implies.

  Speculative decoding shortens the decode phase only: even free decoding
  leaves the prefill, so end to end no method can beat 1 / prefill share.
  """
  ok = [r for r in base if "error" not in r]
  total = sum(r["total_ms"] for r in ok)
  if not total:
    return {"baseline_prefill_share": None, "end_to_end_ceiling": None}
  share = sum(r["prefill_ms"] for r in ok) / total
  return {
    "baseline_prefill_share": share,
    "end_to_end_ceiling": 1.0 / share if share > 0 else None,
  }


def verify_cost(costs: dict, method: str, options: Mapping[str, Any]):
  """One verification of `method`, in target decode steps: a chain's
  gamma + 1 tokens, or a tree's `tree_nodes` (tree mask), from the run's
  method options."""
  base = costs.get("target_decode_ms")
  if method.split(":")[0] in ("tree", "two_phase_tree"):
    nodes = options.get("tree_nodes")
    ms = (costs.get("target_verify_tree_ms") or {}).get(str(nodes))
  else:
    ms = (costs.get("target_verify_ms") or {}).get("gamma+1")
  return ms / base if ms and base else None


def cost_model(
  recs: list[dict], costs: dict, method: str, measured: float | None
) -> dict[str, float | None] | None:
  """The decode-phase speedup the measured tau, c and v predict.

  Per decode-phase verification the loop spends g c + v target steps (g:
  drafts per verification, c: drafting cost per drafted token, v: one
  verification, both relative to one target decode step, all measured)
  and yields tau = (accepted + verifications) / verifications tokens (for
  chain drafting tau = 1 + g alpha, alpha = accepted / drafted, measured:
  not the independent-token formula). Predicted speedup = tau / (g c + v);
  `relative_error` = predicted / measured - 1 (what the model leaves out:
  loop overhead, plain decode steps, the prefill-phase verification).
  """
  its = [x for r in recs if "error" not in r for x in r["per_iteration"]]
  its = [x for x in its if x[0] == "decode"]
  rel = costs.get("relative") or {}
  c, v = (rel.get("c") or {}).get(method), rel.get("v")
  if not its or c is None or v is None:
    return None
  drafted = sum(x[1] for x in its)
  tau = (sum(x[2] for x in its) + len(its)) / len(its)
  g = drafted / len(its)
  predicted = tau / (g * c + v)
  return {
    "tau": tau,
    "alpha": sum(x[2] for x in its) / drafted,
    "drafts_per_verification": g,
    "c": c,
    "v": v,
    "decode_speedup": predicted,
    "measured_decode_speedup": measured,
    "relative_error": None if not measured else predicted / measured - 1.0,
  }
