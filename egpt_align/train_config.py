"""A training config: checked before a run writes anything, completed from
its data once that is open."""

from __future__ import annotations

import os

import ml_collections
from absl import logging

from egpt_align import losses, models, unroll
from egpt_align import train_state as state_lib
from egpt_align.data import splits


def resolve_data(config: ml_collections.ConfigDict) -> None:
  """A given config.data.train wins over built-in synthetic data (demo)."""
  syn = config.data.synthetic
  if syn.enabled and config.data.train:
    logging.info(
      "config.data.train is set: training on %s, not on the built-in "
      "synthetic data",
      config.data.train,
    )
    with config.unlocked():
      syn.enabled = False


def check(config: ml_collections.ConfigDict) -> None:
  """Refuses a bad config before anything is written (synthetic data)."""
  try:
    models.get_spec(config.model.name)
  except ValueError as e:
    raise ValueError(f"config.model.name: {e}") from None
  if config.num_epochs < 1:
    raise ValueError(f"config.num_epochs must be >= 1, got {config.num_epochs}")
  if config.log_every_steps < 1:
    raise ValueError(
      f"config.log_every_steps must be >= 1, got {config.log_every_steps}"
    )
  if config.loss.objective not in losses.OBJECTIVES:
    raise ValueError(
      f"config.loss.objective must be one of {losses.OBJECTIVES}, got "
      f"{config.loss.objective!r}"
    )
  unroll.settings(config.loss, models.get_spec(config.model.name))
  syn = config.data.synthetic
  has_head = config.lm_head or (syn.enabled and syn.lm_head)
  if config.loss.token_ce_weight > 0 and not has_head:
    raise ValueError(
      "config.loss.token_ce_weight > 0 needs config.lm_head (the target's LM "
      "head file from tools/extract_lm_head.py)"
    )
  if not config.data.synthetic.enabled and not config.data.train:
    raise ValueError(
      "config.data.train is required: pass --config.data.train=DATASET_DIR "
      "(written by tools/dump_hidden_states.py), or use experiments/demo.py "
      "for built-in synthetic data"
    )
  for key in ("train", "val"):
    path = config.data[key]
    if path and not os.path.isdir(path):
      raise ValueError(
        f"config.data.{key}={path}: no such dataset directory (expected a "
        "directory written by tools/dump_hidden_states.py or "
        "python -m egpt_align.data)"
      )
  if config.data.val is None and not 0 < config.data.val_fraction < 1:
    raise ValueError(
      "without config.data.val, config.data.val_fraction must be in (0, 1) "
      f"(a hold-out of the training samples); got {config.data.val_fraction}"
    )


def complete_from_data(config, workdir: str, train_ds, val_ds):
  """Checks the data against the adapter; resolves the config's data keys.

  Returns (spec, hidden_dim); fills config.model.hidden_dim from the data,
  resolves dtype 'auto' and points config.lm_head at the synthetic head.
  """
  spec = models.get_spec(config.model.name)
  hidden_dim = int(train_ds.target_dim)
  for name in spec.inputs:
    dim = train_ds.source_dim if name == "source" else train_ds.target_dim
    if dim != hidden_dim:
      raise ValueError(
        f"adapter {spec.name!r} maps {name} states (dim {dim}) into the "
        f"target space (dim {hidden_dim}); the dims must match"
      )
  if (
    val_ds.target_dim != hidden_dim or val_ds.source_dim != train_ds.source_dim
  ):
    raise ValueError(
      f"val data {config.data.val} has dims (source {val_ds.source_dim}, "
      f"target {val_ds.target_dim}); train has ({train_ds.source_dim}, "
      f"{hidden_dim})"
    )
  with config.unlocked():
    syn = config.data.synthetic
    if syn.enabled and syn.lm_head and not config.lm_head:
      config.lm_head = splits.synthetic_lm_head(workdir)
    if config.model.hidden_dim is None:
      config.model.hidden_dim = hidden_dim
    config.model.dtype = state_lib.compute_dtype(config.model.dtype)
  if config.model.hidden_dim != hidden_dim:
    raise ValueError(
      f"config.model.hidden_dim={config.model.hidden_dim} but the data's "
      f"target dim is {hidden_dim}"
    )
  return spec, hidden_dim
