"""The live benchmark proves its own fairness (tools/lib/sd_bench.py).

A fake runtime stands in for the models' timings (`sd_bench._run_one`
times nothing): each run costs 10 ms, plus what the test puts on the first
run of a sample, on the first run of a new prompt shape, or on one label.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tools.lib import fair_runs, sd_bench, sd_report, sd_results  # noqa: E402
from tools.lib.sd_engine import SampleResult  # noqa: E402


class FakeRuntime:
  """Costs of one run: 10 ms + extras (see the module docstring)."""

  def __init__(self, first_extra=0.0, shape_extra=0.0, slow=None):
    self.first_extra, self.shape_extra = first_extra, shape_extra
    self.slow = slow or {}
    self.last = None
    self.shapes = set()
    self.calls = []  # (sample inputs id, label)

  def __call__(self, run, label, method, runtime, t_in, d_in, measure=True):
    ms = 10.0
    if id(t_in) != self.last:  # a new sample's prompt inputs
      self.last = id(t_in)
      ms += self.first_extra
    shape = tuple(t_in["input_ids"].shape)
    if shape not in self.shapes:
      self.shapes.add(shape)
      ms += self.shape_extra
    ms *= self.slow.get(label, 1.0)
    self.calls.append((id(t_in), label))
    r = SampleResult([1, 2, 3], prefill_ms=2.0, decode_ms=ms - 2.0, total_ms=ms)
    return r, 1


def _settings(tmp_path, **kw):
  base = dict(
    out=str(tmp_path / "bench"),
    random_models="tiny",
    prompt_len=4,
    num_samples=6,
    warmup=0,
    methods=("baseline", "decode:b1"),
    adapters={"b1": "random"},
    runtimes=("fast",),
    bootstrap=200,
    shape_warmup=False,
    plots=False,
    progress=False,
  )
  base.update(kw)
  return sd_bench.BenchSettings(**base)


@pytest.mark.parametrize("order", ["fixed", "rotate", "balanced"])
def test_first_run_cost_biases_fixed_order_only(tmp_path, monkeypatch, order):
  """The first run of every sample costs 5 ms more.

  In a fixed order the baseline always pays it: decode:b1 (as fast as the
  baseline) shows a 1.5x speedup and the A/A control flags the run. Rotated,
  each of the 3 runs is first in 2 of the 6 samples: no bias at all.
  """
  fake = FakeRuntime(first_extra=5.0)
  monkeypatch.setattr(sd_bench, "_run_one", fake)
  res = sd_bench.run_benchmark(_settings(tmp_path, order=order))
  agg = res["aggregate"]
  positions = {
    lab: [r["position"] for r in recs]
    for lab, recs in res["per_sample"].items()
  }
  if order == "fixed":
    assert agg["decode:b1"]["speedup"] == pytest.approx(1.5)
    assert res["aa_control"]["fast"]["ratio"] == pytest.approx(1.5)
    assert res["reliable"] is False
    assert positions["baseline"] == [0] * 6
  else:
    assert agg["decode:b1"]["speedup"] == pytest.approx(1.0)
    assert res["aa_control"]["fast"]["ratio"] == pytest.approx(1.0)
    assert res["reliable"] is True
    # Every run takes every position equally often.
    for pos in positions.values():
      assert sorted(pos) == [0, 0, 1, 1, 2, 2]
    assert res["config"]["order_start"] in (0, 1, 2)
  assert res["config"]["order"] == order
  assert res["config"]["runs_per_sample"] == [
    "baseline",
    "baseline_aa",
    "decode:b1",
  ]


def test_aa_control_flags_a_slowed_second_baseline(
  tmp_path, monkeypatch, capsys
):
  fake = FakeRuntime(slow={"baseline_aa": 1.1})
  monkeypatch.setattr(sd_bench, "_run_one", fake)
  res = sd_bench.run_benchmark(_settings(tmp_path))
  aa = res["aa_control"]["fast"]
  assert aa["ratio"] == pytest.approx(1 / 1.1)
  assert aa["reliable"] is False and res["reliable"] is False
  assert "A/A control on the fast runtime" in capsys.readouterr().err
  report = (tmp_path / "bench" / "report.md").read_text()
  assert "UNRELIABLE RUN" in report
  with open(tmp_path / "bench" / "results.json") as f:
    assert json.load(f)["reliable"] is False
  # The method's own speedup is not touched by the control's copy.
  assert res["aggregate"]["decode:b1"]["speedup"] == pytest.approx(1.0)


def test_new_shape_cost_is_warm_up_not_timing(tmp_path, monkeypatch):
  """A new prompt length costs 50 ms once; it lands in the warm-up count.

  Samples of lengths 4, 4, 5, 5, 6, 4 in groups a, a, b, b, c, c.
  """
  lengths, groups = [4, 4, 5, 5, 6, 4], "aabbcc"

  def prompts(num, prompt_len, vocab_size, seed):
    return [
      {"id": f"s{i}", "question": "", "input_ids": [3] * n, "group": g}
      for i, (n, g) in enumerate(zip(lengths, groups, strict=True))
    ][:num]

  monkeypatch.setattr(sd_bench, "random_prompts", prompts)
  fake = FakeRuntime(shape_extra=50.0)
  monkeypatch.setattr(sd_bench, "_run_one", fake)
  res = sd_bench.run_benchmark(_settings(tmp_path, shape_warmup=True))
  timed = [r["total_ms"] for recs in res["per_sample"].values() for r in recs]
  assert timed == [10.0] * len(timed)
  assert [w["id"] for w in res["shape_warmups"]] == ["s0", "s2", "s4"]
  report = (tmp_path / "bench" / "report.md").read_text()
  assert "3 samples of a new shape" in report
  # CIs resample the samples file's groups, and say so.
  assert res["config"]["ci_resampling"] == "group"
  assert res["config"]["num_groups"] == 3
  assert "resampling whole groups (3 groups" in report
  assert [r["group"] for r in res["per_sample"]["baseline"]] == list(groups)


def _rec(total, group=None, base=False):
  r = {
    "tokens": [1] * 4,
    "prefill_ms": 1.0,
    "decode_ms": total - 1.0,
    "total_ms": total,
    "drafted": 0 if base else 8,
    "accepted": 0 if base else 4,
    "verify_iterations": 0 if base else 2,
    "per_iteration": [] if base else [["decode", 4, 2], ["decode", 4, 2]],
    "phases": {},
    "overlap": None,
    "first_draft_match": None,
    "match": True,
  }
  if group is not None:
    r["group"] = group
  return r


def test_group_bootstrap_is_wider_with_a_repeated_scene():
  """One scene asked 7 times is one scene: by group its CI is wider."""
  totals = [5.0, 8.0, 10.0, 12.0, 9.0, 7.0] + [5.0] * 6
  groups = [f"scene{i}" for i in range(6)] + ["scene0"] * 6

  def width(grouped):
    g = groups if grouped else [None] * len(groups)
    recs = [_rec(t, x) for t, x in zip(totals, g, strict=True)]
    base = [_rec(10.0, x, base=True) for x in g]
    a = sd_results.aggregate(recs, base, n_boot=2000, seed=0)
    assert a["speedup"] == pytest.approx(len(totals) * 10.0 / sum(totals))
    lo, hi = a["speedup_ci95"]
    return hi - lo

  per_sample, by_group = width(False), width(True)
  assert by_group > 1.5 * per_sample
  assert sd_results.groups_of([_rec(1.0)]) is None
  assert list(sd_results.groups_of([_rec(1.0, "x")])) == ["x"]


def test_cost_model_uses_measured_tau():
  """tau = (accepted + verifications) / verifications, not a formula."""
  recs = [_rec(10.0)]  # 2 verifications of 4 drafts, 2 accepted each
  costs = {"relative": {"c": {"decode:b1": 0.1}, "v": 1.2}}
  m = sd_results.cost_model(recs, costs, "decode:b1", measured=1.25)
  assert m["tau"] == pytest.approx(3.0)  # 1 + g alpha = 1 + 4 * 0.5
  assert m["drafts_per_verification"] == pytest.approx(4.0)
  assert m["decode_speedup"] == pytest.approx(3.0 / (4 * 0.1 + 1.2))
  assert m["relative_error"] == pytest.approx(m["decode_speedup"] / 1.25 - 1)
  assert np.isfinite(m["alpha"]) and m["alpha"] == pytest.approx(0.5)
  assert sd_results.cost_model([_rec(10.0, base=True)], costs, "x", 1.0) is None


def test_tree_adapter_calls_count_as_drafting_not_as_chain_steps():
  """A tree's adapter calls (B1's chain of 5 runs is one call) are drafting
  time, never the chain's per-step cost the report quotes; that cost is per
  position (a chain's call covers its catch-up and all its steps)."""

  def rec(phases, decode_ms):
    spans = {k: {"ms": ms, "units": u, "calls": c} for k, (ms, u, c) in phases}
    return {
      "phases": spans,
      "prefill_ms": 5.0,
      "decode_ms": decode_ms,
      "iterations": 2,
      "drafted": 10,
      "per_iteration": [("decode", 5, 2), ("decode", 5, 3)],
    }

  chain = rec(
    [("target_verify[6]", (2.0, 12, 2)), ("adapter:b1", (1.0, 10, 2))], 4.0
  )
  tree = rec(
    [
      ("target_verify_tree[60]", (3.0, 120, 2)),
      ("tree_adapter:b1", (2.0, 14, 4)),
    ],
    6.0,
  )
  base = rec([("target_decode", (2.0, 2, 2))], 2.5)
  per = {"baseline": [base], "decode:b1": [chain], "tree:b1": [tree]}
  costs = sd_results.costs_block(per, list(per), gamma=5)
  assert costs["adapter_step_ms"] == {"b1": pytest.approx(0.1)}
  assert sd_results.breakdown(tree)["adapter"] == pytest.approx(2.0)
  assert sd_results.breakdown(tree)["overhead"] == pytest.approx(1.0)
  assert costs["draft_ms_per_token_by_method"]["tree:b1"] == pytest.approx(0.2)


def test_drafter_prefill_cost_is_read_alone_not_beside_the_target():
  """A concurrent prefill's drafter span carries the target's contention;
  the cost is the drafter's prompt timed alone (the overlap record), or
  the span of a prefill run one after the other. A side that also drafted
  (prefill adapter) or was not timed alone does not count."""

  def rec(span_ms, overlap, adapter=False):
    phases = {"draft_prefill": {"ms": span_ms, "units": 1, "calls": 1}}
    if adapter:
      phases["prefill_adapter:l4"] = {"ms": 1.0, "units": 1, "calls": 1}
    return {
      "phases": phases,
      "prefill_ms": 70.0,
      "decode_ms": 10.0,
      "iterations": 1,
      "drafted": 0,
      "per_iteration": [],
      "overlap": overlap,
    }

  both = {"concurrent": True, "drafter_ms": 68.0}
  per = {
    "decode:l5": [
      rec(68.0, {**both, "drafter_alone_ms": 30.0}),
      rec(68.0, dict(both)),  # not timed alone on this sample
    ],
    "prefill_hiding:l4": [
      rec(70.0, {**both, "drafter_alone_ms": 45.0}, adapter=True)
    ],
    "draft_tokens": [rec(20.0, {"concurrent": False})],
  }
  costs = sd_results.costs_block(per, list(per), gamma=5)
  assert costs["draft_model_prefill_ms"] == pytest.approx(25.0)
  report = "\n".join(sd_report._cost_lines(costs))
  assert "drafter 25.00 ms (timed alone)" in report


@pytest.mark.parametrize("n", [2, 3, 4, 5, 18])
def test_williams_orders_balance_positions_and_neighbours(n):
  rows = fair_runs.williams_orders(n)
  assert len(rows) == (n if n % 2 == 0 else 2 * n)
  each = len(rows) // n
  for row in rows:
    assert sorted(row) == list(range(n))
  for pos in range(n):
    assert sorted(r[pos] for r in rows) == sorted(list(range(n)) * each)
  follows = {}
  for row in rows:
    for a, b in zip(row, row[1:], strict=False):
      follows[a, b] = follows.get((a, b), 0) + 1
  want = {(a, b): each for a in range(n) for b in range(n) if a != b}
  assert follows == want


def test_balanced_order_moves_the_aa_copy_away_from_the_baseline(
  tmp_path, monkeypatch
):
  """A run made 5 ms slower by the run just before it being the baseline
  (an after-effect the baseline leaves). Rotated, the A/A copy follows the
  baseline on every sample but those where it runs first (6 of 8 here) and
  pays it far more often than the other runs; balanced, every other run
  follows the baseline equally often (2 of 8: a Williams cycle of 4)."""

  class AfterBaseline(FakeRuntime):
    prev = None

    def __call__(self, run, label, method, runtime, t_in, d_in, measure=True):
      new_sample = id(t_in) != self.last
      r, k = super().__call__(run, label, method, runtime, t_in, d_in)
      if self.prev == "baseline" and not new_sample:
        r.total_ms += 5.0
        r.decode_ms += 5.0
      self.prev = label
      return r, k

  def mean_ms(order):
    fake = AfterBaseline()
    monkeypatch.setattr(sd_bench, "_run_one", fake)
    settings = _settings(
      tmp_path / order,
      order=order,
      num_samples=8,
      methods=("baseline", "decode:b1", "decode:b1_copy"),
      adapters={"b1": "random", "b1_copy": "random:b1"},
    )
    res = sd_bench.run_benchmark(settings)
    assert res["config"]["order"] == order
    return {
      lab: np.mean([r["total_ms"] for r in recs])
      for lab, recs in res["per_sample"].items()
    }

  rot = mean_ms("rotate")
  assert rot["baseline_aa"] == pytest.approx(10 + 5 * 6 / 8)
  assert rot["decode:b1"] == pytest.approx(10)  # never after the baseline
  bal = mean_ms("balanced")
  for lab in ("baseline_aa", "decode:b1", "decode:b1_copy"):
    assert bal[lab] == pytest.approx(10 + 5 * 2 / 8), lab
  assert bal["baseline"] == pytest.approx(10)


def test_timed_runs_run_without_the_garbage_collector(tmp_path, monkeypatch):
  import gc

  seen = []

  class Watch(FakeRuntime):
    def __call__(self, *a, **kw):
      seen.append(gc.isenabled())
      return super().__call__(*a, **kw)

  monkeypatch.setattr(sd_bench, "_run_one", Watch())
  res = sd_bench.run_benchmark(_settings(tmp_path))
  assert seen and not any(seen)
  assert gc.isenabled()
  assert "garbage collector" in (tmp_path / "bench" / "report.md").read_text()
  assert res["config"]["gc"].startswith("off")


def test_grouped_samples_run_one_per_group_in_turn(tmp_path, monkeypatch):
  """3 scenes of 3 questions each, file order scene by scene: a run of
  warm-up 1 + 3 samples measures one question of 3 scenes, not 3
  questions of one, and 3 question types, not one (scene i starts at its
  question i); ungrouped samples keep the file's order."""
  lines = [
    {"id": f"s{g}q{q}", "question": "?", "group": f"s{g}"}
    for g in range(3)
    for q in range(3)
  ]
  path = tmp_path / "samples.jsonl"
  path.write_text("".join(json.dumps(x) + "\n" for x in lines))
  monkeypatch.setattr(sd_bench.bk, "load_backend", lambda *a, **k: None)
  s = _settings(
    tmp_path, random_models=None, target="t", samples=str(path), warmup=1
  )
  s.num_samples = 3
  _, _, got = sd_bench._pair(s, "cpu", "cpu", "float32")
  assert [x["id"] for x in got] == ["s0q0", "s1q1", "s2q2", "s0q1"]
  path.write_text(
    "".join(
      json.dumps({k: x[k] for k in ("id", "question")}) + "\n" for x in lines
    )
  )
  _, _, got = sd_bench._pair(s, "cpu", "cpu", "float32")
  assert [x["id"] for x in got] == ["s0q0", "s0q1", "s0q2", "s1q0"]


def test_compilation_inside_timed_runs_is_counted_and_reported(
  tmp_path, monkeypatch
):
  """decode:b1 compiles on the warm-up sample (not counted) and on the
  third measured sample (a shape it has not met: counted, reported and
  warned of); the baseline never compiles."""
  import torch._dynamo

  step = torch.compile(lambda x: x * 2, dynamic=False, backend="eager")
  seen = []

  class Compiling(FakeRuntime):
    def __call__(self, run, label, method, *a, **kw):
      if label == "decode:b1":
        seen.append(label)
        width = 5 if len(seen) == 4 else 4  # samples 0 (warm-up) and 3
        step(torch.zeros(width))
      return super().__call__(run, label, method, *a, **kw)

  torch._dynamo.reset()
  monkeypatch.setattr(sd_bench, "_run_one", Compiling())
  res = sd_bench.run_benchmark(_settings(tmp_path, warmup=1))
  ids = [r["id"] for r in res["per_sample"]["baseline"]]
  assert res["timed_compiles"] == [
    {"method": "decode:b1", "id": ids[2], "graphs": 1}
  ]
  report = (tmp_path / "bench" / "report.md").read_text()
  assert "decode:b1: torch.compile compiled 1 graph(s) inside" in report
  assert ids[2] in report
