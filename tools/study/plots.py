"""The study's figures (matplotlib, Agg) from results.json."""

from __future__ import annotations

import os

import numpy as np

from egpt_align import metrics as metrics_lib
from tools.study import layout


def _err(vals, cis):
  return np.array(
    [
      [v - (c or [v, v])[0], (c or [v, v])[1] - v]
      for v, c in zip(vals, cis, strict=True)
    ]
  ).T


def _bars(ax, names, series):
  """Grouped bars with CI whiskers: series = [(label, [metric entries])]."""
  w = 0.8 / len(series)
  for i, (label, ms) in enumerate(series):
    vals = [m["value"] or 0 for m in ms]
    x = np.arange(len(names)) + (i - (len(series) - 1) / 2) * w
    ax.bar(
      x,
      vals,
      w,
      yerr=_err(vals, [m["ci95"] for m in ms]),
      capsize=2,
      label=label,
    )


def _save(fig, ax, path, title, ylabel) -> str:
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def make_plots(data: dict, out_dir: str) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  ads = data["adapters"]
  none = {"token_top1": {"value": None, "ci95": None}}
  if ads:
    names = list(ads)
    labels = [layout.short(n) for n in names]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    _bars(
      ax,
      names,
      [
        (f"Accept@{t:.2f}", [ads[n]["metrics"][k] for n in names])
        for t, k in (
          (t, f"accept_{metrics_lib.threshold_key(t)}")
          for t in metrics_lib.THRESHOLDS
        )
      ],
    )
    ax.set_xticks(range(len(names)), labels)
    path = os.path.join(out_dir, "accept.png")
    title = "Accept@τ per adapter (primary reading), 95% CI"
    paths.append(_save(fig, ax, path, title, "share of test positions"))
    plt.close(fig)

    def no_adapter(a):
      b = a["baselines"]
      return (b.get("copy_target") or b.get("raw_source") or none)["token_top1"]

    fig, ax = plt.subplots(figsize=(10, 3.6))
    _bars(
      ax,
      names,
      [
        ("trained", [ads[n]["metrics"]["token_top1"] for n in names]),
        (
          "untrained",
          [ads[n]["baselines"]["untrained"]["token_top1"] for n in names],
        ),
        ("no adapter", [no_adapter(ads[n]) for n in names]),
      ],
    )
    ax.set_xticks(range(len(names)), labels)
    path = os.path.join(out_dir, "token_top1.png")
    title = "Token top-1 vs baselines (primary reading), 95% CI"
    paths.append(_save(fig, ax, path, title, "token top-1"))
    plt.close(fig)

  settings = [
    (sub, rt, block["methods"])
    for sub, live in data["live"].items()
    for rt, block in live["by_runtime"].items()
  ]
  if settings:
    measured = {m for _, _, rows in settings for m in rows}
    methods = [m for m in layout.METHODS if m != "baseline" and m in measured]
    fig, ax = plt.subplots(figsize=(10, 4))
    _bars(
      ax,
      methods,
      [
        (
          f"{layout.setting_name(sub, data['live'][sub]['device'])}, {rt}",
          [
            {
              "value": (rows.get(m) or {}).get("speedup"),
              "ci95": (rows.get(m) or {}).get("speedup_ci95"),
            }
            for m in methods
          ],
        )
        for sub, rt, rows in settings
      ],
    )
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.axhline(2.0, color="tab:red", lw=1, ls=":")
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    path = os.path.join(out_dir, "speedup.png")
    title = "Live speedup over the same runtime's greedy target, 95% CI"
    paths.append(_save(fig, ax, path, title, "speedup (ratio of mean times)"))
    plt.close(fig)
  return paths
