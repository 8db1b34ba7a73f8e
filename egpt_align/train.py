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
import dataclasses
import functools
import math
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from egpt_align import checkpoint as checkpoint_lib
from egpt_align import cli, models, optim, sharding, train_meta
from egpt_align import data as data_lib
from egpt_align import metric_writer as writer_lib
from egpt_align import train_config as config_lib
from egpt_align import train_state as state_lib
from egpt_align import workdir as workdir_lib
from egpt_align.configs import base as base_config
from egpt_align.data import format as format_lib
from egpt_align.data import splits
from egpt_align.preemption import AgreedStop, SignalFlag, TrainingInterrupted

# Public here too, as train.early_stopping.
from egpt_align.train_meta import early_stopping as early_stopping


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  devices: Iterable[jax.Device] | None = None,
) -> dict[str, Any]:
  """Trains per `config` in `workdir` (resuming if it has a checkpoint).

  Returns {'step', 'epochs_run', 'best_epoch', 'best_val_loss',
  'stopped_early', 'stopped_at_step', 'initial', 'final', 'best',
  'history'}: 'initial', 'final' and 'best' are validation-metric dicts
  (untrained, last epoch, best epoch), 'history' the per-epoch keys.
  `devices` restricts the mesh (default: all devices). Multi-process callers
  run `sharding.initialize_multihost()` first (the CLI does, given
  `config.multihost`); every process then calls this with the same config.
  The run owns the workdir (workdir.owned): a second run on it is refused.
  """
  config = copy.deepcopy(config)
  config_lib.resolve_data(config)
  config_lib.check(config)
  workdir = os.path.abspath(workdir)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
  with workdir_lib.owned(workdir):
    return _train(config, workdir, devices)


def _train(config, workdir: str, devices) -> dict[str, Any]:
  """train_and_evaluate's body, run while the workdir is owned."""
  run, state, meta = _build(config, workdir, devices)
  meta = _start(run, state, meta)
  step, stopped_at = _loop(run, state, meta)
  _close(run)
  return train_meta.summary(meta, step, stopped_at)


@dataclasses.dataclass(frozen=True)
class _Run:
  """The parts of a run that stay fixed while it trains."""

  config: ml_collections.ConfigDict
  workdir: str
  spec: models.AdapterSpec
  train_pipe: data_lib.InputPipeline
  val_pipe: data_lib.InputPipeline
  train_step: Callable
  eval_step: Callable
  lm_weight: jax.Array | None
  dropout_rng: jax.Array
  writer: writer_lib.MetricWriter
  ckpt: checkpoint_lib.Checkpointer | None
  is_main: bool  # process 0: writes the workdir's files
  progress: bool  # shows progress bars


def _build(config, workdir: str, devices):
  """(run, state, meta or None if fresh): everything the loop starts from.

  Mesh, data, model, optimizer, LM head, config.json, the jitted steps, the
  writer, and the state, restored from the newest checkpoint if there is one.
  """
  is_main = jax.process_index() == 0
  progress = is_main and config.progress_bar
  mesh = sharding.make_mesh(devices=list(devices) if devices else None)
  sharding.check_batch_size(config.batch_size, mesh)
  spec, hidden_dim, model, train_pipe, val_pipe, example = _model_and_data(
    config, workdir, mesh, progress=progress
  )
  spe = train_pipe.steps_per_epoch
  tx, schedule = optim.create_optimizer(
    config.optim, steps_per_epoch=spe, num_epochs=config.num_epochs
  )
  lm_weight = (
    state_lib.load_lm_head(config.lm_head, hidden_dim, mesh)
    if config.lm_head
    else None
  )
  if is_main:
    _write_config(config, workdir)

  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  dropout_rng = state_lib.dropout_key(dropout_rng, config.dropout_rng_impl)
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
  run = _Run(
    config=config,
    workdir=workdir,
    spec=spec,
    train_pipe=train_pipe,
    val_pipe=val_pipe,
    train_step=train_step,
    eval_step=eval_step,
    lm_weight=lm_weight,
    dropout_rng=dropout_rng,
    writer=writer_lib.MetricWriter(
      workdir, tensorboard=config.tensorboard, active=is_main
    ),
    ckpt=ckpt,
    is_main=is_main,
    progress=progress,
  )
  return run, state, meta


def _model_and_data(config, workdir: str, mesh, *, progress: bool):
  """(spec, hidden_dim, model, train and val pipelines, example inputs).

  Opens the data, checks it against the adapter and completes the config
  from it (train_config.complete_from_data); the example inputs, shaped like
  a short batch of one, initialise the model.
  """
  train_ds, train_idx, val_ds, val_idx = splits.open_data(config, workdir)
  spec, hidden_dim = config_lib.complete_from_data(
    config, workdir, train_ds, val_ds
  )
  model = state_lib.create_model(config.model)
  train_pipe, val_pipe = _pipelines(
    config,
    spec,
    mesh,
    (train_ds, train_idx),
    (val_ds, val_idx),
    progress=progress,
  )
  max_len = getattr(model, "max_seq_len", None)
  longest = max(train_pipe.bucket_lengths[-1], val_pipe.bucket_lengths[-1])
  if max_len is not None and longest > max_len:
    raise ValueError(
      f"batches are padded to {longest} positions but adapter "
      f"{spec.name!r} has max_seq_len={max_len}; raise "
      "config.model.max_seq_len or set config.data.buckets"
    )
  example = tuple(
    np.zeros((1, min(8, longest), hidden_dim), np.float32) for _ in spec.inputs
  )
  return spec, hidden_dim, model, train_pipe, val_pipe, example


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


def _write_config(config, workdir: str) -> None:
  """Writes config.json and logs how the config differs from the base."""
  format_lib.write_json_atomic(
    os.path.join(workdir, checkpoint_lib.CONFIG_FILE), config.to_dict()
  )
  logging.info(
    "config (changed from configs/base.py; all of it in %s):\n  %s",
    checkpoint_lib.CONFIG_FILE,
    "\n  ".join(base_config.summary(config)),
  )


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


def _start(run: _Run, state, meta: dict | None) -> dict:
  """The loop's meta: the restored one, with metrics.jsonl cut back to its
  step, or a fresh one after the untrained evaluation (eval_at_start)."""
  if meta is not None:
    run.writer.truncate_after(int(meta["step"]))
    return meta
  meta = train_meta.fresh(run.train_pipe.steps_per_epoch, run.config.seed)
  if run.is_main and os.path.exists(run.writer.path):
    os.remove(run.writer.path)  # a fresh run in a reused workdir
  if run.config.eval_at_start:
    initial = _evaluate(run, state.params, "eval (untrained)")
    meta["initial_metrics"] = initial
    run.writer.write(
      0, {"epoch": 0, **{f"eval/{k}": v for k, v in initial.items()}}
    )
  return meta


def _loop(run: _Run, state, meta: dict) -> tuple[int, int | None]:
  """(last step, step config.stop_after_steps stopped at, or None).

  Trains epoch after epoch until the last, early stopping or
  config.stop_after_steps; an agreed signal checkpoints, closes the run and
  raises TrainingInterrupted.
  """
  config, spe = run.config, run.train_pipe.steps_per_epoch
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
      state, step, interrupted = _train_epoch(run, state, meta, step, agreed)
      if interrupted:
        _save(run, state, meta, step)
      else:
        _end_epoch(run, state, meta, step)
      stop = config.stop_after_steps and step >= config.stop_after_steps
      signum = agreed.check(step, now=True)
      if signum is not None:
        _close(run)
        raise TrainingInterrupted(signum, step)
      if stop and not meta["done"]:
        stopped_at = step
        logging.info("config.stop_after_steps reached at step %d", step)
        break
  return step, stopped_at


def _train_epoch(run: _Run, state, meta: dict, step: int, agreed: AgreedStop):
  """(state, step, interrupted): trains the rest of the epoch in progress.

  Logs every config.log_every_steps and checkpoints every
  config.checkpoint.every_steps; leaves the epoch unfinished (interrupted)
  at config.stop_after_steps or an agreed signal.
  """
  config, spe = run.config, run.train_pipe.steps_per_epoch
  epoch = meta["epoch"]
  bar = tqdm(
    total=spe,
    initial=meta["epoch_step"],
    desc=f"epoch {epoch + 1}/{config.num_epochs}",
    disable=not run.progress,
  )
  log = writer_lib.TrainLog(run.writer, meta["train_sums"], epoch, bar)
  interrupted = False
  for batch in run.train_pipe.batches(epoch, meta["epoch_step"]):
    state, step_metrics = run.train_step(
      state, batch, run.dropout_rng, run.lm_weight
    )
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
      _save(run, state, meta, step)
    if (stop or signum) and meta["epoch_step"] < spe:
      interrupted = True
      break
  log.flush(step)
  bar.close()
  return state, step, interrupted


def _end_epoch(run: _Run, state, meta: dict, step: int) -> None:
  """Evaluates the finished epoch, books and logs it, and checkpoints."""
  epoch = meta["epoch"]
  val = _evaluate(run, state.params, f"eval epoch {epoch + 1}")
  improved = train_meta.end_epoch(
    meta, epoch, val, patience=run.config.early_stopping_patience
  )
  run.writer.write(step, train_meta.epoch_record(meta, epoch, val))
  if run.is_main:
    writer_lib.write_history(
      run.workdir,
      meta["history"],
      title=f"{run.spec.name} ({os.path.basename(run.workdir)})",
    )
  logging.info(
    "epoch %d: train loss %.5f | val loss %.5f | %s%s",
    epoch + 1,
    meta["history"]["train_loss"][-1],
    val["loss"],
    writer_lib.readings_text(val),
    " (best)" if improved else "",
  )
  _save(run, state, meta, step, val_loss=val["loss"])
  if meta["stopped_early"]:
    logging.info(
      "early stopping: no val-loss gain for %d epochs", meta["bad_epochs"]
    )


def _evaluate(run: _Run, params, desc: str) -> dict[str, float]:
  """Validation metrics over the whole split: summed on device per batch,
  added exactly on the host, finalized with the training loss."""
  per_batch = []
  it = tqdm(
    run.val_pipe.batches(0),
    total=run.val_pipe.steps_per_epoch,
    desc=desc,
    leave=False,
    disable=not run.progress,
  )
  for batch in it:
    per_batch.append(run.eval_step(params, batch, run.lm_weight))
  host = jax.device_get(per_batch)
  sums = {k: math.fsum(float(b[k]) for b in host) for k in host[0]}
  return state_lib.finalize_eval(
    sums, spec=run.spec, loss_config=run.config.loss
  )


def _save(run: _Run, state, meta: dict, step: int, *, val_loss=None) -> None:
  """Checkpoints `state` and `meta` at `step` (if checkpoints are enabled)."""
  if run.ckpt is None:
    return
  meta["step"] = int(step)
  meta["config"] = run.config.to_dict()
  # Host copies: orbax then writes numpy arrays, with no per-array device
  # slicing (each of which is a small XLA compile). Multi-host with the
  # weight update sharded, no process holds every shard: orbax writes the
  # global arrays from each process's shards instead.
  saved = state_lib.without_compute_params(state)
  if all(x.is_fully_addressable for x in jax.tree.leaves(saved)):
    saved = jax.device_get(saved)
  run.ckpt.save(step, saved, format_lib.to_jsonable(meta), val_loss=val_loss)


def _close(run: _Run) -> None:
  """Waits for pending checkpoint saves and closes the metric writer."""
  if run.ckpt:
    run.ckpt.close()
  run.writer.close()


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
