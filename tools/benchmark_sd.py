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

import numpy as np
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
# Aggregation.


def bootstrap_ci(
  stat, arrays: Sequence[np.ndarray], n: int, seed: int, level: float = 0.95
) -> list[float] | None:
  """Percentile CI of stat(*arrays) over paired resamples of the samples."""
  size = len(arrays[0])
  if size < 2 or n < 1:
    return None
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, size, size=(n, size))
  vals = np.array([stat(*(a[i] for a in arrays)) for i in idx], np.float64)
  vals = vals[np.isfinite(vals)]
  if not len(vals):
    return None
  lo, hi = np.percentile(vals, [50 * (1 - level), 50 * (1 + level)])
  return [float(lo), float(hi)]


def _ratio(a, b):
  return float(np.mean(a) / np.mean(b)) if np.mean(b) > 0 else float("nan")


def _phase_ms(rec: dict, prefix: str) -> float:
  return sum(
    v["ms"]
    for k, v in rec["phases"].items()
    if k.startswith(prefix) and not k.startswith("prefill_")
  )


def breakdown(rec: dict) -> dict[str, float]:
  """Per-sample time split: prefill wall, decode-loop parts, overhead (ms)."""
  target = _phase_ms(rec, "target_decode") + _phase_ms(rec, "target_verify")
  drafter = _phase_ms(rec, "draft_decode") + _phase_ms(rec, "draft_catchup")
  adapter = _phase_ms(rec, "adapter:")
  return {
    "prefill": rec["prefill_ms"],
    "target_forward": target,
    "drafter": drafter,
    "adapter": adapter,
    "overhead": rec["decode_ms"] - target - drafter - adapter,
  }


def aggregate(
  method: str,
  recs: list[dict],
  base: list[dict],
  *,
  n_boot: int,
  seed: int,
) -> dict:
  """Aggregates of one method over the measured samples it completed."""
  ok = [(r, b) for r, b in zip(recs, base, strict=True) if "error" not in r]
  out: dict[str, Any] = {"n": len(ok), "failed": len(recs) - len(ok)}
  if not ok:
    return out
  rs, bs = [r for r, _ in ok], [b for _, b in ok]
  tot = np.array([r["total_ms"] for r in rs])
  btot = np.array([b["total_ms"] for b in bs])
  dec = np.array([r["decode_ms"] for r in rs])
  bdec = np.array([b["decode_ms"] for b in bs])
  ntok = np.array([len(r["tokens"]) for r in rs])
  out.update(
    mean_prefill_ms=float(np.mean([r["prefill_ms"] for r in rs])),
    mean_decode_ms=float(np.mean(dec)),
    mean_total_ms=float(np.mean(tot)),
    mean_tokens=float(np.mean(ntok)),
    ms_per_token=float(np.sum(tot) / max(np.sum(ntok), 1)),
    # Ratio of mean totals (never the mean of per-sample ratios, D5).
    speedup=_ratio(btot, tot),
    speedup_ci95=bootstrap_ci(_ratio, [btot, tot], n_boot, seed),
    decode_speedup=_ratio(bdec, dec),
    decode_speedup_ci95=bootstrap_ci(_ratio, [bdec, dec], n_boot, seed),
  )
  drafted = np.array([r["drafted"] for r in rs], np.float64)
  accepted = np.array([r["accepted"] for r in rs], np.float64)
  iters = np.array([r["verify_iterations"] for r in rs], np.float64)
  if drafted.sum() > 0:
    out.update(
      drafted=int(drafted.sum()),
      accepted=int(accepted.sum()),
      verify_iterations=int(iters.sum()),
      alpha=float(accepted.sum() / drafted.sum()),
      alpha_ci95=bootstrap_ci(
        lambda a, d: a.sum() / max(d.sum(), 1),
        [accepted, drafted],
        n_boot,
        seed,
      ),
      # Tokens per verification: accepted drafts + the target's own token.
      tau=float((accepted.sum() + iters.sum()) / iters.sum()),
      tau_ci95=bootstrap_ci(
        lambda a, i: (a.sum() + i.sum()) / max(i.sum(), 1),
        [accepted, iters],
        n_boot,
        seed,
      ),
    )
    for phase in ("prefill", "decode"):
      it = [x for r in rs for x in r["per_iteration"] if x[0] == phase]
      if it:
        d = sum(x[1] for x in it)
        out[f"alpha_{phase}"] = sum(x[2] for x in it) / d
        out[f"drafted_{phase}"] = d
  parts = [breakdown(r) for r in rs]
  out["breakdown_ms"] = {
    k: float(np.mean([p[k] for p in parts])) for k in parts[0]
  }
  names = sorted({k for r in rs for k in r["phases"]})
  out["phases_ms"] = {
    k: float(np.mean([r["phases"].get(k, {}).get("ms", 0.0) for r in rs]))
    for k in names
  }
  ov = [r["overlap"] for r in rs if r.get("overlap")]
  if ov:
    out["prefill_overlap"] = {
      k: float(np.mean([o[k] for o in ov]))
      for k in (
        "target_alone_ms",
        "drafter_alone_ms",
        "wall_ms",
        "overlap_ms",
        "target_ms",
        "drafter_ms",
      )
    }
    out["prefill_overlap"]["concurrent"] = bool(ov[0]["concurrent"])
  fm = [
    r["first_draft_match"] for r in rs if r["first_draft_match"] is not None
  ]
  if fm:
    out["prefill_first_token_agree"] = float(np.mean(fm))
  out["mismatched_samples"] = int(sum(not r["match"] for r in rs))
  out["near_tie_flips"] = int(sum(bool(r.get("near_tie")) for r in rs))
  return out


def label(method: str, runtime: str, runtimes: Sequence[str]) -> str:
  """The result key of `method` on `runtime`: plain for the first runtime."""
  return method if runtime == runtimes[0] else f"{method}@{runtime}"


def speedups_vs(
  recs: list[dict], bases: dict[str, list[dict]], args
) -> dict[str, dict]:
  """Speedup (ratio of mean totals, CI) against each runtime's baseline."""
  out = {}
  for rt, base in bases.items():
    pairs = [
      (r["total_ms"], b["total_ms"])
      for r, b in zip(recs, base, strict=True)
      if "error" not in r
    ]
    tot = np.array([p[0] for p in pairs])
    btot = np.array([p[1] for p in pairs])
    out[rt] = {
      "speedup": _ratio(btot, tot),
      "speedup_ci95": bootstrap_ci(
        _ratio, [btot, tot], args.bootstrap, args.seed
      ),
    }
  return out


def _span_rate(records, name_fn, per: str = "calls") -> float | None:
  ms = cnt = 0.0
  for rec in records:
    for k, v in rec["phases"].items():
      if name_fn(k):
        ms += v["ms"]
        cnt += v[per]
  return ms / cnt if cnt else None


def costs_block(per_sample: dict, methods: list[str], gamma: int) -> dict:
  """Measured per-phase costs; keys read by egpt_align (speedup.py)."""
  ok = {m: [r for r in per_sample[m] if "error" not in r] for m in methods}
  base = _span_rate(ok.get("baseline", []), lambda k: k == "target_decode")
  verify_by_len: dict[int, list[float]] = {}
  for m in methods:
    for rec in ok[m]:
      for k, v in rec["phases"].items():
        if k.startswith("target_verify["):
          length = int(k[len("target_verify[") : -1])
          acc = verify_by_len.setdefault(length, [0.0, 0])
          acc[0] += v["ms"]
          acc[1] += v["calls"]
  verify = {L: a[0] / a[1] for L, a in sorted(verify_by_len.items()) if a[1]}
  draft_model = _span_rate(
    [r for m in methods for r in ok[m]],
    lambda k: k == "draft_decode",
    per="units",
  )
  adapter_step: dict[str, float] = {}
  for m in methods:
    names = {
      k.split(":", 1)[1]
      for r in ok[m]
      for k in r["phases"]
      if k.startswith("adapter:")
    }
    for a in names:
      adapter_step[a] = _span_rate(
        [r for mm in methods for r in ok[mm]],
        lambda k, a=a: k == f"adapter:{a}",
      )
  prefill_adapter: dict[str, float] = {}
  for m in methods:
    for r in ok[m]:
      for k in r["phases"]:
        if k.startswith("prefill_adapter:"):
          a = k.split(":", 1)[1]
          prefill_adapter[a] = _span_rate(
            [r for mm in methods for r in ok[mm]], lambda n, k=k: n == k
          )
  # Drafting cost per drafted token in the decode loop, per method.
  per_token: dict[str, float] = {}
  for m in methods:
    drafted = sum(r["drafted"] for r in ok[m])
    drafted -= sum(
      x[1] for r in ok[m] for x in r["per_iteration"] if x[0] == "prefill"
    )
    if drafted <= 0:
      continue
    ms = sum(
      v["ms"]
      for r in ok[m]
      for k, v in r["phases"].items()
      if k.startswith(("draft_decode", "draft_catchup", "adapter:"))
    )
    per_token[m] = ms / drafted
  prefill_overlap = {}
  for m in methods:
    ov = [r["overlap"] for r in ok[m] if r.get("overlap")]
    if ov:
      prefill_overlap[m] = float(np.mean([o["overlap_ms"] for o in ov]))
  # Wall time of the decode loop not covered by any timed model call,
  # per loop iteration (host work, syncs, launch gaps).
  overhead = {}
  for m in methods:
    iters = sum(r["iterations"] for r in ok[m])
    if iters:
      overhead[m] = sum(breakdown(r)["overhead"] for r in ok[m]) / iters
  out: dict[str, Any] = {
    "gamma": gamma,
    "target_prefill_ms": _span_rate(
      ok.get("baseline", []), lambda k: k == "target_prefill"
    ),
    "target_decode_ms": base,
    "target_verify_ms": {
      "gamma+1": verify.get(gamma + 1),
      **{f"{L}": t for L, t in verify.items()},
    },
    "draft_model_decode_ms": draft_model,
    "draft_model_prefill_ms": _span_rate(
      [r for m in methods for r in ok[m]], lambda k: k == "draft_prefill"
    ),
    "adapter_step_ms": adapter_step,
    # One call on prefill_gamma + 1 positions, LM head + argmax included.
    "prefill_adapter_call_ms": prefill_adapter,
    "prefill_overlap_ms": prefill_overlap,
    "sd_loop_overhead_ms_per_iteration": overhead,
    "draft_ms_per_token_by_method": per_token,
  }
  if base:
    out["relative"] = {
      "c": {m: t / base for m, t in per_token.items()},
      "v": (verify[gamma + 1] / base) if gamma + 1 in verify else None,
    }
    # egpt_align/speedup.py reads these three keys.
    dpt = {}
    if "draft_tokens" in per_token:
      dpt["drafter"] = per_token["draft_tokens"]
    for m, t in per_token.items():
      kind, names = sd.parse_method(m)
      if kind == "decode":
        dpt[names[0]] = t
    out["draft_ms_per_token"] = dpt
    out["verify_ms"] = {str(L - 1): t for L, t in verify.items()}
  return out


# ----------------------------------------------------------------------------
# Report and plots.


def _fmt(x, nd=2):
  if x is None:
    return "–"
  if isinstance(x, float):
    return f"{x:.{nd}f}"
  return str(x)


def _ci(v, ci, nd=3):
  if v is None:
    return "–"
  if not ci:
    return f"{v:.{nd}f}"
  return f"{v:.{nd}f} [{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"


def _cost_lines(costs: dict) -> list[str]:
  lines = [
    f"- target decode: {_fmt(costs.get('target_decode_ms'), 3)} ms/token",
    "- target verify: "
    + ", ".join(
      f"{k} positions {_fmt(v, 3)} ms"
      for k, v in costs["target_verify_ms"].items()
      if k != "gamma+1"
    ),
    f"- drafter decode: {_fmt(costs.get('draft_model_decode_ms'), 3)} ms/token",
    "- SD-loop overhead beyond the model calls (ms per loop iteration): "
    + ", ".join(
      f"{m} {_fmt(v, 3)}"
      for m, v in costs["sd_loop_overhead_ms_per_iteration"].items()
    ),
    "- adapter step: "
    + ", ".join(
      f"{k} {_fmt(v, 3)} ms" for k, v in costs["adapter_step_ms"].items()
    ),
  ]
  rel = costs.get("relative")
  if rel:
    lines.append(
      f"- relative to one target decode step: v = {_fmt(rel['v'], 3)}, c = "
      + ", ".join(f"{m} {_fmt(c, 3)}" for m, c in rel["c"].items())
    )
  return lines


def write_report(path: str, results: dict) -> None:
  """report.md: settings, per-method table, correctness, costs."""
  cfg, agg, costs = results["config"], results["aggregate"], results["costs"]
  lines = [
    "# Speculative decoding benchmark",
    "",
    f"- device: {results['environment'].get('device')}; dtype "
    f"{cfg['dtype']}; gamma {cfg['gamma']}; prefill drafts "
    f"{cfg['prefill_gamma']}; max_new_tokens {cfg['max_new_tokens']}",
    f"- samples: {results['num_measured']} measured after "
    f"{cfg['warmup']} warm-up; target `{cfg['target']}`, drafter "
    f"`{cfg['draft']}`",
    "- speedup = mean(baseline total) / mean(method total) over the same "
    "samples (ratio of mean totals), 95% paired bootstrap CI; alpha = "
    "accepted / drafted over all verifications; tau = tokens per "
    "verification (accepted drafts + the target's own token)",
    "",
    "| method | n | prefill ms | decode ms | total ms | speedup | decode "
    "speedup | alpha | tau | mismatches (near-tie) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for m, a in agg.items():
    if not a.get("n"):
      lines.append(f"| {m} | 0 | failed: {a.get('failed')} |||||||| |")
      continue
    lines.append(
      f"| {m} | {a['n']} | {_fmt(a['mean_prefill_ms'], 1)} | "
      f"{_fmt(a['mean_decode_ms'], 1)} | {_fmt(a['mean_total_ms'], 1)} | "
      f"{_ci(a['speedup'], a['speedup_ci95'])} | "
      f"{_ci(a['decode_speedup'], a['decode_speedup_ci95'])} | "
      f"{_ci(a.get('alpha'), a.get('alpha_ci95'))} | "
      f"{_ci(a.get('tau'), a.get('tau_ci95'), 2)} | "
      f"{a['mismatched_samples']} ({a['near_tie_flips']}) |"
    )
  lines += [
    "",
    "## Where the time goes (mean ms per sample)",
    "",
    "| method | prefill (wall) | target forwards | drafter | adapter | "
    "SD-loop overhead |",
    "|---|---|---|---|---|---|",
  ]
  for m, a in agg.items():
    b = a.get("breakdown_ms")
    if b:
      lines.append(
        f"| {m} | {b['prefill']:.2f} | {b['target_forward']:.2f} | "
        f"{b['drafter']:.2f} | {b['adapter']:.2f} | {b['overhead']:.2f} |"
      )
  ov = {
    m: a["prefill_overlap"] for m, a in agg.items() if "prefill_overlap" in a
  }
  if ov:
    lines += [
      "",
      "## Measured prefill overlap (mean ms)",
      "",
      "Each side is also timed alone after the run; saved = target alone + "
      "drafter alone - concurrent wall (negative: concurrency cost more "
      "than it hid). 'in region' = each side's time while running "
      "concurrently, contention included.",
      "",
      "| method | target alone | drafter alone | concurrent wall | saved | "
      "target in region | drafter in region | concurrent |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for m, o in ov.items():
      lines.append(
        f"| {m} | {o['target_alone_ms']:.2f} | {o['drafter_alone_ms']:.2f} | "
        f"{o['wall_ms']:.2f} | {o['overlap_ms']:.2f} | {o['target_ms']:.2f} "
        f"| {o['drafter_ms']:.2f} | {o['concurrent']} |"
      )
  runtimes = cfg.get("runtimes") or ["eager"]
  if len(runtimes) > 1:
    lines += [
      "",
      "## Speedup against each runtime's baseline",
      "",
      "Ratio of mean totals against the `baseline` of each runtime "
      f"({', '.join(runtimes)}; fast path per model: "
      f"{results.get('fast_path') or '-'}).",
      "",
      "| method | " + " | ".join(f"vs {r} baseline" for r in runtimes) + " |",
      "|---|" + "---|" * len(runtimes),
    ]
    for m, a in agg.items():
      vs = a.get("speedup_vs")
      if vs:
        lines.append(
          f"| {m} | "
          + " | ".join(
            _ci(vs[r]["speedup"], vs[r]["speedup_ci95"]) for r in runtimes
          )
          + " |"
        )
  by_rt = results.get("costs_by_runtime") or {runtimes[0]: costs}
  for rt, c in by_rt.items():
    lines += ["", f"## Measured costs ({rt} runtime)", ""]
    lines += _cost_lines(c)
  bad = results.get("mismatches", [])
  lines += ["", "## Correctness", ""]
  if not bad:
    lines.append("Every method's tokens equal the baseline's on every sample.")
  else:
    lines.append(
      f"{len(bad)} (method, sample) pairs differ from the baseline; "
      f"near-tie = baseline top-2 logit margin < {cfg['tie_margin']} at the "
      "first differing token:"
    )
    lines.append("")
    for x in bad[:50]:
      lines.append(
        f"- {x['method']} / {x['id']}: first difference at token "
        f"{x['index']}, margin {_fmt(x['margin'], 4)}"
        + (" (near-tie)" if x["near_tie"] else " (NOT a near-tie)")
      )
  lines += [
    "",
    "Plots: speedup.png, breakdown.png, acceptance.png.",
    "",
  ]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def write_plots(out_dir: str, results: dict) -> list[str]:
  """speedup.png, breakdown.png, acceptance.png."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  agg = {m: a for m, a in results["aggregate"].items() if a.get("n")}
  methods = [m for m in agg if m != "baseline"]
  paths = []

  fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(methods) + 2), 3.5))
  if methods:
    vals = [agg[m]["speedup"] for m in methods]
    err = np.array(
      [
        [
          v - (agg[m]["speedup_ci95"] or [v, v])[0],
          (agg[m]["speedup_ci95"] or [v, v])[1] - v,
        ]
        for m, v in zip(methods, vals, strict=True)
      ]
    ).T
    ax.bar(range(len(methods)), vals, yerr=err, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
  ax.axhline(1.0, color="k", lw=1, ls="--")
  ax.set_ylabel("speedup (ratio of mean totals)")
  ax.set_title("End-to-end speedup, 95% bootstrap CI")
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "speedup.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

  names = list(agg)
  parts = ["prefill", "target_forward", "drafter", "adapter", "overhead"]
  fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 3.8))
  bottom = np.zeros(len(names))
  for p in parts:
    v = np.array([max(agg[m]["breakdown_ms"][p], 0.0) for m in names])
    ax.bar(range(len(names)), v, bottom=bottom, label=p)
    bottom += v
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
  ax.set_ylabel("mean ms per sample")
  ax.set_title("Time per phase")
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "breakdown.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

  sdm = [m for m in methods if "alpha" in agg[m]]
  fig, axes = plt.subplots(1, 2, figsize=(max(6, 2 * len(sdm) + 3), 3.5))
  for ax, key, title in (
    (axes[0], "alpha", "acceptance alpha (accepted / drafted)"),
    (axes[1], "tau", "tokens per verification tau"),
  ):
    if sdm:
      vals = [agg[m][key] for m in sdm]
      err = np.array(
        [
          [
            v - (agg[m][f"{key}_ci95"] or [v, v])[0],
            (agg[m][f"{key}_ci95"] or [v, v])[1] - v,
          ]
          for m, v in zip(sdm, vals, strict=True)
        ]
      ).T
      ax.bar(range(len(sdm)), vals, yerr=err, capsize=4, color="tab:green")
      ax.set_xticks(range(len(sdm)), sdm, rotation=30, ha="right")
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "acceptance.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  return paths


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
    "two_phase:A+B (baseline always runs)",
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
      f"{cols} {_fmt(a.get('alpha'), 3):>6s} {_fmt(a.get('tau'), 2):>5s} "
      f"{a['mismatched_samples']:4d}"
    )
  for rt, c in results["costs_by_runtime"].items():
    steps = ", ".join(
      f"{k} {_fmt(v, 3)}" for k, v in c["adapter_step_ms"].items()
    )
    loop = ", ".join(
      f"{k} {_fmt(v, 3)}"
      for k, v in c["sd_loop_overhead_ms_per_iteration"].items()
    )
    print(
      f"[{rt}] target decode {_fmt(c.get('target_decode_ms'), 3)} ms/token, "
      f"verify (gamma+1) {_fmt(c['target_verify_ms'].get('gamma+1'), 3)} ms, "
      f"drafter {_fmt(c.get('draft_model_decode_ms'), 3)} ms/token, "
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
  device = torch.device(
    args.device or ("cuda" if torch.cuda.is_available() else "cpu")
  )
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
    sd.parse_method(m)[0] in ("draft_tokens", "prefill_hiding", "two_phase")
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
      if sd.parse_method(m)[0] in ("prefill_hiding", "two_phase"):
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
