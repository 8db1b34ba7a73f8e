"""The decode adapters compared: trees against chains, k = 1 against k > 1,
and the offline prediction of tau against the live tau.

`comparisons(data)` computes the three tables from results.json's adapter
and live entries (it becomes results.json's `comparisons`); `render(data)`
writes their RESULTS.md sections. The live readings are the claims'
(verdicts.headline_live: two GPUs if measured, else one; first runtime),
every method shown with its mismatches.
"""

from __future__ import annotations

from tools.study import layout
from tools.study.verdicts import ci_num, ci_pct, headline_live, num, setting

READINGS = (
  ("free_running", "free-running"),
  ("teacher_forced", "teacher-forced"),
)
# The largest |predicted / live - 1| of issue 32's goal.
PREDICTION_GOAL = 0.10


def _live(data: dict):
  """(setting, runtime, every method's row) of the headline reading."""
  sub, rt, _ = headline_live(data)
  if sub is None:
    return None, None, {}
  return sub, rt, data["live"][sub]["by_runtime"][rt]["methods"]


def _measured(row: dict | None) -> dict | None:
  return row if row and row.get("n") else None


def chains_and_trees(data: dict, rows: dict) -> list[dict]:
  """Per live decode adapter: its chain (decode:A) and tree (tree:A)."""
  out = []
  for a in layout.LIVE_DECODE_ADAPTERS:
    chain = _measured(rows.get(f"decode:{a}"))
    for drafting, m in (("chain", f"decode:{a}"), ("tree", f"tree:{a}")):
      r = _measured(rows.get(m))
      if r is None:
        continue
      tau_vs_chain = None
      if drafting == "tree" and chain and chain["tau"] and r["tau"]:
        tau_vs_chain = r["tau"] / chain["tau"]
      out.append(
        {
          "adapter": a,
          "method": m,
          "drafting": drafting,
          "tau": r["tau"],
          "tau_ci95": r["tau_ci95"],
          "accepted_per_verification": None
          if r["tau"] is None
          else r["tau"] - 1,
          "draft_cost": r.get("draft_cost"),
          "verify_cost": r.get("verify_cost"),
          "decode_speedup": r["decode_speedup"],
          "decode_speedup_ci95": r["decode_speedup_ci95"],
          "speedup": r["speedup"],
          "speedup_ci95": r["speedup_ci95"],
          "mismatches": r["mismatches"],
          "tau_vs_chain": tau_vs_chain,
        }
      )
  return out


def unroll(data: dict, rows: dict) -> list[dict]:
  """k = 1 (*_next) against k > 1 (*_ttt): acceptance at depth offline,
  free-running and teacher-forced, and the chain's live tau."""
  ads, out = data["adapters"], []
  for deep in layout.TTT_ADAPTERS:
    one = f"{layout.kind(deep)}{layout.NEXT_SUFFIX}"
    for name in (one, deep):
      depth = (ads.get(name) or {}).get("depth_acceptance")
      if not depth:
        continue
      live = _measured(rows.get(f"decode:{name}"))
      out.append(
        {
          "adapter": name,
          "kind": layout.kind(name),
          "unroll_steps": ads[name].get("unroll_steps"),
          "gamma": depth["gamma"],
          "depth": {r: depth[r] for r, _ in READINGS},
          "live_tau": None if live is None else live["tau"],
          "live_tau_ci95": None if live is None else live["tau_ci95"],
        }
      )
  return out


def offline_vs_live(data: dict, rows: dict, sub) -> list[dict]:
  """Each live decode adapter's offline tau (free-running, at the live
  gamma) beside its chain's live tau, with the relative difference."""
  ads, out = data["adapters"], []
  live_gamma = data["live"][sub]["gamma"] if sub else None
  for a in layout.LIVE_DECODE_ADAPTERS:
    depth = (ads.get(a) or {}).get("depth_acceptance")
    live = _measured(rows.get(f"decode:{a}"))
    if not depth or live is None:
      continue
    pred = depth["free_running"]["tau"]
    note, rel = None, None
    if depth["gamma"] != live_gamma:
      note = f"offline at γ = {depth['gamma']}, live at γ = {live_gamma}"
    elif pred["value"] is not None and live["tau"]:
      rel = pred["value"] / live["tau"] - 1
    out.append(
      {
        "adapter": a,
        "gamma": depth["gamma"],
        "predicted_tau": pred["value"],
        "predicted_tau_ci95": pred["ci95"],
        "live_tau": live["tau"],
        "live_tau_ci95": live["tau_ci95"],
        "relative_difference": rel,
        "within_goal": None if rel is None else abs(rel) <= PREDICTION_GOAL,
        "note": note,
      }
    )
  return out


def comparisons(data: dict) -> dict:
  sub, rt, rows = _live(data)
  return {
    "setting": None if sub is None else {"setting": sub, "runtime": rt},
    "chains_and_trees": chains_and_trees(data, rows),
    "unroll": unroll(data, rows),
    "offline_vs_live": offline_vs_live(data, rows, sub),
  }


# --------------------------------------------------------------------------
# RESULTS.md sections.


def _where(data: dict) -> str:
  s = data["comparisons"]["setting"]
  if not s:
    return "no live measurement"
  return f"{setting(data, s['setting'])}, {s['runtime']} runtime"


def _drafting(data: dict, row: dict) -> str:
  s = data["comparisons"]["setting"]
  live = data["live"][s["setting"]] if s else {}
  if row["drafting"] == "chain":
    return f"chain, γ = {live.get('gamma')}"
  o = live.get("options") or {}
  return (
    f"tree, depth {o.get('tree_depth')}, top-k {o.get('tree_topk')}, "
    f"{o.get('tree_nodes')} nodes"
  )


def trees_lines(data: dict) -> list[str]:
  rows = data["comparisons"]["chains_and_trees"]
  proj = (data.get("projection_7b") or {}).get("methods") or {}
  lines = [
    "## Chains and trees per decode adapter",
    "",
    f"Live ({_where(data)}). τ = tokens per verification (accepted drafts "
    "+ the target's own token); drafting and verification per decode-"
    "phase verification, in target decode steps (measured here); "
    "decode-phase and end-to-end speedups over the same runtime's target "
    "alone, 95% CIs. The last column is a projection, not a measurement "
    "(see below).",
    "",
    "| adapter | drafting | τ | accepted / verification | drafting cost | "
    "verification cost | decode-phase speedup | end to end | mismatches | "
    "τ vs chain | projected for a 7B pair (decode phase) |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  if not rows:
    lines.append("| – | no decode method measured live | | | | | | | | | |")
  for r in rows:
    p = (proj.get(r["method"]) or {}).get("decode_speedup")
    lines.append(
      f"| {layout.title(r['adapter'])} | {_drafting(data, r)} | "
      f"{ci_num(r['tau'], r['tau_ci95'], 2)} | "
      f"{num(r['accepted_per_verification'], 2)} | "
      f"{num(r['draft_cost'], 2)} | {num(r['verify_cost'], 2)} | "
      f"{ci_num(r['decode_speedup'], r['decode_speedup_ci95'])} | "
      f"{ci_num(r['speedup'], r['speedup_ci95'])} | {r['mismatches']} | "
      + (f"{num(r['tau_vs_chain'], 2)}× | " if r["tau_vs_chain"] else "– | ")
      + (f"{num(p, 2)}× (projected) |" if p is not None else "– |")
    )
  return lines + [""]


def _depth_cells(entry: dict, gamma: int) -> list[str]:
  return [
    ci_pct(entry[f"depth_{d}"]["value"], entry[f"depth_{d}"]["ci95"])
    if f"depth_{d}" in entry
    else "–"
    for d in range(1, gamma + 1)
  ]


def unroll_lines(data: dict) -> list[str]:
  rows = data["comparisons"]["unroll"]
  if not rows:
    return []
  gamma = max(r["gamma"] for r in rows)
  lines = [
    "## Multi-step training: k = 1 against k > 1",
    "",
    "The same recipes (objective next) trained one step deep (k = 1, the "
    "`(objective next)` adapters) and k steps deep, fed their own "
    "predicted states (`(objective next, multi-step)`, experiments/"
    "*_ttt.py). Offline, test split: the share of chain starts whose "
    "first d drafts all match the target's tokens, free-running (the "
    "adapter fed its own states, as live) and teacher-forced (true states "
    "at every step), and the chain's expected τ = 1 + Σ_d share_d; live: "
    f"the chain's τ ({_where(data)}). 95% CIs.",
    "",
    "| adapter | k | reading | "
    + " | ".join(f"depth {d}" for d in range(1, gamma + 1))
    + " | offline τ | live τ |",
    "|---|---|---|" + "---|" * (gamma + 2),
  ]
  for r in rows:
    for key, label in READINGS:
      e = r["depth"][key]
      live = (
        ci_num(r["live_tau"], r["live_tau_ci95"], 2)
        if key == "free_running" and r["live_tau"] is not None
        else "–"
      )
      lines.append(
        f"| {layout.title(r['adapter'])} | {r['unroll_steps'] or '?'} | "
        f"{label} | "
        + " | ".join(_depth_cells(e, gamma))
        + f" | {ci_num(e['tau']['value'], e['tau']['ci95'], 2)} | {live} |"
      )
  return lines + [""]


def offline_lines(data: dict) -> list[str]:
  rows = data["comparisons"]["offline_vs_live"]
  if not rows:
    return []
  lines = [
    "## Offline prediction against live τ",
    "",
    "For every decode adapter: the τ its offline free-running acceptance "
    "at depth predicts for chain drafting at the live γ (evaluate's "
    "`depth_acceptance.free_running.tau`, test split) beside the τ its "
    f"chain measured live ({_where(data)}); relative difference = "
    f"predicted / live − 1 (issue 32's goal: within ±"
    f"{100 * PREDICTION_GOAL:.0f}%).",
    "",
    "| adapter | γ | predicted τ (offline) | live τ | relative difference |",
    "|---|---|---|---|---|",
  ]
  for r in rows:
    rel = r["relative_difference"]
    diff = r["note"] or "–"
    if rel is not None:
      diff = f"{100 * rel:+.1f}%" + (
        "" if r["within_goal"] else f" (outside ±{100 * PREDICTION_GOAL:.0f}%)"
      )
    lines.append(
      f"| {layout.title(r['adapter'])} | {r['gamma']} | "
      f"{ci_num(r['predicted_tau'], r['predicted_tau_ci95'], 2)} | "
      f"{ci_num(r['live_tau'], r['live_tau_ci95'], 2)} | {diff} |"
    )
  return lines + [""]


def render(data: dict) -> list[str]:
  """The three sections (those with rows) as RESULTS.md lines."""
  return trees_lines(data) + unroll_lines(data) + offline_lines(data)
