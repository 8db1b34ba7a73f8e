"""RESULTS.md, its plots and results.json, generated whole from DIR.

Every number and verdict in RESULTS.md is computed from results.json
(tools/study/collect.py); the verdict rules are tools/study/verdicts.py.
"""

from __future__ import annotations

import json
import os

from tools.lib import fair_runs
from tools.study import collect, compare, layout, plots, projection, verdicts
from tools.study.collect import PCT, SEED_COLUMNS
from tools.study.verdicts import ci_num, ci_pct, num, pct, setting

BASELINE_NAMES = {
  "untrained": "untrained (same adapter, fresh init)",
  "raw_source": "no adapter: the drafter's own state",
  "copy_target": "no adapter: target[t] as the guess for target[t+1]",
  "drafter_tokens": "no adapter: the drafter's own greedy tokens",
}


def _fmt_metric(key: str, m: dict) -> str:
  if key in PCT:
    return ci_pct(m["value"], m["ci95"])
  nd = 2 if key == "token_consecutive_mean" else 3
  return ci_num(m["value"], m["ci95"], nd)


def _epochs(a: dict) -> str:
  """'39 / 40': the best-validation epoch of the epochs run (a best epoch
  at the end says the validation loss was still falling)."""
  if a.get("best_epoch") is None:
    return f"{a['epochs']}"
  return f"{a['best_epoch']} / {a['epochs']}"


def seed_table(data: dict) -> list[str]:
  cols = ["params", "best epoch / epochs", "best val loss"] + [
    c for _, c in SEED_COLUMNS
  ]
  lines = [
    "| adapter | reading | " + " | ".join(cols) + " |",
    "|---|---|" + "---|" * len(cols),
  ]
  for name, a in data["adapters"].items():
    lines.append(
      f"| {layout.title(name)} | {a['primary_reading']} | "
      f"{a['params'] if a['params'] is not None else '–'} | "
      f"{_epochs(a)} | {num(a['best_val_loss'], 4)} | "
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


def aa_text(aa: dict | None) -> str:
  """The A/A control's sentence of a live table's header."""
  if not aa:
    return " No A/A control was run."
  return (
    f" A/A control (baseline / baseline again): "
    f"{ci_num(aa['speedup'], aa['speedup_ci95'])}"
    + (
      ", reliable."
      if aa["reliable"]
      else f", outside {aa['range']} or its CI excludes 1: the run is "
      "UNRELIABLE."
    )
  )


def compiles_text(compiles: list[dict] | None) -> str:
  """The sentence on compilation inside timed runs ('' for a run from
  before they were counted)."""
  if compiles is None:
    return ""
  if not compiles:
    return " No timed run compiled."
  return " " + "; ".join(fair_runs.compile_warnings(compiles)) + "."


def samples_text(block: dict) -> str:
  """'67 test samples (18 groups; CIs resample whole groups)'."""
  unit = (
    f"{block['num_groups']} groups; CIs resample whole groups"
    if block.get("ci_resampling") == "group"
    else "CIs resample samples"
  )
  return f"{block['num_measured']} test samples ({unit})"


def live_tables(data: dict) -> list[str]:
  lines = []
  for sub, live in data["live"].items():
    for rt, block in live["by_runtime"].items():
      fast = live.get("fast_path") if rt == "fast" else None
      lines += [
        "",
        f"### {setting(data, sub)}, {rt} runtime",
        "",
        f"Target on {live['target_device']}, drafter on "
        f"{live['draft_device']} ({live['device']}); {live['dtype']}; "
        f"γ = {live['gamma']}; max_new_tokens {live['max_new_tokens']}; "
        f"{samples_text(block)} after {live['warmup']} warm-up; target "
        "decode "
        f"{num(block['target_decode_ms'], 3)} ms/token, prefill "
        f"{num(block['target_prefill_ms'], 2)} ms."
        + aa_text(block.get("aa_control"))
        + compiles_text(block.get("timed_compiles"))
        + (
          " Fast path per model: "
          + "; ".join(f"{k}: {v}" for k, v in fast.items())
          + "."
          if fast
          else ""
        ),
        "",
        "| method | α | τ | c | v | prefill overlap ms | accepted in "
        "prefill / sample | speedup | decode-phase speedup | mismatches "
        "(near-tie) |",
        "|---|---|---|---|---|---|---|---|---|---|",
      ]
      for m, r in block["methods"].items():
        if not r.get("n"):
          lines.append(f"| {m} | failed: {r.get('failed')} |")
          continue
        lines.append(
          f"| {m} | {ci_num(r['alpha'], r['alpha_ci95'])} | "
          f"{ci_num(r['tau'], r['tau_ci95'], 2)} | {num(r['c'])} | "
          f"{num(r['v'])} | {num(r['prefill_overlap_ms'], 2)} | "
          f"{num(r['accepted_in_prefill_per_sample'], 2)} | "
          f"{ci_num(r['speedup'], r['speedup_ci95'])} | "
          f"{ci_num(r['decode_speedup'], r['decode_speedup_ci95'])} | "
          f"{r['mismatches']} ({r['near_tie_flips']}) |"
        )
    for rt, why in (live.get("left_out") or {}).items():
      lines += [
        "",
        f"The {rt} runtime's run of every method on {setting(data, sub)} was "
        f"left out: {why}. Its headline run is below.",
      ]
    for h in (live.get("headlines") or {}).values():
      lines += headline_table(data, sub, h)
    mism = live["mismatch_list"]
    if mism:
      lines += ["", f"Mismatches vs greedy ({setting(data, sub)}):", ""]
      for x in mism[:30]:
        lines.append(
          f"- {x['method']} / {x['id']}: first difference at token "
          f"{x['index']}, top-2 margin {num(x['margin'], 4)}"
          + (" (near-tie)" if x["near_tie"] else " (NOT a near-tie)")
        )
  return lines


def headline_table(data: dict, sub: str, h: dict) -> list[str]:
  """The headline methods alone on more samples (a runtime's first run)."""
  amdahl = (h.get("amdahl") or {}).get(h["runtime"]) or {}
  ceiling = amdahl.get("end_to_end_ceiling")
  lines = [
    "",
    f"#### {setting(data, sub)}, {h['runtime']} runtime: the headline "
    "methods on more samples",
    "",
    f"The baseline and {', '.join(m for m in h['methods'] if m != 'baseline')}"
    f" in a run of their own, on {samples_text(h)}"
    + f"; target decode {num(h['target_decode_ms'], 3)} ms/token, prefill "
    f"{num(h['target_prefill_ms'], 2)} ms"
    + (
      f" ({pct(amdahl.get('baseline_prefill_share'))} of the baseline's "
      f"time: no decode speedup can exceed {num(ceiling, 2)}× end to end)."
      if ceiling
      else "."
    )
    + aa_text(h.get("aa_control"))
    + compiles_text(h.get("timed_compiles")),
    "",
    "| method | α | τ | decode-phase speedup | speedup (end to end) | "
    "mismatches (near-tie) |",
    "|---|---|---|---|---|---|",
  ]
  for m, r in h["methods"].items():
    if m == "baseline":
      continue
    if not r.get("n"):
      lines.append(f"| {m} | failed: {r.get('failed')} |")
      continue
    lines.append(
      f"| {m} | {ci_num(r['alpha'], r['alpha_ci95'])} | "
      f"{ci_num(r['tau'], r['tau_ci95'], 2)} | "
      f"{ci_num(r['decode_speedup'], r['decode_speedup_ci95'])} | "
      f"{ci_num(r['speedup'], r['speedup_ci95'])} | "
      f"{r['mismatches']} ({r['near_tie_flips']}) |"
    )
  return lines


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
  sub, rt, rows = verdicts.headline_live(data)
  rows = rows or {}
  lines = [
    "## The reference's dual objective",
    "",
    "The reference trains L5, B1 and L5F to pull one output towards both "
    "target[t] and target[t+1] (REFERENCE_NOTES D8). The same recipes with "
    "the loss objective `next` (output[t] towards target[t+1] only) train "
    "the `(objective next)` rows, which are the decode adapters of every "
    "live method; next-position reading, test split:",
    "",
    "| adapter | token top-1, reference objective | token top-1, objective "
    "next | Accept@0.90, reference | Accept@0.90, next | live α, next |",
    "|---|---|---|---|---|---|",
  ]
  for ref, nxt in pairs:
    r = rows.get(f"decode:{nxt}", {})
    alpha = ci_num(r["alpha"], r.get("alpha_ci95")) if r.get("n") else "–"
    lines.append(
      f"| {ref.upper()} | {ci_pct(*verdicts._v(ads[ref], 'token_top1'))} | "
      f"{ci_pct(*verdicts._v(ads[nxt], 'token_top1'))} | "
      f"{ci_pct(*verdicts._v(ads[ref], 'accept_90'))} | "
      f"{ci_pct(*verdicts._v(ads[nxt], 'accept_90'))} | {alpha} |"
    )
  if sub:
    lines += ["", f"Live α: {setting(data, sub)}, {rt} runtime."]
  return lines + [""]


def widths_lines(data: dict) -> list[str]:
  """How L1-L4 were sized: on the seed's capacity axis, or why not."""
  w = data.get("prefill_widths")
  if not w:
    return []
  lines = ["## L1–L4 on the seed's capacity axis", ""]
  if w["axis"] != "seed":
    return lines + [
      "L1–L4 keep their recipes' widths (experiments/*.py), not scaled to "
      f"the seed's parameter ratios: {w['why_not']}.",
      "",
    ]
  lines += [
    f"At the pair's hidden size ({w['hidden']}) the recipes' widths do not "
    "form the seed's axis, so each width was scaled (tools/study/widths.py"
    ") until the parameter counts stand in the seed's ratios at hidden "
    f"4096 (largest relative error {100 * w['max_relative_error']:.1f}%):",
    "",
    "| adapter | width | params | ratio to L1 | the seed's ratio at 4096 |",
    "|---|---|---|---|---|",
  ]
  for name, over in w["overrides"].items():
    field, value = next(iter(over.items()))
    lines.append(
      f"| {name.upper()} | {field} {value} | {w['params'][name]} | "
      f"{num(w['ratios'][name], 2)} | {num(w['seed_ratios'][name], 2)} |"
    )
  return lines + [""]


# The 2× goal by where the best method's end-to-end CI lies against 2.
GOAL_WORDS = {
  verdicts.ABOVE: "— reaches 2× (CI above 2).",
  verdicts.BELOW: "— misses 2× (CI below 2).",
  verdicts.CROSSES: "— 2× not shown (CI crosses 2).",
}


def goal_lines(data: dict) -> list[str]:
  lines = ["## The 2× goal", ""]
  g = data["goal"]["by_setting"]
  if not g:
    lines.append("No live measurement yet.")
  for key, e in g.items():
    sub, rt = key.split("/")
    s = (
      f"- {setting(data, sub)}, {rt} runtime: best lossless method "
      f"{e['best_method']} at {ci_num(e['speedup'], e['speedup_ci95'])}× "
      f"end to end (decode phase "
      f"{ci_num(e['decode_speedup'], e['decode_speedup_ci95'])}×) "
      + GOAL_WORDS[e["side"]]
      + (
        " This run's A/A control failed: its timings are unreliable."
        if e.get("reliable") is False
        else ""
      )
    )
    x = e.get("analysis")
    if x:
      k = x["drafts_per_verification"]
      s += (
        f" Best drafting method {x['method']}: measured τ "
        f"{num(x['tau'], 2)}, c {num(x['c'])}, v {num(x['v'])} ({k:g} "
        f"drafts per verification); the decode-phase cost model τ/(kc + v) "
        f"gives {num(x['model_decode_speedup'])}×"
      )
      if x.get("model_error") is not None:
        s += (
          f" ({100 * x['model_error']:+.1f}% from the measured "
          f"{num(x['measured_decode_speedup'])}×)"
        )
      s += (
        f" and at most {num(x['decode_ceiling_full_acceptance'])}× at full "
        "acceptance"
      )
      if x.get("end_to_end_ceiling") is not None:
        s += (
          f"; the target's prefill is {pct(x['prefill_share'])} of its "
          f"end-to-end time, so no decode speedup can exceed "
          f"{num(x['end_to_end_ceiling'])}× end to end"
        )
      s += f". The limiting term is {x['limited_by']}."
    lines.append(s)
  return lines


# The recorded runs' path arguments, shown as names (they are machine-local).
PATH_NAMES = {
  "--out": "DIR",
  "--pack": "PARTS",
  "--unpack": "PARTS",
  "--costs_7b": "RESULTS_JSON",
}


def regenerate_lines(data: dict) -> list[str]:
  lines = [
    "",
    "## How to regenerate",
    "",
    "```",
    "python -m tools.study --out DIR PAIR_FLAGS --stages A --pack PARTS"
    "      # one GPU",
    "python -m tools.study --out DIR --unpack PARTS --stages B --redo bench1"
    "   # two GPUs",
    "```",
    "",
  ]
  for r in data["study"]["runs"]:
    argv = list(r.get("argv", []))
    for i, a in enumerate(argv[:-1]):  # Machine-local paths read as names.
      if a in PATH_NAMES:
        argv[i + 1] = PATH_NAMES[a]
    v = r.get("versions", {})
    lines.append(
      f"- {r.get('started')}: `python -m tools.study "
      + " ".join(argv)
      + "` ("
      + ", ".join(
        f"{k} {val}" for k, val in v.items() if val and k != "git_commit"
      )
      + ")"
      + _run_outcome(r)
    )
  devices = sorted(
    {f"{x['device']} ({setting(data, s)})" for s, x in data["live"].items()}
  )
  lines += [
    "",
    f"Adapters trained on {data['study'].get('train_device') or '–'}; "
    f"evaluated on {data['study'].get('evaluate_device') or '–'}. Live: "
    f"{', '.join(devices) or '–'}; versions as listed per run above"
    + ". Stage times (s): "
    + ", ".join(
      f"{k} {val}" for k, val in data["study"]["stage_seconds"].items()
    )
    + ".",
    "",
  ]
  return lines


LIVE_INTRO = (
  "tools/benchmark_sd.py on the test samples: every method interleaved on "
  "every sample, tokens checked against the target's own greedy tokens; "
  "each runtime is its own run. α = accepted / drafted; τ = tokens per "
  "verification; c = drafting time per drafted token and v = one "
  "verification, both relative to one target decode step; prefill overlap "
  "= target alone + drafter alone − concurrent wall (measured); speedup = "
  "ratio of mean end-to-end times against the same runtime's baseline, "
  "decode-phase speedup the same over the decoding phase alone (95% "
  "paired bootstrap CIs). The decode adapters are the objective-next ones."
)


def render(data: dict, pair, plot_paths: list[str]) -> str:
  t = data["target"] or {}
  lines = [
    f"# {pair.title()}",
    "",
    f"Generated {data['generated']} by `python -m tools.study` from "
    "`results/results.json`; every number and verdict below is computed "
    "from it.",
    "",
    "## The pair and the task",
    "",
    *pair.describe(data["pair"]),
    f"The target on the test answers: mean next-token entropy "
    f"{num(t.get('mean_entropy_nats'))} nats, mean top-1 probability "
    f"{pct(t.get('mean_top1_prob'))} over {t.get('positions')} positions "
    "(its own greedy answers, teacher-forced states through its LM head): "
    "how predictable the task is.",
    "",
    "## The seed's table",
    "",
    "Test split, each adapter trained with its experiments/*.py recipe at "
    "the target's hidden size, the same epochs and batch for all; best-"
    "validation checkpoint. Primary reading: `next` (output[t] vs "
    "target[t+1]) for L5/B1/L5F, `same` otherwise. Brackets: 95% bootstrap "
    f"CI over {ci_over(data)}. Leading run: tokens matched from the first "
    "position on."
    + (
      " The `(objective next)` rows are the same recipes with the loss "
      "objective `next` (see the reference's dual objective below)."
      if any(n in data["adapters"] for n in layout.NEXT_ADAPTERS)
      else " This study predates the `(objective next)` adapters."
    ),
    "",
    *seed_table(data),
    "",
    "Baselines beside each adapter (same metrics, same reading):",
    "",
    *baseline_table(data),
    "",
    "## Live speculative decoding",
    "",
    LIVE_INTRO,
    *live_tables(data),
  ]
  if "gpus1" not in data["live"]:
    lines += [
      "",
      "The one-GPU tables are absent: this study ran no bench1 stage yet "
      "(`--stages bench1,results` on a GPU, after `--unpack` of the parts "
      "that stage A packed).",
    ]
  if "gpus2" not in data["live"]:
    lines += [
      "",
      "The two-GPU table is absent: this study ran no bench2 stage (it "
      "needs a machine with two GPUs: `--stages B`).",
    ]
  lines += ["", *compare.render(data), *projection.lines(data)]
  lines += widths_lines(data)
  lines += ["## The seed's claims", ""]
  for c in data["claims"]:
    lines += [f"**{c['claim']}: {c['verdict']}.** {c['text']} {c['rule']}", ""]
  lines += objective_section(data)
  lines += goal_lines(data)
  if plot_paths:
    lines += ["", "## Plots", ""]
    for p in plot_paths:
      lines.append(f"![{os.path.basename(p)}](results/{os.path.basename(p)})")
  lines += regenerate_lines(data)
  return "\n".join(lines)


def write(study_dir: str, out_dir: str, pair, costs_7b=None) -> list[str]:
  """OUT/RESULTS.md, OUT/results/results.json and OUT/results/*.png
  (`costs_7b`: the 7B-shaped pair's benchmark results.json, if any)."""
  data = collect.collect(study_dir, pair, costs_7b)
  sub = os.path.join(out_dir, "results")
  os.makedirs(sub, exist_ok=True)
  path_json = os.path.join(sub, "results.json")
  with open(path_json, "w") as f:
    json.dump(data, f, indent=1)
  plot_paths = plots.make_plots(data, sub)
  path_md = os.path.join(out_dir, "RESULTS.md")
  with open(path_md, "w") as f:
    f.write(render(data, pair, plot_paths))
  return [path_md, path_json] + plot_paths


def bench_table(live: dict) -> str:
  """A short text table of one benchmark stage (printed after it)."""
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
        f"[{rt}] {m:22s} {num(r['alpha']):>6s} {num(r['tau'], 2):>5s} "
        f"{num(r['speedup']):>8s} {r['mismatches']:4d}"
      )
  return "\n".join(lines)


def stage_table(study, stage: str) -> str:
  """A short table of what a stage produced."""
  rec = study.state["stages"].get(stage, {})
  if stage == "train":
    lines = [f"{'adapter':8s} {'epochs':>6s} {'best val loss':>14s} {'s':>7s}"]
    for n, r in rec.get("adapters", {}).items():
      lines.append(
        f"{n:8s} {r['epochs_run']:6d} {num(r['best_val_loss'], 4):>14s} "
        f"{r['seconds']:7.1f}"
      )
    return "\n".join(lines)
  if stage == "evaluate":
    lines = [f"{'adapter':8s} {'reading':>7s} {'top-1':>7s} {'Acc@.90':>8s}"]
    for n, r in rec.get("adapters", {}).items():
      lines.append(
        f"{n:8s} {r['primary_reading']:>7s} {num(r['token_top1']):>7s} "
        f"{num(r['accept_90']):>8s}"
      )
    t = rec.get("target", {})
    lines.append(
      f"target on the test answers: entropy "
      f"{num(t.get('mean_entropy_nats'))} nats, top-1 p "
      f"{num(t.get('mean_top1_prob'))}"
    )
    return "\n".join(lines)
  if stage == "dump":
    return "\n".join(
      f"{s:6s} {v['samples']:6d} samples" for s, v in rec["splits"].items()
    )
  if stage in layout.BENCH_DIRS:
    return bench_table(
      collect.live_entry(
        {
          rt: collect.load(study.p(r["dir"], "results.json"))
          for rt, r in rec["runtimes"].items()
        }
      )
    )
  return ", ".join(
    f"{k}={v}"
    for k, v in rec.items()
    if k not in ("settings", "done") and not isinstance(v, dict)
  )


def ci_over(data: dict) -> str:
  """What the offline CIs resample, from the adapters' evaluations."""
  units = {
    (
      a.get("ci_resampling", "sample"),
      a.get("num_groups"),
      a.get("test_samples"),
    )
    for a in data["adapters"].values()
  }
  if len(units) != 1:
    return "test samples or groups (the adapters' evaluations differ)"
  unit, n, samples = units.pop()
  if unit == "group":
    return (
      f"the {n} test groups (the samples file's `group`, e.g. one scene), "
      f"each drawn with all its samples ({samples} in all), as samples of "
      "one group are not independent"
    )
  return f"the {samples} test samples"


def _run_outcome(run: dict) -> str:
  """' — ran: dump, train' / ' — failed in stage dump (ran: none)' ... of
  one recorded run; '' for runs recorded before outcomes were."""
  if "outcome" not in run:
    return ""
  ran = ", ".join(run.get("ran", [])) or "none"
  if run["outcome"] == "ran":
    text = f" — ran: {ran}"
  else:
    text = f" — {run['outcome']} (ran: {ran})"
  if run.get("left_for_time"):
    text += f"; left for time: {', '.join(run['left_for_time'])}"
  return text
