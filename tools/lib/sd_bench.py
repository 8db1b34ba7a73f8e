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

import torch

from egpt_align.data.format import write_json_atomic
from egpt_align.models import get_spec
from tools.lib import backends as bk
from tools.lib import media, sd_report, sd_results
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
  SampleResult,
  SDConfig,
  first_difference,
  run_method,
  token_margins,
)
from tools.lib.sd_methods import METHODS, check_method, parse_method
from tools.lib.sd_models import Models, SDError

AUTO_K_MAX = 32


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
  bootstrap: int = 2000
  tie_margin: float = 0.1
  seed: int = 0
  time_budget_s: float | None = None
  profile: bool = False
  plots: bool = True
  progress: bool = True


class PrefillWindow:
  """Running means that size the prefill-hiding draft window ('auto').

  K = (target prefill - drafter prefill - adapter call) / drafter ms per
  token: the drafts that fit while the target prefills (the reference's
  "free tokens", measured live instead of assumed).
  """

  def __init__(self):
    self.sums: dict[str, list[float]] = {}

  def _add(self, key: str, ms: float, n: float) -> None:
    acc = self.sums.setdefault(key, [0.0, 0.0])
    acc[0] += ms
    acc[1] += n

  def _mean(self, key: str) -> float | None:
    acc = self.sums.get(key)
    return acc[0] / acc[1] if acc and acc[1] else None

  def update(self, result: SampleResult) -> None:
    """Adds one run's prefill-side spans."""
    for name, v in result.phases.items():
      if name == "target_prefill":
        self._add("target", v["ms"], v["calls"])
      elif name == "draft_prefill":
        self._add("drafter", v["ms"], v["calls"])
      elif name in ("draft_decode", "prefill_draft_decode"):
        self._add("token", v["ms"], v["units"])
      elif name.startswith("prefill_adapter:"):
        self._add("adapter", v["ms"], v["calls"])

  def drafts(self, default: int) -> int:
    """The current window, or `default` before anything was measured."""
    target, drafter = self._mean("target"), self._mean("drafter")
    token = self._mean("token")
    if target is None or drafter is None or not token:
      return default
    free = target - drafter - (self._mean("adapter") or 0.0)
    return int(min(max(free // token, 1), AUTO_K_MAX))


# ----------------------------------------------------------------------------
# Set-up: settings, devices, models, samples, adapters.


def _check(s: BenchSettings) -> tuple[list[str], list[str]]:
  """The methods (baseline first) and runtimes, checked."""
  if s.gamma < 1 or s.max_new_tokens < 1 or s.warmup < 0:
    raise ValueError("--gamma and --max_new_tokens must be >= 1, --warmup >= 0")
  methods = ["baseline"] + [m for m in s.methods if m != "baseline"]
  if len(set(methods)) != len(methods):
    raise ValueError(f"--methods lists a method twice: {','.join(s.methods)}")
  for m in methods:
    parse_method(m)
  runtimes = list(s.runtimes)
  if not runtimes or len(set(runtimes)) != len(runtimes):
    raise ValueError(f"--runtimes: give each runtime once, not {runtimes}")
  for r in runtimes:
    if r not in RUNTIMES:
      raise ValueError(f"--runtimes: {r!r} is not one of {RUNTIMES}")
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
  samples = media.read_samples(s.samples, s.media_root)
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
    ad.device = ddev if get_spec(ad.kind).role == "prefill" else device
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
    if get_spec(a.kind).role == "decode" and cap is not None and need > cap:
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
  window: PrefillWindow
  per_sample: dict[str, list[dict]]
  mismatches: list[dict]


def _run_sample(run: _Run, sample: dict, warm: bool, t_in, d_in) -> None:
  """Every (method, runtime) on one sample; records unless `warm`."""
  s, runtimes = run.s, run.runtimes
  base_tokens: dict[str, list[int]] = {}  # runtime -> baseline tokens
  margins = None
  for lab, m, rt in run.runs:
    try:
      cfg = dataclasses.replace(run.cfg, runtime=rt)
      if s.prefill_gamma == "auto":
        cfg = dataclasses.replace(cfg, prefill_gamma=run.window.drafts(s.gamma))
      r = run_method(m, run.models, t_in, d_in, cfg)
      if rt == runtimes[0]:
        run.window.update(r)
    except SDError as e:
      if m == "baseline":
        raise
      if not warm:
        run.per_sample[lab].append({"id": sample["id"], "error": str(e)})
      continue
    rec = r.to_json()
    rec["id"] = sample["id"]
    if "prefill" in parse_method(m).spec.phases:
      rec["prefill_gamma"] = cfg.k_prefill
    # Each method is checked against its own runtime's baseline, and each
    # runtime's baseline against the headline runtime's.
    if m == "baseline":
      base_tokens[rt] = r.tokens
      ref = base_tokens[runtimes[0]]
    else:
      ref = base_tokens[rt]
    if lab == "baseline":
      rec["match"] = True
    else:
      diff = first_difference(r.tokens, ref)
      rec["match"] = diff is None
      if diff is not None and not warm:
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
    if not warm:
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
    _run_sample(run, sample, si < s.warmup, t_in, d_in)
  bar.close()
  return t_in, d_in


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
  auto_k = s.prefill_gamma == "auto"
  cfg = SDConfig(
    gamma=s.gamma,
    max_new_tokens=s.max_new_tokens,
    prefill_gamma=None
    if s.prefill_gamma in (None, "auto")
    else int(s.prefill_gamma),
    overlap=s.overlap,
    eos_token_ids=() if s.ignore_eos else None,
  )
  runs = [
    (sd_results.label(m, r, runtimes), m, r) for r in runtimes for m in methods
  ]
  per_sample: dict[str, list[dict]] = {x[0]: [] for x in runs}
  run = _Run(s, models, runs, runtimes, cfg, PrefillWindow(), per_sample, [])
  t_in, d_in = _loop(run, samples, device, ddev)

  bases = {
    r: per_sample[sd_results.label("baseline", r, runtimes)] for r in runtimes
  }
  aggregate = {}
  for lab, _, rt in runs:
    a = sd_results.aggregate(
      per_sample[lab], bases[rt], n_boot=s.bootstrap, seed=s.seed
    )
    if a.get("n") and len(runtimes) > 1:
      a["speedup_vs"] = sd_results.speedups_vs(
        per_sample[lab], bases, n_boot=s.bootstrap, seed=s.seed
      )
    aggregate[lab] = a
  costs = {
    r: sd_results.costs_block(
      {m: per_sample[sd_results.label(m, r, runtimes)] for m in methods},
      methods,
      s.gamma,
    )
    for r in runtimes
  }
  os.makedirs(s.out, exist_ok=True)
  results = {
    "format": "egpt_align.benchmark_sd",
    "version": 1,
    "config": {
      "target": s.target or f"random:{s.random_models}",
      "draft": s.draft or (f"random:{s.random_models}"),
      "samples": s.samples,
      "methods": methods,
      "runtimes": runtimes,
      "compile": s.compile,
      "gamma": s.gamma,
      "prefill_gamma": "auto" if auto_k else cfg.k_prefill,
      "max_new_tokens": s.max_new_tokens,
      "ignore_eos": s.ignore_eos,
      "warmup": s.warmup,
      "dtype": dtype,
      "adapter_dtype": str(adtype).replace("torch.", ""),
      "device": str(device),
      "draft_device": str(ddev),
      "overlap": s.overlap,
      "prompt_len": s.prompt_len if s.random_models else None,
      "bootstrap": s.bootstrap,
      "tie_margin": s.tie_margin,
      "seed": s.seed,
    },
    "environment": environment(device=device),
    "provenance": {
      "target": target.provenance(),
      "draft": None if drafter is None else drafter.provenance(),
      "adapters": adapter_info,
    },
    "num_measured": len(per_sample["baseline"]),
    # What the fast runtime ran per model: 'static' or why it fell back.
    "fast_path": dict(models.fast_notes),
    "aggregate": aggregate,
    "costs": costs[runtimes[0]],
    "costs_by_runtime": costs,
    "mismatches": run.mismatches,
    "mismatches_not_near_tie": int(
      sum(not x["near_tie"] for x in run.mismatches)
    ),
    "per_sample": per_sample,
    "out": s.out,
  }
  if s.profile:
    profiled = [m for m in methods if METHODS[parse_method(m).kind].profiled]
    sd_report.write_profile(
      os.path.join(s.out, "profile.txt"),
      lambda m: run_method(
        m, models, t_in, d_in, dataclasses.replace(cfg, runtime=runtimes[0])
      ),
      profiled,
      runtimes[0],
    )
  write_json_atomic(os.path.join(s.out, "results.json"), results)
  sd_report.write_report(os.path.join(s.out, "report.md"), results)
  if s.plots:
    sd_report.write_plots(s.out, results)
  return results
