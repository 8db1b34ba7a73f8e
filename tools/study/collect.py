"""results.json: everything RESULTS.md and its plots state, from DIR."""

from __future__ import annotations

import json
import os

from egpt_align import metrics as metrics_lib
from tools.lib import sd_results
from tools.lib.sd_methods import recorded_options
from tools.study import layout
from tools.study.pair import StudyError

ACCEPT_KEYS = tuple(
  f"accept_{metrics_lib.threshold_key(t)}" for t in metrics_lib.THRESHOLDS
)
# Metric key in egpt_align.evaluate -> its label in the seed's table.
SEED_COLUMNS = tuple(
  (k, f"Accept@{t:.2f}")
  for k, t in zip(ACCEPT_KEYS, metrics_lib.THRESHOLDS, strict=True)
) + (
  ("cos_sim_mean", "cos"),
  ("token_top1", "token top-1"),
  ("token_consecutive_mean", "leading run (tokens)"),
)
PCT = set(ACCEPT_KEYS) | {"token_top1"}
BASELINES = ("untrained", "raw_source", "copy_target", "drafter_tokens")


def load(path: str) -> dict:
  if not os.path.isfile(path):
    raise StudyError(f"{path}: missing")
  with open(path) as f:
    return json.load(f)


def _metric(m: dict, extra_ci: dict, key: str) -> dict:
  ci = (m.get("ci") or {}).get(key) or extra_ci.get(key)
  return {"value": m.get(key), "ci95": ci}


def adapter_entry(study: dict, study_dir: str, name: str) -> dict:
  metrics = load(os.path.join(study_dir, "eval", name, "metrics.json"))
  extra = load(os.path.join(study_dir, "eval", name, "accept_ci.json"))
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
    "unroll_steps": train.get("unroll_steps"),
    "test_samples": metrics["data"]["num_samples"],
    # What the CIs resample: samples, or groups (scenes) of samples.
    "ci_resampling": metrics["settings"].get("ci_resampling", "sample"),
    "num_groups": metrics["settings"].get("num_groups"),
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
  if depth := metrics.get("depth_acceptance"):
    out["depth_acceptance"] = {
      "gamma": depth["gamma"],
      "fed_back": depth["fed_back"],
      **{r: _depth(depth[r]) for r in ("free_running", "teacher_forced")},
    }
  for base in BASELINES:
    if base not in res:
      continue
    reading = prim if prim in res[base] else next(iter(res[base]))
    ex = extra.get(base, {}).get(reading, {})
    out["baselines"][base] = {
      "reading": reading,
      **{k: _metric(res[base][reading], ex, k) for k, _ in SEED_COLUMNS},
    }
  return out


def _depth(entry: dict) -> dict:
  """One reading of acceptance at depth: {depth_d | tau: value, CI}."""
  keys = [k for k in entry if k.startswith("depth_")] + ["tau"]
  return {k: _metric(entry, {}, k) for k in keys}


def _decode_costs(a: dict, costs: dict, m: str, options: dict) -> dict:
  """Per decode-phase verification, in target decode steps: drafting
  (drafts per verification x cost per draft) and the verification."""
  model = a.get("cost_model") or {}
  g, c = model.get("drafts_per_verification"), model.get("c")
  return {
    "drafts_per_verification": g,
    "draft_cost": None if g is None or c is None else g * c,
    "verify_cost": sd_results.verify_cost(costs, m, options),
  }


def _method_row(a: dict, rt: str, costs: dict, m: str, options: dict) -> dict:
  rel = costs.get("relative") or {}
  if not a.get("n"):
    return {"n": 0, "failed": a.get("failed")}
  vs = a.get("speedup_vs") or {}
  own = vs.get(rt) or {
    "speedup": a.get("speedup"),
    "speedup_ci95": a.get("speedup_ci95"),
  }
  ov = a.get("prefill_overlap")
  acc_prefill = None
  if a.get("drafted_prefill") is not None:
    acc_prefill = a["alpha_prefill"] * a["drafted_prefill"] / a["n"]
  return {
    "n": a["n"],
    "alpha": a.get("alpha"),
    "alpha_ci95": a.get("alpha_ci95"),
    "tau": a.get("tau"),
    "tau_ci95": a.get("tau_ci95"),
    **_decode_costs(a, costs, m, options),
    "c": (rel.get("c") or {}).get(m),
    "v": rel.get("v"),
    "prefill_overlap_ms": None if ov is None else ov["overlap_ms"],
    "prefill_concurrent": None if ov is None else ov["concurrent"],
    "accepted_in_prefill_per_sample": acc_prefill,
    "mean_total_ms": a["mean_total_ms"],
    "speedup": own["speedup"],
    "speedup_ci95": own["speedup_ci95"],
    "decode_speedup": a.get("decode_speedup"),
    "decode_speedup_ci95": a.get("decode_speedup_ci95"),
    "mismatches": a["mismatched_samples"],
    "near_tie_flips": a["near_tie_flips"],
  }


def aa_entry(bench: dict, rt: str) -> dict | None:
  """The A/A control of runtime RT (baseline / its second copy), as the
  verdicts read it: speedup, speedup_ci95, reliable."""
  aa = (bench.get("aa_control") or {}).get(rt)
  if not aa:
    return None
  return {
    "speedup": aa.get("ratio"),
    "speedup_ci95": aa.get("ci95"),
    "decode_speedup": aa.get("decode_ratio"),
    "decode_speedup_ci95": aa.get("decode_ci95"),
    "range": aa.get("range"),
    "reliable": aa.get("reliable"),
  }


def live_entry(benches: dict[str, dict]) -> dict:
  """Per runtime, per method: what the live tables show.

  `benches`: runtime -> that run's results.json (one runtime each)."""
  first = next(iter(benches.values()))
  cfg = first["config"]
  out = {
    "device": first["environment"].get("device"),
    "num_gpus": first["environment"].get("num_gpus"),
    "target_device": cfg.get("device"),
    "draft_device": cfg.get("draft_device"),
    "dtype": cfg.get("dtype"),
    "gamma": cfg.get("gamma"),
    # The method kinds' options (the draft trees' flags).
    "options": recorded_options(cfg),
    "max_new_tokens": cfg.get("max_new_tokens"),
    "warmup": cfg.get("warmup"),
    "runtimes": list(benches),
    "environment": first["environment"],
    "fast_path": None,
    "by_runtime": {},
    "mismatch_list": [],
  }
  for rt, bench in benches.items():
    costs = (bench.get("costs_by_runtime") or {}).get(rt) or bench["costs"]
    options = recorded_options(bench["config"])
    agg = bench["aggregate"]
    if rt == "fast":
      out["fast_path"] = bench.get("fast_path")
    out["by_runtime"][rt] = {
      # The benchmark's A/A control (a second baseline), when it runs one.
      "aa_control": aa_entry(bench, rt),
      # Timed runs that compiled (None: a run from before they were
      # counted).
      "timed_compiles": bench.get("timed_compiles"),
      "num_measured": bench.get("num_measured"),
      # What the CIs resample: 'group' (scenes) or 'sample'.
      "ci_resampling": bench["config"].get("ci_resampling", "sample"),
      "num_groups": bench["config"].get("num_groups"),
      "target_decode_ms": costs.get("target_decode_ms"),
      "target_prefill_ms": costs.get("target_prefill_ms"),
      "amdahl": bench.get("amdahl"),
      "methods": {
        m: _method_row(agg.get(m, {}), rt, costs, m, options)
        for m in bench["config"]["methods"]
      },
    }
    out["mismatch_list"] += bench.get("mismatches", [])
  return out


def headline_records(rec: dict) -> dict[str, dict]:
  """A bench stage's headline runs, runtime -> its record, in run order. A
  study.json from before every runtime had one holds a single record."""
  h = rec.get("headline") or {}
  return {h["runtime"]: h} if "dir" in h else h


def headline_entry(study_dir: str, h: dict) -> dict:
  """One headline run of a bench stage (the headline methods alone on more
  samples), as one runtime's block of `live_entry` plus its runtime."""
  bench = load(os.path.join(study_dir, h["dir"], "results.json"))
  block = live_entry({h["runtime"]: bench})["by_runtime"][h["runtime"]]
  return {"runtime": h["runtime"], **block}


def collect(study_dir: str, pair, costs_7b: str | None = None) -> dict:
  """results.json: everything RESULTS.md and the plots state (`costs_7b`:
  the 7B-shaped pair's benchmark results.json, for the projection)."""
  from tools.study import compare, projection, verdicts

  study = load(os.path.join(study_dir, layout.STUDY_FILE))
  stages = study["stages"]
  data = {
    "format": "egpt_align.study_results",
    "version": 2,
    "generated": layout.now(),
    "study": {
      "runs": study.get("runs", []),
      "stage_seconds": {
        k: v.get("seconds") for k, v in stages.items() if v.get("done")
      },
      "settings": {k: v.get("settings") for k, v in stages.items()},
      "dump": stages.get("dump"),
      "train_device": stages.get("train", {}).get("device"),
      "evaluate_device": stages.get("evaluate", {}).get("device"),
      "pair_kind": pair.name,
    },
    "pair": pair.results_info(study_dir),
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
    rec = stages.get(stage, {})
    if rec.get("done"):
      data["live"][sub] = live_entry(
        {
          rt: load(os.path.join(study_dir, r["dir"], "results.json"))
          for rt, r in rec["runtimes"].items()
        }
      )
      # Runtime -> its headline run's block, and why a runtime's
      # all-methods run was left out (--time_limit_s).
      data["live"][sub]["headlines"] = {
        rt: headline_entry(study_dir, h)
        for rt, h in headline_records(rec).items()
      }
      data["live"][sub]["left_out"] = rec.get("left_out") or {}
  data["prefill_widths"] = stages.get("train", {}).get("prefill_widths")
  data["comparisons"] = compare.comparisons(data)
  data["projection_7b"] = projection.project(data, costs_7b)
  data["claims"] = verdicts.claims(data)
  data["goal"] = verdicts.goal(data)
  return data
