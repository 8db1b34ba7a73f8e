"""The study's verdict rules on hand-made result tables (tools/study).

One table per rule; each verdict's numbers are chosen so that moving one CI
end across its line changes the verdict.
"""

import numpy as np
import pytest

from tools.study import layout, report, stages, verdicts


def _m(value, ci):
  return {"value": value, "ci95": ci}


def _entry(top1, top_ci, acc=None, acc_ci=None, params=1000):
  acc, acc_ci = (top1, top_ci) if acc is None else (acc, acc_ci)
  return {
    "params": params,
    "metrics": {"token_top1": _m(top1, top_ci), "accept_90": _m(acc, acc_ci)},
  }


def _row(**kw):
  row = {
    "n": 4,
    "alpha": 0.5,
    "alpha_ci95": [0.4, 0.6],
    "tau": 2.0,
    "tau_ci95": [1.8, 2.2],
    "c": 0.1,
    "v": 1.1,
    "drafts_per_verification": 5,
    "speedup": 1.3,
    "speedup_ci95": [1.1, 1.5],
    "decode_speedup": 1.3,
    "decode_speedup_ci95": [1.1, 1.5],
    "accepted_in_prefill_per_sample": 2.0,
    "prefill_overlap_ms": 5.0,
    "mismatches": 0,
  }
  row.update(kw)
  return row


def _live(rows, aa=None, device="NVIDIA H100"):
  block = {"methods": {"baseline": _row(alpha=None), **rows}}
  if aa:
    block["aa_control"] = aa
  return {
    "gpus1": {
      "device": device,
      "gamma": 5,
      "runtimes": ["fast"],
      "by_runtime": {"fast": block},
    }
  }


def _data(adapters=None, rows=None, **kw):
  return {"adapters": adapters or {}, "live": _live(rows or {}, **kw)}


@pytest.mark.parametrize(
  "accept, top1, verdict",
  [
    ((0.50, 0.51), (0.50, 0.51), "holds"),  # both within 5 points
    ((0.30, 0.60), (0.30, 0.60), "fails"),  # both far apart
    ((0.50, 0.51), (0.30, 0.60), "partly"),  # Accept holds, top-1 fails
    ((0.50, 0.54), (0.50, 0.54), "not shown"),  # gap could exceed 5 points
  ],
)
def test_plateau_reads_accept_and_top1(accept, top1, verdict):
  w = 0.01
  lo_hi = dict(zip(layout.PREFILL_ADAPTERS, range(4), strict=True))
  ads = {}
  for a, i in lo_hi.items():
    ac = accept[0] if i < 3 else accept[1]
    tp = top1[0] if i < 3 else top1[1]
    ads[a] = _entry(tp, [tp - w, tp + w], ac, [ac - w, ac + w])
  c = verdicts.claim_plateau({"adapters": ads, "live": {}})
  assert c["verdict"] == verdict, c["text"]


@pytest.mark.parametrize(
  "b1, l5, verdict",
  [
    ((0.6, [0.55, 0.65]), (0.3, [0.25, 0.35]), "holds"),
    ((0.5, [0.45, 0.55]), (0.4, [0.36, 0.44]), "partly"),  # above, < 10 pts
    ((0.3, [0.25, 0.35]), (0.6, [0.55, 0.65]), "fails"),
    ((0.5, [0.40, 0.60]), (0.45, [0.35, 0.55]), "not shown"),
  ],
)
def test_b1_over_l5(b1, l5, verdict):
  data = {"adapters": {"b1": _entry(*b1), "l5": _entry(*l5)}, "live": {}}
  assert verdicts.claim_b1_l5(data)["verdict"] == verdict


@pytest.mark.parametrize(
  "offline, live_alpha, verdict",
  [
    ("above", "above", "holds"),
    ("above", "below", "mixed"),
    ("below", "below", "fails"),
    ("above", "cross", "not shown"),
    ("cross", None, "not shown"),
  ],
)
def test_l5f_over_b1_reads_offline_and_live(offline, live_alpha, verdict):
  hi, lo, mid = (0.6, [0.55, 0.65]), (0.3, [0.25, 0.35]), (0.45, [0.2, 0.7])
  f, b = {"above": (hi, lo), "below": (lo, hi), "cross": (mid, mid)}[offline]
  rows = {}
  if live_alpha:
    fa, ba = {
      "above": ([0.5, 0.6], [0.1, 0.2]),
      "below": ([0.1, 0.2], [0.5, 0.6]),
      "cross": ([0.1, 0.6], [0.2, 0.5]),
    }[live_alpha]
    tau = {"above": ([3, 4], [1, 2]), "below": ([1, 2], [3, 4])}.get(
      live_alpha, ([1, 4], [2, 3])
    )
    rows = {
      "decode:l5f_next": _row(alpha_ci95=fa, tau_ci95=tau[0]),
      "decode:b1_next": _row(alpha_ci95=ba, tau_ci95=tau[1]),
    }
  data = _data({"l5f": _entry(*f), "b1": _entry(*b)}, rows)
  c = verdicts.claim_l5f_b1(data)
  assert c["verdict"] == verdict, c["text"]
  if live_alpha:
    assert "live α" in c["text"] and "live τ" in c["text"]
    assert "offline reading alone" not in c["text"]
  else:
    assert "judged on the offline reading alone" in c["text"]


@pytest.mark.parametrize(
  "accepted, ci, aa, verdict",
  [
    (2.0, [1.1, 1.5], None, "holds"),
    (2.0, [0.7, 0.9], None, "partly"),  # accepted, time not saved
    (2.0, [0.9, 1.2], None, "not shown"),
    (0.0, [1.1, 1.5], None, "fails"),
    (2.0, [1.1, 1.5], {"speedup_ci95": [0.95, 1.2]}, "not shown"),
  ],
)
def test_prefill_hiding_is_judged_against_the_aa_control(
  accepted, ci, aa, verdict
):
  rows = {
    "prefill_hiding:l4": _row(
      accepted_in_prefill_per_sample=accepted, speedup_ci95=ci
    )
  }
  c = verdicts.claim_prefill(_data(rows=rows, aa=aa))
  assert c["verdict"] == verdict, c["text"]


@pytest.mark.parametrize(
  "decode_ci, end_to_end_ci, verdict",
  [
    ([1.1, 1.5], [0.8, 1.2], "holds"),  # the decode phase decides
    ([0.9, 1.3], [1.1, 1.5], "not shown"),
    ([0.6, 0.9], [1.1, 1.5], "fails"),
  ],
)
def test_two_phase_reads_the_decode_phase(decode_ci, end_to_end_ci, verdict):
  rows = {
    "two_phase:l4+b1_next": _row(
      decode_speedup_ci95=decode_ci, speedup_ci95=end_to_end_ci
    )
  }
  c = verdicts.claim_two_phase(_data(rows=rows))
  assert c["verdict"] == verdict


def test_best_method_never_has_mismatches():
  rows = {
    "decode:b1_next": _row(speedup=3.0, speedup_ci95=[2.5, 3.5], mismatches=1),
    "decode:l5_next": _row(speedup=1.5, speedup_ci95=[1.2, 1.8]),
    "two_phase:l4+b1_next": _row(
      decode_speedup=5.0, decode_speedup_ci95=[0.5, 9], mismatches=2
    ),
    "two_phase:l4+l5f_next": _row(decode_speedup_ci95=[1.1, 1.4]),
  }
  data = _data(rows=rows)
  g = verdicts.goal(data)["by_setting"]["gpus1/fast"]
  assert g["best_method"] == "decode:l5_next"
  assert g["analysis"]["method"] == "decode:l5_next"
  c = verdicts.claim_two_phase(data)
  assert c["text"].endswith("Best: two_phase:l4+l5f_next.")
  assert c["verdict"] == "holds"
  everything_wrong = {m: _row(mismatches=1) for m in rows}
  assert verdicts.best_lossless(everything_wrong) is None
  assert verdicts.goal(_data(rows=everything_wrong))["by_setting"] == {}


def test_near_tie_flips_do_not_make_a_method_lossy():
  rows = {
    # Three mismatches, all near-tie flips (float16 numerics): lossless.
    "decode:b1_next": _row(speedup=3.0, mismatches=3, near_tie_flips=3),
    # One of two is not a near tie: left out.
    "decode:l5f_next": _row(speedup=4.0, mismatches=2, near_tie_flips=1),
    "decode:l5_next": _row(speedup=1.5),
  }
  assert verdicts.best_lossless(rows) == "decode:b1_next"
  _, _, kept = verdicts.headline_live(_data(rows=rows))
  assert "decode:b1_next" in kept and "decode:l5f_next" not in kept


@pytest.mark.parametrize(
  "prefill_ceiling, c, tau, limited",
  [
    (1.9, 0.05, 3.0, "the prefill"),  # decode could reach 2x, prefill not
    (5.0, 0.5, 3.0, "cost"),  # (5 + 1) / (5 * 0.5 + 1.1) = 1.67 < 2
    (5.0, 0.05, 2.0, "acceptance"),  # 2.0 / 1.35 = 1.48; full: 4.44
  ],
)
def test_the_goal_names_what_stops_the_best_drafting_method(
  prefill_ceiling, c, tau, limited
):
  row = _row(c=c, tau=tau, speedup=1.2, decode_speedup=1.25)
  # A faster lossless method without a drafting cost (prefill hiding) is
  # the best method; the analysis is of the best drafting one.
  hiding = _row(c=None, speedup=1.3, decode_speedup=1.0)
  data = _data(rows={"decode:b1_next": row, "prefill_hiding:l4": hiding})
  block = data["live"]["gpus1"]["by_runtime"]["fast"]
  block["amdahl"] = {
    "fast": {
      "baseline_prefill_share": 1 / prefill_ceiling,
      "end_to_end_ceiling": prefill_ceiling,
    }
  }
  entry = verdicts.goal(data)["by_setting"]["gpus1/fast"]
  assert entry["best_method"] == "prefill_hiding:l4"
  x = entry["analysis"]
  assert x["method"] == "decode:b1_next"
  assert x["model_decode_speedup"] == pytest.approx(tau / (5 * c + 1.1))
  # How far the model lies from the measured decode phase, as the report
  # says it.
  assert x["model_error"] == pytest.approx(tau / (5 * c + 1.1) / 1.25 - 1)
  data["goal"] = verdicts.goal(data)
  (line,) = [x for x in report.goal_lines(data) if x.startswith("- ")]
  assert f"({100 * x['model_error']:+.1f}% from the measured 1.250×)" in line
  assert x["decode_ceiling_full_acceptance"] == pytest.approx(6 / (5 * c + 1.1))
  assert x["limited_by"].startswith(limited)


def test_a_study_that_accepts_nothing_judges_no_claim():
  rows = {m: _row(alpha=0.0) for m in ("decode:b1_next", "prefill_hiding:l4")}
  ads = {a: _entry(0.0, [0.0, 0.0]) for a in layout.ADAPTERS}
  out = verdicts.claims(_data(ads, rows))
  assert {c["verdict"] for c in out} == {"not judged"}
  assert all("accepted 0 drafted tokens" in c["text"] for c in out)
  # Offline only: every top-1 at 0%.
  out = verdicts.claims({"adapters": ads, "live": {}})
  assert {c["verdict"] for c in out} == {"not judged"}
  # One adapter accepting something: the claims are judged.
  rows["decode:b1_next"] = _row(alpha=0.1)
  ads["b1"] = _entry(0.2, [0.1, 0.3])
  assert "not judged" not in {
    c["verdict"] for c in verdicts.claims(_data(ads, rows))
  }


def test_cpu_settings_are_not_called_gpus():
  data = _data(rows={"two_phase:l4+b1_next": _row()}, device="cpu")
  assert verdicts.claim_two_phase(data)["text"].startswith("CPU, fast")


class _FakeEval:
  def __init__(self, arrays):
    self.arrays = arrays


def test_accept_cis_split_samples_by_reading():
  # Three identical samples of 3 positions: the `next` reading has 2 valid
  # positions each, so every resample gives the same share and the CI is a
  # point. Splitting at the `same` lengths would mix samples and widen it.
  out = stages.accept_cis(
    _FakeEval(
      {
        "adapter/next/cos": np.array([0.96, 0.5] * 3),
        "adapter/same/cos": np.array([0.96, 0.5, 0.86] * 3),
        "lengths": np.array([3, 3, 3]),
      }
    ),
    resamples=50,
    seed=0,
  )
  assert out["adapter"]["next"]["accept_90"] == pytest.approx([0.5, 0.5])
  assert out["adapter"]["next"]["accept_80"] == pytest.approx([0.5, 0.5])
  assert out["adapter"]["same"]["accept_85"] == pytest.approx([2 / 3, 2 / 3])
  assert out["adapter"]["same"]["accept_95"] == pytest.approx([1 / 3, 1 / 3])


def test_ratio_ci_contains_the_ratio_and_is_none_without_resamples():
  num = np.array([1.0, 2.0, 0.0, 3.0])
  den = np.array([2.0, 2.0, 1.0, 3.0])
  lo, hi = stages.ratio_ci(num, den, resamples=200, seed=1)
  assert lo <= num.sum() / den.sum() <= hi
  assert stages.ratio_ci(num, den, resamples=0, seed=1) is None


@pytest.mark.parametrize(
  "reliable, verdict", [(True, "holds"), (False, "not shown")]
)
def test_speed_claims_are_not_judged_on_a_run_whose_aa_control_failed(
  reliable, verdict
):
  aa = {"speedup": 0.97, "speedup_ci95": [0.95, 0.99], "reliable": reliable}
  if reliable:
    aa = {"speedup": 1.0, "speedup_ci95": [0.99, 1.01], "reliable": True}
  rows = {
    "two_phase:l4+b1_next": _row(decode_speedup_ci95=[1.5, 2.0]),
    "prefill_hiding:l4": _row(speedup_ci95=[1.1, 1.5]),
  }
  data = _data(rows=rows, aa=aa)
  for claim in (verdicts.claim_two_phase, verdicts.claim_prefill):
    c = claim(data)
    assert c["verdict"] == verdict, c["text"]
    assert ("judge no speed claim" in c["text"]) == (not reliable)


@pytest.mark.parametrize("compiled", ["none", "other", "best"])
def test_speed_claims_are_not_judged_on_runs_that_compiled(compiled):
  """A method whose timed runs compiled (its times hold compilation) is
  not judged; a compile in another method's runs does not matter."""
  rows = {
    "two_phase:l4+b1_next": _row(decode_speedup_ci95=[1.5, 2.0]),
    "prefill_hiding:l4": _row(speedup_ci95=[1.1, 1.5]),
    "decode:b1_next": _row(),
  }
  data = _data(rows=rows)
  for claim, best in (
    (verdicts.claim_two_phase, "two_phase:l4+b1_next"),
    (verdicts.claim_prefill, "prefill_hiding:l4"),
  ):
    method = {"none": None, "other": "decode:b1_next", "best": best}
    block = data["live"]["gpus1"]["by_runtime"]["fast"]
    block["timed_compiles"] = [
      {"method": method[compiled], "id": "s3", "graphs": 1}
    ][: compiled != "none"]
    c = claim(data)
    assert c["verdict"] == ("not shown" if compiled == "best" else "holds")
    assert ("include compilation" in c["text"]) == (compiled == "best")


@pytest.mark.parametrize("reliable", [True, False])
def test_the_2x_goal_says_when_its_run_is_unreliable(reliable):
  from tools.study import report

  aa = {"speedup": 0.97, "speedup_ci95": [0.95, 0.99], "reliable": reliable}
  data = _data(rows={"decode:b1_next": _row()}, aa=aa)
  data["goal"] = verdicts.goal(data)
  assert data["goal"]["by_setting"]["gpus1/fast"]["reliable"] is reliable
  text = "\n".join(report.goal_lines(data))
  assert ("timings are unreliable" in text) == (not reliable)


@pytest.mark.parametrize(
  "ci, words",
  [
    ([2.1, 2.4], "reaches 2× (CI above 2)"),
    ([1.3, 1.5], "misses 2× (CI below 2)"),
    ([1.8, 2.2], "2× not shown (CI crosses 2)"),
  ],
)
def test_the_2x_goal_reads_the_ci_against_2(ci, words):
  from tools.study import report

  row = _row(speedup=sum(ci) / 2, speedup_ci95=ci)
  # A faster lossless method without a drafting cost (prefill hiding) is
  # the best method; the analysis is of the best drafting one.
  hiding = _row(c=None, speedup=1.3, decode_speedup=1.0)
  data = _data(rows={"decode:b1_next": row, "prefill_hiding:l4": hiding})
  data["goal"] = verdicts.goal(data)
  text = "\n".join(report.goal_lines(data))
  assert words in text
