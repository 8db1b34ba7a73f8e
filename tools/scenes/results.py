r"""Writes RESULTS.md, its plots and the JSON it is generated from.

  python -m tools.scenes.results --study DIR --out docs [--pair PAIR]

DIR is a study directory of `python -m tools.scenes.reproduce` (study.json,
eval/ADAPTER/{metrics,accept_ci}.json, exports/, bench/gpusN/results.json).
Writes OUT/RESULTS.md, OUT/results/results.json (everything the text and
plots state) and OUT/results/*.png. Every sentence that judges a claim is
a template filled from results.json, with the rule it applies written out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from tools.scenes import layout

THRESHOLDS = ("80", "85", "90", "95")
# Metric key in egpt_align.evaluate -> (label, CI source).
SEED_COLUMNS = (
  ("accept_80", "Accept@0.80"),
  ("accept_85", "Accept@0.85"),
  ("accept_90", "Accept@0.90"),
  ("accept_95", "Accept@0.95"),
  ("cos_sim_mean", "cos"),
  ("token_top1", "token top-1"),
  ("token_consecutive_mean", "leading run (tokens)"),
)
PCT = {"accept_80", "accept_85", "accept_90", "accept_95", "token_top1"}
BASELINE_NAMES = {
  "untrained": "untrained (same adapter, fresh init)",
  "raw_source": "no adapter: the drafter's own state",
  "copy_target": "no adapter: target[t] as the guess for target[t+1]",
  "drafter_tokens": "no adapter: the drafter's own greedy tokens",
}
SETTING_NAMES = {"gpus1": "one GPU", "gpus2": "two GPUs"}


class ResultsError(Exception):
  """A missing or malformed study output: one line, exit status 2."""


def _load(path: str) -> dict:
  if not os.path.isfile(path):
    raise ResultsError(f"{path}: missing")
  with open(path) as f:
    return json.load(f)


# --------------------------------------------------------------------------
# Collect.


def _metric(m: dict, extra_ci: dict, key: str) -> dict:
  ci = (m.get("ci") or {}).get(key) or extra_ci.get(key)
  return {"value": m.get(key), "ci95": ci}


def adapter_entry(study: dict, study_dir: str, name: str) -> dict:
  metrics = _load(os.path.join(study_dir, "eval", name, "metrics.json"))
  extra = _load(os.path.join(study_dir, "eval", name, "accept_ci.json"))
  extra = extra["accept_ci"]
  prim = metrics["primary_reading"]
  res = metrics["results"]
  stages = study["stages"]
  train = stages.get("train", {}).get("adapters", {}).get(name, {})
  out = {
    "primary_reading": prim,
    "params": stages.get("export", {}).get("params", {}).get(name),
    "epochs": train.get("epochs_run"),
    "best_epoch": train.get("best_epoch"),
    "best_val_loss": train.get("best_val_loss"),
    "train_seconds": train.get("seconds"),
    "test_samples": metrics["data"]["num_samples"],
    "test_positions": metrics["data"]["total_valid_positions"],
    "metrics": {
      k: _metric(res["adapter"][prim], extra["adapter"][prim], k)
      for k, _ in SEED_COLUMNS
    },
    "baselines": {},
  }
  if "same" in res["adapter"] and prim != "same":
    out["same_reading"] = {
      k: _metric(res["adapter"]["same"], extra["adapter"]["same"], k)
      for k, _ in SEED_COLUMNS
    }
  for base in ("untrained", "raw_source", "copy_target", "drafter_tokens"):
    if base not in res:
      continue
    reading = prim if prim in res[base] else next(iter(res[base]))
    ex = extra.get(base, {}).get(reading, {})
    out["baselines"][base] = {
      "reading": reading,
      **{k: _metric(res[base][reading], ex, k) for k, _ in SEED_COLUMNS},
    }
  return out


def _label(method: str, rt: str, runtimes: list[str]) -> str:
  return method if rt == runtimes[0] else f"{method}@{rt}"


def live_entry(bench: dict) -> dict:
  """Per runtime, per method: what the live table shows."""
  cfg = bench["config"]
  runtimes = cfg.get("runtimes") or ["eager"]
  costs_by_rt = bench.get("costs_by_runtime") or {runtimes[0]: bench["costs"]}
  agg = bench["aggregate"]
  out = {
    "device": bench["environment"].get("device"),
    "num_gpus": bench["environment"].get("num_gpus"),
    "target_device": cfg.get("device"),
    "draft_device": cfg.get("draft_device"),
    "dtype": cfg.get("dtype"),
    "gamma": cfg.get("gamma"),
    "max_new_tokens": cfg.get("max_new_tokens"),
    "num_measured": bench.get("num_measured"),
    "warmup": cfg.get("warmup"),
    "runtimes": runtimes,
    "environment": bench["environment"],
    "fast_path": bench.get("fast_path"),
    "by_runtime": {},
  }
  for rt in runtimes:
    rel = (costs_by_rt.get(rt) or {}).get("relative") or {}
    costs = costs_by_rt.get(rt) or {}
    rows = {}
    for m in cfg["methods"]:
      a = agg.get(_label(m, rt, runtimes), {})
      if not a.get("n"):
        rows[m] = {"n": 0, "failed": a.get("failed")}
        continue
      vs = a.get("speedup_vs") or {}
      own = vs.get(rt) or {
        "speedup": a.get("speedup"),
        "speedup_ci95": a.get("speedup_ci95"),
      }
      ov = a.get("prefill_overlap")
      acc_prefill = None
      if a.get("drafted_prefill") is not None:
        acc_prefill = a["alpha_prefill"] * a["drafted_prefill"] / a["n"]
      rows[m] = {
        "n": a["n"],
        "alpha": a.get("alpha"),
        "alpha_ci95": a.get("alpha_ci95"),
        "tau": a.get("tau"),
        "tau_ci95": a.get("tau_ci95"),
        "c": (rel.get("c") or {}).get(m),
        "v": rel.get("v"),
        "prefill_overlap_ms": None if ov is None else ov["overlap_ms"],
        "prefill_concurrent": None if ov is None else ov["concurrent"],
        "accepted_in_prefill_per_sample": acc_prefill,
        "mean_total_ms": a["mean_total_ms"],
        "speedup": own["speedup"],
        "speedup_ci95": own["speedup_ci95"],
        "speedup_vs": {
          r: {"speedup": v["speedup"], "speedup_ci95": v["speedup_ci95"]}
          for r, v in vs.items()
        },
        "decode_speedup": a.get("decode_speedup"),
        "decode_speedup_ci95": a.get("decode_speedup_ci95"),
        "mismatches": a["mismatched_samples"],
        "near_tie_flips": a["near_tie_flips"],
      }
    out["by_runtime"][rt] = {
      "target_decode_ms": costs.get("target_decode_ms"),
      "target_prefill_ms": costs.get("target_prefill_ms"),
      "methods": rows,
    }
  out["mismatch_list"] = bench.get("mismatches", [])
  return out


def collect(study_dir: str, pair_dir: str | None = None) -> dict:
  """results.json: everything RESULTS.md and the plots state.

  `pair_dir`: the pair (default: the one the study recorded)."""
  study = _load(os.path.join(study_dir, layout.STUDY_FILE))
  stages = study["stages"]
  if pair_dir is None:
    pair_dir = stages.get("pair", {}).get("pair") or "pair"
    pair_dir = os.path.join(study_dir, pair_dir)
  pair = None
  if os.path.isfile(os.path.join(pair_dir, "pair.json")):
    pair = _load(os.path.join(pair_dir, "pair.json"))
  data = {
    "format": "egpt_align.scenes_results",
    "version": 1,
    "generated": layout.now(),
    "study": {
      "runs": study.get("runs", []),
      "stage_seconds": {
        k: v.get("seconds") for k, v in stages.items() if v.get("done")
      },
      "settings": {k: v.get("settings") for k, v in stages.items()},
      "dump": stages.get("dump"),
      "train_device": stages.get("train", {}).get("device"),
    },
    "pair": None
    if pair is None
    else {
      "preset": pair["fingerprint"]["preset"],
      "results": pair.get("results"),
      "versions": pair.get("versions"),
    },
    "target": stages.get("evaluate", {}).get("target"),
    "adapters": {},
    "live": {},
  }
  if stages.get("evaluate", {}).get("done"):
    # The adapters this study evaluated (a study made before the *_next
    # adapters existed has the seed's seven only).
    done = stages["evaluate"].get("adapters", {})
    for name in layout.ADAPTERS:
      if name in done:
        data["adapters"][name] = adapter_entry(study, study_dir, name)
  for stage, sub in layout.BENCH_DIRS.items():
    if stages.get(stage, {}).get("done"):
      bench = _load(os.path.join(study_dir, "bench", sub, "results.json"))
      data["live"][sub] = live_entry(bench)
  data["claims"] = claims(data)
  data["goal"] = goal(data)
  return data


# --------------------------------------------------------------------------
# Claims: templated verdicts from the numbers.


def _v(entry: dict, key: str):
  return entry["metrics"][key]["value"], entry["metrics"][key]["ci95"]


def _pct(x) -> str:
  return "–" if x is None else f"{100 * x:.1f}%"


def _ci_pct(v, ci) -> str:
  if v is None:
    return "–"
  if not ci:
    return _pct(v)
  return f"{_pct(v)} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x, nd=3) -> str:
  return "–" if x is None else f"{x:.{nd}f}"


def _ci_num(v, ci, nd=3) -> str:
  if v is None:
    return "–"
  if not ci:
    return _num(v, nd)
  return f"{_num(v, nd)} [{_num(ci[0], nd)}, {_num(ci[1], nd)}]"


def _separated(a_ci, b_ci) -> bool:
  """True when interval a lies wholly above interval b."""
  return bool(a_ci and b_ci and a_ci[0] > b_ci[1])


def _headline_live(data: dict):
  """(setting, runtime, rows) the live claims read: two GPUs if measured."""
  for sub in ("gpus2", "gpus1"):
    live = data["live"].get(sub)
    if live:
      rt = live["runtimes"][0]
      return sub, rt, live["by_runtime"][rt]["methods"]
  return None, None, None


def claim_plateau(data: dict) -> dict:
  ads = data["adapters"]
  rule = (
    "Rule: holds when the 95% CIs of token top-1 of the best and the worst "
    "of L1–L4 overlap; partly when they do not but the gap is at most 5 "
    "points; fails otherwise."
  )
  if not all(a in ads for a in layout.PREFILL_ADAPTERS):
    return _unmeasured("L1–L4 plateau whatever their capacity", rule)
  top = {a: _v(ads[a], "token_top1") for a in layout.PREFILL_ADAPTERS}
  hi = max(top, key=lambda a: top[a][0] or 0)
  lo = min(top, key=lambda a: top[a][0] or 0)
  gap = (top[hi][0] or 0) - (top[lo][0] or 0)
  if not _separated(top[hi][1], top[lo][1]):
    verdict = "holds"
  elif gap <= 0.05:
    verdict = "partly"
  else:
    verdict = "fails"
  params = {a: ads[a]["params"] for a in layout.PREFILL_ADAPTERS}
  text = (
    "Token top-1 on the test answers: "
    + ", ".join(
      f"{a.upper()} {_ci_pct(*top[a])} ({params[a] or '?'} params)"
      for a in layout.PREFILL_ADAPTERS
    )
    + f". The best ({hi.upper()}) and the worst ({lo.upper()}) differ by "
    f"{100 * gap:.1f} points; their CIs "
    + ("overlap" if not _separated(top[hi][1], top[lo][1]) else "do not")
    + "."
  )
  return _claim("L1–L4 plateau whatever their capacity", verdict, text, rule)


def claim_b1_l5(data: dict) -> dict:
  ads = data["adapters"]
  rule = (
    "Rule (next-position token top-1, the primary reading): holds when "
    "B1's CI lies wholly above L5's and B1 leads by at least 10 points; "
    "partly when B1 is higher but not by both; fails otherwise."
  )
  if "b1" not in ads or "l5" not in ads:
    return _unmeasured("B1 ≫ L5 (the cross-modal gap dominates)", rule)
  b, l5 = _v(ads["b1"], "token_top1"), _v(ads["l5"], "token_top1")
  gap = (b[0] or 0) - (l5[0] or 0)
  sep = _separated(b[1], l5[1])
  if sep and gap >= 0.10:
    verdict = "holds"
  elif gap > 0:
    verdict = "partly"
  else:
    verdict = "fails"
  text = (
    f"Next-position token top-1: B1 {_ci_pct(*b)}, L5 {_ci_pct(*l5)} "
    f"({100 * gap:+.1f} points); Accept@0.90: B1 "
    f"{_ci_pct(*_v(ads['b1'], 'accept_90'))}, L5 "
    f"{_ci_pct(*_v(ads['l5'], 'accept_90'))}."
  )
  text += _live_pair(data, "decode:b1", "decode:l5")
  return _claim("B1 ≫ L5 (the cross-modal gap dominates)", verdict, text, rule)


def claim_l5f_b1(data: dict) -> dict:
  ads = data["adapters"]
  rule = (
    "Rule (next-position token top-1): holds when L5F's CI lies wholly "
    "above B1's; partly when L5F is higher but the CIs overlap; fails "
    "otherwise."
  )
  if "b1" not in ads or "l5f" not in ads:
    return _unmeasured("L5F > B1 (the event stream adds signal)", rule)
  f, b = _v(ads["l5f"], "token_top1"), _v(ads["b1"], "token_top1")
  gap = (f[0] or 0) - (b[0] or 0)
  if _separated(f[1], b[1]):
    verdict = "holds"
  elif gap > 0:
    verdict = "partly"
  else:
    verdict = "fails"
  text = (
    f"Next-position token top-1: L5F {_ci_pct(*f)}, B1 {_ci_pct(*b)} "
    f"({100 * gap:+.1f} points)."
  )
  text += _live_pair(data, "decode:l5f", "decode:b1")
  return _claim("L5F > B1 (the event stream adds signal)", verdict, text, rule)


def _live_pair(data: dict, a: str, b: str) -> str:
  sub, rt, rows = _headline_live(data)
  if not rows or not rows.get(a, {}).get("n") or not rows.get(b, {}).get("n"):
    return ""
  return (
    f" Live ({SETTING_NAMES[sub]}, {rt} runtime): α {a} "
    f"{_ci_num(rows[a]['alpha'], rows[a]['alpha_ci95'])} vs {b} "
    f"{_ci_num(rows[b]['alpha'], rows[b]['alpha_ci95'])}."
  )


def claim_prefill(data: dict) -> dict:
  rule = (
    "Rule (two GPUs if measured, else one; headline runtime): holds when "
    "some prefill_hiding method accepts tokens during the prefill, its "
    "measured overlap is > 0 ms and its speedup CI lies at or above 1; "
    "partly when tokens are accepted but the overlap or the speedup falls "
    "short; fails when no prefill draft is accepted."
  )
  sub, rt, rows = _headline_live(data)
  name = "Prefill hiding gives accepted tokens for free"
  if not rows:
    return _unmeasured(name, rule)
  ph = {
    m: r
    for m, r in rows.items()
    if m.startswith("prefill_hiding:") and r.get("n")
  }
  if not ph:
    return _unmeasured(name, rule)
  best = max(ph, key=lambda m: ph[m]["accepted_in_prefill_per_sample"] or 0)
  r = ph[best]
  acc = r["accepted_in_prefill_per_sample"] or 0
  ov = r["prefill_overlap_ms"]
  free = (
    ov is not None
    and ov > 0
    and r["speedup_ci95"] is not None
    and r["speedup_ci95"][0] >= 1.0
  )
  verdict = "fails" if acc <= 0 else ("holds" if free else "partly")
  text = (
    f"{SETTING_NAMES[sub]}, {rt} runtime: "
    + "; ".join(
      f"{m}: {_num(x['accepted_in_prefill_per_sample'], 2)} tokens accepted "
      f"per sample from the prefill drafts, overlap "
      f"{_num(x['prefill_overlap_ms'], 2)} ms, speedup "
      f"{_ci_num(x['speedup'], x['speedup_ci95'])}"
      for m, x in ph.items()
    )
    + f". Best: {best}."
  )
  return _claim(name, verdict, text, rule)


def claim_two_phase(data: dict) -> dict:
  rule = (
    "Rule (headline runtime, two GPUs if measured): holds when a two_phase "
    "method's speedup CI lies wholly above 1; partly when its point "
    "estimate is above 1 but the CI reaches 1 or below; fails otherwise."
  )
  name = "The two-phase pipeline speeds up decoding"
  sub, rt, rows = _headline_live(data)
  if not rows:
    return _unmeasured(name, rule)
  tp = {m: r for m, r in rows.items() if m.startswith("two_phase:")}
  tp = {m: r for m, r in tp.items() if r.get("n")}
  if not tp:
    return _unmeasured(name, rule)
  best = max(tp, key=lambda m: tp[m]["speedup"] or 0)
  r = tp[best]
  if r["speedup_ci95"] and r["speedup_ci95"][0] > 1.0:
    verdict = "holds"
  elif (r["speedup"] or 0) > 1.0:
    verdict = "partly"
  else:
    verdict = "fails"
  text = (
    f"{SETTING_NAMES[sub]}, {rt} runtime: "
    + "; ".join(
      f"{m}: speedup {_ci_num(x['speedup'], x['speedup_ci95'])} (decode "
      f"phase {_ci_num(x['decode_speedup'], x['decode_speedup_ci95'])}), "
      f"α {_num(x['alpha'])}, τ {_num(x['tau'], 2)}"
      for m, x in tp.items()
    )
    + "."
  )
  return _claim(name, verdict, text, rule)


def _claim(name, verdict, text, rule) -> dict:
  return {"claim": name, "verdict": verdict, "text": text, "rule": rule}


def _unmeasured(name, rule) -> dict:
  return _claim(name, "not measured", "The study has no data for it.", rule)


def claims(data: dict) -> list[dict]:
  return [
    claim_plateau(data),
    claim_b1_l5(data),
    claim_l5f_b1(data),
    claim_prefill(data),
    claim_two_phase(data),
  ]


def objective_section(data: dict) -> list[str]:
  """The next-state adapters under the reference's objective and 'next'."""
  ads = data["adapters"]
  pairs = [
    (layout.kind(n), n)
    for n in layout.NEXT_ADAPTERS
    if n in ads and layout.kind(n) in ads
  ]
  if not pairs:
    return []
  lines = [
    "## The reference's dual objective",
    "",
    "The reference trains L5, B1 and L5F to pull one output towards both "
    "target[t] and target[t+1] (REFERENCE_NOTES D8). The same recipes with "
    "the loss objective `next` (output[t] towards target[t+1] only) train "
    "the `(objective next)` rows; next-position reading, test split:",
    "",
    "| adapter | token top-1, reference objective | token top-1, objective "
    "next | Accept@0.90, reference | Accept@0.90, next | live α, reference "
    "| live α, next |",
    "|---|---|---|---|---|---|---|",
  ]
  sub, rt, rows = _headline_live(data)
  rows = rows or {}
  for ref, nxt in pairs:
    alphas = []
    for n in (ref, nxt):
      r = rows.get(f"decode:{n}", {})
      alphas.append(
        _ci_num(r["alpha"], r.get("alpha_ci95")) if r.get("n") else "–"
      )
    lines.append(
      f"| {ref.upper()} | {_ci_pct(*_v(ads[ref], 'token_top1'))} | "
      f"{_ci_pct(*_v(ads[nxt], 'token_top1'))} | "
      f"{_ci_pct(*_v(ads[ref], 'accept_90'))} | "
      f"{_ci_pct(*_v(ads[nxt], 'accept_90'))} | {alphas[0]} | {alphas[1]} |"
    )
  if sub:
    lines += ["", f"Live α: {SETTING_NAMES[sub]}, {rt} runtime."]
  return lines + [""]


def goal(data: dict) -> dict:
  """The >= 2x goal: the best lossless method per setting and runtime, and
  for the best drafting method the term that stops it (measured α, c, v
  in the cost model τ / (γc + v))."""
  from egpt_align import speedup as sp

  out = {"target_speedup": 2.0, "by_setting": {}}
  for sub, live in data["live"].items():
    gamma = live["gamma"]
    for rt, block in live["by_runtime"].items():
      rows = {
        m: r
        for m, r in block["methods"].items()
        if m != "baseline" and r.get("n") and r["mismatches"] == 0
      }
      if not rows:
        continue
      best = max(rows, key=lambda m: rows[m]["speedup"] or 0)
      entry = {
        "best_method": best,
        "speedup": rows[best]["speedup"],
        "speedup_ci95": rows[best]["speedup_ci95"],
        "reached": (rows[best]["speedup"] or 0) >= 2.0,
      }
      costed = {
        m: r
        for m, r in rows.items()
        if r["c"] is not None and r["v"] and r["alpha"] is not None
      }
      if costed:
        m = max(costed, key=lambda m: costed[m]["speedup"] or 0)
        r = costed[m]
        a, c, v = min(max(r["alpha"], 0.0), 1.0), r["c"], r["v"]
        ceiling = float(sp.expected_speedup(1.0, gamma, c, v))
        entry["analysis"] = {
          "method": m,
          "alpha": r["alpha"],
          "c": c,
          "v": v,
          "gamma": gamma,
          "model_speedup": float(sp.expected_speedup(a, gamma, c, v)),
          "ceiling_at_alpha_1": ceiling,
          "limited_by": "cost: even α = 1 stays below 2× at these c and v"
          if ceiling < 2.0
          else "acceptance: these c and v would allow 2× at a higher α",
        }
      out["by_setting"][f"{sub}/{rt}"] = entry
  return out


# --------------------------------------------------------------------------
# Markdown.


def _fmt_metric(key: str, m: dict) -> str:
  if key in PCT:
    return _ci_pct(m["value"], m["ci95"])
  nd = 2 if key == "token_consecutive_mean" else 3
  return _ci_num(m["value"], m["ci95"], nd)


def seed_table(data: dict) -> list[str]:
  cols = ["params", "epochs", "best val loss"] + [c for _, c in SEED_COLUMNS]
  lines = [
    "| adapter | reading | " + " | ".join(cols) + " |",
    "|---|---|" + "---|" * len(cols),
  ]
  for name, a in data["adapters"].items():
    lines.append(
      f"| {layout.title(name)} | {a['primary_reading']} | "
      f"{a['params'] if a['params'] is not None else '–'} | "
      f"{a['epochs']} | {_num(a['best_val_loss'], 4)} | "
      + " | ".join(_fmt_metric(k, a["metrics"][k]) for k, _ in SEED_COLUMNS)
      + " |"
    )
  return lines


def baseline_table(data: dict) -> list[str]:
  lines = [
    "| adapter | prediction | reading | "
    + " | ".join(c for _, c in SEED_COLUMNS)
    + " |",
    "|---|---|---|" + "---|" * len(SEED_COLUMNS),
  ]
  for name, a in data["adapters"].items():
    rows = [("trained", a["primary_reading"], a["metrics"])]
    for base, b in a["baselines"].items():
      rows.append((BASELINE_NAMES[base], b["reading"], b))
    for label, reading, m in rows:
      lines.append(
        f"| {layout.title(name)} | {label} | {reading} | "
        + " | ".join(
          _fmt_metric(k, m[k]) if m[k]["value"] is not None else "–"
          for k, _ in SEED_COLUMNS
        )
        + " |"
      )
  return lines


def live_tables(data: dict) -> list[str]:
  lines = []
  for sub, live in data["live"].items():
    for rt, block in live["by_runtime"].items():
      others = [r for r in live["runtimes"] if r != rt]
      lines += [
        "",
        f"### {SETTING_NAMES[sub]}, {rt} runtime",
        "",
        f"Target on {live['target_device']}, drafter on "
        f"{live['draft_device']} ({live['device']}); {live['dtype']}; "
        f"γ = {live['gamma']}; max_new_tokens {live['max_new_tokens']}; "
        f"{live['num_measured']} test samples after {live['warmup']} warm-up; "
        f"target decode {_num(block['target_decode_ms'], 3)} ms/token, "
        f"prefill {_num(block['target_prefill_ms'], 2)} ms."
        + (
          " Fast path per model: "
          + "; ".join(f"{k}: {v}" for k, v in live["fast_path"].items())
          + "."
          if rt == "fast" and live.get("fast_path")
          else ""
        ),
        "",
        "| method | α | τ | c | v | prefill overlap ms | accepted in "
        "prefill / sample | speedup | "
        + "".join(f"vs {o} baseline | " for o in others)
        + "mismatches (near-tie) |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(others) + "---|",
      ]
      for m, r in block["methods"].items():
        if not r.get("n"):
          lines.append(f"| {m} | failed: {r.get('failed')} |")
          continue
        lines.append(
          f"| {m} | {_ci_num(r['alpha'], r['alpha_ci95'])} | "
          f"{_ci_num(r['tau'], r['tau_ci95'], 2)} | {_num(r['c'])} | "
          f"{_num(r['v'])} | {_num(r['prefill_overlap_ms'], 2)} | "
          f"{_num(r['accepted_in_prefill_per_sample'], 2)} | "
          f"{_ci_num(r['speedup'], r['speedup_ci95'])} | "
          + "".join(
            _ci_num(
              r["speedup_vs"].get(o, {}).get("speedup"),
              r["speedup_vs"].get(o, {}).get("speedup_ci95"),
            )
            + " | "
            for o in others
          )
          + f"{r['mismatches']} ({r['near_tie_flips']}) |"
        )
    mism = live["mismatch_list"]
    if mism:
      lines += ["", f"Mismatches vs greedy ({SETTING_NAMES[sub]}):", ""]
      for x in mism[:30]:
        lines.append(
          f"- {x['method']} / {x['id']}: first difference at token "
          f"{x['index']}, top-2 margin {_num(x['margin'], 4)}"
          + (" (near-tie)" if x["near_tie"] else " (NOT a near-tie)")
        )
  return lines


def _pair_accuracy(r: dict) -> str:
  """make_pair's held-out fact accuracy per question type, one line."""
  if not r.get("target"):
    return ""
  return (
    "Held-out fact accuracy from make_pair (share of "
    f"{r.get('eval_scenes_per_qtype')} test scenes per question type whose "
    "greedy answer states exactly the true facts; `type/part` entries are "
    "partial scores): "
    + ", ".join(
      f"{q} target {_pct(r['target'][q])} / drafter {_pct(r['drafter'].get(q))}"
      for q in r["target"]
    )
    + "."
  )


def render(data: dict, plots: list[str]) -> str:
  pair = data["pair"] or {}
  preset = pair.get("preset") or {}
  t = data["target"] or {}
  runs = data["study"]["runs"]
  lines = [
    "# Results on the scenes pair",
    "",
    f"Generated {data['generated']} by `python -m tools.scenes.results` "
    "from `results/results.json`; every number and verdict below is "
    "computed from it.",
    "",
    "## The pair and the task",
    "",
    f"Preset `{preset.get('name')}`: hidden {preset.get('hidden')}, target "
    f"{preset.get('target_layers')} layers, drafter "
    f"{preset.get('drafter_layers')} layers (tools/scenes/models.py).",
    _pair_accuracy(pair.get("results") or {}),
    f"The target on the test answers: mean next-token entropy "
    f"{_num(t.get('mean_entropy_nats'))} nats, mean top-1 probability "
    f"{_pct(t.get('mean_top1_prob'))} over {t.get('positions')} positions "
    "(its own greedy answers, teacher-forced states through its LM head): "
    "how predictable the task is.",
    "",
    "## The seed's table",
    "",
    "Test split, each adapter trained with its experiments/*.py recipe at "
    "the pair's hidden size, the same epochs and batch for all; best-"
    "validation checkpoint. Primary reading: `next` (output[t] vs "
    "target[t+1]) for L5/B1/L5F, `same` otherwise. Brackets: 95% bootstrap "
    "CI over test samples. Leading run: tokens matched from the first "
    "position on."
    + (
      " The `(objective next)` rows are the same recipes with the loss "
      "objective `next` (see the reference's dual objective below)."
      if any(n in data["adapters"] for n in layout.NEXT_ADAPTERS)
      else " This study predates the `(objective next)` adapters."
    ),
    "",
  ]
  lines += seed_table(data)
  lines += [
    "",
    "Baselines beside each adapter (same metrics, same reading):",
    "",
  ]
  lines += baseline_table(data)
  lines += [
    "",
    "## Live speculative decoding",
    "",
    "tools/benchmark_sd.py on the test scenes: every method interleaved on "
    "every sample, tokens checked against the target's own greedy tokens. "
    "α = accepted / drafted; τ = tokens per verification; c = drafting "
    "time per drafted token and v = one verification, both relative to one "
    "target decode step; prefill overlap = target alone + drafter alone − "
    "concurrent wall (measured); speedup = ratio of mean end-to-end times "
    "against the same runtime's baseline (95% paired bootstrap CI).",
    "",
    "The drafter's prefill side runs on a long-lived thread of the same "
    "process, on its own CUDA stream (on the second GPU when there is one). "
    "How much of it can hide behind the target's prefill depends on what "
    "bounds each side: a prefill that is a chain of small kernels is bound "
    "by the host's launch rate, and two such chains in one Python process "
    "share the host, so only the time one side spends waiting on its GPU "
    "is hidden; a prefill bound by its GPU (a 7B target's over hundreds of "
    "visual tokens) leaves the host free for the drafter.",
  ]
  lines += live_tables(data)
  missing = [n for s, n in SETTING_NAMES.items() if s not in data["live"]]
  if missing:
    lines += [
      "",
      f"Not measured in this study: {', '.join(missing)} (run stage B "
      "with the commands below).",
    ]
  lines += ["", "## The seed's claims", ""]
  for c in data["claims"]:
    lines += [f"**{c['claim']}: {c['verdict']}.** {c['text']} {c['rule']}", ""]
  lines += objective_section(data)
  lines += ["## The 2× goal", ""]
  g = data["goal"]["by_setting"]
  if not g:
    lines.append("No live measurement yet.")
  for key, e in g.items():
    sub, rt = key.split("/")
    s = (
      f"- {SETTING_NAMES[sub]}, {rt} runtime: best lossless method "
      f"{e['best_method']} at {_ci_num(e['speedup'], e['speedup_ci95'])}× "
      + ("— reaches 2×." if e["reached"] else "— short of 2×.")
    )
    x = e.get("analysis")
    if x:
      s += (
        f" Best drafting method {x['method']}: measured α "
        f"{_num(x['alpha'])}, c {_num(x['c'])}, v {_num(x['v'])} (γ = "
        f"{x['gamma']}); the cost model τ/(γc + v) gives "
        f"{_num(x['model_speedup'])}× and at most "
        f"{_num(x['ceiling_at_alpha_1'])}× at α = 1, so the limiting term is "
        f"{x['limited_by']}."
      )
    lines.append(s)
  if plots:
    lines += ["", "## Plots", ""]
    for p in plots:
      lines.append(f"![{os.path.basename(p)}](results/{os.path.basename(p)})")
  lines += [
    "",
    "## How to regenerate",
    "",
    "```",
    "python -m tools.scenes.reproduce --out DIR [--pair PAIR] --stages A "
    "--pack PARTS          # one GPU",
    "python -m tools.scenes.reproduce --out DIR [--pair PAIR] --unpack "
    "PARTS --stages B --redo bench1   # two GPUs",
    "python -m tools.scenes.results --study DIR --out docs [--pair PAIR]",
    "```",
    "",
  ]
  for r in runs:
    argv = list(r.get("argv", []))
    for i, a in enumerate(argv[:-1]):  # Machine-local paths read as names.
      if a in ("--pack", "--unpack"):
        argv[i + 1] = "PARTS"
    v = r.get("versions", {})
    lines.append(
      f"- {r.get('started')}: `python -m tools.scenes.reproduce "
      + " ".join(argv)
      + "` ("
      + ", ".join(
        f"{k} {val}" for k, val in v.items() if val and k != "git_commit"
      )
      + ")"
    )
  devices = sorted(
    {f"{x['device']} ({SETTING_NAMES[s]})" for s, x in data["live"].items()}
  )
  lines += [
    "",
    f"Adapters trained and evaluated on "
    f"{data['study'].get('train_device') or '–'}. Live: "
    f"{', '.join(devices) or '–'}; versions as listed per run above"
    + ". Stage times (s): "
    + ", ".join(
      f"{k} {val}" for k, val in data["study"]["stage_seconds"].items()
    )
    + ".",
    "",
  ]
  return "\n".join(lines)


# --------------------------------------------------------------------------
# Plots.


def _err(vals, cis):
  return np.array(
    [
      [v - (c or [v, v])[0], (c or [v, v])[1] - v]
      for v, c in zip(vals, cis, strict=True)
    ]
  ).T


def make_plots(data: dict, out_dir: str) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  ads = data["adapters"]
  if ads:
    names = list(ads)
    fig, ax = plt.subplots(figsize=(10, 3.6))
    w = 0.8 / len(THRESHOLDS)
    for i, t in enumerate(THRESHOLDS):
      ms = [ads[n]["metrics"][f"accept_{t}"] for n in names]
      vals = [m["value"] or 0 for m in ms]
      x = np.arange(len(names)) + (i - 1.5) * w
      ax.bar(
        x,
        vals,
        w,
        yerr=_err(vals, [m["ci95"] for m in ms]),
        capsize=2,
        label=f"Accept@0.{t}",
      )
    ax.set_xticks(range(len(names)), [layout.short(n) for n in names])
    ax.set_ylabel("share of test positions")
    ax.set_title("Accept@τ per adapter (primary reading), 95% CI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "accept.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 3.6))
    series = [("trained", lambda a: a["metrics"]["token_top1"])]
    series.append(
      ("untrained", lambda a: a["baselines"]["untrained"]["token_top1"])
    )
    series.append(
      (
        "no adapter",
        lambda a: (
          a["baselines"].get("copy_target")
          or a["baselines"].get("raw_source")
          or {"token_top1": {"value": None, "ci95": None}}
        )["token_top1"],
      )
    )
    w = 0.8 / len(series)
    for i, (lab, get) in enumerate(series):
      ms = [get(ads[n]) for n in names]
      vals = [m["value"] or 0 for m in ms]
      x = np.arange(len(names)) + (i - 1) * w
      ax.bar(
        x,
        vals,
        w,
        yerr=_err(vals, [m["ci95"] for m in ms]),
        capsize=2,
        label=lab,
      )
    ax.set_xticks(range(len(names)), [layout.short(n) for n in names])
    ax.set_ylabel("token top-1")
    ax.set_title("Token top-1 vs baselines (primary reading), 95% CI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "token_top1.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

  settings = [
    (sub, rt, block["methods"])
    for sub, live in data["live"].items()
    for rt, block in live["by_runtime"].items()
  ]
  if settings:
    methods = [m for m in layout.METHODS if m != "baseline"]
    fig, ax = plt.subplots(figsize=(10, 4))
    w = 0.8 / len(settings)
    for i, (sub, rt, rows) in enumerate(settings):
      vals = [(rows.get(m) or {}).get("speedup") or 0 for m in methods]
      cis = [(rows.get(m) or {}).get("speedup_ci95") for m in methods]
      x = np.arange(len(methods)) + (i - (len(settings) - 1) / 2) * w
      ax.bar(
        x,
        vals,
        w,
        yerr=_err(vals, cis),
        capsize=2,
        label=f"{SETTING_NAMES[sub]}, {rt}",
      )
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.axhline(2.0, color="tab:red", lw=1, ls=":")
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_ylabel("speedup (ratio of mean times)")
    ax.set_title("Live speedup over the same runtime's greedy target, 95% CI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "speedup.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  return paths


# --------------------------------------------------------------------------
# Entry points.


def write(
  study_dir: str, out_dir: str, pair_dir: str | None = None
) -> list[str]:
  """OUT/RESULTS.md, OUT/results/results.json and OUT/results/*.png."""
  data = collect(study_dir, pair_dir)
  sub = os.path.join(out_dir, "results")
  os.makedirs(sub, exist_ok=True)
  path_json = os.path.join(sub, "results.json")
  with open(path_json, "w") as f:
    json.dump(data, f, indent=1)
  plots = make_plots(data, sub)
  path_md = os.path.join(out_dir, "RESULTS.md")
  with open(path_md, "w") as f:
    f.write(render(data, plots))
  return [path_md, path_json] + plots


def bench_table(bench_dir: str) -> str:
  """A short text table of one benchmark run (printed after the stage)."""
  live = live_entry(_load(os.path.join(bench_dir, "results.json")))
  lines = []
  for rt, block in live["by_runtime"].items():
    lines.append(
      f"[{rt}] {'method':22s} {'alpha':>6s} {'tau':>5s} {'speedup':>8s} "
      f"{'mism':>4s}"
    )
    for m, r in block["methods"].items():
      if not r.get("n"):
        lines.append(f"[{rt}] {m:22s} failed")
        continue
      lines.append(
        f"[{rt}] {m:22s} {_num(r['alpha']):>6s} {_num(r['tau'], 2):>5s} "
        f"{_num(r['speedup']):>8s} {r['mismatches']:4d}"
      )
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--study", required=True, help="reproduce's --out directory")
  p.add_argument("--out", required=True, help="where RESULTS.md goes")
  p.add_argument(
    "--pair", default=None, help="pair directory (default: the study's)"
  )
  args = p.parse_args(argv)
  try:
    paths = write(args.study, args.out, args.pair)
  except (ResultsError, KeyError) as e:
    print(
      f"error: {args.study}: incomplete study output ({e})", file=sys.stderr
    )
    return 2
  for path in paths:
    print("wrote", path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
