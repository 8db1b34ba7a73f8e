"""Which samples a run trains and validates on, and the built-in demo data.

`open_data` is the one place that turns `config.data` into datasets and
index lists, so the trainer and the evaluator read the same split.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from egpt_align.data import reader, synthetic

SYNTHETIC_DIR = os.path.join("data", "synthetic")


def synthetic_path(workdir: str) -> str:
  """Where a run keeps its built-in synthetic dataset."""
  return os.path.join(workdir, SYNTHETIC_DIR)


def synthetic_lm_head(workdir: str) -> str:
  """Where a run keeps the synthetic dataset's LM head."""
  return os.path.join(workdir, "data", "synthetic_lm_head")


def write_synthetic(config, workdir: str) -> str:
  """Writes the built-in synthetic dataset into the workdir once."""
  path = synthetic_path(workdir)
  syn = config.data.synthetic
  head = synthetic_lm_head(workdir) if syn.lm_head else None
  if jax.process_index() == 0 and not os.path.exists(
    os.path.join(path, "header.json")
  ):
    logging.info(
      "writing synthetic data (%d samples) to %s", syn.num_samples, path
    )
    synthetic.write_synthetic_dataset(
      path,
      syn.num_samples,
      hidden_dim=syn.hidden_dim,
      min_len=syn.min_len,
      max_len=syn.max_len,
      seed=syn.seed,
      lm_head_path=head,
    )
  sync("synthetic data")
  return path


def holdout_split(
  num_samples: int, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """(train, val) sample indices: a fixed random `fraction` held out."""
  n_val = int(round(num_samples * fraction))
  n_val = min(max(n_val, 1), num_samples - 1)
  if num_samples < 2:
    raise ValueError(
      f"cannot hold out validation samples from {num_samples} sample(s); "
      "pass config.data.val"
    )
  perm = np.random.default_rng([seed, 0x5A11]).permutation(num_samples)
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def open_data(config, workdir: str):
  """(train_ds, train_idx, val_ds, val_idx) with the hold-out applied."""
  if config.data.synthetic.enabled:
    train_path = write_synthetic(config, workdir)
  else:
    train_path = config.data.train
  train_ds = reader.open_dataset(train_path)
  if config.data.val:
    if os.path.abspath(config.data.val) == os.path.abspath(train_path):
      raise ValueError(
        f"config.data.val and config.data.train are the same ({train_path})"
      )
    val_ds = reader.open_dataset(config.data.val)
    return (
      train_ds,
      np.arange(train_ds.num_samples),
      val_ds,
      np.arange(val_ds.num_samples),
    )
  train_idx, val_idx = holdout_split(
    train_ds.num_samples, config.data.val_fraction, config.data.split_seed
  )
  return train_ds, train_idx, train_ds, val_idx


def sync(name: str) -> None:
  """Waits for every process (a no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
