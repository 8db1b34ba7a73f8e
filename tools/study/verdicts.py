"""The seed's claims judged from results.json, each by a written rule.

Verdicts: "holds" when the confidence interval lies on the claim's side of
its line; "fails" when it lies wholly on the other side; "not shown" when
it crosses the line; "partly" only where one named part of a claim holds
and another fails; "mixed" where readings of one claim disagree (L5F > B1:
offline top-1, live α and live τ). A study whose adapters accept nothing
judges no claim ("not judged") and says so.
"""

from __future__ import annotations

from tools.study import layout

ABOVE, BELOW, CROSSES = "above", "below", "crosses"
PLATEAU_POINTS = 0.05  # the widest gap L1–L4 may show and still plateau
FAR_POINTS = 0.10  # "≫": the lead B1 needs over L5


def pct(x) -> str:
  return "–" if x is None else f"{100 * x:.1f}%"


def ci_pct(v, ci) -> str:
  if v is None:
    return "–"
  if not ci:
    return pct(v)
  return f"{pct(v)} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def num(x, nd=3) -> str:
  return "–" if x is None else f"{x:.{nd}f}"


def ci_num(v, ci, nd=3) -> str:
  if v is None:
    return "–"
  if not ci:
    return num(v, nd)
  return f"{num(v, nd)} [{num(ci[0], nd)}, {num(ci[1], nd)}]"


def side(ci, line: float) -> str:
  """Where an interval lies against a line (a missing CI crosses it)."""
  if ci and ci[0] > line:
    return ABOVE
  if ci and ci[1] < line:
    return BELOW
  return CROSSES


def order(a_ci, b_ci) -> str:
  """Where interval a lies against interval b."""
  if a_ci and b_ci and a_ci[0] > b_ci[1]:
    return ABOVE
  if a_ci and b_ci and a_ci[1] < b_ci[0]:
    return BELOW
  return CROSSES


def setting(data: dict, sub: str) -> str:
  """The name of a live setting as the report writes it."""
  return layout.setting_name(sub, data["live"][sub]["device"])


def _v(entry: dict, key: str):
  return entry["metrics"][key]["value"], entry["metrics"][key]["ci95"]


def _claim(name, verdict, text, rule) -> dict:
  return {"claim": name, "verdict": verdict, "text": text, "rule": rule}


def _unmeasured(name, rule) -> dict:
  return _claim(name, "not measured", "The study has no data for it.", rule)


def lossless(row: dict) -> bool:
  """A measured method whose every token matched the target's greedy ones,
  but for near-tie flips: tokens where the target's top-2 logits differ by
  less than the benchmark's --tie_margin, which batched verification and
  one-token decoding order differently in float16 (numerics, not a wrong
  proposer or verifier)."""
  flips = row.get("near_tie_flips") or 0
  return bool(row.get("n")) and row["mismatches"] - flips == 0


def headline_live(data: dict):
  """(setting, runtime, lossless rows) the live claims read: two GPUs if
  measured, the first runtime. Methods with mismatches other than near-tie
  flips are left out (`lossless`)."""
  for sub in ("gpus2", "gpus1"):
    live = data["live"].get(sub)
    if live:
      rt = live["runtimes"][0]
      rows = live["by_runtime"][rt]["methods"]
      return sub, rt, {m: r for m, r in rows.items() if lossless(r)}
  return None, None, None


def accepts_nothing(data: dict) -> str | None:
  """Why no claim can be judged (None: something is accepted)."""
  ads = data["adapters"]
  for live in data["live"].values():
    alphas = [
      r.get("alpha")
      for block in live["by_runtime"].values()
      for m, r in block["methods"].items()
      if r.get("n") and layout.method_kind(m) in ("prefill_hiding", "decode")
    ]
    if alphas and all((a or 0) <= 0 for a in alphas):
      return "every adapter method accepted 0 drafted tokens live (α = 0)"
  top = [a["metrics"]["token_top1"]["value"] for a in ads.values()]
  if top and all((t or 0) <= 0 for t in top):
    return "every adapter's offline token top-1 is 0%"
  return None


def claim_plateau(data: dict) -> dict:
  name = "L1–L4 plateau whatever their capacity"
  rule = (
    "Rule, on Accept@0.90 (the seed's metric) and token top-1 each: the "
    "part holds when the best of L1–L4 exceeds the worst by at most "
    f"{100 * PLATEAU_POINTS:.0f} points even at the ends of their 95% CIs "
    "(best's upper end − worst's lower end); it fails when the best's CI "
    f"lies more than {100 * PLATEAU_POINTS:.0f} points above the worst's; "
    "not shown otherwise. Both parts hold: holds; both fail: fails; one "
    "holds and one fails: partly."
  )
  ads = data["adapters"]
  if not all(a in ads for a in layout.PREFILL_ADAPTERS):
    return _unmeasured(name, rule)
  parts, texts = {}, []
  for key, label in (("accept_90", "Accept@0.90"), ("token_top1", "top-1")):
    vals = {a: _v(ads[a], key) for a in layout.PREFILL_ADAPTERS}
    hi = max(vals, key=lambda a: vals[a][0] or 0)
    lo = min(vals, key=lambda a: vals[a][0] or 0)
    (_, hci), (_, lci) = vals[hi], vals[lo]
    if hci and lci and hci[1] - lci[0] <= PLATEAU_POINTS:
      parts[label] = "holds"
    elif hci and lci and hci[0] - lci[1] > PLATEAU_POINTS:
      parts[label] = "fails"
    else:
      parts[label] = "not shown"
    texts.append(
      f"{label}: "
      + ", ".join(
        f"{a.upper()} {ci_pct(*vals[a])} ({ads[a]['params'] or '?'} params)"
        for a in layout.PREFILL_ADAPTERS
      )
      + f"; best {hi.upper()}, worst {lo.upper()}: {parts[label]}"
    )
  verdict = _combine(list(parts.values()))
  w = data.get("prefill_widths") or {}
  axis = (
    " The widths are scaled so the parameter counts stand in the seed's "
    "ratios at hidden 4096 (the seed's capacity axis)."
    if w.get("axis") == "seed"
    else " The widths are each recipe's at this hidden size, not scaled "
    "to the seed's parameter ratios at 4096"
    + (f" ({w['why_not']})." if w.get("why_not") else ".")
  )
  text = "; ".join(texts) + "." + axis
  return _claim(name, verdict, text, rule)


def _combine(parts: list[str]) -> str:
  """holds / fails when every part agrees; partly for holds + fails."""
  if all(p == "holds" for p in parts):
    return "holds"
  if all(p == "fails" for p in parts):
    return "fails"
  if "holds" in parts and "fails" in parts:
    return "partly"
  return "not shown"


def claim_b1_l5(data: dict) -> dict:
  name = "B1 ≫ L5 (the cross-modal gap dominates)"
  rule = (
    "Rule (next-position token top-1 of the seed's recipes): holds when "
    "B1's 95% CI lies wholly above L5's and its lower end leads L5's "
    f"upper end by at least {100 * FAR_POINTS:.0f} points; partly when B1 "
    "lies wholly above but by less (B1 > L5 holds, ≫ fails); fails when "
    "B1's CI lies wholly below L5's; not shown when they overlap."
  )
  ads = data["adapters"]
  if "b1" not in ads or "l5" not in ads:
    return _unmeasured(name, rule)
  b, l5 = _v(ads["b1"], "token_top1"), _v(ads["l5"], "token_top1")
  where = order(b[1], l5[1])
  if where == ABOVE:
    far = b[1][0] - l5[1][1] >= FAR_POINTS
    verdict = "holds" if far else "partly"
  else:
    verdict = "fails" if where == BELOW else "not shown"
  gap = (b[0] or 0) - (l5[0] or 0)
  text = (
    f"Next-position token top-1: B1 {ci_pct(*b)}, L5 {ci_pct(*l5)} "
    f"({100 * gap:+.1f} points); Accept@0.90: B1 "
    f"{ci_pct(*_v(ads['b1'], 'accept_90'))}, L5 "
    f"{ci_pct(*_v(ads['l5'], 'accept_90'))}."
  )
  text += _live_pair(data, "decode:b1_next", "decode:l5_next")
  return _claim(name, verdict, text, rule)


def claim_l5f_b1(data: dict) -> dict:
  name = "L5F > B1 (the event stream adds signal)"
  rule = (
    "Rule: three readings, each L5F's 95% CI against B1's: offline next-"
    "position token top-1 (the seed's recipes) and, live, α and τ of "
    "decode:l5f_next vs decode:b1_next. Holds when every reading lies "
    "above; fails when every one lies below; mixed when some lie above and "
    "some below; not shown otherwise."
  )
  ads = data["adapters"]
  if "b1" not in ads or "l5f" not in ads:
    return _unmeasured(name, rule)
  f, b = _v(ads["l5f"], "token_top1"), _v(ads["b1"], "token_top1")
  readings = {"offline top-1": order(f[1], b[1])}
  _, _, rows = headline_live(data)
  lf, lb = (
    (rows or {}).get("decode:l5f_next"),
    (rows or {}).get("decode:b1_next"),
  )
  if lf and lb:
    readings["live α"] = order(lf["alpha_ci95"], lb["alpha_ci95"])
    readings["live τ"] = order(lf["tau_ci95"], lb["tau_ci95"])
  sides = set(readings.values())
  if sides == {ABOVE}:
    verdict = "holds"
  elif sides == {BELOW}:
    verdict = "fails"
  elif {ABOVE, BELOW} <= sides:
    verdict = "mixed"
  else:
    verdict = "not shown"
  gap = (f[0] or 0) - (b[0] or 0)
  text = (
    f"Next-position token top-1: L5F {ci_pct(*f)}, B1 {ci_pct(*b)} "
    f"({100 * gap:+.1f} points)."
    + _live_pair(data, "decode:l5f_next", "decode:b1_next")
    + " L5F against B1: "
    + ", ".join(f"{k} {v}" for k, v in readings.items())
    + "."
  )
  if len(readings) == 1:
    text += " Live α and τ not measured: judged on the offline reading alone."
  return _claim(name, verdict, text, rule)


def _live_pair(data: dict, a: str, b: str) -> str:
  sub, rt, rows = headline_live(data)
  if not rows or a not in rows or b not in rows:
    return ""
  ra, rb = rows[a], rows[b]
  return (
    f" Live ({setting(data, sub)}, {rt} runtime): {a} α "
    f"{ci_num(ra['alpha'], ra['alpha_ci95'])}, τ "
    f"{ci_num(ra['tau'], ra['tau_ci95'], 2)}; {b} α "
    f"{ci_num(rb['alpha'], rb['alpha_ci95'])}, τ "
    f"{ci_num(rb['tau'], rb['tau_ci95'], 2)}."
  )


def _aa_line(data: dict, sub: str, rt: str) -> tuple[float, str]:
  """The line end-to-end time saved is judged against: the A/A control's
  upper CI end when the benchmark measured one, else 1."""
  aa = data["live"][sub]["by_runtime"][rt].get("aa_control") or {}
  ci = aa.get("speedup_ci95")
  if ci:
    return float(ci[1]), f"the A/A control's upper end {num(ci[1])}"
  return 1.0, "1 (no A/A control measured)"


def _unreliable(data: dict, sub: str, rt: str, method: str) -> str | None:
  """Why the run's timings cannot judge a speed claim about `method`: its
  A/A control failed, or torch.compile compiled inside the method's timed
  runs (None: neither)."""
  block = data["live"][sub]["by_runtime"][rt]
  aa = block.get("aa_control") or {}
  if aa.get("reliable") is False:
    return (
      f"The live run's A/A control (baseline against itself) read "
      f"{ci_num(aa.get('speedup'), aa.get('speedup_ci95'))}, outside "
      "[0.98, 1.02] or its CI excluding 1, so its timings judge no speed "
      "claim: not shown. "
    )
  compiled = [
    c for c in block.get("timed_compiles") or [] if c["method"] == method
  ]
  if compiled:
    return (
      f"torch.compile compiled inside {method}'s timed runs on "
      f"{len(compiled)} sample(s), so its times include compilation: "
      "not shown. "
    )
  return None


def _speed_claim(data, sub, rt, method, name, verdict, text, rule) -> dict:
  """A speed claim's verdict about `method`, "not shown" when its timings
  are unreliable (`_unreliable`)."""
  why = _unreliable(data, sub, rt, method)
  if why:
    return _claim(name, "not shown", why + text, rule)
  return _claim(name, verdict, text, rule)


def claim_prefill(data: dict) -> dict:
  name = "Prefill hiding gives accepted tokens for free"
  rule = (
    "Rule (two GPUs if measured, else one; first runtime; lossless "
    "methods, near-tie flips allowed): two named parts, for the "
    "prefill_hiding method that accepts the most prefill drafts: (1) "
    "tokens drafted during the target's prefill are accepted; (2) "
    "end-to-end time is saved: its speedup CI lies above the A/A control "
    "(above 1 when none was measured). Holds: both; partly: (1) and the "
    "CI lies wholly below the line; not shown: (1) and the CI crosses it, "
    "or the run's A/A control failed, or the method compiled inside its timed "
    "runs; fails: no prefill draft accepted."
  )
  sub, rt, rows = headline_live(data)
  ph = {
    m: r
    for m, r in (rows or {}).items()
    if layout.method_kind(m) == "prefill_hiding"
  }
  if not ph:
    return _unmeasured(name, rule)
  best = max(ph, key=lambda m: ph[m]["accepted_in_prefill_per_sample"] or 0)
  r = ph[best]
  line, line_text = _aa_line(data, sub, rt)
  saved = side(r["speedup_ci95"], line)
  if (r["accepted_in_prefill_per_sample"] or 0) <= 0:
    verdict = "fails"
  else:
    verdict = {ABOVE: "holds", BELOW: "partly", CROSSES: "not shown"}[saved]
  text = (
    f"{setting(data, sub)}, {rt} runtime: "
    + "; ".join(
      f"{m}: {num(x['accepted_in_prefill_per_sample'], 2)} tokens accepted "
      f"per sample from the prefill drafts, overlap "
      f"{num(x['prefill_overlap_ms'], 2)} ms, end-to-end speedup "
      f"{ci_num(x['speedup'], x['speedup_ci95'])}"
      for m, x in ph.items()
    )
    + f". Best: {best}; its speedup CI lies {saved} {line_text}."
  )
  return _speed_claim(data, sub, rt, best, name, verdict, text, rule)


def claim_two_phase(data: dict) -> dict:
  name = "The two-phase pipeline speeds up decoding"
  rule = (
    "Rule (two GPUs if measured, else one; first runtime; lossless "
    "methods, near-tie flips allowed): judged on the decode-phase speedup "
    "of the best two_phase method: holds when its 95% CI lies wholly "
    "above 1; fails when wholly below 1; not shown when it crosses 1, "
    "when the run's A/A control failed, or when the method compiled inside "
    "its timed runs."
  )
  sub, rt, rows = headline_live(data)
  tp = {
    m: r
    for m, r in (rows or {}).items()
    if layout.method_kind(m) == "two_phase"
  }
  if not tp:
    return _unmeasured(name, rule)
  best = max(tp, key=lambda m: tp[m]["decode_speedup"] or 0)
  where = side(tp[best]["decode_speedup_ci95"], 1.0)
  verdict = {ABOVE: "holds", BELOW: "fails", CROSSES: "not shown"}[where]
  text = (
    f"{setting(data, sub)}, {rt} runtime: "
    + "; ".join(
      f"{m}: decode phase "
      f"{ci_num(x['decode_speedup'], x['decode_speedup_ci95'])}"
      f" (end to end {ci_num(x['speedup'], x['speedup_ci95'])}), α "
      f"{num(x['alpha'])}, τ {num(x['tau'], 2)}"
      for m, x in tp.items()
    )
    + f". Best: {best}."
  )
  return _speed_claim(data, sub, rt, best, name, verdict, text, rule)


CLAIMS = (
  claim_plateau,
  claim_b1_l5,
  claim_l5f_b1,
  claim_prefill,
  claim_two_phase,
)


def claims(data: dict) -> list[dict]:
  """Every claim's verdict, or "not judged" when nothing is accepted."""
  out = [c(data) for c in CLAIMS]
  why = accepts_nothing(data)
  if why:
    for c in out:
      c["verdict"] = "not judged"
      c["text"] = f"No claim is judged: {why}. " + c["text"]
  return out


def best_lossless(rows: dict) -> str | None:
  """The fastest lossless method (the baseline is not a method)."""
  ok = {m: r for m, r in rows.items() if m != "baseline" and lossless(r)}
  return max(ok, key=lambda m: ok[m]["speedup"] or 0) if ok else None


def _limit(method: str, r: dict, amdahl: dict) -> dict:
  """What stops a drafting method short of 2x end to end: the decode-phase
  cost model tau / (drafts c + v) with its measured tau, c and v, and how
  far it lies from the measured decode-phase speedup; its ceiling at full
  acceptance (tau = drafts + 1); and the prefill's ceiling (Amdahl: 1 / the
  baseline's prefill share)."""
  k, c, v = r["drafts_per_verification"], r["c"], r["v"]
  cost = k * c + v
  model, measured = r["tau"] / cost, r.get("decode_speedup")
  full = (k + 1) / cost
  prefill = amdahl.get("end_to_end_ceiling")
  if prefill is not None and prefill < 2.0:
    limited = (
      "the prefill: even a decode phase of zero time stays below 2× end to end"
    )
  elif full < 2.0:
    limited = "cost: even full acceptance stays below 2× at these c and v"
  else:
    limited = "acceptance: these c and v would allow 2× at a higher τ"
  return {
    "method": method,
    "alpha": r["alpha"],
    "tau": r["tau"],
    "drafts_per_verification": k,
    "c": c,
    "v": v,
    "model_decode_speedup": model,
    "measured_decode_speedup": measured,
    # model / measured - 1: what the model leaves out (loop overhead, plain
    # decode steps, the prefill-phase verification).
    "model_error": model / measured - 1.0 if measured else None,
    "decode_ceiling_full_acceptance": full,
    "prefill_share": amdahl.get("baseline_prefill_share"),
    "end_to_end_ceiling": prefill,
    "limited_by": limited,
  }


def goal(data: dict) -> dict:
  """The >= 2x goal: the best lossless method per setting and runtime, and
  for the best drafting method the term that stops it (`_limit`)."""
  out = {"target_speedup": 2.0, "by_setting": {}}
  for sub, live in data["live"].items():
    for rt, block in live["by_runtime"].items():
      rows = block["methods"]
      best = best_lossless(rows)
      if best is None:
        continue
      entry = {
        "best_method": best,
        "speedup": rows[best]["speedup"],
        "speedup_ci95": rows[best]["speedup_ci95"],
        "decode_speedup": rows[best]["decode_speedup"],
        "decode_speedup_ci95": rows[best]["decode_speedup_ci95"],
        # The end-to-end CI against 2: above, below or crosses.
        "side": side(rows[best]["speedup_ci95"], 2.0),
        # False when the run's A/A control failed (its timings unreliable).
        "reliable": (block.get("aa_control") or {}).get("reliable"),
      }
      costed = {
        m: r
        for m, r in rows.items()
        if m != "baseline"
        and lossless(r)
        and r["c"] is not None
        and r["v"]
        and r.get("tau") is not None
        and r.get("drafts_per_verification")
      }
      if costed:
        entry["analysis"] = _limit(
          *max(costed.items(), key=lambda kv: kv[1]["speedup"] or 0),
          (block.get("amdahl") or {}).get(rt) or {},
        )
      out["by_setting"][f"{sub}/{rt}"] = entry
  return out
