"""Evaluation outputs: metrics.json, positions.json, plots and report.md."""

from __future__ import annotations

import json
import os

from egpt_align import eval_stats as stats
from egpt_align import metrics as metrics_lib
from egpt_align.data import format as format_lib
from egpt_align.eval_format import (
  HEADLINE_ROWS,
  PRED_LABELS,
  col_name,
  columns,
  fmt,
  table,
  with_ci,
)

# Also importable from here as before (tests, tools/study).
from egpt_align.eval_plots import make_plots, p_match_figure  # noqa: F401


def verdict(metrics: dict) -> list[str]:
  """Plain statements: which baselines the adapter fails to beat, slowdowns.

  Compares the adapter's primary reading with every baseline column on token
  top-1 agreement (cosine where there are no token metrics); a baseline on
  the same-position reading stands for what the drafter gives without help.
  """
  res = metrics["results"]
  primary = metrics["primary_reading"]
  adapter = res.get("adapter", {}).get(primary)
  if adapter is None:
    return []
  key, what = "token_top1", "token top-1 agreement"
  if adapter.get(key) is None:
    key, what = "cos_sim_mean", "mean cosine"
  lines = []
  beaten, not_beaten = [], []
  for p, r in columns(metrics, primary)[1:]:
    value = res[p][r].get(key)
    if value is None:
      continue
    name = col_name(p, r, primary)
    entry = f"{name} ({fmt(value, key == 'token_top1')})"
    (beaten if adapter[key] > value else not_beaten).append(entry)
  mine = fmt(adapter[key], key == "token_top1")
  if not_beaten:
    lines.append(
      f"The adapter does NOT beat {', '.join(not_beaten)} on {what} "
      f"(adapter: {mine})."
    )
  if beaten:
    lines.append(f"The adapter beats {', '.join(beaten)} on {what}.")
  speedups = [
    m["speedup"]["speedup"]
    for reads in res.values()
    for m in reads.values()
    if m.get("speedup")
  ]
  mine = (adapter.get("speedup") or {}).get("speedup")
  if speedups and max(speedups) < 1:
    lines.append(
      "Every expected speedup is below 1x: with these costs, speculative "
      "decoding would be slower than decoding with the target alone."
    )
  elif mine is not None and mine < 1:
    lines.append(
      f"The adapter's expected speedup is below 1x ({mine:.3f}x): slower "
      "than decoding with the target alone."
    )
  return lines


def render_markdown(metrics: dict, positions: dict, plots: list[str]) -> str:
  """The human-readable report.md text."""
  run, data = metrics["run"], metrics["data"]
  lines = [f"# Evaluation: adapter `{run['adapter']}` on `{data['path']}`", ""]
  lines += _run_section(metrics)
  lines += _bullets("Notes", metrics["notes"])
  lines += _headline_section(metrics)
  lines += _bullets("Verdict", verdict(metrics))
  lines += _speedup_section(metrics)
  lines += _depth_section(metrics.get("depth_acceptance"))
  lines += _adapter_sections(metrics, positions)
  lines += _plots_section(plots)
  lines += _definitions_section()
  return "\n".join(lines)


def _bullets(title: str, items: list[str]) -> list[str]:
  """A section of bullet points; nothing without items."""
  if not items:
    return []
  return [f"## {title}", ""] + [f"- {x}" for x in items] + [""]


def _run_section(metrics: dict) -> list[str]:
  """Run and data: checkpoint, adapter, data, LM head and settings."""
  run, data, st = metrics["run"], metrics["data"], metrics["settings"]
  head = metrics.get("lm_head")
  lines = [
    "## Run and data",
    "",
    f"- Run: `{run['workdir']}` (checkpoint: {run['step']})"
    if run["workdir"]
    else f"- Run: no workdir; params: {run.get('params')}",
    f"- Adapter: `{run['adapter']}`, inputs {run['inputs']}, "
    f"predicts next state: {run['predicts_next']}; untrained baseline "
    f"initialised with seed {run['seed']}",
    f"- Data: `{data['path']}`"
    + (f" ({data['subset']})" if data.get("subset") else "")
    + f": {data['num_samples']} samples "
    f"(of {data['dataset_num_samples']}), {data['total_valid_positions']} "
    f"valid positions ({data['total_valid_next_positions']} with a next "
    f"position); length mean {fmt(data['num_hidden_tokens_mean'], digits=1)}"
    f", min {fmt(data['num_hidden_tokens_min'], digits=0)}, max "
    f"{fmt(data['num_hidden_tokens_max'], digits=0)}",
    f"- Provenance: `{json.dumps(data.get('provenance'))}`",
  ]
  if head:
    lines.append(
      f"- LM head: `{head['path']}` ({head['model_id']}, V={head['vocab_size']}"
      f", D={head['hidden_dim']}, {head['dtype']}); token targets: "
      f"{head['token_targets']}"
    )
  else:
    lines.append("- LM head: none given, so no token metrics from states")
  return lines + [
    f"- Settings: batch {st['batch_size']} on {st['devices']} device(s), "
    f"logits in {st['logits_dtype']}, {st['bootstrap_resamples']} bootstrap "
    f"resamples of {stats.resampling_text(st)}, 95% percentile CIs in "
    "brackets",
    "",
  ]


def _headline_section(metrics: dict) -> list[str]:
  """The headline table: the primary reading, adapter beside baselines."""
  primary = metrics["primary_reading"]
  res = metrics["results"]
  cols = columns(metrics, primary)
  lines = [
    f"## Headline ({primary}-position reading"
    + (
      ": output[t] vs target[t+1])"
      if primary == "next"
      else ": output[t] vs target[t])"
    ),
    "",
  ]
  rows = []
  for key, label, pct in HEADLINE_ROWS:
    cells = [with_ci(res[p][r], key, pct) for p, r in cols]
    if any(c != "–" for c in cells):
      rows.append([label] + cells)
  sp_cells = [_speedup_cell(res[p][r].get("speedup")) for p, r in cols]
  if any(c != "–" for c in sp_cells):
    gamma = metrics["settings"]["gamma"]
    rows.append([f"expected speedup (γ={gamma})"] + sp_cells)
  lines += table(["metric"] + [col_name(p, r, primary) for p, r in cols], rows)
  return lines + [""]


def _speedup_cell(sp: dict | None) -> str:
  """Expected speedup with its CI; '–' without one."""
  if not sp:
    return "–"
  s = f"{sp['speedup']:.3f}x"
  if sp.get("speedup_ci"):
    s += f" [{sp['speedup_ci'][0]:.3f}, {sp['speedup_ci'][1]:.3f}]"
  return s


def _speedup_section(metrics: dict) -> list[str]:
  """The speedup model, its costs, and a row per prediction and reading."""
  st = metrics["settings"]
  costs = st["costs"]
  lines = [
    "## Expected speedup",
    "",
    "Standard model: tokens per cycle τ = (1 − α^(γ+1)) / (1 − α), speedup "
    "= τ / (γ·c + v), with α the token top-1 agreement, c the draft cost per "
    "token and v the verify cost per cycle, both relative to one target "
    "decode step. No output length enters. `simulated τ` replays the "
    "teacher-forced match sequences cycle by cycle (no independence "
    "assumption).",
    "",
    f"Costs ({costs['source']}): c = {costs['draft_cost']:.3f}, v = "
    f"{costs['verify_cost']:.3f}, γ = {st['gamma']}."
    + (
      " These are assumed defaults, not measurements: pass --bench_json "
      "from tools/benchmark_sd.py for measured costs."
      if costs["source"] == "defaults"
      else ""
    )
    + (f" **{costs['note']}**" if costs.get("note") else ""),
    "",
  ]
  rows = _speedup_rows(metrics["results"], metrics["primary_reading"])
  if rows:
    lines += table(
      [
        "prediction",
        "reading",
        "α",
        "τ (model)",
        "τ (simulated)",
        "speedup [CI]",
        "speedup (simulated)",
        "best γ",
      ],
      rows,
    )
  else:
    lines.append("No token metrics (no LM head and no stored tokens).")
  return lines + [""]


def _speedup_rows(res: dict, primary: str) -> list[list[str]]:
  """One row per prediction and reading that has an expected speedup."""
  rows = []
  for p, reads in res.items():
    for r, m in reads.items():
      sp = m.get("speedup")
      if not sp:
        continue
      rows.append(
        [
          col_name(p, r, primary if p != "drafter_tokens" else "same"),
          r,
          fmt(sp["alpha"]),
          fmt(sp["tokens_per_cycle"]),
          fmt(sp.get("simulated_tokens_per_cycle")),
          with_ci(
            {"s": sp["speedup"], "ci": {"s": sp.get("speedup_ci")}}, "s", False
          ),
          fmt(sp.get("simulated_speedup")),
          f"{sp['best_gamma']} ({sp['best_gamma_speedup']:.3f}x)",
        ]
      )
  return rows


def _adapter_sections(metrics: dict, positions: dict) -> list[str]:
  """The adapter in detail: hidden-state metrics (both readings), cosine vs
  token match, and per position."""
  res, primary = metrics["results"], metrics["primary_reading"]
  if "adapter" not in res:
    return []
  lines = _hidden_detail(res, primary)
  if primary == "next" and "same" in res["adapter"]:
    lines += [
      "### Same-position reading (output[t] vs target[t])",
      "",
      "Shown for comparison with the reference's numbers. For adapters "
      "whose input contains the target (b1, l5f) it is trivially high; "
      "compare it with the untrained column.",
      "",
    ]
    lines += _hidden_detail(res, "same", heading=False)
  lines += _cos_match(res["adapter"][primary])
  return lines + _per_position(positions, primary)


def _plots_section(plots: list[str]) -> list[str]:
  if not plots:
    return []
  images = [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
  return ["## Plots", ""] + images + [""]


def _definitions_section() -> list[str]:
  return [
    "## Definitions",
    "",
    "- Valid positions are the dataset's; `next` uses positions t whose t+1 "
    "is valid. Cosine is F.normalize-style (norms clamped at 1e-12).",
    "- Accept@τ = fraction of valid positions with cosine strictly > τ.",
    "- Leading run = per sample, the number of positions from 0 until the "
    "first failure (cumprod trick), averaged over samples with ≥ 1 valid "
    "position.",
    "- Token top-k = the target token (stored target_tokens, else argmax of "
    "the target state through the LM head; at t+1 for `next`) is among the "
    "k highest logits of the prediction (ties count as in).",
    "- Standard deviations are population (ddof = 0, np.std) and medians "
    "are np.median (mean of the two middle values); the reference's keys of "
    "the same names used torch's ddof = 1 std and lower-middle median "
    "(docs/REFERENCE_NOTES.md §3). CIs resample samples with replacement "
    "(whole groups when the samples file gives each sample a 'group'); "
    "each headline metric is a ratio of per-sample sums.",
    "",
  ]


def _depth_section(depth: dict | None) -> list[str]:
  """Acceptance at depth, free-running beside teacher-forced."""
  if not depth:
    return []
  free, tf = depth["free_running"], depth["teacher_forced"]
  gamma = depth["gamma"]
  rows = [
    [f"first {d} drafts accepted"]
    + [with_ci(e, f"depth_{d}", True) for e in (free, tf)]
    for d in range(1, gamma + 1)
  ]
  rows.append(
    ["τ = 1 + Σ_d share_d"] + [with_ci(e, "tau", False) for e in (free, tf)]
  )
  rows.append(
    ["expected speedup τ / (γ·c + v)"]
    + [fmt(e.get("speedup")) for e in (free, tf)]
  )
  how = (
    "the adapter fed its own predicted states, with the attention of the "
    "runtime's KV cache (egpt_align/unroll.py)"
    if depth["fed_back"]
    else "this adapter reads only the drafter's states, which are the true "
    "ones while the drafts are right, so free-running equals teacher-forced"
  )
  return [
    f"## Acceptance at depth (chain drafting, γ = {gamma})",
    "",
    f"From every position t with t + {gamma} tokens left "
    f"({free['chain_starts']} chain starts), draft {gamma} tokens: "
    f"free-running = {how}; teacher-forced = each draft from the true "
    "states before it. A share is the fraction of starts whose first d "
    "drafts all match the target's tokens.",
    "",
    *table(["", "free-running [CI]", "teacher-forced [CI]"], rows),
    "",
  ]


def _hidden_detail(res, reading, heading=True) -> list[str]:
  cols = [
    (p, reading)
    for p in ("adapter", "untrained", "raw_source", "copy_target")
    if reading in res.get(p, {})
  ]
  keys = [
    "cos_sim_mean",
    "cos_sim_std",
    "cos_sim_median",
    "cos_sim_min",
    "cos_sim_max",
  ]
  keys += [
    f"accept_{metrics_lib.threshold_key(t)}" for t in metrics_lib.THRESHOLDS
  ]
  keys += [
    f"consecutive_mean_{metrics_lib.threshold_key(t)}"
    for t in metrics_lib.THRESHOLDS
  ]
  rows = []
  for k in keys:
    pct = k.startswith("accept")
    rows.append(
      [k]
      + [with_ci(res[p][r], k, pct) if k in res[p][r] else "–" for p, r in cols]
    )
  out = []
  if heading:
    out += [f"## Hidden-state metrics ({reading}-position reading)", ""]
  out += table(["metric"] + [PRED_LABELS[p] for p, _ in cols], rows)
  return out + [""]


def _cos_match(m: dict) -> list[str]:
  cond = m.get("p_match_given_cos")
  if not cond:
    return []
  rows = [
    [f"cos > 0.{k}", fmt(v["p_match"]), str(v["count"])]
    for k, v in cond.items()
  ]
  return (
    ["## Cosine vs token match (adapter)", ""]
    + table(["condition", "P(top-1 match)", "positions"], rows)
    + [
      "",
      f"Pearson r(cosine, match) = {fmt(m.get('cos_token_pearson_r'))}",
      "",
    ]
  )


def _per_position(positions: dict, reading: str, n: int = 20) -> list[str]:
  ad = positions["adapter"][reading][:n]
  if not ad:
    return []
  has_tok = "token_top1" in ad[0]
  extra = [
    (p, r)
    for p in ("untrained", "copy_target", "raw_source", "drafter_tokens")
    for r in (reading, "same")
    if r in positions.get(p, {})
  ]
  extra = list(dict.fromkeys(extra))
  header = ["t", "samples", "cos mean", "Accept@0.90"]
  if has_tok:
    header += ["token top-1"] + [
      f"{PRED_LABELS[p]} top-1" + ("" if r == reading else f" ({r})")
      for p, r in extra
    ]
  rows = []
  for t, e in enumerate(ad):
    row = [
      str(t),
      str(e["num_samples"]),
      fmt(e.get("cos_mean")),
      fmt(e.get("accept_90"), pct=True),
    ]
    if has_tok:
      row.append(fmt(e.get("token_top1"), pct=True))
      for p, r in extra:
        lst = positions[p][r]
        row.append(
          fmt(lst[t].get("token_top1"), pct=True) if t < len(lst) else "–"
        )
    rows.append(row)
  return (
    [f"## Per position ({reading} reading, first {n})", ""]
    + table(header, rows)
    + [""]
  )


def write_outputs(result, out_dir: str) -> list[str]:
  """metrics.json, positions.json, plots and report.md into out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, obj in (
    ("metrics.json", result.metrics),
    ("positions.json", result.positions),
  ):
    path = os.path.join(out_dir, name)
    format_lib.write_json_atomic(path, format_lib.to_jsonable(obj))
    paths.append(path)
  plots = make_plots(result, out_dir)
  paths += [os.path.join(out_dir, p) for p in plots]
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write(render_markdown(result.metrics, result.positions, plots))
  paths.append(path)
  return paths


def summary_text(result) -> str:
  """A few lines for the terminal: headline metrics with CIs."""
  m = result.metrics
  primary = m["primary_reading"]
  lines = [
    f"adapter {m['run']['adapter']} on {m['data']['path']} ({primary} reading)"
  ]
  for p, r in columns(m, primary):
    e = m["results"][p][r]
    parts = [
      f"{k}={with_ci(e, k, pct)}"
      for k, _, pct in HEADLINE_ROWS
      if e.get(k) is not None
    ]
    sp = e.get("speedup")
    if sp:
      parts.append(f"speedup={sp['speedup']:.3f}x")
    lines.append(f"  {col_name(p, r, primary)}: " + ", ".join(parts))
  depth = m.get("depth_acceptance")
  if depth:
    free, tf = depth["free_running"], depth["teacher_forced"]
    lines.append(
      f"  acceptance at depth (γ={depth['gamma']}): τ free-running "
      f"{with_ci(free, 'tau', False)}, teacher-forced "
      f"{with_ci(tf, 'tau', False)}"
    )
  note = m["settings"]["costs"].get("note")
  lines += [f"note: {note}"] if note else []
  lines += [f"verdict: {x}" for x in verdict(m)]
  return "\n".join(lines)
