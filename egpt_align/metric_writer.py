"""Where training metrics go: metrics.jsonl, history.json and the curves.

metrics.jsonl (one line per logged step and per epoch, process 0 only) is
the source of truth; TensorBoard is optional and needs no TensorFlow.
history.json keeps the reference's per-epoch keys.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from egpt_align import metrics, plots
from egpt_align.data import format as format_lib

METRICS_FILE = "metrics.jsonl"
HISTORY_FILE = "history.json"
CURVES_FILE = "training_curves.png"


class MetricWriter:
  """metrics.jsonl (the source of truth) and optional TensorBoard."""

  def __init__(self, workdir: str, *, tensorboard: bool, active: bool):
    self.active = active
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if active and tensorboard:
      try:
        from tensorboardX import SummaryWriter  # no TensorFlow needed
      except ImportError:
        logging.warning(
          "config.tensorboard=True but tensorboardX is not installed "
          "(pip install tensorboardX); writing JSONL only"
        )
      else:
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def truncate_after(self, step: int) -> None:
    """Drops records past `step` (written after the last checkpoint)."""
    if not self.active or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    keep = []
    for line in lines:
      try:
        if json.loads(line).get("step", 0) <= step:
          keep.append(line)
      except json.JSONDecodeError:
        continue  # a torn last line from a hard kill
    with open(self.path, "w") as f:
      f.writelines(keep)

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    if not self.active:
      return
    record = {"step": int(step)}
    record.update(format_lib.to_jsonable(dict(values)))
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, int | float) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


HISTORY_READINGS = {
  "val_cos_sim, val_accept_*, val_token_top1": (
    "same position: output[t] vs target[t] (the reference's reading)"
  ),
  "val_next_cos_sim, val_next_accept_*, val_next_token_top1": (
    "next position: output[t] vs target[t+1] (primary for l5, b1, l5f)"
  ),
}


def readings_text(val: Mapping[str, float]) -> str:
  """Validation cosine and Accept@0.90, each labelled with its reading."""
  text = (
    f"same pos.: cos {val['cos_sim']:.4f} Accept@0.90 {val['accept_90']:.4f}"
  )
  if "next_cos_sim" in val:
    text += (
      f" | next pos.: cos {val['next_cos_sim']:.4f} "
      f"Accept@0.90 {val['next_accept_90']:.4f}"
    )
  return text


def history_append(history: dict, epoch: int, train: dict, val: dict) -> None:
  """Per-epoch lists with the reference's history.json keys (+ extras)."""

  def add(key, value):
    history.setdefault(key, []).append(value)

  add("epoch", epoch)
  add("train_loss", train["loss"])
  add("train_cos_sim", train["cos"])
  add("val_loss", val["loss"])
  add("val_cos_sim", val["cos_sim"])
  for tau in metrics.THRESHOLDS:
    key = metrics.threshold_key(tau)
    add(plots.accept_key(tau), val[f"accept_{key}"])
    if f"next_accept_{key}" in val:
      add(plots.accept_key(tau, "val_next_accept_"), val[f"next_accept_{key}"])
  if "next_cos_sim" in val:
    add("val_next_cos_sim", val["next_cos_sim"])
  for key in ("token_top1", "next_token_top1"):
    if key in val:
      add(f"val_{key}", val[key])
  add("lr", train["lr"])


@jax.jit
def _stack_metrics(pending: list[dict]) -> dict:
  """[{name: scalar}] per step -> {name: [steps]}, on device."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *pending)


class TrainLog:
  """Train metrics of one epoch: fetched to the host only on log steps."""

  def __init__(self, writer: MetricWriter, sums: dict, epoch: int, bar):
    self.writer, self.sums, self.epoch, self.bar = writer, sums, epoch, bar
    self.pending: list[dict] = []
    self.t0 = time.perf_counter()

  def flush(self, step: int) -> None:
    if not self.pending:
      return
    # One device-side stack and one transfer per metric, not one tiny
    # device->host copy per metric and step (~5 ms per 50 steps on a GPU).
    host = jax.device_get(_stack_metrics(self.pending))
    self.pending.clear()
    n = len(host["loss"])
    for i in range(n):  # in step order, so resumed sums are bit-identical
      self.sums["loss"] += float(host["loss"][i])
      self.sums["cos"] += float(host["cos"][i])
      self.sums["steps"] += 1
    self.sums["lr"] = float(host["lr"][-1])
    tokens = int(np.sum(host["tokens"], dtype=np.int64))
    now = time.perf_counter()
    elapsed, self.t0 = now - self.t0, now
    record = {
      "epoch": self.epoch + 1,
      "train/loss": float(np.mean(host["loss"])),
      "train/cos": float(np.mean(host["cos"])),
      "train/mse": float(np.mean(host["mse"])),
      "train/grad_norm": float(host["grad_norm"][-1]),
      "train/lr": float(host["lr"][-1]),
      "train/tokens_per_sec": tokens / max(elapsed, 1e-9),
    }
    for key in ("next_cos", "token_ce"):
      if key in host:
        record[f"train/{key}"] = float(np.mean(host[key]))
    self.writer.write(step, record)
    self.bar.set_postfix(
      loss=f"{record['train/loss']:.4f}",
      cos=f"{record['train/cos']:.4f}",
      tok_s=f"{record['train/tokens_per_sec']:.0f}",
    )


def write_history(workdir: str, history: dict, *, title: str) -> None:
  """history.json (with what each key reads) and the training curves."""
  format_lib.write_json_atomic(
    os.path.join(workdir, HISTORY_FILE),
    {**history, "readings": HISTORY_READINGS},
  )
  plots.plot_training_curves(
    history, os.path.join(workdir, CURVES_FILE), title=title
  )
