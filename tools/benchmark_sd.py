"""Live, lossless, measured speculative decoding with trained adapters.

Runs every method on every sample (interleaved, so drift and noise hit all
methods alike), checks each method's tokens against the target's own greedy
output, and times everything with device synchronisation:

  python tools/benchmark_sd.py \\
    --target video_llava:LanguageBind/Video-LLaVA-7B-hf \\
    --draft my_eventgpt_plugin:make_backend:/ckpt/EventGPT-7b \\
    --samples test.jsonl --adapter l4=exports/l4.pt \\
    --adapter b1=exports/b1.pt --methods \\
    baseline,draft_tokens,prefill_hiding:l4,decode:b1,two_phase:l4+b1 \\
    --gamma 5 --max_new_tokens 50 --warmup 2 --device cuda --dtype float16 \\
    --out runs/bench

No weights at hand? `--random_models vicuna7b` builds a random-weight
Vicuna-7B-shaped target and drafter (and random adapters with
`--adapter l5=random`): acceptance is meaningless then, the costs are real.

Methods: the table in tools/lib/sd_methods.py (listed at the end of
--help); the loop is tools/lib/sd_engine.py, the benchmark
tools/lib/sd_bench.py (`run_benchmark`), which this command only calls.

Runtimes (`--runtimes`, default fast,eager): every method runs on each, on
the same samples. fast = static KV caches, rollback by position, CUDA-graph
steps of compiled layers for target, drafter and decode adapters
(tools/lib/static_kv.py); eager = HF forwards with HF caches. The first runtime
is the headline (plain method names, the `costs` block); the others' results
are keyed METHOD@RUNTIME, and every method's speedup is also reported
against each runtime's baseline (`speedup_vs`).

Outputs in --out: results.json (per sample, aggregates, and a `costs` block
read by `python -m egpt_align.evaluate --bench_json`; `costs_by_runtime`;
`fast_path`: what the fast runtime ran per model), report.md, plots
speedup.png, breakdown.png, acceptance.png, and with --profile a per-kernel
profile.txt.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tools.lib import backends as bk
from tools.lib.random_models import SHAPES
from tools.lib.sd_adapters import parse_adapters
from tools.lib.sd_bench import (
  AA_LABEL,
  AA_RANGE,
  AUTO_K_MAX,
  ORDERS,
  BenchSettings,
  run_benchmark,
)
from tools.lib.sd_methods import (
  add_method_flags,
  method_forms,
  method_help,
  method_options,
)
from tools.lib.sd_report import summary_text


def _model_args(p: argparse.ArgumentParser) -> None:
  """The 'models and samples' flags: the pair, its samples, adapters."""
  src = p.add_argument_group("models and samples")
  src.add_argument("--target", metavar="SPEC", help="target model spec")
  src.add_argument("--draft", metavar="SPEC", help="drafter model spec")
  src.add_argument("--samples", help="samples JSONL (docs/PLUGINS.md)")
  src.add_argument(
    "--random_models",
    metavar="SHAPE",
    choices=sorted(SHAPES),
    help="random-weight Llama target + drafter of this shape instead of "
    "--target/--draft, with random-token prompts",
  )
  src.add_argument(
    "--prompt_len", type=int, default=600, help="random prompt length"
  )
  src.add_argument(
    "--random_same_drafter",
    action="store_true",
    help="random drafter = a copy of the random target (acceptance 1 for "
    "draft_tokens: the upper bound at the measured costs)",
  )
  src.add_argument(
    "--num_samples",
    type=int,
    default=None,
    help="measured samples (default: all of --samples; 20 random); "
    "samples with a `group` run one of each group in turn",
  )
  src.add_argument("--media_root", default=None, help="base of media paths")
  src.add_argument(
    "--adapter",
    action="append",
    default=[],
    metavar="NAME=FILE",
    help="an adapter exported by tools/export_to_torch.py (.pt or "
    ".safetensors), NAME=random[:KIND], or l4=identity; repeatable",
  )
  src.add_argument(
    "--trust_pickle",
    action="store_true",
    help="allow pickled configs in reference .pt files (reference L1)",
  )


def _decoding_args(p: argparse.ArgumentParser) -> None:
  """The 'decoding' flags: methods, their settings, devices, runtimes."""
  run = p.add_argument_group("decoding")
  run.add_argument(
    "--methods",
    default="baseline,draft_tokens",
    help=f"comma list of {method_forms()} (baseline always runs)",
  )
  run.add_argument("--gamma", type=int, default=5, help="drafts per iteration")
  add_method_flags(run)  # the method kinds' own (the tree flags)
  run.add_argument(
    "--prefill_gamma",
    default=None,
    help="drafts made during the target prefill (default: --gamma), or "
    "'auto': as many as the drafter can make while the target prefills, "
    f"from the running means of earlier samples (at most {AUTO_K_MAX})",
  )
  run.add_argument(
    "--max_new_tokens", type=int, default=50, help="never exceeded"
  )
  run.add_argument(
    "--ignore_eos",
    action="store_true",
    help="never stop at EOS (fixed-length runs for cost measurement)",
  )
  run.add_argument("--warmup", type=int, default=2, help="discarded samples")
  run.add_argument("--device", default=None, help="default: cuda if present")
  run.add_argument(
    "--draft_device",
    default=None,
    help="drafter device (default: cuda:1 when 2+ GPUs, else --device)",
  )
  run.add_argument(
    "--dtype",
    default=None,
    choices=sorted(bk.DTYPES),
    help="model dtype (default: float16 on GPU, float32 on CPU)",
  )
  run.add_argument(
    "--adapter_dtype",
    default=None,
    choices=sorted(bk.DTYPES),
    help="adapter dtype (default: --dtype)",
  )
  run.add_argument(
    "--runtimes",
    default="fast,eager",
    help="comma list of runtimes, each running every method: fast = static "
    "KV caches + CUDA-graph (and, with CUDA, compiled) steps, eager = HF "
    "forwards with HF caches. The first is the headline: its labels are the "
    "plain method names (and its costs the `costs` block); the others get "
    "'@RUNTIME' (e.g. baseline@eager)",
  )
  run.add_argument(
    "--no_compile",
    action="store_true",
    help="fast runtime: capture the steps without torch.compile",
  )
  run.add_argument(
    "--overlap",
    default="auto",
    choices=("auto", "thread", "sequential"),
    help="prefill overlap: auto = a thread on the 2nd GPU or a 2nd CUDA "
    "stream (sequential on CPU); thread = a thread on any device",
  )
  run.add_argument(
    "--overlap_every",
    type=int,
    default=4,
    metavar="N",
    help="measure a concurrent prefill's saving (each side run again "
    "alone, untimed) on measured samples 0, N, 2N, ...; 1 = every sample",
  )


def _fairness_args(p: argparse.ArgumentParser) -> None:
  """The 'fairness' flags: run order, the A/A control, shape warm-up."""
  fair = p.add_argument_group("fairness")
  fair.add_argument(
    "--order",
    default="balanced",
    choices=ORDERS,
    help="the runs of a sample: balanced = the orders of a Williams design "
    "in turn from a seeded start (recorded): each (method, runtime) takes "
    "every position, and follows every other one, equally often, so none "
    "pays a first-run cost or a neighbour's after-effect systematically; "
    "rotate = each moves one place per sample (positions balanced, "
    "neighbours fixed); fixed = the listed order every time",
  )
  fair.add_argument(
    "--no_aa_control",
    action="store_true",
    help="do not run the baseline twice per sample (the A/A control that "
    f"marks the run unreliable when baseline / {AA_LABEL} leaves "
    f"[{AA_RANGE[0]}, {AA_RANGE[1]}] or its CI excludes 1)",
  )
  fair.add_argument(
    "--no_shape_warmup",
    action="store_true",
    help="time a sample of a new input shape without first running every "
    "method on it untimed (compilation, graph capture land in the timings)",
  )


def _output_args(p: argparse.ArgumentParser) -> None:
  """The 'output' flags: directory, statistics, time budget, profile."""
  out = p.add_argument_group("output")
  out.add_argument("--out", required=True, help="output directory")
  out.add_argument(
    "--bootstrap", type=int, default=2000, help="bootstrap resamples for CIs"
  )
  out.add_argument(
    "--tie_margin",
    type=float,
    default=0.1,
    help="logit margin below which a mismatch counts as a near-tie flip",
  )
  out.add_argument(
    "--seed", type=int, default=0, help="random models/prompts, bootstrap"
  )
  out.add_argument(
    "--time_budget_s",
    type=float,
    default=None,
    help="start no new sample after this many seconds (results are still "
    "written for the samples done)",
  )
  out.add_argument(
    "--profile",
    action="store_true",
    help="after the run, trace one sample of baseline and of each decode "
    "method on the first runtime with torch.profiler: per-kernel table in "
    "profile.txt",
  )
  out.add_argument("--no_plots", action="store_true")
  out.add_argument("--no_progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
  """The command-line interface."""
  p = argparse.ArgumentParser(
    prog="benchmark_sd.py",
    description=__doc__,
    epilog="methods:\n" + method_help() + "\n\nexit status: 0 ok; 1 some "
    "method's tokens differ from the baseline's other than by a near-tie "
    "flip; 2 bad arguments or inputs",
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  _model_args(p)
  _decoding_args(p)
  _fairness_args(p)
  _output_args(p)
  return p


def settings(args: argparse.Namespace) -> BenchSettings:
  """The library's settings from the parsed command line."""
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  return BenchSettings(
    out=args.out,
    target=args.target,
    draft=args.draft,
    samples=args.samples,
    random_models=args.random_models,
    prompt_len=args.prompt_len,
    random_same_drafter=args.random_same_drafter,
    num_samples=args.num_samples,
    media_root=args.media_root,
    adapters=parse_adapters(args.adapter),
    trust_pickle=args.trust_pickle,
    methods=methods,
    gamma=args.gamma,
    prefill_gamma=args.prefill_gamma,
    options=method_options(args),
    max_new_tokens=args.max_new_tokens,
    ignore_eos=args.ignore_eos,
    warmup=args.warmup,
    device=args.device,
    draft_device=args.draft_device,
    dtype=args.dtype,
    adapter_dtype=args.adapter_dtype,
    runtimes=[r.strip() for r in args.runtimes.split(",") if r.strip()],
    compile=not args.no_compile,
    overlap=args.overlap,
    overlap_every=args.overlap_every,
    bootstrap=args.bootstrap,
    tie_margin=args.tie_margin,
    seed=args.seed,
    time_budget_s=args.time_budget_s,
    profile=args.profile,
    plots=not args.no_plots,
    progress=not args.no_progress,
    order=args.order,
    aa_control=not args.no_aa_control,
    shape_warmup=not args.no_shape_warmup,
  )


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point; returns the process exit status."""
  args = build_parser().parse_args(argv)
  try:
    results = run_benchmark(settings(args))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(summary_text(results))
  return 1 if results["mismatches_not_near_tie"] else 0


if __name__ == "__main__":
  sys.exit(main())
