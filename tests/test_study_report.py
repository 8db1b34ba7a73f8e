"""The study's tables beyond the seed's, on hand-made results (tools/study):
trees against chains, k = 1 against k > 1, the offline prediction against
live tau, the 7B projection; the L1-L4 width solver; the adapter budget.
"""

import argparse

import pytest

from tools.study import compare, layout, projection, stages, state, widths


def _m(value, ci=None):
  return {"value": value, "ci95": ci}


def _depth(shares, tau, gamma=3):
  entry = {f"depth_{d}": _m(shares[d - 1], [0, 1]) for d in range(1, 4)}
  return {**entry, "tau": _m(tau, [tau - 0.1, tau + 0.1])}


def _adapter(k, free_tau, gamma=3):
  return {
    "unroll_steps": k,
    "depth_acceptance": {
      "gamma": gamma,
      "fed_back": True,
      "free_running": _depth([0.5, 0.3, 0.1], free_tau),
      "teacher_forced": _depth([0.5, 0.4, 0.3], free_tau + 0.3),
    },
  }


def _row(tau, **kw):
  row = {
    "n": 4,
    "tau": tau,
    "tau_ci95": None if tau is None else [tau - 0.1, tau + 0.1],
    "draft_cost": 0.2,
    "verify_cost": 1.1,
    "decode_speedup": 1.5,
    "decode_speedup_ci95": [1.2, 1.8],
    "speedup": 1.2,
    "speedup_ci95": [1.0, 1.4],
    "mismatches": 0,
    "alpha": 0.4,
  }
  row.update(kw)
  return row


def _data(gamma=3):
  rows = {
    "baseline": _row(None, alpha=None),
    "decode:b1_next": _row(1.6),
    "tree:b1_next": _row(2.4),
    "decode:b1_ttt": _row(2.0),
  }
  return {
    "adapters": {
      "b1_next": _adapter(1, 1.744),
      "b1_ttt": _adapter(4, 1.9, gamma=gamma),
    },
    "live": {
      "gpus1": {
        "device": "NVIDIA H100",
        "gamma": 3,
        "options": {"tree_depth": 3, "tree_topk": 2, "tree_nodes": 5},
        "runtimes": ["fast"],
        "by_runtime": {"fast": {"methods": rows}},
      }
    },
  }


def test_trees_are_compared_with_their_adapters_chain():
  data = _data()
  rows = compare.comparisons(data)["chains_and_trees"]
  assert [r["method"] for r in rows] == [
    "decode:b1_next",
    "tree:b1_next",
    "decode:b1_ttt",
  ]
  assert rows[1]["tau_vs_chain"] == pytest.approx(2.4 / 1.6)
  assert rows[1]["accepted_per_verification"] == pytest.approx(1.4)
  assert rows[0]["tau_vs_chain"] is None and rows[2]["tau_vs_chain"] is None
  data["comparisons"] = compare.comparisons(data)
  data["projection_7b"] = projection.project(data, None)
  text = "\n".join(compare.render(data))
  assert (
    "| B1 (objective next) | tree, depth 3, top-k 2, 5 nodes | 2.40" in text
  )
  assert "| 1.50× | – |" in text  # tau vs chain; no projection given


def test_k1_against_k4_reads_both_readings_and_the_live_tau():
  data = _data()
  rows = compare.comparisons(data)["unroll"]
  assert [(r["adapter"], r["unroll_steps"]) for r in rows] == [
    ("b1_next", 1),
    ("b1_ttt", 4),
  ]
  assert rows[1]["live_tau"] == 2.0
  data["comparisons"] = compare.comparisons(data)
  text = "\n".join(compare.unroll_lines(data))
  line = next(
    x for x in text.splitlines() if x.startswith("| B1 (objective next, m")
  )
  assert "| 4 | free-running | 50.0% [0.0, 100.0]" in line
  assert line.endswith("| 1.90 [1.80, 2.00] | 2.00 [1.90, 2.10] |")


def test_offline_prediction_against_live_tau():
  data = _data()
  rows = {r["adapter"]: r for r in compare.comparisons(data)["offline_vs_live"]}
  assert rows["b1_next"]["relative_difference"] == pytest.approx(0.09)
  assert rows["b1_ttt"]["relative_difference"] == pytest.approx(1.9 / 2 - 1)
  assert rows["b1_next"]["within_goal"] and rows["b1_ttt"]["within_goal"]
  data["adapters"]["b1_ttt"] = _adapter(4, 2.3)
  data["comparisons"] = compare.comparisons(data)
  text = "\n".join(compare.offline_lines(data))
  assert "| +9.0% |" in text and "| +15.0% (outside ±10%) |" in text
  # Offline at another gamma than live: no difference, the reason instead.
  data = _data(gamma=5)
  row = compare.comparisons(data)["offline_vs_live"][1]
  assert row["relative_difference"] is None
  assert row["note"] == "offline at γ = 5, live at γ = 3"


# The 7B run's tree flags as a results.json records them, and as one from
# before the method options recorded them (still read).
OPTIONS_7B = {"options": {"tree_depth": 3, "tree_topk": 2, "tree_nodes": 5}}
OLD_TREE_7B = {"tree": {"depth": 3, "topk": 2, "nodes": 5}}


def _bench_7b(record=OPTIONS_7B, **config):
  return {
    "format": "egpt_align.benchmark_sd",
    "config": {
      "target": "random:vicuna7b",
      "runtimes": ["fast"],
      "gamma": 3,
      **record,
      **config,
    },
    "environment": {"device": "NVIDIA H100"},
    "costs": {
      "target_decode_ms": 20.0,
      "target_verify_ms": {"gamma+1": 21.0},
      "target_verify_tree_ms": {"5": 24.0},
    },
    "aggregate": {
      "decode:b1": {"cost_model": {"drafts_per_verification": 3, "c": 0.05}},
      "tree:b1": {"cost_model": {"drafts_per_verification": 4, "c": 0.1}},
    },
  }


@pytest.mark.parametrize("record", [OPTIONS_7B, OLD_TREE_7B])
def test_the_7b_projection_is_tau_over_the_7b_costs(tmp_path, record):
  import json

  path = tmp_path / "7b.json"
  path.write_text(json.dumps(_bench_7b(record)))
  p = projection.project(_data(), str(path))
  assert p["available"]
  m = p["methods"]
  assert m["decode:b1_ttt"]["method_7b"] == "decode:b1"
  assert m["decode:b1_ttt"]["decode_speedup"] == pytest.approx(
    2.0 / (3 * 0.05 + 1.05)
  )
  assert m["tree:b1_next"]["decode_speedup"] == pytest.approx(
    2.4 / (4 * 0.1 + 24.0 / 20.0)
  )
  assert "baseline" not in m


@pytest.mark.parametrize(
  "config, why",
  [
    ({"gamma": 5}, "its γ is 5, this study's 3"),
    (
      {"options": {"tree_depth": 6, "tree_topk": 2, "tree_nodes": 5}},
      "it ran with --tree_depth 6 --tree_topk 2 --tree_nodes 5, this study "
      "with --tree_depth 3 --tree_topk 2 --tree_nodes 5",
    ),
    ({"record": {"tree": {"depth": 6}}}, "it ran with --tree_depth 6 "),
    ({"target": "video_llava:x"}, "not run on a random-weight pair"),
    ({"runtimes": ["eager"]}, "not fast"),
  ],
)
def test_a_7b_run_that_does_not_fit_is_absent_with_why(tmp_path, config, why):
  import json

  path = tmp_path / "7b.json"
  path.write_text(json.dumps(_bench_7b(**config)))
  p = projection.project(_data(), str(path))
  assert not p["available"] and why in p["why"], p["why"]
  assert "The projection is absent" in "\n".join(
    projection.lines({"projection_7b": p})
  )


# --------------------------------------------------------------------------
# L1-L4 on the seed's axis.


def test_seed_ratios_come_from_the_recipes_at_4096():
  r = widths.seed_ratios()
  assert r["l1"] == 1.0
  assert r["l4"] == pytest.approx(100_714_497 / 2_113_537)
  # experiments/l3.py trains 3 blocks (25,188,355 params), as the
  # reference's command does, not the registry's default 2 (16.8M).
  assert r["l3"] == pytest.approx(25_188_355 / 2_113_537)
  # At 4096 the recipes' own widths are the solution.
  s = widths.solve(4096)
  assert s["overrides"] == {
    "l1": {"bottleneck_dim": 256},
    "l2": {"bottleneck_dim": 256},
    "l3": {"bottleneck_dim": 1024},
    "l4": {"ffn_dim": 2048},
  }
  assert s["max_relative_error"] == 0


@pytest.mark.parametrize("hidden", [128, 256])
def test_solved_widths_give_the_seeds_ratios(hidden):
  s = widths.solve(hidden)
  target = widths.seed_ratios()
  p1 = widths.param_count("l1", hidden, s["overrides"]["l1"]["bottleneck_dim"])
  for name, over in s["overrides"].items():
    ((field, w),) = over.items()
    assert field == widths.WIDTH_FIELD[name]
    count = widths.param_count(name, hidden, w)
    assert s["params"][name] == count
    assert count / p1 == pytest.approx(target[name], rel=widths.TOLERANCE)
    if field == "bottleneck_dim":
      assert w <= hidden


def test_no_widths_at_a_tiny_hidden_size_is_one_clear_error():
  with pytest.raises(widths.WidthError, match="hidden 32: no L1-L4 widths"):
    widths.solve(32)
  assert widths.solve(32, tolerance=0.05)["max_relative_error"] <= 0.05


class _Study:
  def __init__(self, hidden=128, **args):
    defaults = dict(epochs=1, batch_size=8, seed=0, no_progress=True)
    self.args = argparse.Namespace(**{**defaults, **args})
    self.state = {
      "stages": {"dump": {"splits": {"train": {"target_dim": hidden}}}}
    }

  def p(self, *parts):
    return "/".join(("DIR",) + parts)


def test_train_config_applies_the_widths_and_the_recipes():
  study = _Study(prefill_widths="seed")
  w = stages.prefill_widths(study)
  assert w["axis"] == "seed"
  config = stages.train_config(study, "l4", w)
  assert config.model.ffn_dim == w["overrides"]["l4"]["ffn_dim"]
  assert config.model.hidden_dim == 128
  assert stages.train_config(study, "b1_next", w).model.ffn_dim is None
  deep = stages.train_config(study, "l5f_ttt", w)
  assert (deep.model.name, deep.loss.objective) == ("l5f", "next")
  assert deep.loss.unroll_steps > 1
  assert stages.train_config(study, "b1", w).loss.unroll_steps == 1
  recipe = stages.prefill_widths(_Study(prefill_widths="recipe"))
  assert recipe == {"axis": "recipe", "why_not": "--prefill_widths recipe"}
  assert stages.train_config(_Study(), "l4", recipe).model.ffn_dim is None
  small = stages.prefill_widths(_Study(hidden=32, prefill_widths="seed"))
  assert small["axis"] == "recipe" and "hidden 32" in small["why_not"]


# --------------------------------------------------------------------------
# The adapter budget.


def test_the_adapter_budget_picks_its_methods():
  assert layout.parse_adapters(None) == layout.ADAPTERS
  assert layout.parse_adapters("b1_ttt,l4") == ("l4", "b1_ttt")
  with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['b2'\]"):
    layout.parse_adapters("l4,b2")
  assert layout.methods_of(("b1_ttt",)) == (
    "baseline",
    "draft_tokens",
    "decode:b1_ttt",
    "tree:b1_ttt",
  )
  assert layout.live_adapters(("l1", "b1", "b1_ttt")) == ("l1", "b1_ttt")
  assert (
    layout.kind("l5f_ttt") == "l5f" and layout.recipe("l5f_ttt") == "l5f_ttt"
  )
  assert layout.recipe("b1_next") == "b1"


def test_a_finished_stage_runs_again_for_adapters_it_lacks(tmp_path):
  st = state.Study(
    str(tmp_path), argparse.Namespace(adapters="l4,b1_ttt"), None
  )
  st.record("train", 1.0, adapters={"l4": {}})
  st.record("export", 1.0, files={"l4": "x", "b1_ttt": "y"})
  st.record("bench1", 1.0, methods=["baseline", "draft_tokens"])
  assert st.missing("train") == ["b1_ttt"]
  assert st.missing("export") == []
  assert st.missing("bench1") == [
    "prefill_hiding:l4",
    "decode:b1_ttt",
    "tree:b1_ttt",
  ]
  assert st.missing("dump") == []


def test_readme_quotes_only_numbers_of_the_generated_results():
  """Every percentage or speedup in README's results section is in
  docs/RESULTS.md (README takes its numbers from the generated file)."""
  import os
  import re

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "README.md")) as f:
    readme = f.read()
  with open(os.path.join(root, "docs", "RESULTS.md")) as f:
    results = f.read()
  start = readme.index("## Results on a pair of our own")
  section = readme[start : readme.index("\n## ", start + 1)]
  quoted = re.findall(r"\d+(?:\.\d+)?(?:[–-]\d+(?:\.\d+)?)?\s?[%×]", section)
  assert [q for q in quoted if q not in results] == []


def test_the_aa_control_is_read_per_runtime_as_the_verdicts_read_it():
  from tools.study import collect, report, verdicts

  aa = {"ratio": 1.03, "ci95": [1.01, 1.05], "reliable": False}
  bench = {"aa_control": {"fast": {**aa, "range": [0.98, 1.02]}}}
  entry = collect.aa_entry(bench, "fast")
  assert entry["speedup"] == 1.03 and entry["speedup_ci95"] == [1.01, 1.05]
  assert collect.aa_entry(bench, "eager") is None
  assert "the run is UNRELIABLE" in report.aa_text(entry)
  data = {"live": {"gpus1": {"by_runtime": {"fast": {"aa_control": entry}}}}}
  line, text = verdicts._aa_line(data, "gpus1", "fast")
  assert line == 1.05 and "A/A control's upper end" in text


def test_the_table_says_what_its_cis_resample():
  from tools.study import report

  def data(*units):
    return {
      "adapters": {
        f"a{i}": {"ci_resampling": u, "num_groups": n, "test_samples": 404}
        for i, (u, n) in enumerate(units)
      }
    }

  text = report.ci_over(data(("group", 101), ("group", 101)))
  assert text.startswith("the 101 test groups")
  assert "404 in all" in text
  assert report.ci_over(data(("sample", 404))) == "the 404 test samples"
  assert "differ" in report.ci_over(data(("group", 101), ("sample", 404)))


def test_training_devices_are_named_per_adapter_when_they_differ():
  one = {"l1": {"device": "1 x cpu"}, "b1": {"device": "1 x cpu"}}
  assert stages.devices_text(one) == "1 x cpu"
  two = {
    "l1": {"device": "1 x cpu"},
    "b1": {"device": "1 x H100"},
    "l5": {"device": "1 x H100"},
    "l4": {},
  }
  assert stages.devices_text(two) == "1 x cpu (l1), 1 x H100 (b1, l5), ? (l4)"


def test_a_stage_that_gains_adapters_adds_up_its_time(tmp_path):
  study = state.Study(str(tmp_path), argparse.Namespace(), None)
  study.record("train", 10.0, adapters={"l1": {}})
  study.record("train", 5.0, adapters={"l1": {}, "b1": {}})
  assert study.state["stages"]["train"]["seconds"] == 15.0
  # A bench stage reruns every method: its time is the last run's.
  study.record("bench1", 10.0)
  study.record("bench1", 5.0)
  assert study.state["stages"]["bench1"]["seconds"] == 5.0
