"""The live SD benchmark as a library: `run_benchmark(BenchSettings(...))`.

Runs every method on every sample (interleaved, so drift and noise hit all
methods alike), on every runtime, checks each method's tokens against its
runtime's baseline, aggregates (tools/lib/sd_results.py) and writes
results.json, report.md and the plots (tools/lib/sd_report.py).
tools/benchmark_sd.py is its command line.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from egpt_align import eval_stats
from egpt_align.data.format import write_json_atomic
from tools.lib import backends as bk
from tools.lib import fair_runs, media, sd_report, sd_results
from tools.lib.environment import environment
from tools.lib.random_models import (
  SHAPES,
  TokenPromptBackend,
  random_llama,
  random_prompts,
)
from tools.lib.sd_adapters import load_adapter
from tools.lib.sd_engine import (
  RUNTIMES,
  SDConfig,
  first_difference,
  run_method,
  token_margins,
)
from tools.lib.sd_methods import check_method, method_options, parse_method
from tools.lib.sd_models import Models, SDError

# AUTO_K_MAX: the bound of every 'auto' prefill_gamma this run reports.
from tools.lib.sd_proposers import AUTO_K_MAX, PrefillWindow  # noqa: F401

# The A/A control: the baseline again, under this label, in every sample.
AA_LABEL = "baseline_aa"
# An A/A ratio outside this range (or a CI excluding 1) marks the run
# unreliable: two runs of the same thing should time the same.
AA_RANGE = (0.98, 1.02)
ORDERS = ("balanced", "rotate", "fixed")


@dataclasses.dataclass
class BenchSettings:
  """Everything one benchmark run needs (the command line's flags)."""

  out: str  # output directory
  target: str | None = None  # target backend spec
  draft: str | None = None  # drafter backend spec
  samples: str | None = None  # samples JSONL
  random_models: str | None = None  # a random_models.SHAPES name instead
  prompt_len: int = 600  # random prompt length
  random_same_drafter: bool = False  # random drafter = the random target
  num_samples: int | None = None  # measured samples (None: all; 20 random)
  media_root: str | None = None
  adapters: Mapping[str, str] = dataclasses.field(default_factory=dict)
  trust_pickle: bool = False
  methods: Sequence[str] = ("baseline", "draft_tokens")
  gamma: int = 5
  prefill_gamma: int | str | None = None  # None: gamma; 'auto'
  # The method kinds' own settings by name (tools/lib/sd_methods.py
  # `method_options`; the tree flags); what it lacks takes the default.
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  max_new_tokens: int = 50
  ignore_eos: bool = False
  warmup: int = 2  # discarded samples
  device: str | None = None
  draft_device: str | None = None
  dtype: str | None = None
  adapter_dtype: str | None = None
  runtimes: Sequence[str] = ("fast", "eager")
  compile: bool = True
  overlap: str = "auto"
  # A concurrent prefill's saving is measured (each side again alone,
  # untimed) on samples 0, N, 2N, ...: 1 = every sample.
  overlap_every: int = 4
  bootstrap: int = 2000
  tie_margin: float = 0.1
  seed: int = 0
  time_budget_s: float | None = None
  profile: bool = False
  plots: bool = True
  progress: bool = True
  order: str = "balanced"  # 'balanced', 'rotate' (seeded start) or 'fixed'
  aa_control: bool = True  # the baseline twice per sample (baseline_aa)
  shape_warmup: bool = True  # untimed runs on each new input shape


# ----------------------------------------------------------------------------
# Set-up: settings, devices, models, samples, adapters.


def _check(s: BenchSettings) -> tuple[list[str], list[str]]:
  """The methods (baseline first) and runtimes, checked."""
  if s.gamma < 1 or s.max_new_tokens < 1 or s.warmup < 0:
    raise ValueError("--gamma and --max_new_tokens must be >= 1, --warmup >= 0")
  if s.overlap_every < 1:
    raise ValueError(f"--overlap_every must be >= 1, got {s.overlap_every}")
  methods = ["baseline"] + [m for m in s.methods if m != "baseline"]
  if len(set(methods)) != len(methods):
    raise ValueError(f"--methods lists a method twice: {','.join(s.methods)}")
  for m in methods:
    parse_method(m)
  method_options(s.options)  # before the models load
  runtimes = list(s.runtimes)
  if not runtimes or len(set(runtimes)) != len(runtimes):
    raise ValueError(f"--runtimes: give each runtime once, not {runtimes}")
  for r in runtimes:
    if r not in RUNTIMES:
      raise ValueError(f"--runtimes: {r!r} is not one of {RUNTIMES}")
  if s.order not in ORDERS:
    raise ValueError(f"--order must be one of {ORDERS}, not {s.order!r}")
  if s.prefill_gamma not in (None, "auto"):
    try:
      k = int(s.prefill_gamma)
    except ValueError:
      k = 0
    if k < 1:
      raise ValueError(
        f"--prefill_gamma must be an int >= 1 or 'auto', not "
        f"{s.prefill_gamma!r}"
      )
  return methods, runtimes


def _devices(s: BenchSettings):
  """(target device, drafter device, model dtype name, adapter dtype)."""
  device = bk.torch_device(s.device)
  if device.type == "cuda" and device.index is None:
    device = torch.device("cuda:0")
  if s.draft_device:
    ddev = torch.device(s.draft_device)
  elif device.type == "cuda" and torch.cuda.device_count() > 1:
    ddev = torch.device("cuda:1")
  else:
    ddev = device
  dtype = s.dtype or ("float16" if device.type == "cuda" else "float32")
  return device, ddev, dtype, bk.torch_dtype(s.adapter_dtype or dtype)


def _pair(s: BenchSettings, device, ddev, dtype):
  """(target backend, drafter backend or None, samples incl. warm-up)."""
  if s.random_models:
    if s.target or s.draft or s.samples:
      raise ValueError("--random_models replaces --target/--draft/--samples")
    shape = SHAPES[s.random_models]
    target = TokenPromptBackend(
      random_llama(shape, seed=s.seed, device=device, dtype=dtype),
      model_id=f"random:{s.random_models}:seed{s.seed}",
    )
    dseed = s.seed if s.random_same_drafter else s.seed + 1
    drafter = TokenPromptBackend(
      random_llama(shape, seed=dseed, device=ddev, dtype=dtype),
      model_id=f"random:{s.random_models}:seed{dseed}",
    )
    n = 20 if s.num_samples is None else s.num_samples
    samples = random_prompts(
      s.warmup + n, s.prompt_len, shape["vocab_size"], s.seed
    )
    return target, drafter, samples
  if not s.target or not s.samples:
    raise ValueError("give --target and --samples (or --random_models)")
  samples = media.one_per_group_in_turn(
    media.read_samples(s.samples, s.media_root)
  )
  if s.num_samples is not None:
    samples = samples[: s.warmup + s.num_samples]
  target = bk.load_backend(s.target, device=device, dtype=dtype)
  drafter = None
  if s.draft:
    drafter = bk.load_backend(s.draft, device=ddev, dtype=dtype)
  return target, drafter, samples


def _models(s: BenchSettings, target, drafter, device, ddev, adtype):
  """Models with every adapter loaded; {label: provenance}."""
  adapters, info = {}, {}
  for i, (name, value) in enumerate(sorted(s.adapters.items())):
    ad, meta = load_adapter(
      name,
      value,
      hidden_dim=target.hidden_size,
      device=torch.device("cpu"),
      dtype=adtype,
      seed=s.seed + 100 + i,
      trust_pickle=s.trust_pickle,
    )
    # Prefill adapters run with the drafter (on its GPU, inside the
    # overlapped prefill); decode adapters next to the target.
    ad.device = ddev if ad.spec.role == "prefill" else device
    ad.module.to(ad.device)
    meta["device"] = str(ad.device)
    adapters[name] = ad
    info[name] = meta
  models = Models(target, drafter, adapters, compile_layers=s.compile)
  return models, info


def _check_positions(s: BenchSettings, models: Models) -> None:
  need = s.max_new_tokens + s.gamma + 1
  for a in models.adapters.values():
    cap = getattr(a.module, "max_seq_len", None)
    if a.spec.role == "decode" and cap is not None and need > cap:
      raise ValueError(
        f"--max_new_tokens + --gamma + 1 = {need} exceeds a decode "
        f"adapter's max_seq_len ({cap})"
      )


def _to_device(inputs: dict, device) -> dict:
  return {
    k: v.to(device) if isinstance(v, torch.Tensor) else v
    for k, v in inputs.items()
  }


# ----------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class _Run:
  """What the sample loop shares."""

  s: BenchSettings
  models: Models
  runs: list[tuple[str, str, str]]  # (label, method, runtime)
  runtimes: list[str]
  cfg: SDConfig
  order_start: int  # the rotation's position on the first sample
  window: PrefillWindow = dataclasses.field(default_factory=PrefillWindow)
  per_sample: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
  mismatches: list[dict] = dataclasses.field(default_factory=list)
  shapes: set = dataclasses.field(default_factory=set)  # input shapes seen
  shape_warmups: list[dict] = dataclasses.field(default_factory=list)
  # Timed runs in which torch.compile compiled ({method, id, graphs}).
  timed_compiles: list[dict] = dataclasses.field(default_factory=list)


def _order(run: _Run, si: int) -> list[tuple[str, str, str]]:
  """The runs of sample `si` in the order they run.

  Balanced (default): the orders of a Williams design in turn from a seeded
  start, so over the samples every (method, runtime) takes each position
  equally often and follows each other one equally often: none pays a
  first-run cost, or the after-effect of one neighbour, systematically.
  Rotated: each moves one place per sample (positions balanced, neighbours
  fixed: the A/A copy always follows the baseline). 'fixed' keeps the
  listed order.
  """
  if run.s.order == "fixed":
    return run.runs
  if run.s.order == "balanced":
    rows = fair_runs.williams_orders(len(run.runs))
    return [run.runs[j] for j in rows[(run.order_start + si) % len(rows)]]
  k = (run.order_start + si) % len(run.runs)
  return run.runs[k:] + run.runs[:k]


def _run_one(
  run: _Run, label: str, method: str, runtime: str, t_in, d_in, measure=True
):
  """One labelled run on one sample: (SampleResult, prefill drafts);
  `measure`: a concurrent prefill's saving too (each side alone)."""
  cfg = dataclasses.replace(run.cfg, runtime=runtime, measure_overlap=measure)
  if run.s.prefill_gamma == "auto":
    cfg = dataclasses.replace(cfg, prefill_gamma=run.window.drafts(run.s.gamma))
  r = run_method(method, run.models, t_in, d_in, cfg)
  if runtime == run.runtimes[0]:
    run.window.update(r)
  return r, cfg.k_prefill


def _shape_key(*inputs) -> tuple:
  return tuple(
    (k, tuple(v.shape))
    for x in inputs
    if x is not None
    for k, v in sorted(x.items())
    if isinstance(v, torch.Tensor)
  )


def _warm_shape(run: _Run, sample: dict, order, t_in, d_in) -> None:
  """Work done once per new input shape, done before the timed runs.

  A prompt length not seen yet costs compilation / graph capture / kernel
  selection once, in whichever run meets it first; every run is done once
  untimed on such a sample, and the time it took is counted separately.
  """
  key = _shape_key(t_in, d_in)
  if key in run.shapes:
    return
  run.shapes.add(key)
  t0 = time.perf_counter()
  for lab, m, rt in order:
    try:
      _run_one(run, lab, m, rt, t_in, d_in, measure=False)
    except SDError:
      pass  # the timed run meets (and records) the same error
  run.shape_warmups.append(
    {"id": sample["id"], "ms": (time.perf_counter() - t0) * 1e3}
  )


def _run_sample(run: _Run, si: int, sample: dict, warm: bool, t_in, d_in):
  """Every (method, runtime) on one sample; records unless `warm`."""
  s, runtimes = run.s, run.runtimes
  order = _order(run, si)
  if warm:
    run.shapes.add(_shape_key(t_in, d_in))
  elif s.shape_warmup:
    _warm_shape(run, sample, order, t_in, d_in)
  done: dict[str, tuple] = {}
  # Measured samples 0, N, 2N, ... (after the warm-up ones).
  measure = not warm and (si - s.warmup) % s.overlap_every == 0
  for pos, (lab, m, rt) in enumerate(order):
    try:
      with fair_runs.no_gc(), fair_runs.counting_compiles() as made:
        r = _run_one(run, lab, m, rt, t_in, d_in, measure=measure)
        done[lab] = (*r, pos)
    except SDError as e:
      if m == "baseline":
        raise
      done[lab] = (e, None, pos)
    if made["graphs"] and not warm:
      run.timed_compiles.append(
        {"method": lab, "id": sample["id"], "graphs": made["graphs"]}
      )
  if warm:
    return
  # Each method is checked against its own runtime's baseline, and each
  # runtime's baseline (and A/A copy) against the headline runtime's.
  base = {
    rt: done[sd_results.label("baseline", rt, runtimes)][0] for rt in runtimes
  }
  margins = None
  for lab, m, rt in run.runs:
    r, k_prefill, pos = done[lab]
    if isinstance(r, SDError):
      run.per_sample[lab].append(
        {"id": sample["id"], "error": str(r), "position": pos}
      )
      continue
    rec = r.to_json()
    rec["id"] = sample["id"]
    rec["position"] = pos
    if "group" in sample:
      rec["group"] = sample["group"]
    if "prefill" in parse_method(m).spec.phases:
      rec["prefill_gamma"] = k_prefill
    ref = base[runtimes[0] if m == "baseline" else rt].tokens
    diff = None if lab == "baseline" else first_difference(r.tokens, ref)
    rec["match"] = diff is None
    if diff is not None:
      if margins is None:
        margins = token_margins(run.models.target, t_in, ref)
      margin = margins[diff] if diff < len(margins) else None
      rec["first_difference"] = diff
      rec["near_tie"] = margin is not None and margin < s.tie_margin
      run.mismatches.append(
        {
          "method": lab,
          "id": sample["id"],
          "index": diff,
          "margin": margin,
          "near_tie": rec["near_tie"],
        }
      )
    run.per_sample[lab].append(rec)


def _loop(run: _Run, samples, device, ddev) -> tuple:
  """Runs every sample; returns the last sample's prompt inputs."""
  from tqdm import tqdm

  s, models = run.s, run.models
  bar = tqdm(
    samples, desc="samples", disable=not s.progress, dynamic_ncols=True
  )
  t_start = time.perf_counter()
  t_in = d_in = None
  for si, sample in enumerate(bar):
    budget = s.time_budget_s
    over = budget is not None and time.perf_counter() - t_start > budget
    if over and si > s.warmup:
      print(
        f"--time_budget_s {s.time_budget_s} reached: stopping after "
        f"{si - s.warmup} measured samples",
        file=sys.stderr,
      )
      break
    t_in = _to_device(
      models.target.prompt_inputs(media.role_view(sample, "target")), device
    )
    d_in = None
    if models.drafter is not None:
      d_in = _to_device(
        models.drafter.prompt_inputs(media.role_view(sample, "draft")), ddev
      )
    _run_sample(run, si, sample, si < s.warmup, t_in, d_in)
  bar.close()
  return t_in, d_in


def _aggregate(run: _Run, methods: list[str]) -> dict:
  """aggregate, costs, A/A control, Amdahl ceiling and cost model."""
  s, runtimes, per_sample = run.s, run.runtimes, run.per_sample
  label = sd_results.label
  bases = {r: per_sample[label("baseline", r, runtimes)] for r in runtimes}
  aggregate = {}
  for lab, _, rt in run.runs:
    a = sd_results.aggregate(
      per_sample[lab], bases[rt], n_boot=s.bootstrap, seed=s.seed
    )
    if a.get("n") and len(runtimes) > 1:
      a["speedup_vs"] = sd_results.speedups_vs(
        per_sample[lab], bases, n_boot=s.bootstrap, seed=s.seed
      )
    aggregate[lab] = a
  costs, aa, amdahl = {}, {}, {}
  for rt in runtimes:
    costs[rt] = sd_results.costs_block(
      {m: per_sample[label(m, rt, runtimes)] for m in methods},
      methods,
      s.gamma,
    )
    for m in methods:
      model = sd_results.cost_model(
        per_sample[label(m, rt, runtimes)],
        costs[rt],
        m,
        aggregate[label(m, rt, runtimes)].get("decode_speedup"),
      )
      if model is not None:
        aggregate[label(m, rt, runtimes)]["cost_model"] = model
    if s.aa_control:
      aa[rt] = sd_results.aa_control(aggregate[label(AA_LABEL, rt, runtimes)])
    amdahl[rt] = sd_results.amdahl(bases[rt])
  return {"aggregate": aggregate, "costs": costs, "aa": aa, "amdahl": amdahl}


def _config(s: BenchSettings, run: _Run, methods, device, ddev, dtype, adtype):
  groups = sd_results.groups_of(run.per_sample["baseline"])
  return {
    "target": s.target or f"random:{s.random_models}",
    "draft": s.draft or (f"random:{s.random_models}"),
    "samples": s.samples,
    "methods": methods,
    "runtimes": run.runtimes,
    "compile": s.compile,
    "gamma": s.gamma,
    "prefill_gamma": "auto" if s.prefill_gamma == "auto" else run.cfg.k_prefill,
    "options": dict(run.cfg.options),
    "max_new_tokens": s.max_new_tokens,
    "ignore_eos": s.ignore_eos,
    "warmup": s.warmup,
    "dtype": dtype,
    "adapter_dtype": str(adtype).replace("torch.", ""),
    "device": str(device),
    "draft_device": str(ddev),
    "overlap": s.overlap,
    "overlap_every": s.overlap_every,
    "prompt_len": s.prompt_len if s.random_models else None,
    "bootstrap": s.bootstrap,
    # 'group': CIs resample whole groups (samples.jsonl `group`).
    **eval_stats.resampling(groups),
    "tie_margin": s.tie_margin,
    "seed": s.seed,
    # Runs of one sample: the Williams design's orders or the rotation in
    # turn from `order_start` (each record's `position` says where it ran),
    # or 'fixed'.
    "order": s.order,
    "order_start": None if s.order == "fixed" else run.order_start,
    "gc": "off in timed runs, objects loaded before them frozen",
    # Samples run one of each group in turn (media.one_per_group_in_turn).
    "sample_order": "file order" if groups is None else "one per group in turn",
    "runs_per_sample": [x[0] for x in run.runs],
    "aa_control": s.aa_control,
    "shape_warmup": s.shape_warmup,
  }


def _reliability(aa: dict) -> tuple[bool | None, list[str]]:
  """(reliable, warnings) from the A/A control of every runtime."""
  if not aa:
    return None, []
  bad = [
    f"A/A control on the {rt} runtime: baseline / {AA_LABEL} = "
    f"{sd_report.fmt(c['ratio'], 3)} (95% CI "
    f"[{', '.join(sd_report.fmt(x, 3) for x in c['ci95'] or (None, None))}]), "
    "outside "
    f"[{AA_RANGE[0]}, {AA_RANGE[1]}] or excluding 1: the timings of this "
    "run are not reliable"
    for rt, c in aa.items()
    if not c["reliable"]
  ]
  return not bad, bad


def run_benchmark(s: BenchSettings) -> dict:
  """Loads everything, runs every method on every sample, writes outputs.

  Returns the results (the contents of OUT/results.json). Bad settings or
  inputs raise ValueError / FileNotFoundError with a one-line message.
  """
  methods, runtimes = _check(s)
  device, ddev, dtype, adtype = _devices(s)
  target, drafter, samples = _pair(s, device, ddev, dtype)
  if len(samples) <= s.warmup:
    raise ValueError(
      f"{len(samples)} samples but --warmup {s.warmup}: nothing to measure"
    )
  models, adapter_info = _models(s, target, drafter, device, ddev, adtype)
  for m in methods:
    check_method(m, models)
  _check_positions(s, models)
  fixed_k = s.prefill_gamma not in (None, "auto")
  cfg = SDConfig(
    gamma=s.gamma,
    max_new_tokens=s.max_new_tokens,
    prefill_gamma=int(s.prefill_gamma) if fixed_k else None,
    overlap=s.overlap,
    eos_token_ids=() if s.ignore_eos else None,
    options=s.options,
  )
  runs = []
  for rt in runtimes:
    for m in methods:
      runs.append((sd_results.label(m, rt, runtimes), m, rt))
      if m == "baseline" and s.aa_control:
        runs.append((sd_results.label(AA_LABEL, rt, runtimes), m, rt))
  start = int(np.random.default_rng(s.seed).integers(len(runs)))
  run = _Run(s, models, runs, runtimes, cfg, start)
  run.per_sample = {x[0]: [] for x in runs}
  # What is loaded now lives to the end: frozen, the collections between
  # runs (_no_gc) skip it.
  with fair_runs.frozen_heap():
    t_in, d_in = _loop(run, samples, device, ddev)
  agg = _aggregate(run, methods)
  reliable, warnings = _reliability(agg["aa"])
  for w in warnings + fair_runs.compile_warnings(run.timed_compiles):
    print(f"warning: {w}", file=sys.stderr)
  os.makedirs(s.out, exist_ok=True)
  results = {
    "format": "egpt_align.benchmark_sd",
    "version": 1,
    "config": _config(s, run, methods, device, ddev, dtype, adtype),
    "environment": environment(device=device),
    "provenance": {
      "target": target.provenance(),
      "draft": None if drafter is None else drafter.provenance(),
      "adapters": adapter_info,
    },
    "num_measured": len(run.per_sample["baseline"]),
    # What the fast runtime ran per model: 'static' or why it fell back.
    "fast_path": dict(models.fast_notes),
    # False when an A/A control failed (None: no control ran).
    "reliable": reliable,
    "reliability_warnings": warnings,
    "aa_control": agg["aa"],
    "amdahl": agg["amdahl"],
    # Untimed runs on samples of a new input shape (per sample, wall ms).
    "shape_warmups": run.shape_warmups,
    # Timed runs that compiled: their times include the compilation.
    "timed_compiles": run.timed_compiles,
    "aggregate": agg["aggregate"],
    "costs": agg["costs"][runtimes[0]],
    "costs_by_runtime": agg["costs"],
    "mismatches": run.mismatches,
    "mismatches_not_near_tie": int(
      sum(not x["near_tie"] for x in run.mismatches)
    ),
    "per_sample": run.per_sample,
    "out": s.out,
  }
  if s.profile:
    profiled = [m for m in methods if parse_method(m).spec.profiled]
    sd_report.write_profile(
      os.path.join(s.out, "profile.txt"),
      lambda m: run_method(
        m, models, t_in, d_in, dataclasses.replace(cfg, runtime=runtimes[0])
      ),
      profiled,
      runtimes[0],
    )
  sd_report.write_report(os.path.join(s.out, "report.md"), results)
  if s.plots:
    sd_report.write_plots(s.out, results)
  # Last: a results.json means every output of the run was written.
  write_json_atomic(os.path.join(s.out, "results.json"), results)
  return results
