"""The live stages: every method of the study on the test samples.

`run_benchmark` is the study's one call into the live runtime
(tools/benchmark_sd.py); everything else here decides what to ask of it.
Each runtime is its own run with its own sample count (the fast runtime
affords more samples than the eager one): DIR/bench/gpusN/RUNTIME/.
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


def runtime_samples(args) -> dict[str, int]:
  """Samples per runtime: --bench_samples (fast), --eager_samples (eager)."""
  out = {}
  for rt in [r for r in args.runtimes.split(",") if r] or ["eager"]:
    out[rt] = args.eager_samples if rt == "eager" else args.bench_samples
  return out


def _budget(study) -> float | None:
  """Seconds one benchmark run may sample: --bench_time_budget_s, and what
  --time_limit_s leaves after room for the results and the pack."""
  budget = study.args.bench_time_budget_s or None
  if study.deadline is not None:
    left = study.deadline - time.perf_counter() - MIN_BENCH_S / 2
    budget = max(1.0, left if budget is None else min(budget, left))
  return budget


def _has_cuda() -> bool:
  try:
    import torch

    return torch.cuda.is_available()
  except ImportError:
    return False


def _budget_share(study, share: float) -> float | None:
  """`share` of what `_budget` allows now (None: no budget)."""
  budget = _budget(study)
  return None if budget is None else max(1.0, budget * share)


def _record(study, out: str, res: dict, lossless: bool) -> dict:
  return {
    "dir": os.path.relpath(out, study.out),
    "lossless": lossless,
    "draft_device": res["config"].get("draft_device"),
    "device": res["environment"].get("device"),
    "num_measured": res.get("num_measured"),
    "mismatches": len(res.get("mismatches", [])),
  }


def stage_bench(study, stage: str) -> dict:
  """Every method of the study on the test samples, one run per runtime;
  first, the headline methods alone on up to --headline_samples samples of
  the first runtime (DIR/bench/gpusN/RUNTIME_headline)."""
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

  def run(rt, chosen, n, out, budget):
    return run_benchmark(
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

  info = {"methods": list(methods), "runtimes": {}}
  runtimes = runtime_samples(args)
  for rt, n in runtimes.items():
    if n + args.warmup > available:
      raise StudyError(
        f"--{'eager' if rt == 'eager' else 'bench'}_samples {n} + --warmup "
        f"{args.warmup} exceed the {available} test samples ({samples})"
      )
  headline = layout.headline_of(study.adapters)
  if args.headline_samples > 0 and headline:
    rt = next(iter(runtimes))
    n = min(args.headline_samples, available - args.warmup)
    out = study.p("bench", layout.BENCH_DIRS[stage], f"{rt}_headline")
    share = _budget_share(study, args.headline_share)
    res, lossless = run(rt, ("baseline",) + headline, n, out, share)
    info["headline"] = {
      "runtime": rt,
      "methods": ["baseline", *headline],
      **_record(study, out, res, lossless),
    }
  for rt, n in runtimes.items():
    out = study.p("bench", layout.BENCH_DIRS[stage], rt)
    res, lossless = run(rt, methods, n, out, _budget(study))
    info["runtimes"][rt] = _record(study, out, res, lossless)
  return info
