"""What a live SD benchmark run measured: aggregates and costs.

`aggregate` turns per-sample records of one method into means, the speedup
against a baseline (ratio of mean totals, bootstrap CIs), alpha, tau and the
per-phase breakdown; `costs_block` gives the per-token costs that
`python -m egpt_align.evaluate --bench_json` reads. tools/lib/sd_bench.py
runs the methods and calls these; tools/lib/sd_report.py writes them up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tools.lib.sd_methods import parse_method

# ----------------------------------------------------------------------------
# Aggregation.


def bootstrap_ci(
  stat, arrays: Sequence[np.ndarray], n: int, seed: int, level: float = 0.95
) -> list[float] | None:
  """Percentile CI of stat(*arrays) over paired resamples of the samples."""
  size = len(arrays[0])
  if size < 2 or n < 1:
    return None
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, size, size=(n, size))
  vals = np.array([stat(*(a[i] for a in arrays)) for i in idx], np.float64)
  vals = vals[np.isfinite(vals)]
  if not len(vals):
    return None
  lo, hi = np.percentile(vals, [50 * (1 - level), 50 * (1 + level)])
  return [float(lo), float(hi)]


def _ratio(a, b):
  return float(np.mean(a) / np.mean(b)) if np.mean(b) > 0 else float("nan")


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
  adapter = _phase_ms(rec, "adapter:")
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
  tot = np.array([r["total_ms"] for r in rs])
  btot = np.array([b["total_ms"] for b in bs])
  dec = np.array([r["decode_ms"] for r in rs])
  bdec = np.array([b["decode_ms"] for b in bs])
  ntok = np.array([len(r["tokens"]) for r in rs])
  out.update(
    mean_prefill_ms=float(np.mean([r["prefill_ms"] for r in rs])),
    mean_decode_ms=float(np.mean(dec)),
    mean_total_ms=float(np.mean(tot)),
    mean_tokens=float(np.mean(ntok)),
    ms_per_token=float(np.sum(tot) / max(np.sum(ntok), 1)),
    # Ratio of mean totals (never the mean of per-sample ratios, D5).
    speedup=_ratio(btot, tot),
    speedup_ci95=bootstrap_ci(_ratio, [btot, tot], n_boot, seed),
    decode_speedup=_ratio(bdec, dec),
    decode_speedup_ci95=bootstrap_ci(_ratio, [bdec, dec], n_boot, seed),
  )
  drafted = np.array([r["drafted"] for r in rs], np.float64)
  accepted = np.array([r["accepted"] for r in rs], np.float64)
  iters = np.array([r["verify_iterations"] for r in rs], np.float64)
  if drafted.sum() > 0:
    out.update(
      drafted=int(drafted.sum()),
      accepted=int(accepted.sum()),
      verify_iterations=int(iters.sum()),
      alpha=float(accepted.sum() / drafted.sum()),
      alpha_ci95=bootstrap_ci(
        lambda a, d: a.sum() / max(d.sum(), 1),
        [accepted, drafted],
        n_boot,
        seed,
      ),
      # Tokens per verification: accepted drafts + the target's own token.
      tau=float((accepted.sum() + iters.sum()) / iters.sum()),
      tau_ci95=bootstrap_ci(
        lambda a, i: (a.sum() + i.sum()) / max(i.sum(), 1),
        [accepted, iters],
        n_boot,
        seed,
      ),
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
  ov = [r["overlap"] for r in rs if r.get("overlap")]
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
    pairs = [
      (r["total_ms"], b["total_ms"])
      for r, b in zip(recs, base, strict=True)
      if "error" not in r
    ]
    tot = np.array([p[0] for p in pairs])
    btot = np.array([p[1] for p in pairs])
    out[rt] = {
      "speedup": _ratio(btot, tot),
      "speedup_ci95": bootstrap_ci(_ratio, [btot, tot], n_boot, seed),
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


def costs_block(per_sample: dict, methods: list[str], gamma: int) -> dict:
  """Measured per-phase costs; keys read by egpt_align (speedup.py)."""
  ok = {m: [r for r in per_sample[m] if "error" not in r] for m in methods}
  base = _span_rate(ok.get("baseline", []), lambda k: k == "target_decode")
  verify_by_len: dict[int, list[float]] = {}
  for m in methods:
    for rec in ok[m]:
      for k, v in rec["phases"].items():
        if k.startswith("target_verify["):
          length = int(k[len("target_verify[") : -1])
          acc = verify_by_len.setdefault(length, [0.0, 0])
          acc[0] += v["ms"]
          acc[1] += v["calls"]
  verify = {L: a[0] / a[1] for L, a in sorted(verify_by_len.items()) if a[1]}
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
      adapter_step[a] = _span_rate(
        [r for mm in methods for r in ok[mm]],
        lambda k, a=a: k == f"adapter:{a}",
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
      if k.startswith(("draft_decode", "draft_catchup", "adapter:"))
    )
    per_token[m] = ms / drafted
  prefill_overlap = {}
  for m in methods:
    ov = [r["overlap"] for r in ok[m] if r.get("overlap")]
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
    "draft_model_decode_ms": draft_model,
    "draft_model_prefill_ms": _span_rate(
      [r for m in methods for r in ok[m]], lambda k: k == "draft_prefill"
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
