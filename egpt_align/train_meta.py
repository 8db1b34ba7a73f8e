"""The training loop's bookkeeping (`meta`), checkpointed beside its state.

Where the loop is (epoch, steps into it, the epoch's running train sums), the
best epoch so far, the early-stopping count, the per-epoch history and the
validation metrics: enough for a resumed run to carry on exactly.
"""

from __future__ import annotations

import math
from typing import Any

from egpt_align import metric_writer as writer_lib


def fresh(steps_per_epoch: int, seed: int) -> dict[str, Any]:
  """The loop's checkpointed bookkeeping at step 0."""
  return {
    "epoch": 0,  # the epoch in progress (0-based)
    "epoch_step": 0,  # steps of it already done
    "train_sums": _zero_sums(),
    "best_val_loss": None,
    "best_epoch": None,
    "best_metrics": None,
    "bad_epochs": 0,
    "done": False,
    "stopped_early": False,
    "history": {},
    "initial_metrics": None,
    "last_metrics": None,
    "steps_per_epoch": steps_per_epoch,
    "seed": seed,
  }


def _zero_sums() -> dict[str, Any]:
  return {"loss": 0.0, "cos": 0.0, "steps": 0, "lr": None}


def early_stopping(
  best: float | None, bad_epochs: int, val_loss: float, patience: int
) -> tuple[bool, int, bool]:
  """(improved, bad_epochs, stop) after an epoch, as the reference.

  Improvement is a strict `<` on the validation loss; training stops once
  `patience` epochs in a row brought none (patience 0 = never).
  """
  improved = best is None or val_loss < best
  bad_epochs = 0 if improved else bad_epochs + 1
  return improved, bad_epochs, bool(patience) and bad_epochs >= patience


def end_epoch(meta: dict, epoch: int, val: dict, *, patience: int) -> bool:
  """Books a finished epoch into `meta`; True when validation improved."""
  sums = meta["train_sums"]
  train = {
    "loss": sums["loss"] / max(sums["steps"], 1),
    "cos": sums["cos"] / max(sums["steps"], 1),
    "lr": sums["lr"],
  }
  if not math.isfinite(val["loss"]):
    raise FloatingPointError(
      f"validation loss is {val['loss']} after epoch {epoch + 1} "
      f"(train loss {train['loss']}): training diverged; lower "
      "config.optim.learning_rate or check the data for inf/NaN"
    )
  improved, meta["bad_epochs"], stop = early_stopping(
    meta["best_val_loss"], meta["bad_epochs"], val["loss"], patience
  )
  if improved:
    meta.update(
      best_val_loss=val["loss"], best_epoch=epoch + 1, best_metrics=val
    )
  if stop:
    meta["done"] = meta["stopped_early"] = True
  writer_lib.history_append(meta["history"], epoch + 1, train, val)
  meta["last_metrics"] = val
  meta["epoch"], meta["epoch_step"] = epoch + 1, 0
  meta["train_sums"] = _zero_sums()
  return improved


def epoch_record(meta: dict, epoch: int, val: dict) -> dict[str, Any]:
  """The metrics.jsonl line of a finished epoch."""
  history = meta["history"]
  return {
    "epoch": epoch + 1,
    "epoch_train/loss": history["train_loss"][-1],
    "epoch_train/cos": history["train_cos_sim"][-1],
    "best/eval/loss": meta["best_val_loss"],
    "best/epoch": meta["best_epoch"],
    **{f"eval/{k}": v for k, v in val.items()},
  }


def summary(meta: dict, step: int, stopped_at: int | None) -> dict[str, Any]:
  """train_and_evaluate's result, read from the final `meta`."""
  return {
    "step": step,
    "epochs_run": meta["epoch"],
    "best_epoch": meta["best_epoch"],
    "best_val_loss": meta["best_val_loss"],
    "stopped_early": meta["stopped_early"],
    "stopped_at_step": stopped_at,
    "initial": meta["initial_metrics"],
    "final": meta["last_metrics"],
    "best": meta["best_metrics"],
    "history": meta["history"],
  }
