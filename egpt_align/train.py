r"""Trains a hidden-state adapter.

  python -m egpt_align.train --config experiments/l5f.py --workdir runs/l5f \
    --config.data.train=DATA/train [--config.data.val=DATA/val] \
    [--config.batch_size=32 ...]

Data parallel over a one-axis mesh: pmap-style data parallelism done the
current way (jit with explicit shardings, the batch split on 'data'); with
several devices the float32 params and AdamW moments are split over them too
(weight-update sharding, `config.shard_weight_update`; see sharding.py).
The run writes, in WORKDIR:
config.json, metrics.jsonl (one line per logged step and per epoch),
history.json (the reference's per-epoch keys), training_curves.png and
checkpoints/ (newest + best by validation loss). Started again on the same
workdir it resumes exactly where the newest checkpoint left off (same data
order, RNG and schedule). SIGINT / SIGTERM save a checkpoint and exit
non-zero. One run owns a workdir at a time (workdir.py): a second training
on it is refused.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import sys
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from egpt_align import checkpoint as checkpoint_lib
from egpt_align import cli, losses, models, optim, sharding, unroll
from egpt_align import data as data_lib
from egpt_align import metric_writer as writer_lib
from egpt_align import train_state as state_lib
from egpt_align import workdir as workdir_lib
from egpt_align.configs import base as base_config
from egpt_align.data import format as format_lib
from egpt_align.data import splits
from egpt_align.preemption import AgreedStop, SignalFlag, TrainingInterrupted


def _resolve_data(config: ml_collections.ConfigDict) -> None:
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


def _check_config(config: ml_collections.ConfigDict) -> None:
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


def _prepare(config, workdir: str, train_ds, val_ds):
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


def _pipelines(config, spec, mesh, train, val, *, progress: bool):
  """(train, val) InputPipelines over (dataset, indices) pairs."""
  kwargs = dict(
    global_batch_size=config.batch_size,
    seed=config.seed,
    bucket_lengths=config.data.buckets,
    sharding=sharding.batch_sharding(mesh),
    cache=config.data.cache,
    prefetch=config.data.prefetch,
    gather_batches=config.data.gather_batches,
    fields=tuple(sorted(set(spec.inputs) | {"target"})),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    progress=progress,
  )
  train_pipe = data_lib.InputPipeline(
    *train, shuffle=True, drop_remainder=True, **kwargs
  )
  val_pipe = data_lib.InputPipeline(
    *val, shuffle=False, drop_remainder=False, **kwargs
  )
  if train_pipe.steps_per_epoch < 1:
    raise ValueError(
      f"{len(train[1])} training samples give no full batch of "
      f"{config.batch_size}; lower config.batch_size"
    )
  return train_pipe, val_pipe


def _fresh_meta(steps_per_epoch: int, seed: int) -> dict[str, Any]:
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


def _restore(ckpt, workdir, abstract_state, steps_per_epoch):
  """(state, meta) of the newest checkpoint that restores; checks epochs."""
  latest, state, meta = ckpt.restore_newest_intact(abstract_state)
  if meta["steps_per_epoch"] != steps_per_epoch:
    raise ValueError(
      f"{workdir}: the checkpoint was made with {meta['steps_per_epoch']} "
      f"steps per epoch, this config gives {steps_per_epoch} (data or batch "
      "size changed); use a new workdir"
    )
  logging.info(
    "resumed from step %d: %d epochs completed%s",
    latest,
    meta["epoch"],
    f", {meta['epoch_step']} steps into epoch {meta['epoch'] + 1}"
    if meta["epoch_step"]
    else "",
  )
  return state, meta


def _create_state(
  config,
  workdir,
  init_rng,
  *,
  model,
  tx,
  mesh,
  ckpt,
  example_inputs,
  steps_per_epoch,
):
  """(state with its bf16 copies, its shardings, meta or None if fresh).

  Restores the newest checkpoint when there is one (and config.checkpoint.
  resume), else initialises; either way laid out as `state_shardings` says.
  """
  init_fn = functools.partial(
    state_lib.init_state, model=model, tx=tx, example_inputs=example_inputs
  )
  layout = functools.partial(
    state_lib.state_shardings,
    mesh=mesh,
    shard_update=config.shard_weight_update,
    min_size=config.shard_min_size,
  )
  abstract_state = jax.eval_shape(init_fn, init_rng)
  init_shard = layout(abstract_state)
  abstract_state = state_lib.abstract(abstract_state, init_shard)
  meta = None
  if ckpt and ckpt.latest_step() is not None and config.checkpoint.resume:
    state, meta = _restore(ckpt, workdir, abstract_state, steps_per_epoch)
  else:
    state = jax.jit(init_fn, out_shardings=init_shard)(init_rng)
  add_copies = functools.partial(
    state_lib.with_compute_params, dtype=config.model.dtype
  )
  state_shard = layout(jax.eval_shape(add_copies, abstract_state))
  state = jax.jit(add_copies, out_shardings=state_shard)(state)
  return state, state_shard, meta


def _validate(
  config, spec, eval_step, pipe, params, lm_weight, desc: str, progress: bool
) -> dict[str, float]:
  """Validation metrics over the whole split: summed on device per batch,
  added exactly on the host, finalized with the training loss."""
  per_batch = []
  it = tqdm(
    pipe.batches(0),
    total=pipe.steps_per_epoch,
    desc=desc,
    leave=False,
    disable=not progress,
  )
  for batch in it:
    per_batch.append(eval_step(params, batch, lm_weight))
  host = jax.device_get(per_batch)
  sums = {k: math.fsum(float(b[k]) for b in host) for k in host[0]}
  return state_lib.finalize_eval(sums, spec=spec, loss_config=config.loss)


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  devices: Iterable[jax.Device] | None = None,
) -> dict[str, Any]:
  """Trains per `config` in `workdir` (resuming if it has a checkpoint).

  Returns {'step', 'epochs_run', 'best_epoch', 'best_val_loss',
  'stopped_early', 'stopped_at_step', 'initial', 'final', 'best'}, the last
  three being validation-metric dicts (untrained, last epoch, best epoch).
  `devices` restricts the mesh (default: all devices). Multi-process callers
  run `sharding.initialize_multihost()` first (the CLI does, given
  `config.multihost`); every process then calls this with the same config.
  The run owns the workdir (workdir.owned): a second run on it is refused.
  """
  config = copy.deepcopy(config)
  _resolve_data(config)
  _check_config(config)
  workdir = os.path.abspath(workdir)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
  with workdir_lib.owned(workdir):
    return _train(config, workdir, devices)


def _train(config, workdir: str, devices) -> dict[str, Any]:
  """train_and_evaluate's body, run while the workdir is owned."""
  is_main = jax.process_index() == 0
  progress = is_main and config.progress_bar

  mesh = sharding.make_mesh(devices=list(devices) if devices else None)
  sharding.check_batch_size(config.batch_size, mesh)

  # Data and model.
  train_ds, train_idx, val_ds, val_idx = splits.open_data(config, workdir)
  spec, hidden_dim = _prepare(config, workdir, train_ds, val_ds)
  model = state_lib.create_model(config.model)
  train_pipe, val_pipe = _pipelines(
    config,
    spec,
    mesh,
    (train_ds, train_idx),
    (val_ds, val_idx),
    progress=progress,
  )
  spe = train_pipe.steps_per_epoch
  max_len = getattr(model, "max_seq_len", None)
  longest = max(train_pipe.bucket_lengths[-1], val_pipe.bucket_lengths[-1])
  if max_len is not None and longest > max_len:
    raise ValueError(
      f"batches are padded to {longest} positions but adapter "
      f"{spec.name!r} has max_seq_len={max_len}; raise "
      "config.model.max_seq_len or set config.data.buckets"
    )
  tx, schedule = optim.create_optimizer(
    config.optim, steps_per_epoch=spe, num_epochs=config.num_epochs
  )
  lm_weight = (
    state_lib.load_lm_head(config.lm_head, hidden_dim, mesh)
    if config.lm_head
    else None
  )
  if is_main:
    format_lib.write_json_atomic(
      os.path.join(workdir, checkpoint_lib.CONFIG_FILE), config.to_dict()
    )
    logging.info(
      "config (changed from configs/base.py; all of it in %s):\n  %s",
      checkpoint_lib.CONFIG_FILE,
      "\n  ".join(base_config.summary(config)),
    )

  # State: fresh, or restored from the newest checkpoint.
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  dropout_rng = state_lib.dropout_key(dropout_rng, config.dropout_rng_impl)
  example = tuple(
    np.zeros((1, min(8, longest), hidden_dim), np.float32) for _ in spec.inputs
  )
  ckpt = (
    checkpoint_lib.Checkpointer(
      workdir, async_save=config.checkpoint.async_save
    )
    if config.checkpoint.enabled
    else None
  )
  state, state_shard, meta = _create_state(
    config,
    workdir,
    init_rng,
    model=model,
    tx=tx,
    mesh=mesh,
    ckpt=ckpt,
    example_inputs=example,
    steps_per_epoch=spe,
  )
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("%s: %d parameters, %d steps/epoch", spec.name, n_params, spe)

  train_step = state_lib.create_train_step(
    config,
    model=model,
    spec=spec,
    tx=tx,
    schedule=schedule,
    shardings=state_shard,
    mesh=mesh,
  )
  eval_step = state_lib.create_eval_step(
    config,
    model=model,
    spec=spec,
    params_shardings=state_shard.params,
    mesh=mesh,
  )

  def evaluate(params, desc: str) -> dict[str, float]:
    return _validate(
      config, spec, eval_step, val_pipe, params, lm_weight, desc, progress
    )

  writer = writer_lib.MetricWriter(
    workdir, tensorboard=config.tensorboard, active=is_main
  )
  if meta is None:
    meta = _fresh_meta(spe, config.seed)
    if is_main and os.path.exists(writer.path):
      os.remove(writer.path)  # a fresh run in a reused workdir
    if config.eval_at_start:
      initial = evaluate(state.params, "eval (untrained)")
      meta["initial_metrics"] = initial
      writer.write(
        0, {"epoch": 0, **{f"eval/{k}": v for k, v in initial.items()}}
      )
  else:
    writer.truncate_after(int(meta["step"]))

  def save(step: int, *, val_loss: float | None = None) -> None:
    if ckpt is None:
      return
    meta["step"] = int(step)
    meta["config"] = config.to_dict()
    # Host copies: orbax then writes numpy arrays, with no per-array device
    # slicing (each of which is a small XLA compile). Multi-host with the
    # weight update sharded, no process holds every shard: orbax writes the
    # global arrays from each process's shards instead.
    saved = state_lib.without_compute_params(state)
    if all(x.is_fully_addressable for x in jax.tree.leaves(saved)):
      saved = jax.device_get(saved)
    ckpt.save(step, saved, format_lib.to_jsonable(meta), val_loss=val_loss)

  step = int(jax.device_get(state.step))
  if step != meta["epoch"] * spe + meta["epoch_step"]:
    raise RuntimeError(
      f"checkpoint step {step} does not match epoch {meta['epoch']} + "
      f"{meta['epoch_step']} steps of {spe}"
    )
  stopped_at = None
  with SignalFlag() as flag:
    agreed = AgreedStop(flag, config.distributed.stop_check_every_steps)
    logging.info("training from step %d (signals now stop it cleanly)", step)
    while not meta["done"] and meta["epoch"] < config.num_epochs:
      epoch = meta["epoch"]
      sums = meta["train_sums"]
      bar = tqdm(
        total=spe,
        initial=meta["epoch_step"],
        desc=f"epoch {epoch + 1}/{config.num_epochs}",
        disable=not progress,
      )
      log = writer_lib.TrainLog(writer, sums, epoch, bar)
      interrupted = False
      for batch in train_pipe.batches(epoch, meta["epoch_step"]):
        state, step_metrics = train_step(state, batch, dropout_rng, lm_weight)
        log.pending.append(step_metrics)
        step += 1
        meta["epoch_step"] += 1
        bar.update(1)
        stop = config.stop_after_steps and step >= config.stop_after_steps
        signum = agreed.check(step)
        if step % config.log_every_steps == 0 or stop or signum:
          log.flush(step)
        every = config.checkpoint.every_steps
        if every and step % every == 0 and meta["epoch_step"] < spe:
          save(step)
        if (stop or signum) and meta["epoch_step"] < spe:
          interrupted = True
          break
      log.flush(step)
      bar.close()

      if not interrupted:
        val = evaluate(state.params, f"eval epoch {epoch + 1}")
        improved = _end_epoch(config, meta, epoch, val)
        writer.write(step, _epoch_record(meta, epoch, val))
        if is_main:
          writer_lib.write_history(
            workdir,
            meta["history"],
            title=f"{spec.name} ({os.path.basename(workdir)})",
          )
        train = meta["history"]
        logging.info(
          "epoch %d: train loss %.5f | val loss %.5f | %s%s",
          epoch + 1,
          train["train_loss"][-1],
          val["loss"],
          writer_lib.readings_text(val),
          " (best)" if improved else "",
        )
        save(step, val_loss=val["loss"])
        if meta["stopped_early"]:
          logging.info(
            "early stopping: no val-loss gain for %d epochs", meta["bad_epochs"]
          )
      else:
        save(step)

      stop = config.stop_after_steps and step >= config.stop_after_steps
      signum = agreed.check(step, now=True)
      if signum is not None:
        if ckpt:
          ckpt.close()
        writer.close()
        raise TrainingInterrupted(signum, step)
      if stop and not meta["done"]:
        stopped_at = step
        logging.info("config.stop_after_steps reached at step %d", step)
        break

  if ckpt:
    ckpt.close()
  writer.close()
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


def _end_epoch(config, meta: dict, epoch: int, val: dict) -> bool:
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
    meta["best_val_loss"],
    meta["bad_epochs"],
    val["loss"],
    config.early_stopping_patience,
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


def _epoch_record(meta: dict, epoch: int, val: dict) -> dict[str, Any]:
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


# ------------------------------------------------------------------ CLI

_CONFIG = None  # set by _define_flags(): only the CLI defines flags, so
_WORKDIR = None  # importing this module (tests, benchmarks) adds none.


def _define_flags() -> None:
  """Defines --config and --workdir (called by the CLI entry point only)."""
  global _CONFIG, _WORKDIR
  _CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file (experiments/*.py); override keys with "
    "--config.KEY=VALUE, e.g. --config.batch_size=32.",
    lock_config=True,
  )
  _WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config, metrics, curves, checkpoints."
  )


def main(argv) -> None:
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config.multihost:
    dist = config.distributed
    sharding.initialize_multihost(
      coordinator_address=dist.coordinator_address,
      num_processes=dist.num_processes,
      process_id=dist.process_id,
      heartbeat_timeout_s=dist.heartbeat_timeout_s,
    )
  # Process 0 tells the story; the others only warn.
  logging.set_verbosity(
    logging.INFO if jax.process_index() == 0 else logging.WARNING
  )
  try:
    result = train_and_evaluate(config, _WORKDIR.value)
  except TrainingInterrupted as e:
    logging.error("%s", e)
    sys.exit(128 + e.signum)
  except Exception as e:
    if jax.process_count() == 1:
      raise
    # A normal exit would wait minutes in jax.distributed's shutdown barrier
    # for peers that may be blocked in a collective with this process. Leave
    # now: the coordination service then ends the others within
    # config.distributed.heartbeat_timeout_s.
    cli.exit_now(e)
  if jax.process_index() == 0:
    best = result["best"] or {}
    print(
      f"done: step {result['step']}, epochs {result['epochs_run']}, best "
      f"epoch {result['best_epoch']}: val loss {result['best_val_loss']}, "
      f"{writer_lib.readings_text(best) if best else 'no validation'}"
    )


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run_absl(main)
