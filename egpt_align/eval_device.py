"""The evaluator's device side: per-position cosines and token ranks.

Every sample is evaluated once, in length-sorted jitted batches on a
one-axis data mesh (padded rows and positions are masked out later); the
device reduces the hidden and vocabulary dimensions, the host keeps the
[N, S] arrays for `eval_stats`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from egpt_align import lm_head as lm_head_lib
from egpt_align import metrics as metrics_lib
from egpt_align import sharding, unroll


def _shift_left(x: jax.Array) -> jax.Array:
  """x[:, t] <- x[:, t + 1]; the last position gets zeros."""
  return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


def readings(spec, raw_source: bool) -> dict[str, tuple]:
  """Prediction name -> the readings computed for it."""
  both = ("same", "next") if spec.predicts_next else ("same",)
  out = {"adapter": both, "untrained": both}
  if raw_source:
    out["raw_source"] = ("same",)
  if spec.predicts_next:
    out["copy_target"] = ("next",)
  return out


def make_eval_step(
  spec,
  module,
  readings: dict[str, tuple],
  *,
  use_head: bool,
  stored_tokens: bool,
  logits_dtype: Any,
  depth: int = 0,
):
  """The jitted step: batch -> {pred/reading/cos|rank: [B, S]}.

  With `depth` > 1 (and the LM head), also the adapter's free-running
  drafts: `adapter/step{j}/rank` for j = 2..depth, the rank of token p+1
  under draft j made at position p, fed its own states as live
  (`unroll.forward`; step 1 is `adapter/next/rank`).
  """

  def step(params, params0, weight_VD, batch):
    mask = batch["mask"]
    inputs = tuple(batch[k] for k in spec.inputs)
    preds = {}
    for pname, p in (("adapter", params), ("untrained", params0)):
      preds[pname] = module.apply(
        {"params": p}, *inputs, mask=mask, deterministic=True
      )
    if "raw_source" in readings:
      preds["raw_source"] = batch["source"]
    if "copy_target" in readings:
      preds["copy_target"] = batch["target"]
    target = batch["target"]
    targets = {"same": target, "next": _shift_left(target)}
    out = {}
    toks = {}
    if use_head:
      if stored_tokens:
        tok = batch["target_tokens"].astype(jnp.int32)
      else:
        tok = jnp.argmax(
          lm_head_lib.logits(target, weight_VD, dtype=logits_dtype), axis=-1
        ).astype(jnp.int32)
      toks = {"same": tok, "next": _shift_left(tok)}
      out["target_tokens"] = tok
    for pname, reads in readings.items():
      pred = preds[pname]
      lg = None
      if use_head:
        lg = lm_head_lib.logits(pred, weight_VD, dtype=logits_dtype)
      for r in reads:
        out[f"{pname}/{r}/cos"] = metrics_lib.cosine(pred, targets[r])
        if use_head:
          out[f"{pname}/{r}/rank"] = lm_head_lib.token_rank(lg, toks[r])
    if use_head and depth > 1:
      drafts = unroll.forward(module, spec, params, batch, depth)
      for j, pred in enumerate(drafts[1:], start=2):
        lg = lm_head_lib.logits(pred, weight_VD, dtype=logits_dtype)
        out[f"adapter/step{j}/rank"] = lm_head_lib.token_rank(lg, toks["next"])
    return out

  return jax.jit(step)


# ---------------------------------------------------------------------------
# Host side: batches in, per-position arrays out.


def _pad_lengths(lengths: np.ndarray, multiple: int, cap: int) -> np.ndarray:
  """Round lengths up to `multiple`, capped at `cap` (the longest sample)."""
  return np.minimum(-(-lengths // multiple) * multiple, cap)


def plan_batches(
  lengths: np.ndarray, batch_size: int, multiple: int
) -> list[tuple[np.ndarray, int]]:
  """Length-sorted batches (index array padded with -1, pad_to).

  Every batch is padded to a multiple of `multiple` (or to the dataset's
  longest sample), so the step compiles for at most
  ceil(max_len / multiple) + 1 distinct shapes.
  """
  cap = int(lengths.max())
  order = np.argsort(lengths, kind="stable")
  plan = []
  for start in range(0, len(order), batch_size):
    idx = order[start : start + batch_size]
    pad_to = int(_pad_lengths(lengths[idx].max(), multiple, cap))
    full = np.full(batch_size, -1, np.int64)
    full[: len(idx)] = idx
    plan.append((full, pad_to))
  return plan


def _compile_shapes(step, args, dataset, fields, batch_size, pads, layout):
  """{pad_to: compiled step}, every shape compiled concurrently up front.

  XLA compiles outside the GIL, so the few bucket shapes compile in about
  the time of one instead of one after another inside the loop.
  """

  def abstract(pad_to):
    batch = {}
    for f in fields:
      trailing, dtype = dataset.field_spec(f)
      batch[f] = jax.ShapeDtypeStruct(
        (batch_size, pad_to) + tuple(trailing), dtype, sharding=layout
      )
    batch["mask"] = jax.ShapeDtypeStruct(
      (batch_size, pad_to), jnp.bool_, sharding=layout
    )
    return batch

  def compile_one(pad_to):
    return step.lower(*args, abstract(pad_to)).compile()

  with concurrent.futures.ThreadPoolExecutor(max(len(pads), 1)) as pool:
    return dict(zip(pads, pool.map(compile_one, pads), strict=True))


def run(
  dataset,
  indices: np.ndarray,
  step,
  params,
  params0,
  weight,
  fields: Sequence[str],
  *,
  batch_size: int,
  pad_multiple: int,
  progress: bool,
  prefetch: int = 3,
) -> tuple[dict[str, np.ndarray], int, float]:
  """Runs `step` over every sample.

  Returns ({key: [N, S_max]} host arrays, number of batches, seconds spent
  compiling).
  """
  lengths = np.asarray(dataset.lengths)[indices]
  s_max = int(lengths.max())
  plan = plan_batches(lengths, batch_size, pad_multiple)
  mesh = sharding.make_mesh()
  data_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  params, params0 = jax.device_put((params, params0), replicated)
  if weight is not None:
    weight = jax.device_put(jnp.asarray(weight), replicated)

  def load(k):
    local, pad_to = plan[k]
    glob = np.where(local >= 0, indices[np.maximum(local, 0)], -1)
    batch = dataset.read_batch(glob, pad_to, fields=fields)
    batch = {f: batch[f] for f in (*fields, "mask")}
    return local, jax.device_put(batch, data_sharding)

  t_compile = time.perf_counter()
  compiled = _compile_shapes(
    step,
    (params, params0, weight),
    dataset,
    fields,
    batch_size,
    sorted({pad for _, pad in plan}),
    data_sharding,
  )
  t_compile = time.perf_counter() - t_compile
  pending = []
  # A few batches are read ahead on threads (numpy's large copies release
  # the GIL), so reading overlaps both other reads and device compute.
  depth = min(prefetch, len(plan))
  with concurrent.futures.ThreadPoolExecutor(max(depth, 1)) as pool:
    futures = collections.deque(pool.submit(load, k) for k in range(depth))
    for k in tqdm(
      range(len(plan)), desc="evaluate", unit="batch", disable=not progress
    ):
      local, batch = futures.popleft().result()
      if k + depth < len(plan):
        futures.append(pool.submit(load, k + depth))
      # Dispatch is asynchronous: fetching later lets the device run ahead.
      pad_to = batch["mask"].shape[1]
      pending.append((local, compiled[pad_to](params, params0, weight, batch)))
  out: dict[str, np.ndarray] = {}
  for local, res in pending:
    res = jax.device_get(res)
    rows = np.flatnonzero(local >= 0)
    for key, val in res.items():
      if key not in out:
        fill = np.nan if np.issubdtype(val.dtype, np.floating) else -1
        out[key] = np.full((len(indices), s_max), fill, val.dtype)
      width = min(val.shape[1], s_max)
      out[key][local[rows], :width] = val[rows, :width]
  return out, len(plan), t_compile
