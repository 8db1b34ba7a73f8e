"""The study end to end on the toy plugin pair, run once for the module.

Two tiny random Llamas (tests/toy_plugin.py) as target and drafter: every
stage of `python -m tools.study` (dump, LM head, ten adapters trained,
evaluated and exported, every live method on two settings and two
runtimes, the report), then pack, unpack into another directory and
regenerate. Random models accept nothing, so the report must say that no
claim is judged. Nothing here depends on how fast the machine is (no time
limit unless a test sets one).
"""

import json
import os
import shutil

import pytest

from tools.study import cli, layout, state
from tools.study.collect import SEED_COLUMNS

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


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  root = tmp_path_factory.mktemp("study")
  samples = ",".join(
    _write_samples(root / f"{split}.jsonl", n, off)
    for split, n, off in (("train", 16, 0), ("val", 4, 100), ("test", 6, 200))
  )
  out = str(root / "study")
  argv = [
    "--out", out, "--target", TARGET, "--draft", DRAFT,
    "--samples", samples, "--max_new_tokens", "8", "--stages", "all",
    "--epochs", "1", "--batch_size", "8", "--bootstrap", "50",
    "--bench_samples", "4", "--eager_samples", "4", "--warmup", "1",
    "--device", "cpu", "--dtype", "float32", "--draft_device2", "cpu",
    "--no_progress", "--pack", str(root / "parts"),
  ]  # fmt: skip
  assert cli.main(argv) == 0
  return {"root": root, "out": out, "argv": argv}


def _results(out):
  with open(os.path.join(out, "report", "results", "results.json")) as f:
    return json.load(f)


def test_every_method_is_lossless_in_fp32(study):
  for sub in ("gpus1", "gpus2"):
    for rt in ("fast", "eager"):
      path = os.path.join(study["out"], "bench", sub, rt, "results.json")
      with open(path) as f:
        bench = json.load(f)
      assert bench["config"]["dtype"] == "float32"
      assert bench["config"]["runtimes"] == [rt]
      assert bench["mismatches"] == []
      assert set(bench["aggregate"]) == set(layout.METHODS)
      for lab, a in bench["aggregate"].items():
        assert a["n"] == 4 and a["mismatched_samples"] == 0, lab


def test_live_methods_draft_with_the_objective_next_adapters(study):
  decode = [m for m in layout.METHODS if m.split(":")[0] in ("decode",)]
  assert decode == [f"decode:{n}" for n in layout.NEXT_ADAPTERS]
  for m in layout.METHODS:
    if m.startswith("two_phase:"):
      assert m.split("+")[1] in layout.NEXT_ADAPTERS
  path = os.path.join(study["out"], "bench", "gpus1", "fast", "results.json")
  with open(path) as f:
    loaded = json.load(f)["provenance"]["adapters"]
  assert set(loaded) == set(layout.LIVE_ADAPTERS)


def test_results_json_has_every_adapter_method_and_claim(study):
  data = _results(study["out"])
  assert list(data["adapters"]) == list(layout.ADAPTERS)
  for name, a in data["adapters"].items():
    want = "next" if name in layout.DECODE_ADAPTERS else "same"
    assert a["primary_reading"] == want
    assert a["params"] > 0 and a["epochs"] == 1
    for key, _ in SEED_COLUMNS:
      m = a["metrics"][key]
      assert m["value"] is not None and m["ci95"] is not None, (name, key)
      assert m["ci95"][0] <= m["value"] + 1e-9 <= m["ci95"][1] + 2e-9
    assert "untrained" in a["baselines"]
  for sub in ("gpus1", "gpus2"):
    for rt, block in data["live"][sub]["by_runtime"].items():
      assert set(block["methods"]) == set(layout.METHODS), (sub, rt)
      for m, r in block["methods"].items():
        assert r["n"] == 4 and r["mismatches"] == 0, (sub, rt, m)
  # Random models accept nothing: no claim is judged, and each says why.
  assert len(data["claims"]) == 5
  for c in data["claims"]:
    assert c["verdict"] == "not judged", c
    assert "accepted 0 drafted tokens" in c["text"]
  assert data["pair"] == {"target": TARGET, "draft": DRAFT}
  assert data["study"]["dump"]["splits"]["test"]["groups"] == 6


def test_next_adapters_train_their_recipe_with_objective_next(study):
  for name in layout.ADAPTERS:
    with open(os.path.join(study["out"], "runs", name, "config.json")) as f:
      config = json.load(f)
    assert config["model"]["name"] == layout.kind(name)
    assert config["model"]["hidden_dim"] == 32  # the toy target's width
    want = "next" if name.endswith("_next") else "reference"
    assert config["loss"]["objective"] == want, name


def test_results_md_has_every_section(study):
  with open(os.path.join(study["out"], "report", "RESULTS.md")) as f:
    text = f.read()
  for heading in (
    "## The pair and the task",
    "## The seed's table",
    "## Live speculative decoding",
    "### CPU, fast runtime",
    "### CPU, drafter as a second device, eager runtime",
    "## The seed's claims",
    "## The 2× goal",
    "## Plots",
    "## How to regenerate",
  ):
    assert heading in text, heading
  assert "one GPU" not in text.split("## How to regenerate")[0]
  for name in layout.ADAPTERS:
    assert f"| {layout.title(name)} |" in text
  for m in layout.METHODS:
    assert f"| {m} |" in text
  assert f"Target `{TARGET}`, drafter `{DRAFT}`." in text
  assert "mean next-token entropy" in text
  for png in ("accept.png", "token_top1.png", "speedup.png"):
    assert os.path.isfile(os.path.join(study["out"], "report", "results", png))


def test_rerun_keeps_finished_stages_and_refuses_changed_settings(
  study, capsys
):
  # The pair flags are left out: study.json remembers the pair.
  argv = ["--out", study["out"], "--stages", "dump,train,evaluate,export"]
  argv += ["--epochs", "1", "--batch_size", "8", "--bootstrap", "50"]
  capsys.readouterr()
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  for stage in ("dump", "train", "evaluate", "export"):
    assert f"== {stage}: done earlier, kept" in out
  argv[argv.index("--epochs") + 1] = "2"
  assert cli.main(argv) == 2
  assert "stage train was run with --epochs 1" in capsys.readouterr().err


def _copy(study, tmp_path):
  """The study's small outputs unpacked into another directory."""
  copy = str(tmp_path / "copy")
  state.unpack(str(study["root"] / "parts"), copy)
  return copy


def test_unpacked_parts_regenerate_the_results(study, tmp_path):
  copy = _copy(study, tmp_path)
  assert cli.main(["--out", copy, "--stages", "results"]) == 0
  assert not os.path.exists(os.path.join(copy, "data", "train", "shard_0"))
  again, first = _results(copy), _results(study["out"])
  for key in ("adapters", "live", "claims", "goal", "pair"):
    assert again[key] == first[key], key


def test_a_stage_left_for_time_exits_3_and_names_it(study, tmp_path, capsys):
  copy = _copy(study, tmp_path)
  argv = ["--out", copy, "--stages", "bench1,bench2", "--redo", "bench1"]
  argv += ["--time_limit_s", "1", "--bench_samples", "4"]
  argv += ["--eager_samples", "4"]
  assert cli.main(argv) == cli.EXIT_TIME_LEFT
  err = capsys.readouterr().err
  assert "stages left for lack of time" in err and "bench1" in err
  assert "bench2" not in err  # done earlier, kept
  # The redo removed bench1's outputs; bench2's stay.
  assert not os.path.exists(os.path.join(copy, "bench", "gpus1"))
  assert os.path.isdir(os.path.join(copy, "bench", "gpus2"))


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


def test_a_study_without_the_next_adapters_still_renders(study, tmp_path):
  """A study made before the *_next adapters: the seed's seven, no
  objective section, and the table says why."""
  from tools.study import collect, report

  copy = str(tmp_path / "old")
  shutil.copytree(study["out"], copy, ignore=shutil.ignore_patterns("data"))
  path = os.path.join(copy, layout.STUDY_FILE)
  with open(path) as f:
    st = json.load(f)
  for name in layout.NEXT_ADAPTERS:
    del st["stages"]["evaluate"]["adapters"][name]
  with open(path, "w") as f:
    json.dump(st, f)
  pair = cli.make_pair_object(
    cli.build_parser().parse_args(["--out", copy]), copy
  )
  data = collect.collect(copy, pair)
  assert list(data["adapters"]) == list(layout.SEED_ADAPTERS)
  text = report.render(data, pair, [])
  assert "This study predates the `(objective next)` adapters." in text
  assert "## The reference's dual objective" not in text
