"""How evaluation numbers are written: labels, columns, values with CIs.

Shared by report.md, the terminal summary (report.py) and the plots
(eval_plots.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Prediction name -> its label in tables and legends.
PRED_LABELS = {
  "adapter": "adapter",
  "untrained": "untrained adapter",
  "raw_source": "raw drafter state",
  "copy_target": "copy target[t]",
  "drafter_tokens": "drafter's own tokens",
}


def columns(metrics: dict, reading: str) -> list[tuple[str, str]]:
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


def fmt(x: Any, pct: bool = False, digits: int = 3) -> str:
  """A number as the report writes it: 'n/a' for None, ints as they are."""
  if x is None:
    return "n/a"
  if isinstance(x, int | np.integer) and not pct:
    return str(int(x))
  if pct:
    return f"{100 * x:.1f}%"
  return f"{x:.{digits}f}"


def with_ci(m: dict, key: str, pct: bool) -> str:
  """m[key] with its CI in brackets when m has one; '–' without a value."""
  val = m.get(key)
  if val is None:
    return "–"
  s = fmt(val, pct)
  ci = m.get("ci", {}).get(key)
  if ci:
    s += f" [{fmt(ci[0], pct)}, {fmt(ci[1], pct)}]"
  return s


# (metric key, label, shown as a percentage) of the headline table.
HEADLINE_ROWS = (
  ("token_top1", "token top-1 agreement (α)", True),
  ("token_top5", "token top-5 agreement", True),
  ("token_top10", "token top-10 agreement", True),
  ("token_consecutive_mean", "leading run of token matches (mean)", False),
  ("cos_sim_mean", "cosine (mean)", False),
  ("accept_90", "Accept@0.90 (cos > 0.90)", True),
  ("consecutive_mean_90", "leading run of cos > 0.90 (mean)", False),
)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
  """A Markdown table's lines."""
  out = [
    "| " + " | ".join(header) + " |",
    "|" + "|".join("---" for _ in header) + "|",
  ]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  return out


def col_name(p: str, r: str, primary: str) -> str:
  """A column's label: the reading is named when it is not the primary."""
  label = PRED_LABELS.get(p, p)
  return label + (f" ({r} pos.)" if r != primary else "")
