"""The study end to end on the toy plugin pair, run once for the session.

Two tiny random Llamas (tests/toy_plugin.py) as target and drafter: the
stages of group A of `python -m tools.study` (dump, LM head, a budget of
adapters trained, evaluated and exported, their live methods on two
runtimes, the report), then pack, unpack into another directory and
regenerate; the second-GPU stage with the benchmark faked. Random models
accept nothing, so the report must say that no claim is judged. Nothing
here depends on how fast the machine is (no time limit unless a test sets
one).
"""

import json
import os
import re
import shutil
import types

import pytest

from tools.study import cli, layout, state
from tools.study.collect import SEED_COLUMNS

# Every test here on one pytest-xdist worker (`--dist loadgroup`): the
# others run the rest of the suite instead of waiting for the study.
pytestmark = pytest.mark.xdist_group("study_e2e")

TARGET = "tests.toy_plugin:make_backend:0"
DRAFT = "tests.toy_plugin:make_backend:1"


def _write_samples(path, n, offset):
  with open(path, "w") as f:
    for i in range(n):
      s = offset + i
      q = " ".join(f"w{(s * 7 + k * 3) % 40}" for k in range(4))
      media = {"target": {"seed": s}, "draft": {"seed": s}}
      rec = {"id": f"q{s}", "question": q, "media": media, "group": str(s)}
      f.write(json.dumps(rec) + "\n")
  return str(path)


# The e2e study trains a budget of adapters that covers every code path:
# a prefill adapter, and one decode adapter at k = 1 and k > 1 (chains,
# trees, the k comparison, the offline prediction); the tables the others
# fill are tested on hand-made results (tests/test_study_report.py).
ADAPTERS = ("l4", "b1_next", "b1_ttt")
TREE = {"depth": 3, "topk": 2, "nodes": 5}  # not the defaults: passed on
GAMMA = 3


def _run_study(root):
  samples = ",".join(
    _write_samples(root / f"{split}.jsonl", n, off)
    for split, n, off in (("train", 16, 0), ("val", 4, 100), ("test", 6, 200))
  )
  out = str(root / "study")
  argv = [
    "--out", out, "--target", TARGET, "--draft", DRAFT,
    "--samples", samples, "--max_new_tokens", "8", "--stages", "A",
    "--adapters", ",".join(ADAPTERS), "--gamma", str(GAMMA),
    "--tree_depth", str(TREE["depth"]), "--tree_topk", str(TREE["topk"]),
    "--tree_nodes", str(TREE["nodes"]),
    "--epochs", "1", "--batch_size", "8", "--bootstrap", "50",
    "--bench_samples", "4", "--eager_samples", "4", "--warmup", "1",
    "--device", "cpu", "--dtype", "float32",
    "--no_progress", "--pack", str(root / "parts"),
  ]  # fmt: skip
  assert cli.main(argv) == 0
  return argv


@pytest.fixture(scope="session")
def study(tmp_path_factory, request):
  """One study for the session, shared by pytest-xdist's workers (the
  first to arrive runs it under a file lock; the others wait for it)."""
  from filelock import FileLock

  base = tmp_path_factory.getbasetemp()
  if hasattr(request.config, "workerinput"):
    base = base.parent  # the run's directory, shared by its workers
  root = base / "study_e2e"
  with FileLock(str(root) + ".lock"):
    argv_file = root / "argv.json"
    if not argv_file.exists():
      root.mkdir(exist_ok=True)
      argv_file.write_text(json.dumps(_run_study(root)))
  argv = json.loads(argv_file.read_text())
  return {"root": root, "out": str(root / "study"), "argv": argv}


def _copy(study, tmp_path, name="copy"):
  """The whole study directory copied (tests that run stages change it)."""
  copy = str(tmp_path / name)
  shutil.copytree(study["out"], copy)
  return copy


def _results(out):
  with open(os.path.join(out, "report", "results", "results.json")) as f:
    return json.load(f)


def _bench(out, sub="gpus1", rt="fast"):
  with open(os.path.join(out, "bench", sub, rt, "results.json")) as f:
    return json.load(f)


def test_every_method_is_lossless_in_fp32(study):
  methods = layout.methods_of(ADAPTERS)
  assert methods == (
    "baseline", "draft_tokens", "prefill_hiding:l4", "decode:b1_next",
    "decode:b1_ttt", "tree:b1_next", "tree:b1_ttt", "two_phase:l4+b1_next",
  )  # fmt: skip
  for rt in ("fast", "eager"):
    bench = _bench(study["out"], rt=rt)
    assert bench["config"]["dtype"] == "float32"
    assert bench["config"]["runtimes"] == [rt]
    assert bench["mismatches"] == []
    # Every study method, and the A/A control's second baseline.
    assert set(bench["aggregate"]) == set(methods) | {"baseline_aa"}
    for lab, a in bench["aggregate"].items():
      assert a["n"] == 4 and a["mismatched_samples"] == 0, lab


def test_each_runtime_first_runs_the_headline_methods_alone(study):
  heads = {}
  for rt in ("fast", "eager"):
    with open(
      os.path.join(
        study["out"], "bench", "gpus1", f"{rt}_headline", "results.json"
      )
    ) as f:
      heads[rt] = json.load(f)
    assert heads[rt]["config"]["runtimes"] == [rt]
    assert set(heads[rt]["aggregate"]) == {
      "baseline",
      "baseline_aa",
      "decode:b1_next",
      "tree:b1_next",
    }
  # 6 test samples, 1 warm-up: fast, every other one measured; eager, its
  # own sample count (--eager_samples 4).
  assert heads["fast"]["num_measured"] == 5
  assert heads["eager"]["num_measured"] == 4
  with open(os.path.join(study["out"], layout.STUDY_FILE)) as f:
    rec = json.load(f)["stages"]["bench1"]
  assert list(rec["headline"]) == ["fast", "eager"]
  assert rec["headline"]["eager"]["dir"].endswith("eager_headline")
  assert "left_out" not in rec  # no time limit: every run ran
  # Each run's wall time, start-up included (to size the budgets by).
  for r in [*rec["headline"].values(), *rec["runtimes"].values()]:
    assert r["seconds"] > 0, r["dir"]
  hs = _results(study["out"])["live"]["gpus1"]["headlines"]
  assert list(hs) == ["fast", "eager"]
  assert [h["num_measured"] for h in hs.values()] == [5, 4]
  assert hs["fast"]["runtime"] == "fast"
  assert hs["eager"]["methods"]["tree:b1_next"]["n"] == 4
  assert hs["fast"]["aa_control"]["speedup_ci95"] is not None
  with open(os.path.join(study["out"], "report", "RESULTS.md")) as f:
    text = f.read()
  # A table per runtime, the fast one first.
  fast = text.index("#### CPU, fast runtime: the headline methods on more")
  eager = text.index("#### CPU, eager runtime: the headline methods on more")
  assert fast < eager
  assert "in a run of their own, on 5 test samples" in text[fast:eager]
  assert "in a run of their own, on 4 test samples" in text[eager:]
  assert "was left out:" not in text
  # Where the adapters trained and were evaluated (the stages' records).
  assert re.search(
    r"Adapters trained on \d+ x cpu; evaluated on \d+ x cpu\.", text
  )


def test_live_methods_draft_with_the_objective_next_adapters(study):
  decode = [m for m in layout.METHODS if m.split(":")[0] == "decode"]
  assert decode == [f"decode:{n}" for n in layout.LIVE_DECODE_ADAPTERS]
  assert set(layout.LIVE_DECODE_ADAPTERS) == set(
    layout.NEXT_ADAPTERS + layout.TTT_ADAPTERS
  )
  for m in layout.METHODS:
    if m.startswith(("two_phase:", "tree:")):
      assert layout.method_adapters(m)[-1] in layout.LIVE_DECODE_ADAPTERS
  bench = _bench(study["out"])
  assert set(bench["provenance"]["adapters"]) == {"l4", "b1_next", "b1_ttt"}
  # The study's gamma and tree flags reached the benchmark.
  assert bench["config"]["gamma"] == GAMMA
  assert bench["config"]["options"] == {f"tree_{k}": v for k, v in TREE.items()}


def test_results_json_has_every_adapter_method_and_claim(study):
  data = _results(study["out"])
  assert list(data["adapters"]) == list(ADAPTERS)
  for name, a in data["adapters"].items():
    want = "next" if name in layout.DECODE_ADAPTERS else "same"
    assert a["primary_reading"] == want
    assert a["params"] > 0 and a["epochs"] == 1
    for key, _ in SEED_COLUMNS:
      m = a["metrics"][key]
      assert m["value"] is not None and m["ci95"] is not None, (name, key)
      assert m["ci95"][0] <= m["value"] + 1e-9 <= m["ci95"][1] + 2e-9
    assert "untrained" in a["baselines"]
  # Acceptance at depth at the live gamma, for the decode adapters only.
  assert "depth_acceptance" not in data["adapters"]["l4"]
  for name, k in (("b1_next", 1), ("b1_ttt", 4)):
    a = data["adapters"][name]
    assert a["unroll_steps"] == k
    depth = a["depth_acceptance"]
    assert depth["gamma"] == GAMMA
    for reading in ("free_running", "teacher_forced"):
      assert set(depth[reading]) == {"depth_1", "depth_2", "depth_3", "tau"}
  for rt, block in data["live"]["gpus1"]["by_runtime"].items():
    assert set(block["methods"]) == set(layout.methods_of(ADAPTERS)), rt
    for m, r in block["methods"].items():
      assert r["n"] == 4 and r["mismatches"] == 0, (rt, m)
    assert block["aa_control"]["speedup_ci95"] is not None
  comp = data["comparisons"]
  assert [(r["method"]) for r in comp["chains_and_trees"]] == [
    "decode:b1_next", "tree:b1_next", "decode:b1_ttt", "tree:b1_ttt",
  ]  # fmt: skip
  assert [r["unroll_steps"] for r in comp["unroll"]] == [1, 4]
  assert [r["adapter"] for r in comp["offline_vs_live"]] == [
    "b1_next",
    "b1_ttt",
  ]
  p = data["projection_7b"]
  assert not p["available"] and "no 7B costs were given" in p["why"]
  # The toy pair's hidden 32 cannot hold the seed's ratios: said why.
  w = data["prefill_widths"]
  assert w["axis"] == "recipe" and "hidden 32" in w["why_not"]
  # Random models accept nothing: no claim is judged, and each says why.
  assert len(data["claims"]) == 5
  for c in data["claims"]:
    assert c["verdict"] == "not judged", c
    assert "accepted 0 drafted tokens" in c["text"]
  assert data["pair"] == {"target": TARGET, "draft": DRAFT}
  assert data["study"]["dump"]["splits"]["test"]["groups"] == 6


def test_adapters_train_their_recipes(study):
  want = {
    "l4": ("l4", "reference", 1),
    "b1_next": ("b1", "next", 1),
    "b1_ttt": ("b1", "next", 4),
  }
  for name, (model, objective, k) in want.items():
    with open(os.path.join(study["out"], "runs", name, "config.json")) as f:
      config = json.load(f)
    assert config["model"]["name"] == model
    assert config["model"]["hidden_dim"] == 32  # the toy target's width
    assert config["loss"]["objective"] == objective, name
    assert config["loss"]["unroll_steps"] == k, name


def test_results_md_has_every_section(study):
  with open(os.path.join(study["out"], "report", "RESULTS.md")) as f:
    text = f.read()
  for heading in (
    "## The pair and the task",
    "## The seed's table",
    "## Live speculative decoding",
    "### CPU, fast runtime",
    "### CPU, eager runtime",
    "## Chains and trees per decode adapter",
    "## Multi-step training: k = 1 against k > 1",
    "## Offline prediction against live τ",
    "## Projected for a 7B pair (not measured)",
    "## L1–L4 on the seed's capacity axis",
    "## The seed's claims",
    "## The 2× goal",
    "## Plots",
    "## How to regenerate",
  ):
    assert heading in text, heading
  assert "one GPU" not in text.split("## How to regenerate")[0]
  assert "The two-GPU table is absent" in text
  assert "The projection is absent: no 7B costs were given" in text
  assert "A/A control (baseline / baseline again): " in text
  # The samples have groups: offline and live CIs resample whole groups.
  assert "95% bootstrap CI over the 6 test groups" in text
  assert "groups; CIs resample whole groups) after" in text
  for name in ADAPTERS:
    assert f"| {layout.title(name)} |" in text
  for m in layout.methods_of(ADAPTERS):
    assert f"| {m} |" in text
  assert f"Target `{TARGET}`, drafter `{DRAFT}`." in text
  assert "mean next-token entropy" in text
  for png in ("accept.png", "token_top1.png", "speedup.png"):
    assert os.path.isfile(os.path.join(study["out"], "report", "results", png))


def test_rerun_keeps_finished_stages_and_refuses_changed_settings(
  study, tmp_path, capsys
):
  copy = _copy(study, tmp_path)
  # The pair flags are left out: study.json remembers the pair.
  argv = ["--out", copy, "--stages", "dump,train,evaluate,export"]
  argv += ["--epochs", "1", "--batch_size", "8", "--bootstrap", "50"]
  argv += ["--adapters", ",".join(ADAPTERS), "--gamma", str(GAMMA)]
  capsys.readouterr()
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  for stage in ("dump", "train", "evaluate", "export"):
    assert f"== {stage}: done earlier, kept" in out
  argv[argv.index("--epochs") + 1] = "2"
  assert cli.main(argv) == 2
  assert "stage train was run with --epochs 1" in capsys.readouterr().err
  argv[argv.index("--epochs") + 1] = "1"
  argv[argv.index("--gamma") + 1] = "5"
  assert cli.main(argv) == 2
  assert "stage evaluate was run with --gamma 3" in capsys.readouterr().err
  argv[argv.index("--adapters") + 1] = "l4,b1_nxt"
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: --adapters: unknown adapter(s) ['b1_nxt']")


def test_unpacked_parts_regenerate_the_results(study, tmp_path):
  copy = str(tmp_path / "copy")
  state.unpack(str(study["root"] / "parts"), copy)
  assert cli.main(["--out", copy, "--stages", "results"]) == 0
  assert not os.path.exists(os.path.join(copy, "data", "train", "shard_0"))
  again, first = _results(copy), _results(study["out"])
  for key in ("adapters", "live", "claims", "goal", "pair", "comparisons"):
    assert again[key] == first[key], key


def _costs_7b(study, path, **config):
  """A 7B-shaped run's results.json made from the study's own fast run:
  the methods renamed to the 7B run's (`decode:b1`), the costs scaled."""
  bench = _bench(study["out"])
  bench["config"].update(target="random:vicuna7b", **config)
  bench["aggregate"] = {
    "decode:b1": bench["aggregate"]["decode:b1_next"],
    "tree:b1": bench["aggregate"]["tree:b1_next"],
  }
  bench["costs"]["target_decode_ms"] *= 4
  with open(path, "w") as f:
    json.dump(bench, f)
  return bench


def test_the_7b_projection_reads_costs_7b_and_is_kept(study, tmp_path, capsys):
  copy = _copy(study, tmp_path)
  bench = _costs_7b(study, tmp_path / "7b.json")
  argv = ["--out", copy, "--stages", "results"]
  assert cli.main(argv + ["--costs_7b", str(tmp_path / "7b.json")]) == 0
  p = _results(copy)["projection_7b"]
  assert p["available"] and p["why"] is None
  live = _results(copy)["live"]["gpus1"]["by_runtime"]["fast"]["methods"]
  # decode:b1_ttt maps to the 7B run's decode:b1; the formula by hand.
  base = bench["costs"]["target_decode_ms"]
  for m, m7 in (("decode:b1_ttt", "decode:b1"), ("tree:b1_next", "tree:b1")):
    model = bench["aggregate"][m7]["cost_model"]
    draft = model["drafts_per_verification"] * model["c"]
    if m7.startswith("tree"):
      verify = bench["costs"]["target_verify_tree_ms"][str(TREE["nodes"])]
    else:
      verify = bench["costs"]["target_verify_ms"][str(GAMMA + 1)]
    want = live[m]["tau"] / (draft + verify / base)
    assert p["methods"][m]["method_7b"] == m7
    assert p["methods"][m]["decode_speedup"] == pytest.approx(want), m
  # Kept in the study directory: a later results run still projects.
  assert cli.main(argv) == 0
  assert _results(copy)["projection_7b"]["available"]
  with open(os.path.join(copy, "report", "RESULTS.md")) as f:
    text = f.read()
  assert "(projected)" in text and "not a measured speedup" in text
  # A run at another gamma does not fit; a wrong file is one error line.
  _costs_7b(study, tmp_path / "g.json", gamma=GAMMA + 1)
  assert cli.main(argv + ["--costs_7b", str(tmp_path / "g.json")]) == 0
  p = _results(copy)["projection_7b"]
  assert not p["available"] and f"its γ is {GAMMA + 1}" in p["why"]
  capsys.readouterr()
  bad = os.path.join(copy, layout.STUDY_FILE)
  assert cli.main(argv + ["--costs_7b", bad]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "expected a tools/benchmark_sd.py" in err


def _fake_benchmark(monkeypatch, copy, clock=None):
  """The benchmark replaced by a copy of bench1's run of the same runtime;
  returns the commands the study ran. With `clock` ({'s': 0.0}), the
  stage's clock moves on by each run's whole --time_budget_s, the slowest
  a run may be."""
  import time

  from tools.study import live

  cmds = []

  def fake_tool(cmd, what, ok=(0,)):
    cmds.append(cmd)
    out = cmd[cmd.index("--out") + 1]
    rt = cmd[cmd.index("--runtimes") + 1]
    shutil.copytree(os.path.join(copy, "bench", "gpus1", rt), out)
    if clock is not None:
      clock["s"] += float(cmd[cmd.index("--time_budget_s") + 1])
    return 0

  monkeypatch.setattr(live, "run_tool", fake_tool)
  if clock is not None:
    fake_time = types.SimpleNamespace(
      perf_counter=lambda: time.perf_counter() + clock["s"]
    )
    monkeypatch.setattr(live, "time", fake_time)
  return cmds


def _flag(cmd, name):
  return cmd[cmd.index(name) + 1]


def test_bench2_hands_the_second_device_to_the_benchmark(
  study, tmp_path, monkeypatch
):
  """bench2 on a CPU, the benchmark faked: what the study asks of it (each
  runtime's headline run first, with its own samples), and the
  two-setting report."""
  copy = _copy(study, tmp_path)
  cmds = _fake_benchmark(monkeypatch, copy)
  argv = ["--out", copy, "--stages", "bench2,results", "--adapters"]
  argv += [",".join(ADAPTERS), "--gamma", str(GAMMA), "--tree_nodes", "5"]
  argv += ["--tree_depth", "3", "--tree_topk", "2", "--bench_samples", "4"]
  argv += ["--eager_samples", "3", "--warmup", "1", "--draft_device2", "cpu"]
  argv += ["--bench_time_budget_s", "100", "--headline_budget_s", "25"]
  assert cli.main(argv) == 0
  # First the headline methods alone on each runtime: on the fast one,
  # every test sample but the warm-up one (6 - 1); on the eager one,
  # --eager_samples. Then every method, on each runtime.
  outs = [os.path.relpath(_flag(c, "--out"), copy) for c in cmds]
  assert outs == [
    os.path.join("bench", "gpus2", d)
    for d in ("fast_headline", "eager_headline", "fast", "eager")
  ]
  heads, full = cmds[:2], cmds[2:]
  assert [_flag(c, "--runtimes") for c in cmds] == ["fast", "eager"] * 2
  assert [_flag(c, "--num_samples") for c in cmds] == ["5", "3", "4", "3"]
  for cmd in heads:
    assert _flag(cmd, "--methods") == "baseline,decode:b1_next,tree:b1_next"
    assert float(_flag(cmd, "--time_budget_s")) == 25.0
  for cmd in full:
    assert float(_flag(cmd, "--time_budget_s")) == 100.0
    assert _flag(cmd, "--methods") == ",".join(layout.methods_of(ADAPTERS))
  for cmd in cmds:
    assert _flag(cmd, "--draft_device") == "cpu"
    assert _flag(cmd, "--tree_nodes") == "5"
  with open(os.path.join(copy, "report", "RESULTS.md")) as f:
    text = f.read()
  assert "### CPU, drafter as a second device, eager runtime" in text
  assert "The two-GPU table is absent" not in text
  for rt in ("fast", "eager"):
    assert (
      f"#### CPU, drafter as a second device, {rt} runtime: the headline"
    ) in text


def test_the_live_budgets_follow_the_time_limit(study, tmp_path, monkeypatch):
  """With --time_limit_s, each run's budget taken as it starts, every run
  using all of it: a headline run leaves the headline runs after it an
  equal part, the first runtime's all-methods run gets what is left, and a
  later one is left out when under 60 s would be left for it."""
  from tools.study import live, verdicts

  argv = ["--stages", "bench2", "--adapters", ",".join(ADAPTERS)]
  argv += ["--gamma", str(GAMMA), "--bench_samples", "4"]
  argv += ["--eager_samples", "4", "--warmup", "1", "--draft_device2", "cpu"]
  reserve = live.MIN_BENCH_S / 2  # kept for the results and the pack

  def budgets(limit, name):
    copy = _copy(study, tmp_path, name)
    clock = {"s": 0.0}
    cmds = _fake_benchmark(monkeypatch, copy, clock)
    assert cli.main(["--out", copy, "--time_limit_s", str(limit)] + argv) == 0
    return copy, cmds, [float(_flag(c, "--time_budget_s")) for c in cmds]

  # 540 s and the default caps (160 s per headline run, 200 s per
  # all-methods run): both headline runs get their whole cap, the fast
  # all-methods run the rest (540 - 45 - 2 x 160), the eager one nothing.
  copy, cmds, got = budgets(540, "limit540")
  assert [_flag(c, "--runtimes") for c in cmds] == ["fast", "eager", "fast"]
  assert got[:2] == [160.0, 160.0]
  assert got[2] == pytest.approx(540 - reserve - 320, abs=5)
  with open(os.path.join(copy, layout.STUDY_FILE)) as f:
    rec = json.load(f)["stages"]["bench2"]
  assert list(rec["headline"]) == ["fast", "eager"]
  assert list(rec["runtimes"]) == ["fast"]
  assert list(rec["left_out"]) == ["eager"]
  assert rec["headline"]["fast"]["seconds"] >= 160  # the stage's clock
  assert cli.main(["--out", copy, "--stages", "results"]) == 0
  data = _results(copy)
  assert list(data["live"]["gpus2"]["headlines"]) == ["fast", "eager"]
  # The verdicts still read the first runtime's run of every method.
  assert verdicts.headline_live(data)[:2] == ("gpus2", "fast")
  with open(os.path.join(copy, "report", "RESULTS.md")) as f:
    text = f.read()
  assert "drafter as a second device, eager runtime: the headline" in text
  assert "### CPU, drafter as a second device, eager runtime\n" not in text
  assert (
    "The eager runtime's run of every method on CPU, drafter as a second "
    "device was left out: only "
  ) in text
  # 240 s: the fast headline run may not take the whole limit, as the
  # eager headline run is still to come: each takes half.
  _, cmds, got = budgets(240, "limit240")
  half = (240 - reserve) / 2
  assert got[0] == pytest.approx(half, abs=3) and got[0] <= half
  assert got[1] == pytest.approx(half, abs=3)
  assert got[2] == 1.0  # nothing left: the first all-methods run still runs
  assert len(cmds) == 3


def test_a_single_headline_record_of_an_older_study_still_renders(
  study, tmp_path
):
  """study.json from before every runtime had a headline run: bench1's
  `headline` is one record, its runtime inside."""
  copy = _copy(study, tmp_path)
  path = os.path.join(copy, layout.STUDY_FILE)
  with open(path) as f:
    st = json.load(f)
  st["stages"]["bench1"]["headline"] = st["stages"]["bench1"]["headline"][
    "fast"
  ]
  assert st["stages"]["bench1"]["headline"]["runtime"] == "fast"
  with open(path, "w") as f:
    json.dump(st, f)
  assert cli.main(["--out", copy, "--stages", "results"]) == 0
  assert list(_results(copy)["live"]["gpus1"]["headlines"]) == ["fast"]
  with open(os.path.join(copy, "report", "RESULTS.md")) as f:
    text = f.read()
  assert "#### CPU, fast runtime: the headline methods on more" in text
  assert "#### CPU, eager runtime: the headline" not in text


@pytest.mark.parametrize(
  "argv, error",
  [
    (["--headline_budget_s", "-1"], "--headline_budget_s -1.0: expected "),
    (["--bench_time_budget_s", "-5"], "--bench_time_budget_s -5.0: expected"),
    (["--headline_samples", "-1"], "--headline_samples -1: expected a "),
    (["--eager_samples", "0"], "--eager_samples 0: expected a number of "),
  ],
)
def test_a_bad_live_sample_count_or_budget_is_one_error_line(
  tmp_path, capsys, argv, error
):
  out = str(tmp_path / "none")
  assert cli.main(["--out", out, *argv]) == cli.EXIT_USAGE
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and err.startswith(f"error: {error}")
  assert not os.path.exists(out)  # refused before the study opened


def test_results_without_a_live_stage_say_so(study, tmp_path):
  copy = _copy(study, tmp_path)
  shutil.rmtree(os.path.join(copy, "bench"))
  path = os.path.join(copy, "study.json")
  with open(path) as f:
    state = json.load(f)
  del state["stages"]["bench1"]
  with open(path, "w") as f:
    json.dump(state, f)
  assert cli.main(["--out", copy, "--stages", "results"]) == 0
  with open(os.path.join(copy, "report", "RESULTS.md")) as f:
    text = f.read()
  assert "The one-GPU tables are absent: this study ran no bench1" in text
  # The recorded runs name their paths, which are machine-local.
  runs = text.split("## How to regenerate")[1]
  assert "`python -m tools.study --out DIR " in runs
  assert str(tmp_path) not in runs and study["out"] not in runs
  assert "No live measurement yet." in text


def test_a_stage_left_for_time_exits_3_and_names_it(study, tmp_path, capsys):
  copy = _copy(study, tmp_path)
  argv = ["--out", copy, "--stages", "bench1", "--redo", "bench1"]
  argv += ["--time_limit_s", "1", "--bench_samples", "4"]
  argv += ["--eager_samples", "4", "--adapters", ",".join(ADAPTERS)]
  argv += ["--gamma", str(GAMMA)]
  assert cli.main(argv) == cli.EXIT_TIME_LEFT
  err = capsys.readouterr().err
  assert "stages left for lack of time" in err and "bench1" in err
  # The redo removed bench1's outputs.
  assert not os.path.exists(os.path.join(copy, "bench", "gpus1"))


def test_an_interrupt_is_one_line_naming_what_finished(
  study, tmp_path, capsys, monkeypatch
):
  copy = _copy(study, tmp_path)

  def interrupted(s):
    raise KeyboardInterrupt

  monkeypatch.setitem(cli.RUNNERS, "lm_head", interrupted)
  argv = ["--out", copy, "--stages", "lm_head", "--redo", "lm_head"]
  capsys.readouterr()
  assert cli.main(argv) == cli.EXIT_INTERRUPTED
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "Traceback" not in err
  assert err.startswith("interrupted during stage lm_head; finished: pair")
  assert "run the same command again to resume" in err
  # The run's record says what it did, and RESULTS.md lists it so.
  with open(os.path.join(copy, "study.json")) as f:
    run = json.load(f)["runs"][-1]
  assert run["outcome"] == "interrupted during lm_head" and run["ran"] == []

  # A bad input the library finds inside a stage (it raises ValueError with
  # a message naming it) is one error line, and the run records the stage.
  def bad_input(s):
    raise ValueError("16 training samples give no full batch of 64")

  monkeypatch.setitem(cli.RUNNERS, "lm_head", bad_input)
  assert cli.main(argv) == cli.EXIT_USAGE
  err = capsys.readouterr().err.strip()
  assert err == (
    "error: stage lm_head: 16 training samples give no full batch of 64"
  )
  with open(os.path.join(copy, "study.json")) as f:
    run = json.load(f)["runs"][-1]
  assert run["outcome"] == "failed in stage lm_head"

  def broken(s):
    raise RuntimeError("a bug")

  monkeypatch.setitem(cli.RUNNERS, "lm_head", broken)
  with pytest.raises(RuntimeError):
    cli.main(argv)
  assert cli.main(["--out", copy, "--stages", "results"]) == 0
  with open(os.path.join(copy, "study.json")) as f:
    runs = json.load(f)["runs"]
  assert runs[-2]["outcome"] == "failed in stage lm_head"
  assert runs[-1] | {"outcome": "ran", "ran": ["results"]} == runs[-1]
  with open(os.path.join(copy, "report", "RESULTS.md")) as f:
    text = f.read()
  assert "--redo lm_head` (" in text
  assert " — failed in stage lm_head (ran: none)" in text
  assert "--stages results` (" in text and " — ran: results" in text


def test_a_study_without_the_next_adapters_still_renders(study, tmp_path):
  """A study made before the *_next adapters: the seed's only, no
  objective section, and the table says why."""
  from tools.study import collect, report

  copy = str(tmp_path / "old")
  shutil.copytree(study["out"], copy, ignore=shutil.ignore_patterns("data"))
  path = os.path.join(copy, layout.STUDY_FILE)
  with open(path) as f:
    st = json.load(f)
  for name in layout.NEXT_ADAPTERS + layout.TTT_ADAPTERS:
    st["stages"]["evaluate"]["adapters"].pop(name, None)
  with open(path, "w") as f:
    json.dump(st, f)
  pair = cli.make_pair_object(
    cli.build_parser().parse_args(["--out", copy]), copy
  )
  data = collect.collect(copy, pair)
  assert list(data["adapters"]) == ["l4"]
  text = report.render(data, pair, [])
  assert "This study predates the `(objective next)` adapters." in text
  assert "## The reference's dual objective" not in text
  assert "## Multi-step training" not in text
