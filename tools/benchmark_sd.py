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

Methods (see tools/lib/sd_engine.py for the exact algorithms):
  baseline                 target greedy decoding with its KV cache
  draft_tokens             the drafter's own greedy tokens, verified
  prefill_hiding:A         (A in l1..l4) drafter prefill + K drafts run while
                           the target prefills (2nd GPU or 2nd CUDA stream);
                           verified once, then plain decoding
  decode:A                 (A in l5, b1, l5f) gamma adapter drafts per
                           iteration with the adapter's KV cache
  two_phase:A+B            prefill_hiding:A, then decode:B
  tree:A                   (A in l5, b1, l5f) an EAGLE-2 draft tree per
                           iteration (--tree_depth, --tree_topk, --tree_nodes)
                           verified in one target forward with a tree mask
  two_phase_tree:A+B       prefill_hiding:A, then tree:B

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
import dataclasses
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from egpt_align.data.format import write_json_atomic
from egpt_align.models import ADAPTERS, get_spec
from tools.lib import backends as bk
from tools.lib import bridge, media
from tools.lib import sd_engine as sd
from tools.lib import twins as ta
from tools.lib.random_models import (
  SHAPES,
  TokenPromptBackend,
  random_llama,
  random_prompts,
)
from tools.lib.sd_results import (
  aggregate,
  costs_block,
  fmt,
  label,
  speedups_vs,
  write_plots,
  write_report,
)


def load_adapter(
  name: str,
  value: str,
  *,
  hidden_dim: int,
  device: torch.device,
  dtype: torch.dtype,
  seed: int = 0,
  trust_pickle: bool = False,
) -> tuple[sd.Adapter, dict]:
  """Builds adapter `name` from 'random[:KIND]', 'identity' or a file.

  Files: PATH.pt / PATH.safetensors (+ PATH.config.json) written by
  tools/export_to_torch.py, or a reference checkpoint; the kind comes from
  the file (a reference L5_EAGLE file is read as `name` when that is b1).
  """
  info: dict[str, Any] = {"source": value}
  if value == "identity":
    # L4 with alpha = 0 returns its input exactly (h + 0 * (out - h)): with
    # a drafter equal to the target every prefill draft is accepted.
    if name != "l4":
      raise ValueError(
        f"--adapter {name}=identity: only l4 can be an exact identity"
      )
    kind = "l4"
    module = ta.build_torch_adapter(kind, hidden_dim=hidden_dim, alpha_init=0.0)
    info["config"] = {"hidden_dim": hidden_dim, "alpha_init": 0.0}
  elif value == "random" or value.startswith("random:"):
    kind = value.split(":", 1)[1] if ":" in value else name
    if kind not in ADAPTERS:
      raise ValueError(
        f"--adapter {name}={value}: cannot tell the adapter kind; name it "
        f"one of {tuple(ADAPTERS)} or write {name}=random:KIND"
      )
    torch.manual_seed(seed)
    module = ta.build_torch_adapter(kind, hidden_dim=hidden_dim)
    info["config"] = {"hidden_dim": hidden_dim}
  else:
    try:
      ckpt = bridge.load_checkpoint(value, trust_pickle=trust_pickle)
      override = None
      if not ckpt.get("egpt_align_adapter") and name in ADAPTERS:
        override = name  # a reference L5_EAGLE file may be L5 or B1
      kind = bridge.adapter_name(ckpt, override)
      if name in ADAPTERS and kind != name:
        raise ValueError(
          f"the checkpoint holds a {kind} adapter, not the {name} that "
          f"--adapter {name}= asks for"
        )
      state = dict(ckpt["model_state_dict"])
      cfg = bridge.resolve_config(kind, state, bridge.model_config(kind, ckpt))
      module = bridge.load_torch_adapter(kind, state, **cfg)
    except (ValueError, KeyError) as e:
      raise ValueError(f"--adapter {name}={value}: {e}") from e
    info["config"] = cfg
  width = getattr(module, "hidden_dim", None)
  if width is None and hasattr(module, "config"):
    width = module.config.hidden_dim
  if width is not None and int(width) != hidden_dim:
    raise ValueError(
      f"--adapter {name}={value}: hidden_dim {width} != the models' "
      f"{hidden_dim}"
    )
  module = module.to(device=device, dtype=dtype).eval()
  info.update(kind=kind, params=sum(p.numel() for p in module.parameters()))
  return sd.Adapter(name, kind, module, device, dtype), info


def parse_adapters(items: Sequence[str]) -> dict[str, str]:
  """['l4=FILE', 'b1=random'] -> {'l4': 'FILE', 'b1': 'random'}."""
  out = {}
  for item in items:
    name, sep, value = item.partition("=")
    if not sep or not name or not value:
      raise ValueError(f"--adapter {item!r}: expected NAME=FILE or NAME=random")
    if name in out:
      raise ValueError(f"--adapter {name!r} given twice")
    out[name] = value
  return out


AUTO_K_MAX = 32


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

  def update(self, result: sd.SampleResult) -> None:
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
# CLI.


def build_parser() -> argparse.ArgumentParser:
  """The command-line interface."""
  p = argparse.ArgumentParser(
    prog="benchmark_sd.py",
    description=__doc__,
    epilog="exit status: 0 ok; 1 some method's tokens differ from the "
    "baseline's other than by a near-tie flip; 2 bad arguments or inputs",
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
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
    help="measured samples (default: all of --samples; 20 random)",
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
  run = p.add_argument_group("decoding")
  run.add_argument(
    "--methods",
    default="baseline,draft_tokens",
    help="comma list: baseline, draft_tokens, prefill_hiding:A, decode:A, "
    "two_phase:A+B, tree:A, two_phase_tree:A+B (baseline always runs)",
  )
  run.add_argument(
    "--tree_depth", type=int, default=6, help="tree methods: draft depth"
  )
  run.add_argument(
    "--tree_topk",
    type=int,
    default=10,
    help="tree methods: children per expanded node, nodes expanded per depth",
  )
  run.add_argument(
    "--tree_nodes",
    type=int,
    default=60,
    help="tree methods: tokens per verification, the root included",
  )
  run.add_argument("--gamma", type=int, default=5, help="drafts per iteration")
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
  return p


def profile_methods(path, models, methods, t_in, d_in, cfg) -> None:
  """Per-kernel device time of one sample per method (torch.profiler)."""
  from torch.profiler import ProfilerActivity, profile

  acts = [ProfilerActivity.CPU]
  if torch.cuda.is_available():
    acts.append(ProfilerActivity.CUDA)
  with open(path, "w") as f:
    for m in methods:
      with profile(activities=acts) as prof:
        r = sd.run_method(m, models, t_in, d_in, cfg)
      key = "self_cuda_time_total" if len(acts) > 1 else "self_cpu_time_total"
      f.write(
        f"## {m} ({cfg.runtime} runtime): {len(r.tokens)} tokens, "
        f"{r.iterations} iterations, decode {r.decode_ms:.2f} ms\n"
      )
      f.write(prof.key_averages().table(sort_by=key, row_limit=40))
      f.write("\n\n")


def _git_commit() -> str | None:
  try:
    return (
      subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=os.path.dirname(os.path.abspath(__file__)),
        capture_output=True,
        text=True,
        timeout=5,
      ).stdout.strip()
      or None
    )
  except (OSError, subprocess.SubprocessError):
    return None


def _environment(device: torch.device) -> dict:
  import transformers

  env = {
    "python": platform.python_version(),
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "git_commit": _git_commit(),
    "device": str(device),
  }
  if device.type == "cuda":
    env["device"] = torch.cuda.get_device_name(device)
    env["num_gpus"] = torch.cuda.device_count()
  return env


def _to_device(inputs: dict, device) -> dict:
  return {
    k: v.to(device) if isinstance(v, torch.Tensor) else v
    for k, v in inputs.items()
  }


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point; returns the process exit status."""
  args = build_parser().parse_args(argv)
  try:
    results = run(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  _print_table(results)
  return 1 if results["mismatches_not_near_tie"] else 0


def _print_table(results: dict) -> None:
  runtimes = results["config"]["runtimes"]
  vs = "".join(f" {'vs ' + r:>10s}" for r in runtimes if len(runtimes) > 1)
  print(
    f"\n{'method':32s} {'n':>3s} {'total ms':>9s} {'speedup':>8s}{vs} "
    f"{'alpha':>6s} {'tau':>5s} {'mism':>4s}"
  )
  for m, a in results["aggregate"].items():
    if not a.get("n"):
      print(f"{m:32s}   0  (all samples failed)")
      continue
    cols = "".join(
      f" {a['speedup_vs'][r]['speedup']:10.3f}" for r in a.get("speedup_vs", {})
    )
    print(
      f"{m:32s} {a['n']:3d} {a['mean_total_ms']:9.2f} {a['speedup']:8.3f}"
      f"{cols} {fmt(a.get('alpha'), 3):>6s} {fmt(a.get('tau'), 2):>5s} "
      f"{a['mismatched_samples']:4d}"
    )
  for rt, c in results["costs_by_runtime"].items():
    steps = ", ".join(
      f"{k} {fmt(v, 3)}" for k, v in c["adapter_step_ms"].items()
    )
    loop = ", ".join(
      f"{k} {fmt(v, 3)}"
      for k, v in c["sd_loop_overhead_ms_per_iteration"].items()
    )
    print(
      f"[{rt}] target decode {fmt(c.get('target_decode_ms'), 3)} ms/token, "
      f"verify (gamma+1) {fmt(c['target_verify_ms'].get('gamma+1'), 3)} ms, "
      f"drafter {fmt(c.get('draft_model_decode_ms'), 3)} ms/token, "
      f"adapter steps (ms) {steps or '-'}; loop overhead (ms/iter) {loop}"
    )
  print(f"fast path: {results['fast_path'] or '-'}; wrote {results['out']}")


def run(args: argparse.Namespace) -> dict:
  """Loads everything, runs every method on every sample, writes outputs."""
  from tqdm import tqdm

  if args.gamma < 1 or args.max_new_tokens < 1 or args.warmup < 0:
    raise ValueError("--gamma and --max_new_tokens must be >= 1, --warmup >= 0")
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  methods = ["baseline"] + [m for m in methods if m != "baseline"]
  if len(set(methods)) != len(methods):
    raise ValueError(f"--methods lists a method twice: {args.methods}")
  for m in methods:
    sd.parse_method(m)
  runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
  if not runtimes or len(set(runtimes)) != len(runtimes):
    raise ValueError(
      f"--runtimes: give each runtime once, not {args.runtimes!r}"
    )
  for r in runtimes:
    if r not in sd.RUNTIMES:
      raise ValueError(f"--runtimes: {r!r} is not one of {sd.RUNTIMES}")
  runs = [(label(m, r, runtimes), m, r) for r in runtimes for m in methods]
  labels = [x[0] for x in runs]
  device = bk.torch_device(args.device)
  if device.type == "cuda" and device.index is None:
    device = torch.device("cuda:0")
  if args.draft_device:
    ddev = torch.device(args.draft_device)
  elif device.type == "cuda" and torch.cuda.device_count() > 1:
    ddev = torch.device("cuda:1")
  else:
    ddev = device
  dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
  adtype = bk.torch_dtype(args.adapter_dtype or dtype)
  needs_drafter = any(
    sd.parse_method(m)[0]
    in ("draft_tokens", "prefill_hiding", "two_phase", "two_phase_tree")
    for m in methods
  )
  adapter_values = parse_adapters(args.adapter)

  # ---- models and samples.
  if args.random_models:
    if args.target or args.draft or args.samples:
      raise ValueError("--random_models replaces --target/--draft/--samples")
    shape = SHAPES[args.random_models]
    target = TokenPromptBackend(
      random_llama(shape, seed=args.seed, device=device, dtype=dtype),
      model_id=f"random:{args.random_models}:seed{args.seed}",
    )
    dseed = args.seed if args.random_same_drafter else args.seed + 1
    drafter = TokenPromptBackend(
      random_llama(shape, seed=dseed, device=ddev, dtype=dtype),
      model_id=f"random:{args.random_models}:seed{dseed}",
    )
    n = 20 if args.num_samples is None else args.num_samples
    samples = random_prompts(
      args.warmup + n, args.prompt_len, shape["vocab_size"], args.seed
    )
  else:
    if not args.target or not args.samples:
      raise ValueError("give --target and --samples (or --random_models)")
    samples = media.read_samples(args.samples, args.media_root)
    if args.num_samples is not None:
      samples = samples[: args.warmup + args.num_samples]
    target = bk.load_backend(args.target, device=device, dtype=dtype)
    drafter = None
    if args.draft:
      drafter = bk.load_backend(args.draft, device=ddev, dtype=dtype)
    elif needs_drafter:
      raise ValueError(f"--methods {args.methods} need --draft")
  if len(samples) <= args.warmup:
    raise ValueError(
      f"{len(samples)} samples but --warmup {args.warmup}: nothing to measure"
    )

  adapters, adapter_info = {}, {}
  for i, (name, value) in enumerate(sorted(adapter_values.items())):
    ad, info = load_adapter(
      name,
      value,
      hidden_dim=target.hidden_size,
      device=torch.device("cpu"),
      dtype=adtype,
      seed=args.seed + 100 + i,
      trust_pickle=args.trust_pickle,
    )
    # Prefill adapters run with the drafter (on its GPU, inside the
    # overlapped prefill); decode adapters next to the target.
    ad.device = ddev if get_spec(ad.kind).role == "prefill" else device
    ad.module.to(ad.device)
    info["device"] = str(ad.device)
    adapters[name] = ad
    adapter_info[name] = info
  models = sd.Models(
    target, drafter, adapters, compile_layers=not args.no_compile
  )
  for m in methods:
    sd.check_method(m, models)
  max_pos = [
    getattr(a.module, "max_seq_len", None)
    for a in adapters.values()
    if get_spec(a.kind).role == "decode"
  ]
  need = args.max_new_tokens + args.gamma + 1
  if any(p is not None and need > p for p in max_pos):
    raise ValueError(
      f"--max_new_tokens + --gamma + 1 = {need} exceeds a decode adapter's "
      f"max_seq_len ({min(p for p in max_pos if p)})"
    )
  auto_k = args.prefill_gamma == "auto"
  fixed_k = None
  if args.prefill_gamma is not None and not auto_k:
    try:
      fixed_k = int(args.prefill_gamma)
    except ValueError:
      raise ValueError(
        f"--prefill_gamma must be an int >= 1 or 'auto', not "
        f"{args.prefill_gamma!r}"
      ) from None
  window = PrefillWindow()
  cfg = sd.SDConfig(
    gamma=args.gamma,
    max_new_tokens=args.max_new_tokens,
    prefill_gamma=fixed_k,
    overlap=args.overlap,
    eos_token_ids=() if args.ignore_eos else None,
    tree_depth=args.tree_depth,
    tree_topk=args.tree_topk,
    tree_nodes=args.tree_nodes,
  )

  # ---- run.
  per_sample: dict[str, list[dict]] = {x: [] for x in labels}
  mismatches = []
  bar = tqdm(
    samples, desc="samples", disable=args.no_progress, dynamic_ncols=True
  )
  t_start = time.perf_counter()
  for si, sample in enumerate(bar):
    warm = si < args.warmup
    budget = args.time_budget_s
    over = budget is not None and time.perf_counter() - t_start > budget
    if over and si > args.warmup:
      print(
        f"--time_budget_s {args.time_budget_s} reached: stopping after "
        f"{si - args.warmup} measured samples",
        file=sys.stderr,
      )
      break
    t_in = _to_device(
      target.prompt_inputs(media.role_view(sample, "target")), device
    )
    d_in = None
    if drafter is not None:
      d_in = _to_device(
        drafter.prompt_inputs(media.role_view(sample, "draft")), ddev
      )
    base_tokens: dict[str, list[int]] = {}  # runtime -> baseline tokens
    margins = None
    for lab, m, rt in runs:
      try:
        run_cfg = dataclasses.replace(cfg, runtime=rt)
        if auto_k:
          run_cfg = dataclasses.replace(
            run_cfg, prefill_gamma=window.drafts(args.gamma)
          )
        r = sd.run_method(m, models, t_in, d_in, run_cfg)
        if rt == runtimes[0]:
          window.update(r)
      except sd.SDError as e:
        if m == "baseline":
          raise
        if not warm:
          per_sample[lab].append({"id": sample["id"], "error": str(e)})
        continue
      rec = r.to_json()
      rec["id"] = sample["id"]
      if sd.parse_method(m)[0] in (
        "prefill_hiding",
        "two_phase",
        "two_phase_tree",
      ):
        rec["prefill_gamma"] = run_cfg.k_prefill
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
        diff = sd.first_difference(r.tokens, ref)
        rec["match"] = diff is None
        if diff is not None and not warm:
          if margins is None:
            margins = sd.token_margins(target, t_in, ref)
          margin = margins[diff] if diff < len(margins) else None
          rec["first_difference"] = diff
          rec["near_tie"] = margin is not None and margin < args.tie_margin
          mismatches.append(
            {
              "method": lab,
              "id": sample["id"],
              "index": diff,
              "margin": margin,
              "near_tie": rec["near_tie"],
            }
          )
      if not warm:
        per_sample[lab].append(rec)
  bar.close()

  base = per_sample["baseline"]
  bases = {r: per_sample[label("baseline", r, runtimes)] for r in runtimes}
  aggregate_ = {}
  for lab, _, rt in runs:
    a = aggregate(
      lab, per_sample[lab], bases[rt], n_boot=args.bootstrap, seed=args.seed
    )
    if a.get("n") and len(runtimes) > 1:
      a["speedup_vs"] = speedups_vs(per_sample[lab], bases, args)
    aggregate_[lab] = a
  costs = {
    r: costs_block(
      {m: per_sample[label(m, r, runtimes)] for m in methods},
      methods,
      args.gamma,
    )
    for r in runtimes
  }
  os.makedirs(args.out, exist_ok=True)
  results = {
    "format": "egpt_align.benchmark_sd",
    "version": 1,
    "config": {
      "target": args.target or f"random:{args.random_models}",
      "draft": args.draft or (f"random:{args.random_models}"),
      "samples": args.samples,
      "methods": methods,
      "runtimes": runtimes,
      "compile": not args.no_compile,
      "gamma": args.gamma,
      "prefill_gamma": "auto" if auto_k else cfg.k_prefill,
      "tree": {
        "depth": cfg.tree_depth,
        "topk": cfg.tree_topk,
        "nodes": cfg.tree_nodes,
      },
      "max_new_tokens": args.max_new_tokens,
      "ignore_eos": args.ignore_eos,
      "warmup": args.warmup,
      "dtype": dtype,
      "adapter_dtype": str(adtype).replace("torch.", ""),
      "device": str(device),
      "draft_device": str(ddev),
      "overlap": args.overlap,
      "prompt_len": args.prompt_len if args.random_models else None,
      "bootstrap": args.bootstrap,
      "tie_margin": args.tie_margin,
      "seed": args.seed,
    },
    "environment": _environment(device),
    "provenance": {
      "target": target.provenance(),
      "draft": None if drafter is None else drafter.provenance(),
      "adapters": adapter_info,
    },
    "num_measured": len(base),
    # What the fast runtime ran per model: 'static' or why it fell back.
    "fast_path": dict(models.fast_notes),
    "aggregate": aggregate_,
    "costs": costs[runtimes[0]],
    "costs_by_runtime": costs,
    "mismatches": mismatches,
    "mismatches_not_near_tie": int(sum(not x["near_tie"] for x in mismatches)),
    "per_sample": per_sample,
    "out": args.out,
  }
  if args.profile:
    profile_methods(
      os.path.join(args.out, "profile.txt"),
      models,
      [m for m in methods if sd.parse_method(m)[0] in ("baseline", "decode")],
      t_in,
      d_in,
      dataclasses.replace(cfg, runtime=runtimes[0]),
    )
  write_json_atomic(os.path.join(args.out, "results.json"), results)
  write_report(os.path.join(args.out, "report.md"), results)
  if not args.no_plots:
    write_plots(args.out, results)
  return results


if __name__ == "__main__":
  sys.exit(main())
