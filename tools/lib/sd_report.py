"""What a live SD benchmark run writes for people: report.md, plots, tables.

`write_report` and `write_plots` write report.md and the figures from the
results (tools/lib/sd_results.py builds them); `summary_text` is the table
the command line prints; `write_profile` the per-kernel profile.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from egpt_align import eval_stats
from tools.lib import fair_runs


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
    "- prefill (prompt and media): target "
    f"{fmt(costs.get('target_prefill_ms'), 2)} ms (the baseline's)"
    + (
      ""
      if costs.get("draft_model_prefill_ms") is None
      else f", drafter {fmt(costs['draft_model_prefill_ms'], 2)} ms "
      "(timed alone)"
    ),
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


def _fairness_lines(results: dict) -> list[str]:
  """The reliability verdict, run order, warm-ups, A/A and Amdahl lines."""
  cfg = results["config"]
  lines = []
  if results.get("reliable") is False:
    lines += [
      "",
      "**UNRELIABLE RUN**: " + "; ".join(results["reliability_warnings"]),
    ]
  if cfg.get("order") == "balanced":
    lines.append(
      f"- run order: the {len(cfg['runs_per_sample'])} runs of a sample "
      "follow the orders of a Williams design in turn (starting at "
      f"{cfg['order_start']}): each takes every position and follows every "
      "other run equally often over a full cycle; each record's `position` "
      "says where it ran"
    )
  elif cfg.get("order") == "rotate":
    lines.append(
      f"- run order: the {len(cfg['runs_per_sample'])} runs of a sample "
      f"rotate one place per sample (starting at {cfg['order_start']}; each "
      "record's `position` says where it ran)"
    )
  elif cfg.get("order"):
    lines.append("- run order: fixed (the listed order on every sample)")
  if cfg.get("sample_order") == "one per group in turn":
    lines.append(
      "- sample order: one sample of each group in turn (a run cut short "
      "covers as many groups as it can)"
    )
  if cfg.get("gc"):
    lines.append(f"- Python's garbage collector: {cfg['gc']}")
  warm = results.get("shape_warmups") or []
  if cfg.get("shape_warmup"):
    lines.append(
      f"- work done once per new input shape: {len(warm)} samples of a new "
      f"shape ran every method once untimed first "
      f"({sum(w['ms'] for w in warm):.1f} ms in all, not in any timing)"
    )
  compiled = results.get("timed_compiles")
  if compiled is not None:
    lines.append(
      "- torch.compile inside timed runs: "
      + (
        "none"
        if not compiled
        else "; ".join(fair_runs.compile_warnings(compiled))
      )
    )
  for rt, c in (results.get("aa_control") or {}).items():
    lines.append(
      f"- A/A control ({rt}): baseline / baseline again = "
      f"{_ci(c['ratio'], c['ci95'])} end to end, "
      f"{_ci(c['decode_ratio'], c['decode_ci95'])} decode phase; "
      + ("within" if c["reliable"] else "NOT within")
      + f" [{c['range'][0]}, {c['range'][1]}] with a CI holding 1"
    )
  for rt, a in (results.get("amdahl") or {}).items():
    if a["baseline_prefill_share"] is not None:
      lines.append(
        f"- Amdahl ({rt}): the baseline's prefill is "
        f"{100 * a['baseline_prefill_share']:.1f}% of its time, so no "
        "decoding speedup can give more than "
        f"{fmt(a['end_to_end_ceiling'], 3)}x end to end"
      )
  return lines


def _cost_model_lines(agg: dict) -> list[str]:
  rows = {m: a["cost_model"] for m, a in agg.items() if a.get("cost_model")}
  if not rows:
    return []
  lines = [
    "",
    "## Cost model against the measured decode phase",
    "",
    "Predicted decode-phase speedup = tau / (g c + v) from the measured tau "
    "(tokens per decode-phase verification), g (drafts per verification), c "
    "(drafting cost per drafted token) and v (one verification), c and v "
    "relative to one target decode step; error = predicted / measured - 1.",
    "",
    "| method | tau | alpha | g | c | v | predicted | measured | error |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for m, x in rows.items():
    err = x["relative_error"]
    lines.append(
      f"| {m} | {x['tau']:.2f} | {x['alpha']:.3f} | "
      f"{x['drafts_per_verification']:.2f} | {x['c']:.3f} | {x['v']:.3f} | "
      f"{x['decode_speedup']:.3f} | {fmt(x['measured_decode_speedup'], 3)} "
      f"| {'–' if err is None else f'{100 * err:+.1f}%'} |"
    )
  return lines


def _overlap_lines(agg: dict) -> list[str]:
  """Measured prefill overlap: each side alone vs concurrent."""
  ov = {
    m: a["prefill_overlap"] for m, a in agg.items() if "prefill_overlap" in a
  }
  if not ov:
    return []
  lines = [
    "",
    "## Measured prefill overlap (mean ms)",
    "",
    "Each side is also timed alone after the run (untimed, on every "
    "--overlap_every-th sample: `samples`); saved = target alone + "
    "drafter alone - concurrent wall (negative: concurrency cost more "
    "than it hid). 'in region' = each side's time while running "
    "concurrently, contention included. Means over those samples.",
    "",
    "| method | target alone | drafter alone | concurrent wall | saved | "
    "target in region | drafter in region | concurrent | samples |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for m, o in ov.items():
    lines.append(
      f"| {m} | {o['target_alone_ms']:.2f} | {o['drafter_alone_ms']:.2f} | "
      f"{o['wall_ms']:.2f} | {o['overlap_ms']:.2f} | {o['target_ms']:.2f} "
      f"| {o['drafter_ms']:.2f} | {o['concurrent']} | {o.get('samples')} |"
    )
  return lines


def _runtime_lines(results: dict, runtimes: list[str]) -> list[str]:
  """Speedups against each runtime's baseline (several runtimes)."""
  if len(runtimes) <= 1:
    return []
  lines = [
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
  for m, a in results["aggregate"].items():
    vs = a.get("speedup_vs")
    if vs:
      lines.append(
        f"| {m} | "
        + " | ".join(
          _ci(vs[r]["speedup"], vs[r]["speedup_ci95"]) for r in runtimes
        )
        + " |"
      )
  return lines


def _correctness_lines(results: dict) -> list[str]:
  """Tokens that differ from the baseline, near-tie or not."""
  cfg, bad = results["config"], results.get("mismatches", [])
  lines = ["", "## Correctness", ""]
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
    "samples (ratio of mean totals); decode speedup = the same over the "
    "decode loop alone; 95% paired bootstrap CIs, "
    + "resampling "
    + eval_stats.resampling_text(cfg)
    + "; alpha = accepted / drafted over all verifications; tau = tokens "
    "per verification (accepted drafts + the target's own token)",
    *_fairness_lines(results),
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
  lines += _cost_model_lines(agg)
  lines += _overlap_lines(agg)
  runtimes = cfg.get("runtimes") or ["eager"]
  lines += _runtime_lines(results, runtimes)
  by_rt = results.get("costs_by_runtime") or {runtimes[0]: costs}
  for rt, c in by_rt.items():
    lines += ["", f"## Measured costs ({rt} runtime)", ""]
    lines += _cost_lines(c)
  lines += _correctness_lines(results)
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


def summary_text(results: dict) -> str:
  """The per-method table and measured costs the command line prints."""
  runtimes = results["config"]["runtimes"]
  vs = "".join(f" {'vs ' + r:>10s}" for r in runtimes if len(runtimes) > 1)
  lines = [
    "",
    f"{'method':32s} {'n':>3s} {'total ms':>9s} {'speedup':>8s}{vs} "
    f"{'alpha':>6s} {'tau':>5s} {'mism':>4s}",
  ]
  for m, a in results["aggregate"].items():
    if not a.get("n"):
      lines.append(f"{m:32s}   0  (all samples failed)")
      continue
    cols = "".join(
      f" {a['speedup_vs'][r]['speedup']:10.3f}" for r in a.get("speedup_vs", {})
    )
    lines.append(
      f"{m:32s} {a['n']:3d} {a['mean_total_ms']:9.2f} {a['speedup']:8.3f}"
      f"{cols} {fmt(a.get('alpha'), 3):>6s} {fmt(a.get('tau'), 2):>5s} "
      f"{a['mismatched_samples']:4d}"
    )
  for rt, c in results["costs_by_runtime"].items():
    steps = ", ".join(
      f"{k} {fmt(v, 3)}" for k, v in c["adapter_step_ms"].items()
    )
    loop = ", ".join(
      f"{k} {fmt(v, 3)}"
      for k, v in c["sd_loop_overhead_ms_per_iteration"].items()
    )
    lines.append(
      f"[{rt}] target decode {fmt(c.get('target_decode_ms'), 3)} ms/token, "
      f"verify (gamma+1) {fmt(c['target_verify_ms'].get('gamma+1'), 3)} ms, "
      f"drafter {fmt(c.get('draft_model_decode_ms'), 3)} ms/token, "
      f"adapter steps (ms) {steps or '-'}; loop overhead (ms/iter) {loop}"
    )
  for rt, c in (results.get("aa_control") or {}).items():
    lines.append(
      f"[{rt}] A/A control: baseline / baseline again "
      f"{_ci(c['ratio'], c['ci95'])}"
      + ("" if c["reliable"] else "  UNRELIABLE RUN")
    )
  for rt, a in (results.get("amdahl") or {}).items():
    lines.append(
      f"[{rt}] baseline prefill share {fmt(a['baseline_prefill_share'], 3)}"
      f": end-to-end ceiling {fmt(a['end_to_end_ceiling'], 3)}x"
    )
  lines.append(
    f"fast path: {results['fast_path'] or '-'}; wrote {results['out']}"
  )
  return "\n".join(lines)


def write_profile(
  path: str, run: Callable, methods: Sequence[str], runtime: str
) -> None:
  """Per-kernel device time of one sample per method (torch.profiler).

  `run(method)` runs one method on one sample and returns its SampleResult.
  """
  import torch
  from torch.profiler import ProfilerActivity, profile

  acts = [ProfilerActivity.CPU]
  if torch.cuda.is_available():
    acts.append(ProfilerActivity.CUDA)
  key = "self_cuda_time_total" if len(acts) > 1 else "self_cpu_time_total"
  with open(path, "w") as f:
    for m in methods:
      with profile(activities=acts) as prof:
        r = run(m)
      f.write(
        f"## {m} ({runtime} runtime): {len(r.tokens)} tokens, "
        f"{r.iterations} iterations, decode {r.decode_ms:.2f} ms\n"
      )
      f.write(prof.key_averages().table(sort_by=key, row_limit=40))
      f.write("\n\n")
