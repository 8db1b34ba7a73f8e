"""Plots: every label inside its figure, no legend over a curve."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from egpt_align import plots, report  # noqa: E402


def _inside(inner, outer):
  return (
    inner.x0 >= outer.x0 - 1
    and inner.x1 <= outer.x1 + 1
    and inner.y0 >= outer.y0 - 1
    and inner.y1 <= outer.y1 + 1
  )


def test_p_match_keeps_empty_conditions_inside_the_axes():
  counts = {"80": 1343, "85": 456, "90": 20, "92": 2, "95": 0, "98": 0}
  cond = {
    k: {"count": n, "p_match": None if n == 0 else 0.3}
    for k, n in counts.items()
  }
  fig = report.p_match_figure(cond, 0.1)
  fig.canvas.draw()
  ax = fig.axes[0]
  labels = [t.get_text() for t in ax.get_xticklabels()]
  assert labels == [f">0.{k}" for k in counts]
  ax_box = ax.get_window_extent()
  renderer = fig.canvas.get_renderer()
  texts = [t for t in ax.texts if t.get_text().startswith("n=")]
  assert [t.get_text() for t in texts] == [f"n={n}" for n in counts.values()]
  for t in texts:
    assert _inside(t.get_window_extent(renderer), ax_box), t.get_text()
  plt.close(fig)


def test_training_curves_legend_hides_no_curve():
  epochs = list(range(1, 6))
  ramp = list(np.linspace(0.1, 0.95, 5))
  history = {
    "epoch": epochs,
    "train_loss": ramp[::-1],
    "val_loss": ramp[::-1],
    "train_cos_sim": ramp,
    "val_cos_sim": ramp,
    "val_next_cos_sim": ramp,
    "val_token_top1": ramp,
    "val_next_token_top1": ramp,
  }
  for tau in plots.THRESHOLDS:
    history[plots.accept_key(tau)] = ramp
    history[plots.accept_key(tau, "val_next_accept_")] = ramp
  fig = plots.training_curves_figure(history)
  fig.canvas.draw()
  ax = fig.axes[2]
  legend = ax.get_legend()
  labels = [t.get_text() for t in legend.get_texts()]
  assert "solid: same position" in labels
  assert "dashed: next position" in labels
  # The legend sits outside the Accept@τ axes, so it covers no curve.
  assert not legend.get_window_extent().overlaps(ax.get_window_extent())
  plt.close(fig)
