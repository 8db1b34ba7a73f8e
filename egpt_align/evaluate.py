r"""Offline evaluation of a trained adapter: hidden-state and token metrics.

  python -m egpt_align.evaluate --workdir RUN [--data DIR] [--lm_head FILE] \
      [--out DIR] [--step N] [--bench_json FILE] [--gamma 5] \
      [--draft_cost c] [--verify_cost v] [--bootstrap 1000]

Instead of --workdir: --params OUT.npz (tools/import_from_torch.py output,
e.g. a reference checkpoint) or --adapter NAME (a freshly initialised adapter,
for timing and smoke runs); both need --data and --out.

Every sample of the dataset is evaluated once, in jitted batches on device
(padded rows and positions are masked out). The device reduces the hidden and
vocabulary dimensions to per-position cosines and token ranks; everything else
is exact float64 arithmetic on those per-position arrays on the host.

Readings (REFERENCE_NOTES §3, D7): `same` compares output[t] with target[t];
`next` compares output[t] with target[t+1] (positions t with t+1 valid). For
adapters that predict the next state (l5, b1, l5f) `next` is primary.

Predictions compared against the target, so each number has a floor:
  adapter      the trained adapter
  untrained    the same adapter freshly initialised from the run's seed
  raw_source   the drafter's own state (cross-model adapters, equal dims)
  copy_target  target[t] as the guess for target[t+1] (`next` reading only)
  drafter_tokens  the drafter's greedy tokens (dataset field draft_tokens)
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from egpt_align import cli
from egpt_align import lm_head as lm_head_lib
from egpt_align import metrics as metrics_lib
from egpt_align import speedup as speedup_lib

THRESHOLDS = (0.80, 0.85, 0.90, 0.95)
COS_MATCH_THRESHOLDS = (0.80, 0.85, 0.90, 0.92, 0.95, 0.98)
TOPK = (1, 5, 10)


@dataclasses.dataclass
class EvalResult:
  """What `evaluate` returns: JSON-able metrics and positions, plot arrays."""

  metrics: dict[str, Any]
  positions: dict[str, Any]
  arrays: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class _Adapter:
  name: str
  module: Any
  inputs: tuple[str, ...]
  predicts_next: bool


def _tag(t: float) -> str:
  return f"{round(t * 100):d}"


# ---------------------------------------------------------------------------
# Device side: per-position cosines and token ranks.


def _shift_left(x: jax.Array) -> jax.Array:
  """x[:, t] <- x[:, t + 1]; the last position gets zeros."""
  return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


def _readings(adapter: _Adapter, raw_source: bool) -> dict[str, tuple]:
  """Prediction name -> the readings computed for it."""
  both = ("same", "next") if adapter.predicts_next else ("same",)
  out = {"adapter": both, "untrained": both}
  if raw_source:
    out["raw_source"] = ("same",)
  if adapter.predicts_next:
    out["copy_target"] = ("next",)
  return out


def _make_eval_step(
  adapter: _Adapter,
  readings: dict[str, tuple],
  *,
  use_head: bool,
  stored_tokens: bool,
  logits_dtype: Any,
):
  """The jitted step: batch -> {pred/reading/cos|rank: [B, S]}."""

  def step(params, params0, weight_VD, batch):
    mask = batch["mask"]
    inputs = tuple(batch[k] for k in adapter.inputs)
    preds = {}
    for pname, p in (("adapter", params), ("untrained", params0)):
      preds[pname] = adapter.module.apply(
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
    return out

  return jax.jit(step)


# ---------------------------------------------------------------------------
# Host side: batches in, per-position arrays out.


def _pad_lengths(lengths: np.ndarray, multiple: int, cap: int) -> np.ndarray:
  """Round lengths up to `multiple`, capped at `cap` (the longest sample)."""
  return np.minimum(-(-lengths // multiple) * multiple, cap)


def _plan_batches(
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


def _compile_shapes(step, args, dataset, fields, batch_size, pads, sharding):
  """{pad_to: compiled step}, every shape compiled concurrently up front.

  XLA compiles outside the GIL, so the few bucket shapes compile in about
  the time of one instead of one after another inside the loop.
  """

  def abstract(pad_to):
    batch = {}
    for f in fields:
      trailing, dtype = dataset.field_spec(f)
      batch[f] = jax.ShapeDtypeStruct(
        (batch_size, pad_to) + tuple(trailing), dtype, sharding=sharding
      )
    batch["mask"] = jax.ShapeDtypeStruct(
      (batch_size, pad_to), jnp.bool_, sharding=sharding
    )
    return batch

  def compile_one(pad_to):
    return step.lower(*args, abstract(pad_to)).compile()

  with concurrent.futures.ThreadPoolExecutor(max(len(pads), 1)) as pool:
    return dict(zip(pads, pool.map(compile_one, pads), strict=True))


def _run_device(
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
  plan = _plan_batches(lengths, batch_size, pad_multiple)
  n_dev = jax.device_count()
  mesh = jax.make_mesh(
    (n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  data_sharding = jax.NamedSharding(mesh, jax.P("data"))
  replicated = jax.NamedSharding(mesh, jax.P())
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


# ---------------------------------------------------------------------------
# Metrics from per-position arrays (exact, float64).


def leading_run(ok_NS: np.ndarray, valid_NS: np.ndarray) -> np.ndarray:
  """Length of the leading run of (ok & valid) from position 0, per sample."""
  return np.cumprod(ok_NS & valid_NS, axis=1).sum(axis=1)


def _stats(x: np.ndarray, prefix: str) -> dict[str, float | None]:
  if x.size == 0:
    return {
      f"{prefix}_{k}": None for k in ("mean", "std", "min", "max", "median")
    }
  x = x.astype(np.float64)
  return {
    f"{prefix}_mean": float(x.mean()),
    f"{prefix}_std": float(x.std()),
    f"{prefix}_min": float(x.min()),
    f"{prefix}_max": float(x.max()),
    f"{prefix}_median": float(np.median(x)),
  }


def _safe_div(a, b):
  return float(a) / float(b) if b else None


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
  """Pearson correlation; None when either side is constant or empty."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.size < 2 or x.std() == 0 or y.std() == 0:
    return None
  return float(np.mean((x - x.mean()) * (y - y.mean())) / (x.std() * y.std()))


def reading_metrics(
  cos_NS: np.ndarray | None,
  rank_NS: np.ndarray | None,
  valid_NS: np.ndarray,
  *,
  match_NS: np.ndarray | None = None,
) -> tuple[dict, list, dict]:
  """(metrics, per-position list, per-sample sums) of one prediction/reading.

  `rank_NS` gives token ranks (top-k = rank < k); `match_NS` gives top-1
  matches directly (for token-only baselines such as the drafter's tokens).
  """
  valid = np.asarray(valid_NS, bool)
  n_valid = valid.sum(1)
  has = n_valid > 0
  m: dict[str, Any] = {
    "valid_positions": int(valid.sum()),
    "num_samples": int(has.sum()),
  }
  sums: dict[str, np.ndarray] = {
    "n": n_valid.astype(np.float64),
    "has": has.astype(np.float64),
  }
  # Positions until none is valid (as position_stats.json).
  last = int(np.max(np.nonzero(valid.any(0))[0], initial=-1)) + 1
  per_pos = [
    {"position": t, "num_samples": int(valid[:, t].sum())} for t in range(last)
  ]
  if cos_NS is not None:
    cos = np.where(valid, cos_NS, 0.0).astype(np.float64)
    flat = cos[valid]
    m.update(_stats(flat, "cos_sim"))
    sums["cos"] = cos.sum(1)
    for t in THRESHOLDS:
      ok = (cos > t) & valid
      m[f"accept_{_tag(t)}"] = _safe_div(ok.sum(), valid.sum())
      sums[f"accept_{_tag(t)}"] = ok.sum(1).astype(np.float64)
      run = leading_run(ok, valid)
      m.update(_stats(run[has], f"consecutive_{_tag(t)}"))
      # Renamed to the reference's key order: consecutive_{stat}_{tau}.
      for stat in ("mean", "std", "min", "max", "median"):
        m[f"consecutive_{stat}_{_tag(t)}"] = m.pop(
          f"consecutive_{_tag(t)}_{stat}"
        )
      sums[f"consecutive_{_tag(t)}"] = run * has
    for t in range(last):
      col = cos[valid[:, t], t]
      per_pos[t]["cos_mean"] = float(col.mean()) if col.size else None
      per_pos[t]["cos_std"] = float(col.std()) if col.size else None
      for th in THRESHOLDS:
        per_pos[t][f"accept_{_tag(th)}"] = (
          float((col > th).mean()) if col.size else None
        )
  if rank_NS is not None or match_NS is not None:
    if match_NS is None:
      rank = np.asarray(rank_NS)
      in_k = {k: (rank < k) & (rank >= 0) & valid for k in TOPK}
    else:
      in_k = {1: np.asarray(match_NS, bool) & valid}
    match = in_k[1]
    for k, ok in in_k.items():
      m[f"token_top{k}"] = _safe_div(ok.sum(), valid.sum())
      sums[f"token_top{k}"] = ok.sum(1).astype(np.float64)
    run = leading_run(match, valid)
    m.update(_stats(run[has], "token_consecutive"))
    sums["token_consecutive"] = run * has
    for t in range(last):
      v = valid[:, t]
      for k, ok in in_k.items():
        per_pos[t][f"token_top{k}"] = (
          float(ok[v, t].mean()) if v.any() else None
        )
    if cos_NS is not None:
      flat_cos = cos[valid]
      flat_match = match[valid]
      cond = {}
      for t in COS_MATCH_THRESHOLDS:
        sel = flat_cos > t
        cond[_tag(t)] = {
          "p_match": _safe_div(flat_match[sel].sum(), sel.sum()),
          "count": int(sel.sum()),
        }
      m["p_match_given_cos"] = cond
      m["cos_token_pearson_r"] = pearson(flat_cos, flat_match)
  return m, per_pos, sums


# Headline metrics: name -> (numerator key, denominator key) of per-sample
# sums, so each is a ratio of sums and resamples exactly.
HEADLINE = {
  "cos_sim_mean": ("cos", "n"),
  "accept_90": ("accept_90", "n"),
  "consecutive_mean_90": ("consecutive_90", "has"),
  "token_top1": ("token_top1", "n"),
  "token_top5": ("token_top5", "n"),
  "token_top10": ("token_top10", "n"),
  "token_consecutive_mean": ("token_consecutive", "has"),
}


def bootstrap_ci(
  sums: dict[str, np.ndarray],
  *,
  num_resamples: int,
  seed: int = 0,
  level: float = 0.95,
  chunk: int = 100,
) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
  """Percentile CIs of the headline ratios, resampling samples.

  Returns ({metric: [lo, hi]}, {metric: resampled values}). Every resample
  draws N samples with replacement; a metric is sum(w * num) / sum(w * den)
  with w the draw counts, so all metrics share the same draws.
  """
  keys = [k for k, (a, b) in HEADLINE.items() if a in sums and b in sums]
  if not keys or num_resamples <= 0:
    return {}, {}
  cols = sorted({c for k in keys for c in HEADLINE[k]})
  mat = np.stack([sums[c] for c in cols], axis=1)  # [N, C]
  n = mat.shape[0]
  rng = np.random.default_rng(seed)
  parts = []
  for start in range(0, num_resamples, chunk):
    r = min(chunk, num_resamples - start)
    draws = rng.integers(0, n, size=(r, n))
    flat = (draws + np.arange(r)[:, None] * n).ravel()
    w = np.bincount(flat, minlength=r * n).reshape(r, n).astype(np.float64)
    parts.append(w @ mat)  # [r, C]
  tot = np.concatenate(parts)
  col = {c: i for i, c in enumerate(cols)}
  lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
  cis, samples = {}, {}
  for k in keys:
    num, den = HEADLINE[k]
    with np.errstate(invalid="ignore", divide="ignore"):
      vals = tot[:, col[num]] / tot[:, col[den]]
    vals = vals[np.isfinite(vals)]
    samples[k] = vals
    if vals.size:
      cis[k] = [
        float(np.percentile(vals, lo_q)),
        float(np.percentile(vals, hi_q)),
      ]
  return cis, samples


def _speedup_entry(
  alpha: float | None,
  alpha_samples: np.ndarray | None,
  match_NS: np.ndarray | None,
  lengths_N: np.ndarray | None,
  *,
  gamma: int,
  costs: dict,
) -> dict | None:
  if alpha is None:
    return None
  c, v = costs["draft_cost"], costs["verify_cost"]
  tau = float(speedup_lib.tokens_per_cycle(alpha, gamma))
  entry = {
    "alpha": alpha,
    "tokens_per_cycle": tau,
    "speedup": float(speedup_lib.expected_speedup(alpha, gamma, c, v)),
  }
  if alpha_samples is not None and alpha_samples.size:
    sp = speedup_lib.expected_speedup(np.clip(alpha_samples, 0, 1), gamma, c, v)
    entry["speedup_ci"] = [
      float(np.percentile(sp, 2.5)),
      float(np.percentile(sp, 97.5)),
    ]
  best_g, best_s = speedup_lib.best_gamma(alpha, c, v)
  entry["best_gamma"] = best_g
  entry["best_gamma_speedup"] = best_s
  if match_NS is not None:
    sim = speedup_lib.simulated_tokens_per_cycle(match_NS, lengths_N, gamma)
    entry["simulated_tokens_per_cycle"] = sim
    entry["simulated_speedup"] = sim / (gamma * c + v)
  return entry


# ---------------------------------------------------------------------------
# Public API.


def _resolve_adapter(
  adapter: str | None,
  overrides: dict | None,
  module,
  inputs: Sequence[str] | None,
  predicts_next: bool | None,
) -> _Adapter:
  spec = None
  if adapter is not None:
    from egpt_align import models  # Deferred: only when a name is given.

    if module is None or adapter.lower() in models.ADAPTERS:
      spec = models.get_spec(adapter)
  if module is None:
    if spec is None:
      raise ValueError("evaluate needs an adapter name or a module")
    module = models.create_adapter(spec.name, **(overrides or {}))
  name = spec.name if spec else (adapter or type(module).__name__)
  inputs = (
    tuple(inputs) if inputs is not None else (spec.inputs if spec else None)
  )
  if inputs is None:
    raise ValueError(f"adapter {name!r}: pass inputs= (batch fields)")
  if predicts_next is None:
    if spec is None:
      raise ValueError(f"adapter {name!r}: pass predicts_next=")
    predicts_next = spec.predicts_next
  return _Adapter(name, module, inputs, bool(predicts_next))


def _init_params(adapter: _Adapter, dataset, seed: int):
  dims = {"source": dataset.source_dim, "target": dataset.target_dim}
  s = int(min(int(np.max(dataset.lengths)), 8))
  dummy = tuple(jnp.zeros((1, s, dims[k]), jnp.float32) for k in adapter.inputs)
  # The trainer's init key for this seed (train.py: split(key(seed))[0]),
  # so for a workdir this is the run's own starting point. Initialisers
  # depend on parameter shapes only, not on the dummy input's length.
  init_rng = jax.random.split(jax.random.key(seed))[0]
  # One compiled program instead of one per op (much faster to build).
  variables = jax.jit(adapter.module.init)(
    {"params": init_rng}, *dummy, mask=jnp.ones((1, s), bool)
  )
  return variables["params"]


def _unwrap(params):
  if isinstance(params, dict) and set(params) == {"params"}:
    return params["params"]
  return params


def evaluate(
  data=None,
  *,
  workdir: str | None = None,
  step: str | int = "best",
  adapter: str | None = None,
  overrides: dict | None = None,
  params=None,
  module=None,
  inputs: Sequence[str] | None = None,
  predicts_next: bool | None = None,
  seed: int | None = None,
  lm_head=None,
  batch_size: int = 64,
  logits_dtype: str = "float32",
  gamma: int = 5,
  draft_cost: float | None = None,
  verify_cost: float | None = None,
  bench_json: str | None = None,
  bootstrap: int = 1000,
  max_samples: int | None = None,
  indices: Sequence[int] | None = None,
  pad_multiple: int = 64,
  progress: bool = True,
) -> EvalResult:
  """Evaluates an adapter on every sample of a dataset; see module doc.

  Either `workdir` (params and config from checkpoint.load_params(workdir,
  step)) or `adapter` (registry name) + `overrides` + `params`; `module`,
  `inputs`, `predicts_next` describe an adapter outside the registry. `data`
  is a dataset directory or an opened dataset; by default the run's
  data.test, else data.val, else the run's validation hold-out of data.train
  (exactly the trainer's split). `indices` restricts to those samples, and
  `max_samples` to the first N of them. `lm_head` is a path, an LMHead or
  None (then the run's config.lm_head, if any).
  """
  config = None
  subset = None
  if workdir is not None:
    from egpt_align import checkpoint

    params, config = checkpoint.load_params(workdir, step)
    model_cfg = dict(config.model)
    adapter = model_cfg.pop("name")
    overrides = {**model_cfg, **(overrides or {})}
    if seed is None:
      seed = int(config.get("seed", 0))
    if lm_head is None and config.get("lm_head"):
      lm_head = config.lm_head
    if data is None:
      data = config.data.get("test") or config.data.get("val")
      if not data:
        # The trainer's own hold-out of data.train (synthetic data included).
        from egpt_align import train

        _, _, data, holdout = train.open_data(config, workdir)
        if indices is None:
          indices = holdout
          subset = f"validation hold-out of data.train ({len(holdout)})"
  t_start = time.perf_counter()
  if params is None:
    raise ValueError(
      "evaluate needs params (or a workdir to load them from; params='init' "
      "evaluates a freshly initialised adapter)"
    )
  if data is None:
    raise ValueError("evaluate needs a dataset (data=DIR)")
  seed = 0 if seed is None else seed
  if gamma < 1:
    raise ValueError(f"gamma must be >= 1, got {gamma}")

  if isinstance(data, str | os.PathLike):
    from egpt_align.data import open_dataset

    data_path = os.fspath(data)
    dataset = open_dataset(data_path)
  else:
    dataset = data
    data_path = getattr(dataset, "path", None)
  if dataset.num_samples == 0:
    raise ValueError(f"{data_path}: dataset has no samples")

  if module is None:
    overrides = dict(overrides or {})
    if overrides.get("hidden_dim") is None:
      overrides["hidden_dim"] = int(dataset.target_dim)
    if overrides.get("dtype") == "auto":
      # As the trainer resolves it: bf16 matmuls on GPU, else float32.
      on_gpu = jax.default_backend() == "gpu"
      overrides["dtype"] = "bfloat16" if on_gpu else "float32"
  ad = _resolve_adapter(adapter, overrides, module, inputs, predicts_next)
  missing = [k for k in ad.inputs if k not in ("source", "target")]
  if missing:
    raise ValueError(f"adapter {ad.name!r}: unknown input fields {missing}")
  params0 = _init_params(ad, dataset, seed)
  fresh = isinstance(params, str) and params == "init"
  params = params0 if fresh else _unwrap(params)

  head = None
  if lm_head is not None:
    head = (
      lm_head
      if isinstance(lm_head, lm_head_lib.LMHead)
      else lm_head_lib.load_lm_head(lm_head)
    )
    if head.hidden_dim != dataset.target_dim:
      raise ValueError(
        f"LM head hidden dim {head.hidden_dim} != dataset target_dim "
        f"{dataset.target_dim} ({data_path})"
      )

  cross_model = "source" in ad.inputs
  raw_source = cross_model and dataset.source_dim == dataset.target_dim
  readings = _readings(ad, raw_source)
  stored_tokens = bool(dataset.has_target_tokens)
  fields = ["target"]
  if "source" in ad.inputs or raw_source:
    fields.insert(0, "source")
  if head is not None and stored_tokens:
    fields.append("target_tokens")

  n_total = dataset.num_samples
  if indices is None:
    indices = np.arange(n_total)
  else:
    indices = np.asarray(indices, np.int64)
    if indices.ndim != 1 or not len(indices):
      raise ValueError("indices must be a non-empty 1-D list of samples")
    if indices.min() < 0 or indices.max() >= n_total:
      raise ValueError(
        f"{data_path}: indices must lie in [0, {n_total}), got "
        f"[{indices.min()}, {indices.max()}]"
      )
    if subset is None:
      subset = f"{len(indices)} given samples"
  if max_samples is not None:
    indices = indices[:max_samples]
  n_dev = jax.device_count()
  batch_size = -(-batch_size // n_dev) * n_dev  # Divisible across devices.
  step_fn = _make_eval_step(
    ad,
    readings,
    use_head=head is not None,
    stored_tokens=stored_tokens,
    logits_dtype=jnp.dtype(logits_dtype),
  )
  t_loop = time.perf_counter()
  arrays, num_batches, compile_s = _run_device(
    dataset,
    indices,
    step_fn,
    params,
    params0,
    None if head is None else head.weight,
    fields,
    batch_size=batch_size,
    pad_multiple=pad_multiple,
    progress=progress,
  )

  t_loop = time.perf_counter() - t_loop
  lengths = np.asarray(dataset.lengths)[indices].astype(np.int64)
  s_max = int(lengths.max())
  valid = {
    "same": np.arange(s_max)[None] < lengths[:, None],
    "next": np.arange(s_max)[None] < (lengths[:, None] - 1),
  }
  costs = speedup_lib.resolve_costs(
    ad.name,
    gamma,
    bench_json=bench_json,
    draft_cost=draft_cost,
    verify_cost=verify_cost,
    # Cross-model adapters draft through the drafter's own decode.
    fallback="drafter" if cross_model else None,
  )
  results: dict[str, dict] = {}
  positions: dict[str, dict] = {}
  plot_arrays: dict[str, Any] = {}
  for pname, reads in readings.items():
    for r in reads:
      cos = arrays[f"{pname}/{r}/cos"]
      rank = arrays.get(f"{pname}/{r}/rank")
      m, per_pos, sums = reading_metrics(cos, rank, valid[r])
      cis, samples = bootstrap_ci(sums, num_resamples=bootstrap, seed=seed)
      m["ci"] = cis
      match = None if rank is None else (rank == 0) & valid[r]
      m["speedup"] = _speedup_entry(
        m.get("token_top1"),
        samples.get("token_top1"),
        match,
        lengths - (r == "next"),
        gamma=gamma,
        costs=costs,
      )
      results.setdefault(pname, {})[r] = m
      positions.setdefault(pname, {})[r] = per_pos
      plot_arrays[f"{pname}/{r}/cos"] = cos[valid[r]]
      if match is not None:
        plot_arrays[f"{pname}/{r}/match"] = match[valid[r]]

  # The drafter's own greedy tokens against the target tokens (same position).
  if cross_model and dataset.has_draft_tokens:
    if stored_tokens or head is not None:
      extra = ["draft_tokens"] + (["target_tokens"] if stored_tokens else [])
      toks = _read_tokens(dataset, indices, s_max, extra)
      tgt = toks["target_tokens"] if stored_tokens else arrays["target_tokens"]
      match = (toks["draft_tokens"] == tgt) & valid["same"]
      m, per_pos, sums = reading_metrics(
        None, None, valid["same"], match_NS=match
      )
      cis, samples = bootstrap_ci(sums, num_resamples=bootstrap, seed=seed)
      m["ci"] = cis
      drafter_costs = dict(costs)
      if bench_json:
        try:
          drafter_costs = speedup_lib.costs_from_bench(
            bench_json, "drafter", gamma
          )
        except ValueError:
          pass  # No 'drafter' entry: the adapter's costs (it drafts too).
      elif draft_cost is None:
        drafter_costs["draft_cost"] = speedup_lib.DEFAULT_DRAFTER_COST
      m["costs"] = drafter_costs
      m["speedup"] = _speedup_entry(
        m["token_top1"],
        samples.get("token_top1"),
        match,
        lengths,
        gamma=gamma,
        costs=drafter_costs,
      )
      results["drafter_tokens"] = {"same": m}
      positions["drafter_tokens"] = {"same": per_pos}

  primary = "next" if ad.predicts_next else "same"
  notes = []
  if ad.predicts_next:
    notes.append(
      "Primary reading is `next` (output[t] vs target[t+1]); `same` "
      "(output[t] vs target[t]) is reported separately."
    )
  if "target" in ad.inputs:
    notes.append(
      f"For {ad.name} the `same` reading is trivially high: its input "
      "contains the target state it is compared with (docs/REFERENCE_NOTES.md "
      "D7); "
      "the untrained adapter scores about as high."
    )
  if ad.predicts_next:
    notes.append(
      "Token metrics are teacher-forced: every position sees the true "
      "earlier states. Drafting several tokens ahead would feed back the "
      "adapter's own predictions, so live acceptance will be lower "
      "(docs/REFERENCE_NOTES.md D9)."
    )
  header = getattr(dataset, "header", {}) or {}
  metrics = {
    "run": {
      "workdir": workdir,
      "step": step if workdir is not None else None,
      "params": "workdir"
      if workdir is not None
      else ("fresh init (untrained)" if fresh else "given"),
      "adapter": ad.name,
      "overrides": {k: v for k, v in (overrides or {}).items()},
      "seed": seed,
      "inputs": list(ad.inputs),
      "predicts_next": ad.predicts_next,
    },
    "data": {
      "path": data_path,
      "num_samples": int(len(indices)),
      "dataset_num_samples": int(n_total),
      "subset": subset,
      "total_valid_positions": int(lengths.sum()),
      "total_valid_next_positions": int(np.maximum(lengths - 1, 0).sum()),
      **{
        k.replace("seq_len", "num_hidden_tokens"): v
        for k, v in _stats(lengths, "seq_len").items()
      },
      "source_dim": int(dataset.source_dim),
      "target_dim": int(dataset.target_dim),
      "has_target_tokens": stored_tokens,
      "has_draft_tokens": bool(dataset.has_draft_tokens),
      "provenance": header.get("provenance"),
    },
    "lm_head": None
    if head is None
    else {
      "path": None if isinstance(lm_head, lm_head_lib.LMHead) else str(lm_head),
      **{
        k: head.info.get(k)
        for k in ("model_id", "vocab_size", "hidden_dim", "dtype")
      },
      "token_targets": "stored target_tokens"
      if stored_tokens
      else "argmax of target states through the LM head",
    },
    "settings": {
      "batch_size": batch_size,
      "num_batches": num_batches,
      "devices": n_dev,
      "logits_dtype": str(logits_dtype),
      "thresholds": list(THRESHOLDS),
      "cos_match_thresholds": list(COS_MATCH_THRESHOLDS),
      "bootstrap_resamples": bootstrap,
      "ci_level": 0.95,
      "gamma": gamma,
      "costs": costs,
    },
    "primary_reading": primary,
    "timing": {
      "device_loop_s": t_loop,
      "compile_s": compile_s,
      "evaluate_s": time.perf_counter() - t_start,
    },
    "results": results,
    "notes": notes,
  }
  plot_arrays["lengths"] = lengths
  return EvalResult(
    metrics=_jsonable(metrics),
    positions=_jsonable(positions),
    arrays=plot_arrays,
  )


def _read_tokens(dataset, indices, s_max, fields) -> dict[str, np.ndarray]:
  """Token-id streams [N, s_max] (-1 padded), read in chunks."""
  out = {f: np.full((len(indices), s_max), -1, np.int64) for f in fields}
  for start in range(0, len(indices), 4096):
    idx = indices[start : start + 4096]
    b = dataset.read_batch(idx, s_max, fields=fields)
    for f in fields:
      out[f][start : start + len(idx)] = np.where(b["mask"], b[f], -1)
  return out


def _jsonable(x):
  """Numpy scalars -> Python, NaN/inf -> None, recursively."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, np.bool_ | bool):
    return bool(x)
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.floating | float):
    x = float(x)
    return x if np.isfinite(x) else None
  return x


# ---------------------------------------------------------------------------
# CLI.


def _load_npz_params(path: str) -> tuple[str, dict, dict]:
  """(adapter name, overrides, params) from tools/import_from_torch output."""
  from egpt_align import checkpoint

  stem = path[: -len(".npz")] if path.endswith(".npz") else path
  cfg_path = stem + ".config.json"
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(
      f"{cfg_path} not found: --params needs OUT.npz with its "
      "OUT.config.json ({'model': {'name': ..., ...}})"
    )
  with open(cfg_path) as f:
    model_cfg = dict(json.load(f).get("model") or {})
  if "name" not in model_cfg:
    raise ValueError(f"{cfg_path}: missing field 'model.name'")
  name = model_cfg.pop("name")
  return name, model_cfg, checkpoint.load_params_npz(stem + ".npz")


def main(argv):
  """absl entry point."""
  del argv
  from egpt_align import report

  sources = [FLAGS.workdir, FLAGS.params, FLAGS.adapter]
  if sum(x is not None for x in sources) != 1:
    raise cli.UserError(
      "give exactly one of --workdir (a training run), --params "
      "(OUT.npz from tools/import_from_torch.py) or --adapter (a freshly "
      "initialised adapter: timing and smoke runs only)"
    )
  if FLAGS.workdir is None and (FLAGS.data is None or FLAGS.out is None):
    raise cli.UserError("--params/--adapter need --data and --out")
  step = FLAGS.step if FLAGS.step is not None else "best"
  costs_note = (
    f"costs from {FLAGS.bench_json}"
    if FLAGS.bench_json
    else "costs: draft_cost="
    + (
      str(FLAGS.draft_cost)
      if FLAGS.draft_cost is not None
      else f"default ({speedup_lib.DEFAULT_DRAFT_COST} per adapter, else "
      f"{speedup_lib.DEFAULT_DRAFTER_COST})"
    )
    + ", verify_cost="
    + (
      str(FLAGS.verify_cost)
      if FLAGS.verify_cost is not None
      else f"default ({speedup_lib.DEFAULT_VERIFY_COST})"
    )
  )
  print(costs_note)
  if FLAGS.compilation_cache:
    jax.config.update(
      "jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache)
    )
  kwargs = {}
  if FLAGS.params is not None:
    name, overrides, params = _load_npz_params(FLAGS.params)
    kwargs = {"adapter": name, "overrides": overrides, "params": params}
  elif FLAGS.adapter is not None:
    kwargs = {"adapter": FLAGS.adapter, "params": "init"}
  result = evaluate(
    FLAGS.data,
    workdir=FLAGS.workdir,
    step=step,
    lm_head=FLAGS.lm_head,
    batch_size=FLAGS.batch_size,
    logits_dtype=FLAGS.logits_dtype,
    gamma=FLAGS.gamma,
    draft_cost=FLAGS.draft_cost,
    verify_cost=FLAGS.verify_cost,
    bench_json=FLAGS.bench_json,
    bootstrap=FLAGS.bootstrap,
    max_samples=FLAGS.max_samples,
    pad_multiple=FLAGS.pad_multiple,
    **kwargs,
  )
  data_path = result.metrics["data"]["path"]
  name = os.path.basename(os.path.normpath(data_path or "data"))
  if result.metrics["data"]["subset"]:
    name += "_holdout"
  out = FLAGS.out or os.path.join(FLAGS.workdir, "eval_" + name)
  paths = report.write_outputs(result, out)
  print(report.summary_text(result))
  for p in paths:
    print("wrote", p)
  t = result.metrics["timing"]
  print(
    f"evaluated {result.metrics['data']['num_samples']} samples, "
    f"{result.metrics['data']['total_valid_positions']} positions: "
    f"device loop {t['device_loop_s']:.2f} s (compile "
    f"{t['compile_s']:.2f} s), total {t['evaluate_s']:.2f} s"
  )


if __name__ == "__main__":
  from absl import flags

  flags.DEFINE_string(
    "workdir", None, "Training run directory (or --params / --adapter)."
  )
  flags.DEFINE_string(
    "params",
    None,
    "OUT.npz (+ OUT.config.json) from tools/import_from_torch.py, e.g. an "
    "imported reference checkpoint.",
  )
  flags.DEFINE_string(
    "adapter",
    None,
    "Evaluate a freshly initialised adapter of this name (l1..l5f): for "
    "timing and smoke runs only.",
  )
  flags.DEFINE_string(
    "data", None, "Dataset dir (default: the run's data.test, else data.val)."
  )
  flags.DEFINE_string(
    "lm_head", None, "LM head NAME[.npy] (default: the run's config.lm_head)."
  )
  flags.DEFINE_string("out", None, "Output dir (default RUN/eval_<data>).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: best).")
  flags.DEFINE_string(
    "bench_json", None, "tools/benchmark_sd.py JSON with measured costs."
  )
  flags.DEFINE_integer("gamma", 5, "Draft length for the speedup model.")
  flags.DEFINE_float(
    "draft_cost", None, "Draft cost per token / one target decode step."
  )
  flags.DEFINE_float(
    "verify_cost", None, "Verify cost per cycle / one target decode step."
  )
  flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples (0 = none).")
  flags.DEFINE_integer("batch_size", 64, "Samples per batch (global).")
  flags.DEFINE_enum(
    "logits_dtype",
    "float32",
    ["float32", "bfloat16"],
    "LM-head matmul dtype (float32 accumulation either way).",
  )
  flags.DEFINE_integer("max_samples", None, "Evaluate only the first N.")
  flags.DEFINE_integer(
    "pad_multiple",
    64,
    "Batches are length-sorted and padded to a multiple of this, capped at "
    "the longest sample (fewer distinct shapes = fewer compiles, which cost "
    "more than the extra padded positions; smaller = less padding).",
  )
  flags.DEFINE_string(
    "compilation_cache",
    os.path.join("~", ".cache", "egpt_align", "jax"),
    "Persistent XLA compilation cache directory: later runs of the same "
    "adapter and shapes skip compiling ('' = off).",
  )
  FLAGS = flags.FLAGS
  cli.run_absl(main)
