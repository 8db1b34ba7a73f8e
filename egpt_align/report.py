"""Evaluation outputs: metrics.json, positions.json, plots and report.md."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from egpt_align import eval_stats as stats
from egpt_align import metrics as metrics_lib
from egpt_align.data import format as format_lib

PRED_LABELS = {
  "adapter": "adapter",
  "untrained": "untrained adapter",
  "raw_source": "raw drafter state",
  "copy_target": "copy target[t]",
  "drafter_tokens": "drafter's own tokens",
}
_TOKEN_ONLY = ("drafter_tokens",)


def _columns(metrics: dict, reading: str) -> list[tuple[str, str]]:
  """(prediction, reading) columns for a reading: adapter first, baselines."""
  res = metrics["results"]
  cols = [
    (p, reading)
    for p in ("adapter", "untrained", "copy_target")
    if reading in res.get(p, {})
  ]
  # Cross-model floors exist only at the same position; show them next to
  # the primary reading too, labelled.
  for p in ("raw_source", "drafter_tokens"):
    if "same" in res.get(p, {}):
      cols.append((p, "same"))
  return cols


def _fmt(x: Any, pct: bool = False, digits: int = 3) -> str:
  if x is None:
    return "n/a"
  if isinstance(x, int | np.integer) and not pct:
    return str(int(x))
  if pct:
    return f"{100 * x:.1f}%"
  return f"{x:.{digits}f}"


def _with_ci(m: dict, key: str, pct: bool) -> str:
  val = m.get(key)
  if val is None:
    return "–"
  s = _fmt(val, pct)
  ci = m.get("ci", {}).get(key)
  if ci:
    s += f" [{_fmt(ci[0], pct)}, {_fmt(ci[1], pct)}]"
  return s


_HEADLINE_ROWS = (
  ("token_top1", "token top-1 agreement (α)", True),
  ("token_top5", "token top-5 agreement", True),
  ("token_top10", "token top-10 agreement", True),
  ("token_consecutive_mean", "leading run of token matches (mean)", False),
  ("cos_sim_mean", "cosine (mean)", False),
  ("accept_90", "Accept@0.90 (cos > 0.90)", True),
  ("consecutive_mean_90", "leading run of cos > 0.90 (mean)", False),
)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  out = [
    "| " + " | ".join(header) + " |",
    "|" + "|".join("---" for _ in header) + "|",
  ]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  return out


def _col_name(p: str, r: str, primary: str) -> str:
  label = PRED_LABELS.get(p, p)
  return label + (f" ({r} pos.)" if r != primary else "")


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
  for p, r in _columns(metrics, primary)[1:]:
    value = res[p][r].get(key)
    if value is None:
      continue
    name = _col_name(p, r, primary)
    entry = f"{name} ({_fmt(value, key == 'token_top1')})"
    (beaten if adapter[key] > value else not_beaten).append(entry)
  mine = _fmt(adapter[key], key == "token_top1")
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
  run, data, st = metrics["run"], metrics["data"], metrics["settings"]
  primary = metrics["primary_reading"]
  res = metrics["results"]
  head = metrics.get("lm_head")
  lines = [f"# Evaluation: adapter `{run['adapter']}` on `{data['path']}`", ""]
  lines += [
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
    f"position); length mean {_fmt(data['num_hidden_tokens_mean'], digits=1)}"
    f", min {_fmt(data['num_hidden_tokens_min'], digits=0)}, max "
    f"{_fmt(data['num_hidden_tokens_max'], digits=0)}",
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
  lines += [
    f"- Settings: batch {st['batch_size']} on {st['devices']} device(s), "
    f"logits in {st['logits_dtype']}, {st['bootstrap_resamples']} bootstrap "
    f"resamples of {stats.resampling_text(st)}, 95% percentile CIs in "
    "brackets",
    "",
  ]
  if metrics["notes"]:
    lines += ["## Notes", ""] + [f"- {n}" for n in metrics["notes"]] + [""]

  cols = _columns(metrics, primary)
  lines += [
    f"## Headline ({primary}-position reading"
    + (
      ": output[t] vs target[t+1])"
      if primary == "next"
      else ": output[t] vs target[t])"
    ),
    "",
  ]
  rows = []
  for key, label, pct in _HEADLINE_ROWS:
    cells = [_with_ci(res[p][r], key, pct) for p, r in cols]
    if any(c != "–" for c in cells):
      rows.append([label] + cells)
  sp_cells = []
  for p, r in cols:
    sp = res[p][r].get("speedup")
    if sp:
      s = f"{sp['speedup']:.3f}x"
      if sp.get("speedup_ci"):
        s += f" [{sp['speedup_ci'][0]:.3f}, {sp['speedup_ci'][1]:.3f}]"
      sp_cells.append(s)
    else:
      sp_cells.append("–")
  if any(c != "–" for c in sp_cells):
    rows.append([f"expected speedup (γ={st['gamma']})"] + sp_cells)
  lines += _table(
    ["metric"] + [_col_name(p, r, primary) for p, r in cols], rows
  )
  lines.append("")
  plain = verdict(metrics)
  if plain:
    lines += ["## Verdict", ""] + [f"- {x}" for x in plain] + [""]

  costs = st["costs"]
  lines += [
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
  rows = []
  for p, reads in res.items():
    for r, m in reads.items():
      sp = m.get("speedup")
      if not sp:
        continue
      rows.append(
        [
          _col_name(p, r, primary if p != "drafter_tokens" else "same"),
          r,
          _fmt(sp["alpha"]),
          _fmt(sp["tokens_per_cycle"]),
          _fmt(sp.get("simulated_tokens_per_cycle")),
          _with_ci(
            {"s": sp["speedup"], "ci": {"s": sp.get("speedup_ci")}}, "s", False
          ),
          _fmt(sp.get("simulated_speedup")),
          f"{sp['best_gamma']} ({sp['best_gamma_speedup']:.3f}x)",
        ]
      )
  if rows:
    lines += _table(
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
  lines.append("")

  lines += _depth_section(metrics.get("depth_acceptance"))
  if "adapter" in res:
    lines += _hidden_detail(res, primary)
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
    lines += _per_position(positions, primary)
  if plots:
    lines += (
      ["## Plots", ""]
      + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
      + [""]
    )
  lines += [
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
  return "\n".join(lines)


def _depth_section(depth: dict | None) -> list[str]:
  """Acceptance at depth, free-running beside teacher-forced."""
  if not depth:
    return []
  free, tf = depth["free_running"], depth["teacher_forced"]
  gamma = depth["gamma"]
  rows = [
    [f"first {d} drafts accepted"]
    + [_with_ci(e, f"depth_{d}", True) for e in (free, tf)]
    for d in range(1, gamma + 1)
  ]
  rows.append(
    ["τ = 1 + Σ_d share_d"] + [_with_ci(e, "tau", False) for e in (free, tf)]
  )
  rows.append(
    ["expected speedup τ / (γ·c + v)"]
    + [_fmt(e.get("speedup")) for e in (free, tf)]
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
    *_table(["", "free-running [CI]", "teacher-forced [CI]"], rows),
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
      + [
        _with_ci(res[p][r], k, pct) if k in res[p][r] else "–" for p, r in cols
      ]
    )
  out = []
  if heading:
    out += [f"## Hidden-state metrics ({reading}-position reading)", ""]
  out += _table(["metric"] + [PRED_LABELS[p] for p, _ in cols], rows)
  return out + [""]


def _cos_match(m: dict) -> list[str]:
  cond = m.get("p_match_given_cos")
  if not cond:
    return []
  rows = [
    [f"cos > 0.{k}", _fmt(v["p_match"]), str(v["count"])]
    for k, v in cond.items()
  ]
  return (
    ["## Cosine vs token match (adapter)", ""]
    + _table(["condition", "P(top-1 match)", "positions"], rows)
    + [
      "",
      f"Pearson r(cosine, match) = {_fmt(m.get('cos_token_pearson_r'))}",
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
      _fmt(e.get("cos_mean")),
      _fmt(e.get("accept_90"), pct=True),
    ]
    if has_tok:
      row.append(_fmt(e.get("token_top1"), pct=True))
      for p, r in extra:
        lst = positions[p][r]
        row.append(
          _fmt(lst[t].get("token_top1"), pct=True) if t < len(lst) else "–"
        )
    rows.append(row)
  return (
    [f"## Per position ({reading} reading, first {n})", ""]
    + _table(header, rows)
    + [""]
  )


def make_plots(result, out_dir: str) -> list[str]:
  """Writes the PNG plots; returns their file names (relative to out_dir)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  metrics, positions, arrays = result.metrics, result.positions, result.arrays
  primary = metrics["primary_reading"]
  names = []

  fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
  hists = [
    (p, a, arrays.get(f"{p}/{primary}/cos"))
    for p, a in (("adapter", 0.8), ("untrained", 0.4))
  ]
  hists = [(p, a, c) for p, a, c in hists if c is not None and c.size]
  if hists:
    # Shared bins so the two histograms compare bar for bar.
    lo = min(float(c.min()) for _, _, c in hists)
    hi = max(float(c.max()) for _, _, c in hists)
    bins = np.linspace(lo, max(hi, lo + 1e-6), 51)
  for p, alpha, cos in hists:
    ax.hist(cos, bins=bins, alpha=alpha, label=PRED_LABELS[p])
  for t in metrics_lib.THRESHOLDS:
    ax.axvline(t, color="k", ls="--", lw=0.8)
    ax.text(t, ax.get_ylim()[1] * 0.95, f"{t:.2f}", rotation=90, fontsize=7)
  ax.set_xlabel(f"cosine ({primary} reading)")
  ax.set_ylabel("positions")
  ax.legend()
  ax.set_title("Cosine histogram with Accept@τ thresholds")
  names.append(_save(fig, out_dir, "cosine_hist.png"))

  ad = positions["adapter"][primary]
  t = np.arange(len(ad))
  has_tok = bool(ad) and "token_top1" in ad[0]
  fig, axes = plt.subplots(
    1,
    2 if has_tok else 1,
    figsize=(12 if has_tok else 6, 4),
    layout="constrained",
  )
  axes = np.atleast_1d(axes)
  for th in metrics_lib.THRESHOLDS:
    k = f"accept_{metrics_lib.threshold_key(th)}"
    axes[0].plot(t, [_nan(e.get(k)) for e in ad], marker=".", label=f"τ={th}")
  axes[0].set_xlabel("position")
  axes[0].set_ylabel("Accept@τ")
  axes[0].set_ylim(-0.02, 1.02)
  axes[0].legend()
  axes[0].set_title(f"Per-position acceptance ({primary})")
  if has_tok:
    for p in (
      "adapter",
      "untrained",
      "copy_target",
      "raw_source",
      "drafter_tokens",
    ):
      for r in (primary, "same"):
        lst = positions.get(p, {}).get(r)
        if lst and "token_top1" in lst[0]:
          axes[1].plot(
            np.arange(len(lst)),
            [_nan(e.get("token_top1")) for e in lst],
            marker=".",
            label=PRED_LABELS[p] + ("" if r == primary else f" ({r})"),
          )
          break
    axes[1].set_xlabel("position")
    axes[1].set_ylabel("token top-1 agreement")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].legend(fontsize=8)
    axes[1].set_title("Per-position token agreement")
  names.append(_save(fig, out_dir, "positions.png"))

  adapter = metrics["results"]["adapter"][primary]
  if adapter.get("p_match_given_cos"):
    fig = p_match_figure(
      adapter["p_match_given_cos"], adapter.get("cos_token_pearson_r")
    )
    names.append(_save(fig, out_dir, "p_match_given_cos.png"))
  return names


def p_match_figure(cond: dict, pearson_r: float | None):
  """Bar chart of P(top-1 match | cos > τ) with each condition's count."""
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
  keys = list(cond)
  # Empty conditions (n=0) have no P(match): a zero-height bar, labelled,
  # so every threshold keeps its tick and label inside the axes.
  vals = [np.nan_to_num(_nan(cond[k]["p_match"])) for k in keys]
  x = np.arange(len(keys))
  ax.bar(x, vals)
  ax.set_xticks(x, [f">0.{k}" for k in keys])
  ax.set_xlim(-0.5, len(keys) - 0.5)
  for i, k in enumerate(keys):
    ax.text(
      i,
      0.02,
      f"n={cond[k]['count']}",
      ha="center",
      va="bottom",
      fontsize=7,
      rotation=90,
    )
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("cosine condition")
  ax.set_ylabel("P(top-1 match | cos > τ)")
  ax.set_title(f"P(match | cosine); Pearson r = {_fmt(pearson_r)}")
  return fig


def _nan(x):
  return np.nan if x is None else x


def _save(fig, out_dir: str, name: str) -> str:
  fig.savefig(os.path.join(out_dir, name), dpi=110)
  import matplotlib.pyplot as plt

  plt.close(fig)
  return name


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
  for p, r in _columns(m, primary):
    e = m["results"][p][r]
    parts = [
      f"{k}={_with_ci(e, k, pct)}"
      for k, _, pct in _HEADLINE_ROWS
      if e.get(k) is not None
    ]
    sp = e.get("speedup")
    if sp:
      parts.append(f"speedup={sp['speedup']:.3f}x")
    lines.append(f"  {_col_name(p, r, primary)}: " + ", ".join(parts))
  depth = m.get("depth_acceptance")
  if depth:
    free, tf = depth["free_running"], depth["teacher_forced"]
    lines.append(
      f"  acceptance at depth (γ={depth['gamma']}): τ free-running "
      f"{_with_ci(free, 'tau', False)}, teacher-forced "
      f"{_with_ci(tf, 'tau', False)}"
    )
  note = m["settings"]["costs"].get("note")
  lines += [f"note: {note}"] if note else []
  lines += [f"verdict: {x}" for x in verdict(m)]
  return "\n".join(lines)
