"""What a live SD benchmark run reports: aggregates, costs, report.md, plots.

`aggregate` turns per-sample records of one method into means, the speedup
against a baseline (ratio of mean totals, bootstrap CIs), alpha, tau and the
per-phase breakdown; `costs_block` gives the per-token costs that
`python -m egpt_align.evaluate --bench_json` reads; `write_report` and
`write_plots` write report.md and the figures. tools/benchmark_sd.py runs the
methods (tools/lib/sd_engine.py) and calls these.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tools.lib import sd_engine as sd

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
  method: str,
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
  recs: list[dict], bases: dict[str, list[dict]], args
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
      "speedup_ci95": bootstrap_ci(
        _ratio, [btot, tot], args.bootstrap, args.seed
      ),
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
    # Draft trees: one verification of L tokens (tree mask), by L.
    "target_verify_tree_ms": {f"{L}": t for L, t in tree_verify.items()},
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
    if "draft_tokens" in per_token:
      dpt["drafter"] = per_token["draft_tokens"]
    for m, t in per_token.items():
      kind, names = sd.parse_method(m)
      if kind == "decode":
        dpt[names[0]] = t
    out["draft_ms_per_token"] = dpt
    out["verify_ms"] = {str(L - 1): t for L, t in verify.items()}
  return out


# ----------------------------------------------------------------------------
# Report and plots.


def fmt(x, nd=2):
  """A number for a table: nd decimals, or - for None."""
  if x is None:
    return "–"
  if isinstance(x, float):
    return f"{x:.{nd}f}"
  return str(x)


def _ci(v, ci, nd=3):
  if v is None:
    return "–"
  if not ci:
    return f"{v:.{nd}f}"
  return f"{v:.{nd}f} [{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"


def _cost_lines(costs: dict) -> list[str]:
  lines = [
    f"- target decode: {fmt(costs.get('target_decode_ms'), 3)} ms/token",
    "- target verify: "
    + ", ".join(
      f"{k} positions {fmt(v, 3)} ms"
      for k, v in costs["target_verify_ms"].items()
      if k != "gamma+1"
    ),
  ]
  base = costs.get("target_decode_ms")
  tree = costs.get("target_verify_tree_ms") or {}
  if tree:
    lines.append(
      "- target tree verify: "
      + ", ".join(
        f"{k} tokens {fmt(v, 3)} ms"
        + (f" ({v / base:.2f}x decode)" if base else "")
        for k, v in tree.items()
      )
    )
  lines += [
    f"- drafter decode: {fmt(costs.get('draft_model_decode_ms'), 3)} ms/token",
    "- SD-loop overhead beyond the model calls (ms per loop iteration): "
    + ", ".join(
      f"{m} {fmt(v, 3)}"
      for m, v in costs["sd_loop_overhead_ms_per_iteration"].items()
    ),
    "- adapter step: "
    + ", ".join(
      f"{k} {fmt(v, 3)} ms" for k, v in costs["adapter_step_ms"].items()
    ),
  ]
  rel = costs.get("relative")
  if rel:
    lines.append(
      f"- relative to one target decode step: v = {fmt(rel['v'], 3)}, c = "
      + ", ".join(f"{m} {fmt(c, 3)}" for m, c in rel["c"].items())
    )
  return lines


def write_report(path: str, results: dict) -> None:
  """report.md: settings, per-method table, correctness, costs."""
  cfg, agg, costs = results["config"], results["aggregate"], results["costs"]
  lines = [
    "# Speculative decoding benchmark",
    "",
    f"- device: {results['environment'].get('device')}; dtype "
    f"{cfg['dtype']}; gamma {cfg['gamma']}; prefill drafts "
    f"{cfg['prefill_gamma']}; max_new_tokens {cfg['max_new_tokens']}",
    f"- samples: {results['num_measured']} measured after "
    f"{cfg['warmup']} warm-up; target `{cfg['target']}`, drafter "
    f"`{cfg['draft']}`",
    "- speedup = mean(baseline total) / mean(method total) over the same "
    "samples (ratio of mean totals), 95% paired bootstrap CI; alpha = "
    "accepted / drafted over all verifications; tau = tokens per "
    "verification (accepted drafts + the target's own token)",
    "",
    "| method | n | prefill ms | decode ms | total ms | speedup | decode "
    "speedup | alpha | tau | mismatches (near-tie) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for m, a in agg.items():
    if not a.get("n"):
      lines.append(f"| {m} | 0 | failed: {a.get('failed')} |||||||| |")
      continue
    lines.append(
      f"| {m} | {a['n']} | {fmt(a['mean_prefill_ms'], 1)} | "
      f"{fmt(a['mean_decode_ms'], 1)} | {fmt(a['mean_total_ms'], 1)} | "
      f"{_ci(a['speedup'], a['speedup_ci95'])} | "
      f"{_ci(a['decode_speedup'], a['decode_speedup_ci95'])} | "
      f"{_ci(a.get('alpha'), a.get('alpha_ci95'))} | "
      f"{_ci(a.get('tau'), a.get('tau_ci95'), 2)} | "
      f"{a['mismatched_samples']} ({a['near_tie_flips']}) |"
    )
  lines += [
    "",
    "## Where the time goes (mean ms per sample)",
    "",
    "| method | prefill (wall) | target forwards | drafter | adapter | "
    "SD-loop overhead |",
    "|---|---|---|---|---|---|",
  ]
  for m, a in agg.items():
    b = a.get("breakdown_ms")
    if b:
      lines.append(
        f"| {m} | {b['prefill']:.2f} | {b['target_forward']:.2f} | "
        f"{b['drafter']:.2f} | {b['adapter']:.2f} | {b['overhead']:.2f} |"
      )
  ov = {
    m: a["prefill_overlap"] for m, a in agg.items() if "prefill_overlap" in a
  }
  if ov:
    lines += [
      "",
      "## Measured prefill overlap (mean ms)",
      "",
      "Each side is also timed alone after the run; saved = target alone + "
      "drafter alone - concurrent wall (negative: concurrency cost more "
      "than it hid). 'in region' = each side's time while running "
      "concurrently, contention included.",
      "",
      "| method | target alone | drafter alone | concurrent wall | saved | "
      "target in region | drafter in region | concurrent |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for m, o in ov.items():
      lines.append(
        f"| {m} | {o['target_alone_ms']:.2f} | {o['drafter_alone_ms']:.2f} | "
        f"{o['wall_ms']:.2f} | {o['overlap_ms']:.2f} | {o['target_ms']:.2f} "
        f"| {o['drafter_ms']:.2f} | {o['concurrent']} |"
      )
  runtimes = cfg.get("runtimes") or ["eager"]
  if len(runtimes) > 1:
    lines += [
      "",
      "## Speedup against each runtime's baseline",
      "",
      "Ratio of mean totals against the `baseline` of each runtime "
      f"({', '.join(runtimes)}; fast path per model: "
      f"{results.get('fast_path') or '-'}).",
      "",
      "| method | " + " | ".join(f"vs {r} baseline" for r in runtimes) + " |",
      "|---|" + "---|" * len(runtimes),
    ]
    for m, a in agg.items():
      vs = a.get("speedup_vs")
      if vs:
        lines.append(
          f"| {m} | "
          + " | ".join(
            _ci(vs[r]["speedup"], vs[r]["speedup_ci95"]) for r in runtimes
          )
          + " |"
        )
  by_rt = results.get("costs_by_runtime") or {runtimes[0]: costs}
  for rt, c in by_rt.items():
    lines += ["", f"## Measured costs ({rt} runtime)", ""]
    lines += _cost_lines(c)
  bad = results.get("mismatches", [])
  lines += ["", "## Correctness", ""]
  if not bad:
    lines.append("Every method's tokens equal the baseline's on every sample.")
  else:
    lines.append(
      f"{len(bad)} (method, sample) pairs differ from the baseline; "
      f"near-tie = baseline top-2 logit margin < {cfg['tie_margin']} at the "
      "first differing token:"
    )
    lines.append("")
    for x in bad[:50]:
      lines.append(
        f"- {x['method']} / {x['id']}: first difference at token "
        f"{x['index']}, margin {fmt(x['margin'], 4)}"
        + (" (near-tie)" if x["near_tie"] else " (NOT a near-tie)")
      )
  lines += [
    "",
    "Plots: speedup.png, breakdown.png, acceptance.png.",
    "",
  ]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def write_plots(out_dir: str, results: dict) -> list[str]:
  """speedup.png, breakdown.png, acceptance.png."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  agg = {m: a for m, a in results["aggregate"].items() if a.get("n")}
  methods = [m for m in agg if m != "baseline"]
  paths = []

  fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(methods) + 2), 3.5))
  if methods:
    vals = [agg[m]["speedup"] for m in methods]
    err = np.array(
      [
        [
          v - (agg[m]["speedup_ci95"] or [v, v])[0],
          (agg[m]["speedup_ci95"] or [v, v])[1] - v,
        ]
        for m, v in zip(methods, vals, strict=True)
      ]
    ).T
    ax.bar(range(len(methods)), vals, yerr=err, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
  ax.axhline(1.0, color="k", lw=1, ls="--")
  ax.set_ylabel("speedup (ratio of mean totals)")
  ax.set_title("End-to-end speedup, 95% bootstrap CI")
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "speedup.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

  names = list(agg)
  parts = ["prefill", "target_forward", "drafter", "adapter", "overhead"]
  fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 3.8))
  bottom = np.zeros(len(names))
  for p in parts:
    v = np.array([max(agg[m]["breakdown_ms"][p], 0.0) for m in names])
    ax.bar(range(len(names)), v, bottom=bottom, label=p)
    bottom += v
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
  ax.set_ylabel("mean ms per sample")
  ax.set_title("Time per phase")
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "breakdown.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

  sdm = [m for m in methods if "alpha" in agg[m]]
  fig, axes = plt.subplots(1, 2, figsize=(max(6, 2 * len(sdm) + 3), 3.5))
  for ax, key, title in (
    (axes[0], "alpha", "acceptance alpha (accepted / drafted)"),
    (axes[1], "tau", "tokens per verification tau"),
  ):
    if sdm:
      vals = [agg[m][key] for m in sdm]
      err = np.array(
        [
          [
            v - (agg[m][f"{key}_ci95"] or [v, v])[0],
            (agg[m][f"{key}_ci95"] or [v, v])[1] - v,
          ]
          for m, v in zip(sdm, vals, strict=True)
        ]
      ).T
      ax.bar(range(len(sdm)), vals, yerr=err, capsize=4, color="tab:green")
      ax.set_xticks(range(len(sdm)), sdm, rotation=30, ha="right")
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "acceptance.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  return paths
