"""The evaluation's plots (matplotlib, Agg): cosine histogram, per-position
acceptance and token agreement, P(top-1 match | cosine)."""

from __future__ import annotations

import os

import numpy as np

from egpt_align import metrics as metrics_lib
from egpt_align.eval_format import PRED_LABELS, fmt


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
  ax.set_title(f"P(match | cosine); Pearson r = {fmt(pearson_r)}")
  return fig


def _nan(x):
  return np.nan if x is None else x


def _save(fig, out_dir: str, name: str) -> str:
  fig.savefig(os.path.join(out_dir, name), dpi=110)
  import matplotlib.pyplot as plt

  plt.close(fig)
  return name
