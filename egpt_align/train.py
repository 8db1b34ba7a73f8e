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
non-zero.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from egpt_align import checkpoint as checkpoint_lib
from egpt_align import cli, losses, metrics, models, optim, plots, sharding
from egpt_align import data as data_lib
from egpt_align import lm_head as lm_head_lib

METRICS_FILE = "metrics.jsonl"
HISTORY_FILE = "history.json"
CURVES_FILE = "training_curves.png"
SYNTHETIC_DIR = os.path.join("data", "synthetic")
THRESHOLDS = metrics.THRESHOLDS


class TrainingInterrupted(RuntimeError):
  """Raised after SIGINT/SIGTERM once the checkpoint is saved."""

  def __init__(self, signum: int, step: int):
    super().__init__(
      f"training interrupted by signal {signum} at step {step}; checkpoint "
      "saved, run the same command again to resume"
    )
    self.signum = signum
    self.step = step


@flax.struct.dataclass
class TrainState:
  """Everything that changes from step to step (and is checkpointed)."""

  step: jax.Array
  params: Any
  opt_state: Any
  # bf16 copies of the Dense kernels (None at every other leaf), written by
  # the optimizer step; None when compute is float32. Derived from params,
  # so never checkpointed (see `without_compute_params`).
  compute_params: Any = None


# ---------------------------------------------------------------- config


def compute_dtype(name: str) -> str:
  """'auto' -> 'bfloat16' on GPU, 'float32' elsewhere; others unchanged."""
  if name == "auto":
    return "bfloat16" if jax.default_backend() == "gpu" else "float32"
  return name


DROPOUT_RNG_IMPLS = ("auto", "threefry2x32", "rbg")


def dropout_key(key: jax.Array, impl: str) -> jax.Array:
  """The base dropout key, derived from `key`, of the configured PRNG.

  'auto' is 'rbg' on GPU (XLA's RngBitGenerator: about 0.1-0.2 ms less per
  L4/L5F step on an H100 than threefry's masks) and threefry2x32 elsewhere.
  """
  if impl not in DROPOUT_RNG_IMPLS:
    raise ValueError(
      f"config.dropout_rng_impl must be one of {DROPOUT_RNG_IMPLS}, got "
      f"{impl!r}"
    )
  if impl == "auto":
    impl = "rbg" if jax.default_backend() == "gpu" else "threefry2x32"
  if impl == "threefry2x32":
    return key
  bits = jax.random.bits(key, (4,), jnp.uint32)  # rbg keys are uint32[4].
  return jax.random.wrap_key_data(bits, impl=impl)


def model_overrides(model_config: Mapping[str, Any]) -> dict[str, Any]:
  """create_adapter overrides from `config.model`: all set keys but name."""
  out = {
    k: v for k, v in dict(model_config).items() if k != "name" and v is not None
  }
  if "dtype" in out:
    out["dtype"] = compute_dtype(out["dtype"])
  return out


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


# ------------------------------------------------------------------ data


def _synthetic_path(config, workdir: str) -> str:
  """Writes the built-in synthetic dataset into the workdir once."""
  path = os.path.join(workdir, SYNTHETIC_DIR)
  syn = config.data.synthetic
  head = _synthetic_lm_head(path) if syn.lm_head else None
  if jax.process_index() == 0 and not os.path.exists(
    os.path.join(path, "header.json")
  ):
    logging.info(
      "writing synthetic data (%d samples) to %s", syn.num_samples, path
    )
    data_lib.synthetic.write_synthetic_dataset(
      path,
      syn.num_samples,
      hidden_dim=syn.hidden_dim,
      min_len=syn.min_len,
      max_len=syn.max_len,
      seed=syn.seed,
      lm_head_path=head,
    )
  _sync("synthetic data")
  return path


def _synthetic_lm_head(synthetic_path: str) -> str:
  return os.path.join(os.path.dirname(synthetic_path), "synthetic_lm_head")


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
    train_path = _synthetic_path(config, workdir)
  else:
    train_path = config.data.train
  train_ds = data_lib.open_dataset(train_path)
  if config.data.val:
    if os.path.abspath(config.data.val) == os.path.abspath(train_path):
      raise ValueError(
        f"config.data.val and config.data.train are the same ({train_path})"
      )
    val_ds = data_lib.open_dataset(config.data.val)
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


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------- steps


def init_state(
  rng: jax.Array,
  *,
  model,
  tx: optax.GradientTransformation,
  example_inputs: tuple,
) -> TrainState:
  """A fresh TrainState (params float32, optimizer state, step 0)."""
  params = model.init(
    {"params": rng}, *example_inputs, mask=None, deterministic=True
  )["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
  )


def compute_params(params: Any, dtype: Any) -> Any:
  """Every Dense `kernel` of params cast to the compute dtype; None elsewhere.

  Those are exactly the leaves the model itself casts before its matmuls
  (LayerNorm parameters, biases, embeddings and scalars stay float32 and are
  read from params), so the forward and backward are unchanged; the cast
  now happens once, fused into the optimizer update, instead of in a
  separate pass over the float32 kernels every step.
  """

  def cast(path, leaf):
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    return leaf.astype(dtype) if name == "kernel" else None

  return jax.tree_util.tree_map_with_path(cast, params)


def forward_params(params: Any, copies: Any) -> Any:
  """params with the kernels replaced by their compute-dtype copies."""
  if copies is None:
    return params
  return jax.tree.map(
    lambda c, p: p if c is None else c,
    copies,
    params,
    is_leaf=lambda x: x is None,
  )


def _recast(copies: Any, params: Any) -> Any:
  """Fresh copies of params where `copies` has one, in the copies' dtypes."""
  return jax.tree.map(
    lambda c, p: None if c is None else p.astype(c.dtype),
    copies,
    params,
    is_leaf=lambda x: x is None,
  )


def with_compute_params(state: TrainState, dtype: Any) -> TrainState:
  """Adds the bf16 kernel copies for a reduced-precision compute dtype."""
  if jnp.dtype(dtype) == jnp.float32:
    return state.replace(compute_params=None)
  return state.replace(compute_params=compute_params(state.params, dtype))


def state_shardings(
  state: TrainState,
  mesh,
  *,
  shard_update: bool,
  min_size: int,
  copies_replicated: bool = False,
) -> TrainState:
  """A TrainState of NamedShardings for `state` (arrays or abstract).

  The step counter is replicated; params, optimizer state and the
  compute-dtype kernel copies follow `sharding.weight_update_sharding` when
  `shard_update` (the step all-gathers the copies at its start), else are
  replicated. `copies_replicated` keeps the copies replicated even then (the
  all-gather then happens at the end of the step, when they are written).
  """
  rep = sharding.replicated(mesh)

  def layout(tree):
    if not shard_update:
      return jax.tree.map(lambda _: rep, tree)
    return jax.tree.map(
      lambda x: sharding.weight_update_sharding(
        x.shape, mesh, min_size=min_size
      ),
      tree,
    )

  return state.replace(
    step=rep,
    params=layout(state.params),
    opt_state=layout(state.opt_state),
    compute_params=(
      jax.tree.map(lambda _: rep, state.compute_params)
      if copies_replicated
      else layout(state.compute_params)
    ),
  )


def without_compute_params(state: TrainState) -> TrainState:
  """The checkpointed part of the state."""
  return state.replace(compute_params=None)


def _readings(spec, objective: str) -> tuple[int, ...]:
  """Shifts read in eval: 0 (same position) and 1 for predicts_next."""
  return (0, 1) if spec.predicts_next else (0,)


def _ce_shift(spec, objective: str) -> int:
  """Which reading the token CE uses: next for the 'next' objective."""
  return 1 if (spec.predicts_next and objective == "next") else 0


def _forward(model, spec, params, batch, *, deterministic, rng=None):
  inputs = models.adapter_inputs(spec.name, batch)
  rngs = None if deterministic else {"dropout": rng}
  pred = model.apply(
    {"params": params},
    *inputs,
    mask=batch["mask"],
    deterministic=deterministic,
    rngs=rngs,
  )
  return pred.astype(jnp.float32)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  lm_weight: jax.Array | None,
  *,
  model,
  spec,
  tx: optax.GradientTransformation,
  schedule: Callable,
  loss_config: ml_collections.ConfigDict,
  ce_dtype: Any = jnp.float32,
  grad_shardings: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW step on a global batch; pure (model etc. bound by partial).

  `lm_weight` is the frozen target LM head [V, D] for the token CE loss
  (None without it); it is an argument, not a closure, so it is not baked
  into the compiled program as a constant. `grad_shardings` (the params'
  shardings under weight-update sharding) constrains the gradients to the
  optimizer's layout, so XLA reduce-scatters them instead of all-reducing.
  """
  dropout_rng = jax.random.fold_in(rng, state.step)
  mask = batch["mask"]
  target = batch["target"].astype(jnp.float32)

  def loss_fn(params):
    pred = _forward(
      model, spec, params, batch, deterministic=False, rng=dropout_rng
    )
    # Padding rows of e.g. L1 at init are exact zero vectors: the loss's
    # cosine (metrics.normalize) keeps a finite gradient there.
    loss, aux = losses.adapter_loss(
      pred,
      target,
      mask,
      predicts_next=spec.predicts_next,
      objective=loss_config.objective,
      prediction_weight=loss_config.prediction_weight,
      cos_weight=loss_config.cos_weight,
    )
    if loss_config.token_ce_weight > 0:
      p, t, m = metrics.shift_pairs(
        pred, target, mask, _ce_shift(spec, loss_config.objective)
      )
      ce = lm_head_lib.token_ce_loss(
        p, t, lm_weight, m, soft=loss_config.token_ce_soft, dtype=ce_dtype
      )
      aux = dict(aux, token_ce=ce)
      loss = loss + loss_config.token_ce_weight * ce
    return loss, aux

  fast = state.compute_params
  # With bf16 compute, differentiate through the bf16 kernel copies; the
  # model would have cast the float32 kernels to the same values before
  # every matmul.
  weights = forward_params(state.params, fast)
  if grad_shardings is not None:
    # Every device runs the whole forward and backward: all-gather the
    # weights it holds a share of, here at the start of the step, where the
    # scheduler can overlap the later layers' gathers with earlier compute.
    mesh = jax.tree.leaves(grad_shardings)[0].mesh
    rep = sharding.replicated(mesh)
    weights = jax.lax.with_sharding_constraint(
      weights, jax.tree.map(lambda _: rep, weights)
    )
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(weights)
  if grad_shardings is not None:
    # Reduced in the gradients' own dtype (bf16 for the kernel copies), as
    # the replicated layout's all-reduce is.
    grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
  if fast is not None:
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  out = {
    "loss": loss,
    "cos": aux["cos_sim"],
    "mse": aux["mse"],
    "grad_norm": optax.global_norm(grads),
    "lr": schedule(state.step),
    "tokens": jnp.sum(mask, dtype=jnp.int32),
  }
  if "next_cos_sim" in aux:
    out["next_cos"] = aux["next_cos_sim"]
  if "token_ce" in aux:
    out["token_ce"] = aux["token_ce"]
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    compute_params=None if fast is None else _recast(fast, params),
  )
  return new_state, out


def eval_step(
  params: Any,
  batch: dict[str, jax.Array],
  lm_weight: jax.Array | None,
  *,
  model,
  spec,
  loss_config: ml_collections.ConfigDict,
) -> dict[str, jax.Array]:
  """Summable validation statistics of one batch (padding rows masked)."""
  mask = batch["mask"]
  target = batch["target"].astype(jnp.float32)
  pred = _forward(model, spec, params, batch, deterministic=True)
  out = {}
  for shift in _readings(spec, loss_config.objective):
    prefix = "next_" if shift else ""
    sums = metrics.hidden_state_sums(
      pred, target, mask, shift=shift, thresholds=THRESHOLDS
    )
    out.update({prefix + k: v for k, v in sums.items()})
    if lm_weight is not None:
      p, t, m = metrics.shift_pairs(pred, target, mask, shift)
      agree = lm_head_lib.topk_agreement(p, t, lm_weight, m, ks=(1,))
      out[prefix + "token_top1"] = agree["top1"]
      if loss_config.token_ce_weight > 0 and shift == _ce_shift(
        spec, loss_config.objective
      ):
        ce = lm_head_lib.token_ce_loss(
          p, t, lm_weight, m, soft=loss_config.token_ce_soft
        )
        # The mean times the count is the batch sum: exact aggregation.
        out["token_ce_sum"] = ce * jnp.sum(m, dtype=jnp.float32)
  return out


def finalize_eval(
  sums: Mapping[str, float], *, spec, loss_config
) -> dict[str, float]:
  """Validation metrics from accumulated sums; loss exactly as training's.

  The loss is position-weighted over the whole split (the reference averages
  per-batch losses, which over-weights a short last batch, D12).
  """
  out = {}
  same = {k: v for k, v in sums.items() if not k.startswith("next_")}
  fin = metrics.finalize_sums(same)
  out.update(fin)
  out["n_valid"] = float(same["n_valid"])
  if "token_top1" in same:
    out["token_top1"] = same["token_top1"] / max(same["n_valid"], 1.0)
  nxt = {k[5:]: v for k, v in sums.items() if k.startswith("next_")}
  if nxt:
    fin_next = metrics.finalize_sums(nxt)
    out.update({"next_" + k: v for k, v in fin_next.items()})
    out["next_n_valid"] = float(nxt["n_valid"])
    if "token_top1" in nxt:
      out["next_token_top1"] = nxt["token_top1"] / max(nxt["n_valid"], 1.0)
  cw, w = loss_config.cos_weight, loss_config.prediction_weight
  align = fin["mse"] + cw * (1.0 - fin["cos_sim"])
  if not spec.predicts_next:
    loss = align
  elif loss_config.objective == "reference":
    loss = (1.0 - w) * align + w * fin_next["mse"]
  else:
    loss = fin_next["mse"] + cw * (1.0 - fin_next["cos_sim"])
  if "token_ce_sum" in sums:
    key = (
      "next_n_valid" if _ce_shift(spec, loss_config.objective) else "n_valid"
    )
    ce = sums["token_ce_sum"] / max(out[key], 1.0)
    out["token_ce"] = ce
    loss += loss_config.token_ce_weight * ce
  out["loss"] = loss
  return out


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


# --------------------------------------------------------------- logging


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
    record.update({k: _jsonable(v) for k, v in values.items()})
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


def _jsonable(v):
  if isinstance(v, np.generic | jax.Array):
    v = np.asarray(v).item()
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


# Which comparison each history.json key reads (written beside the lists).
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


def _history_append(history: dict, epoch: int, train: dict, val: dict) -> None:
  """Per-epoch lists with the reference's history.json keys (+ extras)."""

  def add(key, value):
    history.setdefault(key, []).append(value)

  add("epoch", epoch)
  add("train_loss", train["loss"])
  add("train_cos_sim", train["cos"])
  add("val_loss", val["loss"])
  add("val_cos_sim", val["cos_sim"])
  for tau in THRESHOLDS:
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


# ----------------------------------------------------------------- loop


@jax.jit
def _stack_metrics(pending: list[dict]) -> dict:
  """[{name: scalar}] per step -> {name: [steps]}, on device."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *pending)


class _TrainLog:
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


class _SignalFlag:
  """Turns SIGINT/SIGTERM into a flag checked between steps."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop without saving
    self.signum = signum
    logging.warning(
      "signal %d: saving a checkpoint after this step (several processes: "
      "at the next step where they check; config.distributed."
      "stop_check_every_steps)",
      signum,
    )

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


class _AgreedStop:
  """A signal on any process, seen by all of them at the same step.

  One process stops at the step after its signal. Several agree: every
  `every` steps they all-gather their flags (a collective of one int each,
  which waits for the step to finish), so all leave the loop at the same
  step and save one consistent checkpoint instead of waiting in a collective
  that a departed process never joins.
  """

  def __init__(self, flag: _SignalFlag, every: int):
    if every < 1:
      raise ValueError(
        f"config.distributed.stop_check_every_steps must be >= 1, got {every}"
      )
    self.flag = flag
    self.every = every if jax.process_count() > 1 else 1
    self.signum = None

  def check(self, step: int, *, now: bool = False) -> int | None:
    """The agreed signal number (None: go on), checked at `step`."""
    if self.signum is not None or not (now or step % self.every == 0):
      return self.signum
    if jax.process_count() == 1:
      self.signum = self.flag.signum
      return self.signum
    from jax.experimental import multihost_utils

    local = np.int32(self.flag.signum or 0)
    flags = np.asarray(multihost_utils.process_allgather(local)).ravel()
    if np.any(flags):
      self.signum = int(flags[np.flatnonzero(flags)[0]])
      logging.warning(
        "stopping at step %d: signal %d on process(es) %s",
        step,
        self.signum,
        np.flatnonzero(flags).tolist(),
      )
    return self.signum


def _load_lm_head(path: str, hidden_dim: int, mesh) -> jax.Array:
  head = lm_head_lib.load_lm_head(path)
  if head.hidden_dim != hidden_dim:
    raise ValueError(
      f"config.lm_head {path}: hidden dim {head.hidden_dim} does not match "
      f"the data's target dim {hidden_dim}"
    )
  weight = head.weight
  return jax.make_array_from_callback(
    weight.shape, sharding.replicated(mesh), lambda idx: weight[idx]
  )


def _abstract(tree, shardings):
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    tree,
    shardings,
  )


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
  """
  config = copy.deepcopy(config)
  _resolve_data(config)
  _check_config(config)
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)

  mesh = sharding.make_mesh(devices=list(devices) if devices else None)
  sharding.check_batch_size(config.batch_size, mesh)
  rep = sharding.replicated(mesh)
  batch_shard = sharding.batch_sharding(mesh)

  # Data and model.
  train_ds, train_idx, val_ds, val_idx = open_data(config, workdir)
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
      config.lm_head = _synthetic_lm_head(os.path.join(workdir, SYNTHETIC_DIR))
    if config.model.hidden_dim is None:
      config.model.hidden_dim = hidden_dim
    config.model.dtype = compute_dtype(config.model.dtype)
  if config.model.hidden_dim != hidden_dim:
    raise ValueError(
      f"config.model.hidden_dim={config.model.hidden_dim} but the data's "
      f"target dim is {hidden_dim}"
    )
  model = models.create_adapter(spec.name, **model_overrides(config.model))

  fields = tuple(sorted(set(spec.inputs) | {"target"}))
  pipe_kwargs = dict(
    global_batch_size=config.batch_size,
    seed=config.seed,
    bucket_lengths=config.data.buckets,
    sharding=batch_shard,
    cache=config.data.cache,
    prefetch=config.data.prefetch,
    staging=config.data.staging,
    gather_batches=config.data.gather_batches,
    fields=fields,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    progress=is_main and config.progress_bar,
  )
  train_pipe = data_lib.InputPipeline(
    train_ds, train_idx, shuffle=True, drop_remainder=True, **pipe_kwargs
  )
  val_pipe = data_lib.InputPipeline(
    val_ds, val_idx, shuffle=False, drop_remainder=False, **pipe_kwargs
  )
  spe = train_pipe.steps_per_epoch
  if spe < 1:
    raise ValueError(
      f"{len(train_idx)} training samples give no full batch of "
      f"{config.batch_size}; lower config.batch_size"
    )
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
    _load_lm_head(config.lm_head, hidden_dim, mesh) if config.lm_head else None
  )

  if is_main:
    _write_json(
      os.path.join(workdir, checkpoint_lib.CONFIG_FILE), config.to_dict()
    )
    logging.info("config:\n%s", config)

  # State: fresh, or restored from the newest checkpoint.
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  dropout_rng = dropout_key(dropout_rng, config.dropout_rng_impl)
  example = tuple(
    np.zeros((1, min(8, longest), hidden_dim), np.float32) for _ in spec.inputs
  )
  init_fn = functools.partial(
    init_state, model=model, tx=tx, example_inputs=example
  )
  layout = functools.partial(
    state_shardings,
    mesh=mesh,
    shard_update=config.shard_weight_update,
    min_size=config.shard_min_size,
  )
  abstract_state = jax.eval_shape(init_fn, init_rng)
  init_shard = layout(abstract_state)
  abstract_state = _abstract(abstract_state, init_shard)
  ckpt = (
    checkpoint_lib.Checkpointer(
      workdir, async_save=config.checkpoint.async_save
    )
    if config.checkpoint.enabled
    else None
  )
  meta = None
  latest = ckpt.latest_step() if ckpt else None
  if latest is not None and config.checkpoint.resume:
    state, meta = ckpt.restore(latest, abstract_state)
    if meta["steps_per_epoch"] != spe:
      raise ValueError(
        f"{workdir}: the checkpoint was made with {meta['steps_per_epoch']} "
        f"steps per epoch, this config gives {spe} (data or batch size "
        "changed); use a new workdir"
      )
    logging.info(
      "resumed from step %d: %d epochs completed%s",
      latest,
      meta["epoch"],
      f", {meta['epoch_step']} steps into epoch {meta['epoch'] + 1}"
      if meta["epoch_step"]
      else "",
    )
  else:
    state = jax.jit(init_fn, out_shardings=init_shard)(init_rng)
  add_copies = functools.partial(
    with_compute_params, dtype=compute_dtype(config.model.dtype)
  )
  state_shard = layout(jax.eval_shape(add_copies, abstract_state))
  state = jax.jit(add_copies, out_shardings=state_shard)(state)
  n_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  logging.info("%s: %d parameters, %d steps/epoch", spec.name, n_params, spe)

  ce_dtype = jnp.dtype(config.model.dtype)
  p_train_step = jax.jit(
    functools.partial(
      train_step,
      model=model,
      spec=spec,
      tx=tx,
      schedule=schedule,
      loss_config=config.loss,
      ce_dtype=ce_dtype,
      grad_shardings=state_shard.params if config.shard_weight_update else None,
    ),
    in_shardings=(state_shard, batch_shard, rep, rep),
    out_shardings=(state_shard, rep),
    donate_argnums=(0,),
  )
  p_eval_step = jax.jit(
    functools.partial(
      eval_step, model=model, spec=spec, loss_config=config.loss
    ),
    in_shardings=(state_shard.params, batch_shard, rep),
    out_shardings=rep,
  )

  def evaluate(params, desc: str) -> dict[str, float]:
    per_batch = []
    it = tqdm(
      val_pipe.batches(0),
      total=val_pipe.steps_per_epoch,
      desc=desc,
      leave=False,
      disable=not (is_main and config.progress_bar),
    )
    for batch in it:
      per_batch.append(p_eval_step(params, batch, lm_weight))
    host = jax.device_get(per_batch)
    sums = {k: math.fsum(float(b[k]) for b in host) for k in host[0]}
    return finalize_eval(sums, spec=spec, loss_config=config.loss)

  writer = MetricWriter(workdir, tensorboard=config.tensorboard, active=is_main)
  if meta is None:
    meta = {
      "epoch": 0,  # the epoch in progress (0-based)
      "epoch_step": 0,  # steps of it already done
      "train_sums": {"loss": 0.0, "cos": 0.0, "steps": 0, "lr": None},
      "best_val_loss": None,
      "best_epoch": None,
      "best_metrics": None,
      "bad_epochs": 0,
      "done": False,
      "stopped_early": False,
      "history": {},
      "initial_metrics": None,
      "last_metrics": None,
      "steps_per_epoch": spe,
      "seed": config.seed,
    }
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
    saved = without_compute_params(state)
    if all(x.is_fully_addressable for x in jax.tree.leaves(saved)):
      saved = jax.device_get(saved)
    ckpt.save(
      step,
      saved,
      _to_json(meta),
      val_loss=val_loss,
    )

  step = int(jax.device_get(state.step))
  if step != meta["epoch"] * spe + meta["epoch_step"]:
    raise RuntimeError(
      f"checkpoint step {step} does not match epoch {meta['epoch']} + "
      f"{meta['epoch_step']} steps of {spe}"
    )
  stopped_at = None
  with _SignalFlag() as flag:
    agreed = _AgreedStop(flag, config.distributed.stop_check_every_steps)
    logging.info("training from step %d (signals now stop it cleanly)", step)
    while not meta["done"] and meta["epoch"] < config.num_epochs:
      epoch = meta["epoch"]
      sums = meta["train_sums"]
      bar = tqdm(
        total=spe,
        initial=meta["epoch_step"],
        desc=f"epoch {epoch + 1}/{config.num_epochs}",
        disable=not (is_main and config.progress_bar),
      )
      log = _TrainLog(writer, sums, epoch, bar)
      interrupted = False
      for batch in train_pipe.batches(epoch, meta["epoch_step"]):
        state, step_metrics = p_train_step(state, batch, dropout_rng, lm_weight)
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
        _history_append(meta["history"], epoch + 1, train, val)
        meta["last_metrics"] = val
        meta["epoch"], meta["epoch_step"] = epoch + 1, 0
        meta["train_sums"] = {"loss": 0.0, "cos": 0.0, "steps": 0, "lr": None}
        record = {
          "epoch": epoch + 1,
          "epoch_train/loss": train["loss"],
          "epoch_train/cos": train["cos"],
          "best/eval/loss": meta["best_val_loss"],
          "best/epoch": meta["best_epoch"],
          **{f"eval/{k}": v for k, v in val.items()},
        }
        writer.write(step, record)
        if is_main:
          _write_json(
            os.path.join(workdir, HISTORY_FILE),
            {**meta["history"], "readings": HISTORY_READINGS},
          )
          plots.plot_training_curves(
            meta["history"],
            os.path.join(workdir, CURVES_FILE),
            title=f"{spec.name} ({os.path.basename(workdir)})",
          )
        logging.info(
          "epoch %d: train loss %.5f | val loss %.5f | %s%s",
          epoch + 1,
          train["loss"],
          val["loss"],
          readings_text(val),
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


def _to_json(obj):
  """A JSON-clean copy (numpy scalars to Python, non-finite to None)."""
  if isinstance(obj, Mapping):
    return {str(k): _to_json(v) for k, v in obj.items()}
  if isinstance(obj, list | tuple):
    return [_to_json(v) for v in obj]
  return _jsonable(obj)


# ------------------------------------------------------------------ CLI

_CONFIG = None  # set by _define_flags(): only the CLI defines flags, so
_WORKDIR = None  # importing this module (evaluate, tests) adds none.


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
  except Exception:
    if jax.process_count() == 1:
      raise
    # A normal exit would wait minutes in jax.distributed's shutdown barrier
    # for peers that may be blocked in a collective with this process. Leave
    # now: the coordination service then ends the others within
    # config.distributed.heartbeat_timeout_s.
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
  if jax.process_index() == 0:
    best = result["best"] or {}
    print(
      f"done: step {result['step']}, epochs {result['epochs_run']}, best "
      f"epoch {result['best_epoch']}: val loss {result['best_val_loss']}, "
      f"{readings_text(best) if best else 'no validation'}"
    )


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run_absl(main)
