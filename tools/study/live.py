"""The live stages: every method of the study on the test samples.

`run_benchmark` is the study's one call into the live runtime
(tools/benchmark_sd.py); everything else here decides what to ask of it.
Each runtime is its own run with its own sample count (the fast runtime
affords more samples than the eager one). A stage runs, in order:

1. a headline run per runtime (the baseline and the headline methods
   alone; DIR/bench/gpusN/RUNTIME_headline): --headline_samples samples
   on the fast runtime, --eager_samples on the eager one;
2. an all-methods run per runtime (DIR/bench/gpusN/RUNTIME):
   --bench_samples on the fast runtime, --eager_samples on the eager one.

Budgets, in seconds of sampling, taken when each run starts (`left`: what
--time_limit_s leaves after MIN_BENCH_S / 2 for the results and the pack):
a headline run samples at most --headline_budget_s and left / (the
headline runs still to come, itself included), so it never takes the time
of a headline run after it; an all-methods run samples at most
--bench_time_budget_s and left, and one after the first runtime's is left
out (and named in RESULTS.md) when left is under MIN_LATER_RUN_S.
"""

from __future__ import annotations

import json
import os
import sys
import time

from tools.lib.sd_methods import method_options, option_flags
from tools.study import layout
from tools.study.pair import StudyError
from tools.study.stages import max_new_tokens, run_tool

MIN_BENCH_S = 90  # a benchmark stage starts only with this much time left
# An all-methods run after the first runtime's starts only with this much
# sampling time left (eager, every method: a few samples at least).
MIN_LATER_RUN_S = 60


def run_benchmark(
  *,
  target: str,
  draft: str,
  samples: str,
  adapters: dict[str, str],
  methods: tuple[str, ...],
  out: str,
  num_samples: int,
  runtime: str,
  gamma: int,
  options: dict,
  max_new: int,
  warmup: int,
  seed: int,
  device: str | None = None,
  draft_device: str | None = None,
  dtype: str | None = None,
  no_compile: bool = False,
  time_budget_s: float | None = None,
  progress: bool = True,
) -> tuple[dict, bool]:
  """One benchmark run; returns (its results.json, lossless). `options`:
  the method kinds' (tools/lib/sd_methods.py `method_options`)."""
  cmd = [
    sys.executable,
    "-m",
    "tools.benchmark_sd",
    "--target",
    target,
    "--draft",
    draft,
    "--samples",
    samples,
    "--methods",
    ",".join(methods),
    "--gamma",
    str(gamma),
    *option_flags(options),
    "--max_new_tokens",
    str(max_new),
    "--warmup",
    str(warmup),
    "--num_samples",
    str(num_samples),
    "--out",
    out,
    "--seed",
    str(seed),
  ]
  for name, path in adapters.items():
    cmd += ["--adapter", f"{name}={path}"]
  for flag, value in (
    ("--device", device),
    ("--draft_device", draft_device),
    ("--dtype", dtype),
    ("--runtimes", runtime),
    ("--time_budget_s", time_budget_s and str(time_budget_s)),
  ):
    if value:
      cmd += [flag, value]
  if no_compile:
    cmd += ["--no_compile"]
  if not progress:
    cmd += ["--no_progress"]
  # Exit status 1: a method differs from greedy other than by a near-tie
  # flip. The run is kept and RESULTS.md reports it.
  rc = run_tool(cmd, f"benchmark ({out})", ok=(0, 1))
  with open(os.path.join(out, "results.json")) as f:
    return json.load(f), rc == 0


def check_flags(args) -> None:
  """One StudyError for a bad sample count or time budget of the live
  stages (before any stage runs)."""
  for flag in ("bench_samples", "eager_samples"):
    if getattr(args, flag) < 1:
      raise StudyError(
        f"--{flag} {getattr(args, flag)}: expected a number of test "
        "samples >= 1"
      )
  if args.headline_samples < 0:
    raise StudyError(
      f"--headline_samples {args.headline_samples}: expected a number of "
      "test samples >= 0 (0 = no headline runs)"
    )
  for flag in ("headline_budget_s", "bench_time_budget_s"):
    if getattr(args, flag) < 0:
      raise StudyError(
        f"--{flag} {getattr(args, flag)}: expected seconds >= 0 (0 = no "
        "budget of its own)"
      )


def _runtimes(args) -> list[str]:
  return [r for r in args.runtimes.split(",") if r] or ["eager"]


def runtime_samples(args) -> dict[str, int]:
  """The all-methods runs' samples per runtime, in --runtimes order:
  --bench_samples (fast), --eager_samples (eager)."""
  return {
    rt: args.eager_samples if rt == "eager" else args.bench_samples
    for rt in _runtimes(args)
  }


def headline_samples(args, available: int) -> dict[str, int]:
  """The headline runs' samples per runtime, in --runtimes order:
  --headline_samples (fast), --eager_samples (eager), each at most the
  test samples after the warm-up; {} with --headline_samples 0."""
  if args.headline_samples <= 0:
    return {}
  return {
    rt: min(
      args.eager_samples if rt == "eager" else args.headline_samples,
      available - args.warmup,
    )
    for rt in _runtimes(args)
  }


def _left(study) -> float | None:
  """Seconds --time_limit_s leaves for sampling now, after room for the
  results and the pack (None: no limit)."""
  if study.deadline is None:
    return None
  return study.deadline - time.perf_counter() - MIN_BENCH_S / 2


def _budget(cap: float, left: float | None, runs: int = 1) -> float | None:
  """A run's sampling budget: at most `cap` (0: none) and `left` / `runs`
  (None: no budget)."""
  budget = cap or None
  if left is not None:
    part = left / runs
    budget = max(1.0, part if budget is None else min(budget, part))
  return budget


def _has_cuda() -> bool:
  try:
    import torch

    return torch.cuda.is_available()
  except ImportError:
    return False


def _record(study, out: str, res: dict, lossless: bool, seconds) -> dict:
  return {
    "dir": os.path.relpath(out, study.out),
    "seconds": round(seconds, 1),  # the run's wall time, start-up included
    "lossless": lossless,
    "draft_device": res["config"].get("draft_device"),
    "device": res["environment"].get("device"),
    "num_measured": res.get("num_measured"),
    "mismatches": len(res.get("mismatches", [])),
  }


def stage_bench(study, stage: str) -> dict:
  """The headline methods alone, one run per runtime, then every method
  of the study, one run per runtime (the module's docstring: samples and
  budgets)."""
  args = study.args
  if stage == "bench2" and not args.draft_device2:
    import torch

    if torch.cuda.device_count() < 2:
      raise StudyError(
        f"stage bench2 needs 2 GPUs (this machine has "
        f"{torch.cuda.device_count()}) or an explicit --draft_device2"
      )
    args.draft_device2 = "cuda:1"
  if stage == "bench1" and not args.draft_device1:
    args.draft_device1 = args.device or ("cuda:0" if _has_cuda() else "cpu")
  methods = layout.methods_of(study.adapters)
  try:
    options = method_options(args)
  except ValueError as e:
    raise StudyError(str(e)) from e
  adapters = {
    n: study.p("exports", f"{n}.pt")
    for n in layout.live_adapters(study.adapters)
  }
  for path in adapters.values():
    if not os.path.isfile(path):
      raise StudyError(
        f"{path}: missing; run the export stage (or --unpack the outputs "
        "of stage A)"
      )
  samples = study.pair.samples(study, "test")
  with open(samples) as f:
    available = sum(1 for line in f if line.strip())

  def run(rt, chosen, n, out, budget) -> dict:
    """One benchmark run; its record for study.json."""
    t0 = time.perf_counter()
    res, lossless = run_benchmark(
      target=study.pair.target_spec(),
      draft=study.pair.draft_spec(),
      samples=samples,
      adapters={
        a: adapters[a]
        for a in adapters
        if any(a in layout.method_adapters(m) for m in chosen)
      },
      methods=chosen,
      out=out,
      num_samples=n,
      runtime=rt,
      gamma=args.gamma,
      options=options,
      max_new=max_new_tokens(study, "bench_max_new_tokens"),
      warmup=args.warmup,
      seed=args.seed,
      device=args.device,
      draft_device=getattr(args, f"draft_device{stage[-1]}"),
      dtype=args.dtype,
      no_compile=args.no_compile,
      time_budget_s=budget,
      progress=not args.no_progress,
    )
    return _record(study, out, res, lossless, time.perf_counter() - t0)

  info = {"methods": list(methods), "runtimes": {}}
  runtimes = runtime_samples(args)
  for rt, n in runtimes.items():
    if n + args.warmup > available:
      raise StudyError(
        f"--{'eager' if rt == 'eager' else 'bench'}_samples {n} + --warmup "
        f"{args.warmup} exceed the {available} test samples ({samples})"
      )
  headline = layout.headline_of(study.adapters)
  heads = headline_samples(args, available) if headline else {}
  if heads:
    info["headline"] = {}
  for i, (rt, n) in enumerate(heads.items()):
    out = study.p("bench", layout.BENCH_DIRS[stage], f"{rt}_headline")
    # Each headline run leaves the ones after it an equal part of the time.
    budget = _budget(args.headline_budget_s, _left(study), len(heads) - i)
    info["headline"][rt] = {
      "runtime": rt,
      "methods": ["baseline", *headline],
      **run(rt, ("baseline",) + headline, n, out, budget),
    }
  for i, (rt, n) in enumerate(runtimes.items()):
    left = _left(study)
    if i and left is not None and left < MIN_LATER_RUN_S:
      why = (
        f"only {max(0.0, left):.0f} s of --time_limit_s were left for it "
        f"(an all-methods run after the first runtime's needs "
        f"{MIN_LATER_RUN_S} s)"
      )
      info.setdefault("left_out", {})[rt] = why
      print(f"{stage}: the {rt} runtime's all-methods run left out: {why}")
      continue
    out = study.p("bench", layout.BENCH_DIRS[stage], rt)
    budget = _budget(args.bench_time_budget_s, left)
    info["runtimes"][rt] = run(rt, methods, n, out, budget)
  return info
