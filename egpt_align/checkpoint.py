"""Checkpoints: one orbax CheckpointManager keeping the newest and the best.

Layout under a run's workdir:

  WORKDIR/config.json                  the run's resolved config
  WORKDIR/checkpoints/<step>/state     TrainState(step, params, opt_state)
  WORKDIR/checkpoints/<step>/meta      JSON: epoch, early-stopping counters,
                                       best metric, history, seed, config
  WORKDIR/checkpoints_broken/<step>    checkpoints that did not restore on
                                       resume, set aside (restore_newest_intact)

Epoch-end checkpoints carry the validation loss as their orbax metric; the
preservation policy keeps the newest checkpoint (for resume) and the one with
the lowest validation loss (for use). Mid-epoch checkpoints (interrupts,
`checkpoint.every_steps`) carry no metric and live only while newest.

`load_params(workdir, which)` is what evaluation and export tools call.
`save_params_npz` / `load_params_npz` hold a params tree as one `.npz` with
'/'-joined keys ('layers_0/attn/in_proj/kernel'), for the torch bridge.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from orbax.checkpoint import checkpoint_managers

CHECKPOINT_DIR = "checkpoints"
BROKEN_DIR = "checkpoints_broken"  # steps that did not restore, set aside
CONFIG_FILE = "config.json"
METRIC = "val_loss"


class _ReadOnlyNotice(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


_READ_ONLY_NOTICE = _ReadOnlyNotice()


def _best_fn(metrics: Mapping[str, Any]) -> float:
  return float(metrics[METRIC])


class Checkpointer:
  """CheckpointManager over WORKDIR/checkpoints keeping newest + best."""

  def __init__(
    self,
    workdir: str,
    *,
    async_save: bool = True,
    read_only: bool = False,
  ):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    if read_only and not os.path.isdir(self.directory):
      raise FileNotFoundError(
        f"no checkpoints in {workdir!r} (expected {self.directory})"
      )
    policy = checkpoint_managers.AnyPreservationPolicy(
      [
        checkpoint_managers.LatestN(n=1),
        # BestN keeps the last n after an ascending sort of the metric, so
        # reverse=True sorts descending and keeps the lowest loss.
        checkpoint_managers.BestN(
          get_metric_fn=_best_fn,
          reverse=True,
          n=1,
          keep_checkpoints_without_metrics=False,
        ),
      ]
    )
    options = ocp.CheckpointManagerOptions(
      best_fn=_best_fn,
      best_mode="min",
      preservation_policy=policy,
      enable_async_checkpointing=async_save,
      read_only=read_only,
      create=not read_only,
      save_interval_steps=0 if read_only else 1,
    )
    # orbax warns "Given directory is read only" whenever a manager is
    # opened read-only, which is how every restore-only reader opens it.
    absl_logger = absl_logging.get_absl_logger()
    absl_logger.addFilter(_READ_ONLY_NOTICE)
    try:
      self.manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
          "state": ocp.StandardCheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler(),
        },
      )
    finally:
      absl_logger.removeFilter(_READ_ONLY_NOTICE)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the lowest validation loss (None if none has one)."""
    return self.manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(
    self,
    step: int,
    state: Any,
    meta: Mapping[str, Any],
    *,
    val_loss: float | None = None,
  ) -> bool:
    """Saves `state` and the JSON-able `meta` at `step` (False if present)."""
    if step in self.manager.all_steps():
      return False
    metrics = None if val_loss is None else {METRIC: float(val_loss)}
    return self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(dict(meta)),
      ),
      metrics=metrics,
      force=True,
    )

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, meta) at `step`, with `abstract_state`'s types and shardings."""
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore(),
      ),
    )
    return restored["state"], dict(restored["meta"])

  def restore_newest_intact(self, abstract_state: Any) -> tuple[int, Any, dict]:
    """(step, state, meta) of the newest checkpoint that restores.

    A newer one that does not (files deleted or cut short outside orbax) is
    moved to WORKDIR/checkpoints_broken/STEP with a warning, so that later
    saves can take its step again. With none intact, a ValueError names each
    and what to do. Every process agrees on the step.
    """
    broken = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, abstract_state)
        error = None
      except Exception as e:  # noqa: BLE001 -- orbax raises bare Exception
        error = " ".join(str(e).split())[:300] or type(e).__name__
      if _everywhere(error is None):
        self._set_aside(broken, step)
        return step, state, meta
      broken.append((step, error or "it does not restore on another process"))
    listed = "; ".join(f"step {k}: {e}" for k, e in broken)
    raise ValueError(
      f"no checkpoint in {self.directory} restores ({listed}); delete "
      f"{self.directory} to start over, or train in a new workdir"
    )

  def _set_aside(self, broken: list[tuple[int, str]], resumed: int) -> None:
    """Moves broken step directories out of orbax's sight (process 0)."""
    if not broken:
      return
    root = os.path.join(os.path.dirname(self.directory), BROKEN_DIR)
    for step, error in broken:
      dest = os.path.join(root, str(step))
      if jax.process_index() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(dest):
          dest += f".{int(time.time())}"
        os.replace(os.path.join(self.directory, str(step)), dest)
      absl_logging.warning(
        "checkpoint step %d does not restore (%s): moved to %s; resuming "
        "from step %d, the newest intact checkpoint",
        step,
        error,
        dest,
        resumed,
      )
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("checkpoints set aside")
    self.manager.reload()

  def restore_meta(self, step: int) -> dict:
    restored = self.manager.restore(
      step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
    )
    return dict(restored["meta"])

  def restore_params(self, step: int) -> dict:
    """The params subtree at `step` as host numpy arrays (any device count)."""
    metadata = self.manager.item_metadata(step)["state"]
    tree = getattr(metadata, "tree", metadata)
    device = jax.local_devices(backend="cpu")[0]
    sharding = jax.sharding.SingleDeviceSharding(device)

    def abstract(m):
      return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding)

    target = jax.tree.map(abstract, tree, is_leaf=lambda m: hasattr(m, "shape"))
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(target)),
    )
    state = restored["state"]
    params = state["params"] if isinstance(state, Mapping) else state.params
    return jax.tree.map(np.asarray, params)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _everywhere(ok: bool) -> bool:
  """True when `ok` holds on every process."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.int32(ok))
  return bool(np.all(np.asarray(flags)))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """WORKDIR/config.json as a ConfigDict."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} not found: is {workdir!r} a training workdir?"
    )
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_params(
  workdir: str, which: str | int = "best"
) -> tuple[dict, ml_collections.ConfigDict]:
  """(params, config) of a run: which = 'best' | 'latest' | a step number.

  Params come back as numpy arrays in the Flax tree of the adapter named by
  `config.model.name`; `config` is the one the run was trained with.
  """
  ckpt = Checkpointer(workdir, read_only=True)
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {ckpt.directory}")
  if which == "best":
    step = ckpt.best_step()
    if step is None:
      raise FileNotFoundError(
        f"{ckpt.directory} holds no checkpoint with a validation loss yet "
        f"(steps {steps}); use which='latest'"
      )
  elif which == "latest":
    step = ckpt.latest_step()
  elif isinstance(which, int | np.integer) and not isinstance(which, bool):
    step = int(which)
    if step not in steps:
      raise ValueError(
        f"step {step} is not in {ckpt.directory}; kept steps are {steps}"
      )
  else:
    raise ValueError(
      f"which must be 'best', 'latest' or a step number, got {which!r}"
    )
  params = ckpt.restore_params(step)
  meta = ckpt.restore_meta(step)
  ckpt.close()
  if "config" in meta:
    config = ml_collections.ConfigDict(meta["config"])
  else:
    config = read_config(workdir)
  return params, config


def flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{'a/b/c': array} from a nested params dict."""
  flat = {}

  def visit(prefix: str, node: Any) -> None:
    if isinstance(node, Mapping):
      for key, value in node.items():
        if "/" in str(key):
          raise ValueError(f"parameter name {key!r} contains '/'")
        visit(f"{prefix}/{key}" if prefix else str(key), value)
    else:
      flat[prefix] = np.asarray(node)

  visit("", params)
  return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict:
  """The nested dict back from '/'-joined keys."""
  params: dict = {}
  for key, value in flat.items():
    node = params
    *parents, leaf = key.split("/")
    for name in parents:
      node = node.setdefault(name, {})
      if not isinstance(node, dict):
        raise ValueError(f"key {key!r} clashes with a leaf at {name!r}")
    node[leaf] = np.asarray(value)
  return params


def save_params_npz(path: str, params: Mapping[str, Any]) -> str:
  """Writes params as one .npz with '/'-joined keys (atomically)."""
  flat = flatten_params(params)
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **flat)
  os.replace(tmp, path)
  return path


def load_params_npz(path: str) -> dict:
  """The nested params dict from a `save_params_npz` file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"params file {path} not found")
  with np.load(path, allow_pickle=False) as data:
    return unflatten_params({k: data[k] for k in data.files})
