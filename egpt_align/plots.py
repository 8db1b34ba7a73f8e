"""Training curves (matplotlib, Agg): loss, cosine and val Accept@tau."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from egpt_align.metrics import THRESHOLDS, threshold_key


def accept_key(tau: float, prefix: str = "val_accept_") -> str:
  """History key of Accept@tau: 0.90 -> 'val_accept_90' (reference style)."""
  return f"{prefix}{threshold_key(tau)}"


def plot_training_curves(
  history: Mapping[str, Sequence[float]],
  path: str,
  *,
  thresholds: Sequence[float] = THRESHOLDS,
  title: str | None = None,
) -> str:
  """Writes training_curves.png from per-epoch history lists; returns path.

  Panels: loss (train / val), cosine similarity (train / val, plus the
  next-position reading when present) and val Accept@tau in [0, 1] (solid:
  same position, dashed: next position). Accept@tau is the fraction of valid
  positions whose hidden-state cosine exceeds tau, not a token match rate.
  """
  import matplotlib.pyplot as plt

  fig = training_curves_figure(history, thresholds=thresholds, title=title)
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)
  return path


def training_curves_figure(
  history: Mapping[str, Sequence[float]],
  *,
  thresholds: Sequence[float] = THRESHOLDS,
  title: str | None = None,
):
  """The matplotlib figure of `plot_training_curves` (caller closes it)."""
  import matplotlib

  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  def series(key):
    values = history.get(key) or []
    return [v for v in values]

  epochs = history.get("epoch") or list(range(1, len(series("train_loss")) + 1))
  has_val = bool(series("val_loss"))
  n_panels = 3 if has_val else 2
  fig, axes = plt.subplots(
    1, n_panels, figsize=(5 * n_panels + 2, 4), layout="constrained"
  )

  ax = axes[0]
  ax.plot(epochs, series("train_loss"), label="train")
  if has_val:
    ax.plot(epochs, series("val_loss"), label="val")
  ax.set_xlabel("epoch")
  ax.set_ylabel("loss")
  ax.set_title("Loss")
  ax.legend()

  ax = axes[1]
  ax.plot(epochs, series("train_cos_sim"), label="train")
  if has_val:
    ax.plot(epochs, series("val_cos_sim"), label="val (same pos.)")
  if series("val_next_cos_sim"):
    ax.plot(epochs, series("val_next_cos_sim"), "--", label="val (next pos.)")
  ax.set_xlabel("epoch")
  ax.set_ylabel("cosine similarity")
  ax.set_title("Cosine similarity")
  ax.legend()

  if has_val:
    ax = axes[2]
    for i, tau in enumerate(thresholds):
      color = f"C{i}"
      ax.plot(
        epochs, series(accept_key(tau)), color=color, label=f"τ={tau:.2f}"
      )
      nxt = series(accept_key(tau, "val_next_accept_"))
      if nxt:
        ax.plot(epochs, nxt, "--", color=color)
    if series("val_token_top1"):
      ax.plot(epochs, series("val_token_top1"), "k-", label="token top-1")
    if series("val_next_token_top1"):
      ax.plot(epochs, series("val_next_token_top1"), "k--")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction of positions")
    ax.set_title("Val Accept@τ (cos > τ)")
    ax.plot([], [], "k-", lw=0.8, label="solid: same position")
    if series("val_next_cos_sim"):
      ax.plot([], [], "k--", lw=0.8, label="dashed: next position")
    # Outside the axes: inside, it hid whichever curve ran under it.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))

  if title:
    fig.suptitle(title)
  return fig
