"""The decode-phase speedup projected for a 7B pair (issue 31), not measured.

The scenes pair's costs are not the real pair's, so its measured speedups
do not transfer; its acceptance (tau) is what the study measures. The
projection combines the tau measured live here with the costs measured
live on the 7B-shaped random pair (tools/benchmark_sd.py --random_models
vicuna7b, fast runtime, the same gamma and tree flags):

  projected decode-phase speedup = tau / (drafting + verification),

both per decode-phase verification in target decode steps of the 7B pair
(drafting = drafts per verification x cost per draft; verification = a
chain's gamma + 1 tokens or a tree's node budget under the tree mask). A
study method maps to the 7B run's method of the same kind and adapter kind
(`decode:b1_ttt` -> `decode:b1`). results.json keeps it apart from every
measured speedup (`projection_7b`).
"""

from __future__ import annotations

import json
import os

from tools.lib.sd_methods import all_options, option_flags, recorded_options
from tools.lib.sd_results import verify_cost
from tools.study import layout
from tools.study.verdicts import num

COMMAND = (
  "python -m tools.benchmark_sd --random_models vicuna7b --prompt_len 600 "
  "--max_new_tokens 64 --ignore_eos --num_samples 20 --gamma {gamma} "
  "{options} --methods "
  "baseline,decode:b1,tree:b1,decode:l5f,tree:l5f --adapter b1=random "
  "--adapter l5f=random --runtimes fast --device cuda --out OUT"
)


PROJECTED_KINDS = ("decode", "tree")


def _options(options: dict, missing: str | None = None) -> dict:
  """The projected kinds' options (the tree flags) in `options`; one it
  lacks reads `missing` (default: its placeholder, NAME)."""
  return {
    o.name: options.get(o.name, missing or o.name.upper())
    for o in all_options(PROJECTED_KINDS)
  }


def command(data: dict) -> str:
  """The 7B run that fits this study (its gamma and tree flags)."""
  live = (data.get("live") or {}).get("gpus1") or {}
  flags = option_flags(_options(live.get("options") or {}))
  return COMMAND.format(gamma=live.get("gamma", "G"), options=" ".join(flags))


def _absent(why: str) -> dict:
  return {"available": False, "why": why, "methods": {}}


def load_costs(path: str) -> dict:
  """The 7B run's results.json; a StudyError on a wrong file."""
  from tools.study.pair import StudyError

  if not os.path.isfile(path):
    raise StudyError(f"--costs_7b {path}: missing")
  try:
    with open(path) as f:
      bench = json.load(f)
  except json.JSONDecodeError as e:
    raise StudyError(f"--costs_7b {path}: not JSON ({e})") from e
  if bench.get("format") != "egpt_align.benchmark_sd":
    raise StudyError(
      f"--costs_7b {path}: expected a tools/benchmark_sd.py results.json "
      f"(format 'egpt_align.benchmark_sd'), got {bench.get('format')!r}"
    )
  return bench


def seven_b_method(method: str) -> str:
  """The 7B run's method of the same kind ('tree:b1_ttt' -> 'tree:b1')."""
  (adapter,) = layout.method_adapters(method)
  return f"{layout.method_kind(method)}:{layout.kind(adapter)}"


def _mismatch(bench: dict, live: dict) -> str | None:
  """Why the 7B run's costs do not fit this study's settings (or None)."""
  cfg = bench["config"]
  if not str(cfg.get("target")).startswith("random:"):
    return f"it was not run on a random-weight pair (target {cfg['target']})"
  if (cfg.get("runtimes") or [None])[0] != "fast":
    return f"its first runtime is {cfg.get('runtimes')}, not fast"
  if cfg.get("gamma") != live.get("gamma"):
    return f"its γ is {cfg.get('gamma')}, this study's {live.get('gamma')}"
  theirs = _options(recorded_options(cfg), missing="?")
  here = _options(live.get("options") or {}, missing="?")
  if theirs != here:
    return (
      f"it ran with {' '.join(option_flags(theirs))}, this study with "
      f"{' '.join(option_flags(here))}"
    )
  return None


def project(data: dict, path: str | None) -> dict:
  """results.json's `projection_7b`: per study method, the projection and
  its inputs; or `available: False` with the reason."""
  if not path:
    return _absent(
      "no 7B costs were given: run the command below on a GPU and pass "
      "its results.json with --costs_7b"
    )
  bench = load_costs(path)
  live = data["live"].get("gpus1")
  if not live or "fast" not in live["by_runtime"]:
    return _absent("this study measured no live fast-runtime τ on one GPU")
  if why := _mismatch(bench, live):
    return _absent(f"the 7B run does not fit: {why}")
  costs = bench["costs"]
  options = recorded_options(bench["config"])
  out = {
    "available": True,
    "why": None,
    "source": os.path.basename(path),
    "device": bench["environment"].get("device"),
    "target_decode_ms": costs.get("target_decode_ms"),
    "methods": {},
  }
  for m, r in live["by_runtime"]["fast"]["methods"].items():
    if layout.method_kind(m) not in PROJECTED_KINDS or not r.get("n"):
      continue
    m7 = seven_b_method(m)
    model = (bench["aggregate"].get(m7) or {}).get("cost_model") or {}
    g, c = model.get("drafts_per_verification"), model.get("c")
    v = verify_cost(costs, m7, options)
    entry = {"method_7b": m7, "tau": r["tau"], "decode_speedup": None}
    if g is None or c is None or v is None or r["tau"] is None:
      entry["why"] = f"the 7B run has no drafting or verification cost of {m7}"
    else:
      entry.update(
        draft_cost=g * c,
        verify_cost=v,
        decode_speedup=r["tau"] / (g * c + v),
        why=None,
      )
    out["methods"][m] = entry
  return out


def lines(data: dict) -> list[str]:
  """RESULTS.md's section on the projection."""
  p = data["projection_7b"]
  head = ["## Projected for a 7B pair (not measured)", ""]
  if not p["available"]:
    return head + [
      f"The projection is absent: {p['why']}.",
      "",
      "```",
      command(data),
      "```",
      "",
    ]
  rows = [
    "| method | live τ here | 7B method | drafting (7B target steps) | "
    "verification (7B target steps) | projected decode-phase speedup |",
    "|---|---|---|---|---|---|",
  ]
  for m, e in p["methods"].items():
    proj = (
      f"{num(e['decode_speedup'], 2)}× (projected)"
      if e["decode_speedup"] is not None
      else f"– ({e['why']})"
    )
    rows.append(
      f"| {m} | {num(e['tau'], 2)} | {e['method_7b']} | "
      f"{num(e.get('draft_cost'), 3)} | {num(e.get('verify_cost'), 3)} | "
      f"{proj} |"
    )
  return head + [
    "τ measured live here (fast runtime, one GPU) with the drafting and "
    "verification costs measured live on the 7B-shaped random pair "
    f"(`{p['source']}`, {p['device']}, target decode "
    f"{num(p['target_decode_ms'], 2)} ms/token): projected decode-phase "
    "speedup = τ / (drafting + verification). A projection from two "
    "measurements, not a measured speedup; the tables above hold the "
    "measured ones.",
    "",
    *rows,
    "",
  ]
