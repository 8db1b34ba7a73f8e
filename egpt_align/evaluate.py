r"""Offline evaluation of a trained adapter: hidden-state and token metrics.

  python -m egpt_align.evaluate --workdir RUN [--data DIR] [--lm_head FILE] \
      [--out DIR] [--step N] [--bench_json FILE] [--gamma 5] \
      [--draft_cost c] [--verify_cost v] [--bootstrap 1000]

Instead of --workdir: --params OUT.npz (tools/import_from_torch.py output,
e.g. a reference checkpoint) or --adapter NAME (a freshly initialised adapter,
for timing and smoke runs); both need --data and --out.

Every sample of the dataset is evaluated once, in jitted batches on device
(eval_device.py; padded rows and positions are masked out). The device
reduces the hidden and vocabulary dimensions to per-position cosines and
token ranks; everything else is exact float64 arithmetic on those
per-position arrays on the host (eval_stats.py), with the hidden-state
metrics (cosine, Accept@tau, leading runs) of metrics.py that training's
validation uses too.

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

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from egpt_align import checkpoint, cli, eval_device, eval_inputs, models, unroll
from egpt_align import eval_stats as stats
from egpt_align import lm_head as lm_head_lib
from egpt_align import speedup as speedup_lib
from egpt_align.data import format as format_lib

# Also importable from here as before (tests use evaluate._init_params).
from egpt_align.eval_inputs import init_params as _init_params  # noqa: F401
from egpt_align.eval_inputs import run_data


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """How to evaluate (batching, speedup model, resampling); not what."""

  batch_size: int = 64  # Samples per batch (global).
  logits_dtype: str = "float32"  # LM-head matmul dtype (f32 accumulation).
  gamma: int = 5  # Draft length for the speedup model.
  draft_cost: float | None = None  # Per drafted token / one target step.
  verify_cost: float | None = None  # Per verify cycle / one target step.
  bench_json: str | None = None  # tools/benchmark_sd.py measured costs.
  bootstrap: int = 1000  # Bootstrap resamples (0 = none).
  max_samples: int | None = None  # Evaluate only the first N.
  pad_multiple: int = 64  # Batches padded to a multiple of this.
  progress: bool = True  # tqdm progress bar.


@dataclasses.dataclass
class EvalResult:
  """What `evaluate` returns: JSON-able metrics and positions, plot arrays."""

  metrics: dict[str, Any]
  positions: dict[str, Any]
  arrays: dict[str, Any]


def evaluate(
  data=None,
  *,
  workdir: str | None = None,
  step: str | int = "best",
  adapter: str | None = None,
  overrides: dict | None = None,
  params=None,
  seed: int | None = None,
  lm_head=None,
  indices: Sequence[int] | None = None,
  settings: EvalSettings = EvalSettings(),
) -> EvalResult:
  """Evaluates an adapter on every sample of a dataset; see module doc.

  Either `workdir` (params and config from checkpoint.load_params(workdir,
  step)) or `adapter` (registry name) + `overrides` + `params`
  (params='init': a freshly initialised adapter). `data` is a dataset
  directory or an opened dataset; by default the run's data.test, else
  data.val, else the run's validation hold-out of data.train (exactly the
  trainer's split). `indices` restricts to those samples, and
  `settings.max_samples` to the first N of them. `lm_head` is a path, an
  LMHead or None (then the run's config.lm_head, if any).
  """
  request = eval_inputs.Request(
    data, adapter, overrides, params, seed, lm_head, indices
  )
  if workdir is not None:
    request = eval_inputs.from_workdir(request, workdir, step)
  t_start = time.perf_counter()
  inputs = eval_inputs.prepare(request, settings)
  arrays, loop = _device_loop(inputs, settings)
  stat_args = {
    "settings": settings,
    "costs": inputs.costs,
    "seed": inputs.seed,
    "groups": inputs.groups,
  }
  results, positions, plot_arrays = stats.all_readings(
    arrays, _readings(inputs), inputs.lengths, **stat_args
  )
  depth = _depth_acceptance(inputs, arrays, stat_args)
  drafter = _drafter_tokens(inputs, arrays, stat_args)
  if drafter is not None:
    results["drafter_tokens"] = {"same": drafter[0]}
    positions["drafter_tokens"] = {"same": drafter[1]}
  loop["evaluate_s"] = time.perf_counter() - t_start
  metrics = _metrics(inputs, workdir, step, settings, loop, results, depth)
  plot_arrays["lengths"] = inputs.lengths
  if inputs.groups is not None:
    plot_arrays["groups"] = inputs.groups
  return EvalResult(
    metrics=format_lib.to_jsonable(metrics),
    positions=format_lib.to_jsonable(positions),
    arrays=plot_arrays,
  )


def _readings(inputs) -> dict[str, tuple]:
  """Prediction name -> its readings (eval_device.readings)."""
  return eval_device.readings(inputs.spec, inputs.raw_source)


def _device_loop(inputs, settings: EvalSettings) -> tuple[dict, dict]:
  """(per-position arrays of every batch, the loop's sizes and timings).

  The jitted step reduces each batch to per-position cosines and token
  ranks on device; with acceptance at depth for an adapter fed its own
  predictions, it also drafts free-running (unroll.py).
  """
  fields = ["target"]
  if inputs.cross_model:
    fields.insert(0, "source")
  if inputs.head is not None and inputs.stored_tokens:
    fields.append("target_tokens")
  fed_back = unroll.feeds_back(inputs.spec)
  n_dev = jax.device_count()
  # Divisible across devices.
  batch_size = -(-settings.batch_size // n_dev) * n_dev
  step_fn = eval_device.make_eval_step(
    inputs.spec,
    inputs.module,
    _readings(inputs),
    use_head=inputs.head is not None,
    stored_tokens=inputs.stored_tokens,
    logits_dtype=jnp.dtype(settings.logits_dtype),
    # Free-running drafts need the adapter re-run on its own states (b1,
    # l5f); L5's equal step 1.
    depth=settings.gamma if inputs.depth_report and fed_back else 0,
  )
  t_loop = time.perf_counter()
  arrays, num_batches, compile_s = eval_device.run(
    inputs.dataset,
    inputs.indices,
    step_fn,
    inputs.params,
    inputs.params0,
    None if inputs.head is None else inputs.head.weight,
    fields,
    batch_size=batch_size,
    pad_multiple=settings.pad_multiple,
    progress=settings.progress,
  )
  loop = {
    "batch_size": batch_size,
    "num_batches": num_batches,
    "devices": n_dev,
    "device_loop_s": time.perf_counter() - t_loop,
    "compile_s": compile_s,
  }
  return arrays, loop


def _depth_acceptance(inputs, arrays, stat_args: dict) -> dict | None:
  """Chain-drafting acceptance at depth 1..gamma (decode adapters with an
  LM head), free-running beside teacher-forced; else None."""
  if not inputs.depth_report:
    return None
  return stats.depth_acceptance(
    arrays,
    inputs.lengths,
    gamma=stat_args["settings"].gamma,
    fed_back=unroll.feeds_back(inputs.spec),
    **stat_args,
  )


def _drafter_tokens(inputs, arrays, stat_args: dict) -> tuple | None:
  """The drafter's own greedy tokens against the target tokens (same
  position): (metrics, per-position list), or None without them."""
  dataset = inputs.dataset
  if not (inputs.cross_model and dataset.has_draft_tokens):
    return None
  stored = inputs.stored_tokens
  if not (stored or inputs.head is not None):
    return None
  lengths = inputs.lengths
  extra = ["draft_tokens"] + (["target_tokens"] if stored else [])
  toks = _read_tokens(dataset, inputs.indices, int(lengths.max()), extra)
  tgt = toks["target_tokens"] if stored else arrays["target_tokens"]
  return stats.drafter_tokens(toks["draft_tokens"], tgt, lengths, **stat_args)


def _metrics(inputs, workdir, step, settings, loop, results, depth) -> dict:
  """The metrics.json record: run, data, settings, timing and results."""
  metrics = {
    "run": _run_info(inputs, workdir, step),
    "data": _data_info(inputs),
    "lm_head": _head_info(inputs),
    "settings": {
      **{k: loop[k] for k in ("batch_size", "num_batches", "devices")},
      "logits_dtype": str(settings.logits_dtype),
      "thresholds": list(stats.THRESHOLDS),
      "cos_match_thresholds": list(stats.COS_MATCH_THRESHOLDS),
      "bootstrap_resamples": settings.bootstrap,
      **stats.resampling(inputs.groups),
      "ci_level": 0.95,
      "gamma": settings.gamma,
      "costs": inputs.costs,
    },
    "primary_reading": "next" if inputs.spec.predicts_next else "same",
    "timing": {
      k: loop[k] for k in ("device_loop_s", "compile_s", "evaluate_s")
    },
    "results": results,
    "notes": _notes(inputs.spec),
  }
  if depth is not None:
    metrics["depth_acceptance"] = depth
  return metrics


def _run_info(inputs, workdir, step) -> dict:
  spec = inputs.spec
  return {
    "workdir": workdir,
    "step": step if workdir is not None else None,
    "params": "workdir"
    if workdir is not None
    else ("fresh init (untrained)" if inputs.fresh else "given"),
    "adapter": spec.name,
    "overrides": dict(inputs.overrides),
    "seed": inputs.seed,
    "inputs": list(spec.inputs),
    "predicts_next": spec.predicts_next,
  }


def _data_info(inputs) -> dict:
  dataset, lengths = inputs.dataset, inputs.lengths
  header = getattr(dataset, "header", {}) or {}
  return {
    "path": inputs.data_path,
    "num_samples": int(len(inputs.indices)),
    "dataset_num_samples": int(dataset.num_samples),
    "subset": inputs.subset,
    "total_valid_positions": int(lengths.sum()),
    "total_valid_next_positions": int(np.maximum(lengths - 1, 0).sum()),
    **{
      k.replace("seq_len", "num_hidden_tokens"): v
      for k, v in stats.describe(lengths, "seq_len").items()
    },
    "source_dim": int(dataset.source_dim),
    "target_dim": int(dataset.target_dim),
    "has_target_tokens": bool(dataset.has_target_tokens),
    "has_draft_tokens": bool(dataset.has_draft_tokens),
    "provenance": header.get("provenance"),
  }


def _head_info(inputs) -> dict | None:
  head, lm_head = inputs.head, inputs.lm_head
  if head is None:
    return None
  return {
    "path": None if isinstance(lm_head, lm_head_lib.LMHead) else str(lm_head),
    **{
      k: head.info.get(k)
      for k in ("model_id", "vocab_size", "hidden_dim", "dtype")
    },
    "token_targets": "stored target_tokens"
    if inputs.stored_tokens
    else "argmax of target states through the LM head",
  }


def _notes(spec) -> list[str]:
  notes = []
  if spec.predicts_next:
    notes.append(
      "Primary reading is `next` (output[t] vs target[t+1]); `same` "
      "(output[t] vs target[t]) is reported separately."
    )
  if "target" in spec.inputs:
    notes.append(
      f"For {spec.name} the `same` reading is trivially high: its input "
      "contains the target state it is compared with (docs/REFERENCE_NOTES.md "
      "D7); "
      "the untrained adapter scores about as high."
    )
  if spec.predicts_next:
    notes.append(
      "Token metrics are teacher-forced: every position sees the true "
      "earlier states. Drafting several tokens ahead feeds back the "
      "adapter's own predictions, so live acceptance is lower "
      "(docs/REFERENCE_NOTES.md D9); 'Acceptance at depth' drafts "
      "free-running as live (with an LM head)."
    )
  return notes


def _read_tokens(dataset, indices, s_max, fields) -> dict[str, np.ndarray]:
  """Token-id streams [N, s_max] (-1 padded), read in chunks."""
  out = {f: np.full((len(indices), s_max), -1, np.int64) for f in fields}
  for start in range(0, len(indices), 4096):
    idx = indices[start : start + 4096]
    b = dataset.read_batch(idx, s_max, fields=fields)
    for f in fields:
      out[f][start : start + len(idx)] = np.where(b["mask"], b[f], -1)
  return out


# ---------------------------------------------------------------------------
# CLI.


def _load_npz_params(path: str) -> tuple[str, dict, dict]:
  """(adapter name, overrides, params) from tools/import_from_torch output."""
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


# What an evaluation directory holds (report.write_outputs); one of these in
# --out means an earlier evaluation, kept unless --overwrite.
_OUTPUTS = ("metrics.json", "report.md")


def default_out(workdir: str, data: str | None = None) -> str:
  """The CLI's output directory: RUN/eval_<data name>[_holdout]."""
  holdout = None
  if data is None:
    data, holdout = run_data(checkpoint.read_config(workdir), workdir)
  path = data if isinstance(data, str | os.PathLike) else data.path
  name = os.path.basename(os.path.normpath(path))
  suffix = "_holdout" if holdout is not None else ""
  return os.path.join(workdir, f"eval_{name}{suffix}")


def _check_out(out: str, overwrite: bool) -> None:
  """Refuses to replace an earlier evaluation unless asked to."""
  found = [f for f in _OUTPUTS if os.path.exists(os.path.join(out, f))]
  if found and not overwrite:
    raise cli.UserError(
      f"{out} already holds an evaluation ({', '.join(found)}); pass "
      "--overwrite to replace it, or --out DIR to write elsewhere"
    )


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
  out = FLAGS.out or default_out(FLAGS.workdir, FLAGS.data)
  _check_out(out, FLAGS.overwrite)
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
  try:
    result = _evaluate_flags(step, kwargs)
  except models.ParamsMismatch as e:
    if FLAGS.params is None:
      raise
    raise cli.UserError(
      f"--params {FLAGS.params} (adapter {kwargs['adapter']!r} as its "
      f"config.json says): {e}"
    ) from None
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


def _evaluate_flags(step, kwargs) -> EvalResult:
  """evaluate() with the command line's data and settings."""
  return evaluate(
    FLAGS.data,
    workdir=FLAGS.workdir,
    step=step,
    lm_head=FLAGS.lm_head,
    settings=EvalSettings(
      batch_size=FLAGS.batch_size,
      logits_dtype=FLAGS.logits_dtype,
      gamma=FLAGS.gamma,
      draft_cost=FLAGS.draft_cost,
      verify_cost=FLAGS.verify_cost,
      bench_json=FLAGS.bench_json,
      bootstrap=FLAGS.bootstrap,
      max_samples=FLAGS.max_samples,
      pad_multiple=FLAGS.pad_multiple,
    ),
    **kwargs,
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
  flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace an earlier evaluation in the output dir (else refused).",
  )
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
    os.environ.get("JAX_COMPILATION_CACHE_DIR")
    or os.path.join("~", ".cache", "egpt_align", "jax"),
    "Persistent XLA compilation cache directory: later runs of the same "
    "adapter and shapes skip compiling ('' = off; default "
    "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/egpt_align/jax).",
  )
  FLAGS = flags.FLAGS
  cli.run_absl(main)
