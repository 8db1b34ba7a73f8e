"""Issue 35: a drafting method is its entry in tools/lib/sd_methods.py
plus its proposer. A kind added here with an option of its own, and nothing
else, gets its flag on benchmark_sd's and the study's command lines, the
value reaches its proposer through SDConfig.options, results.json records
it, and a bad value is one error line naming the flag."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tools import benchmark_sd as bench  # noqa: E402
from tools.lib import sd_methods  # noqa: E402
from tools.lib.sd_engine import SDConfig  # noqa: E402
from tools.lib.sd_proposers import AdapterProposer  # noqa: E402

WIDTH = sd_methods.Option("probe_width", int, 2, "the probe's width")


def _check_width(width: int) -> None:
  if width < 1:
    raise ValueError(f"--probe_width must be >= 1, got {width}")


@pytest.fixture
def probe(monkeypatch):
  """A kind `probe:ADAPTER`: decode's proposer, recording the probe_width
  each run's config gives it. Returns the recorded values."""
  seen = []

  def create(ctx):
    seen.append(ctx.config.options["probe_width"])
    return AdapterProposer.create(ctx)

  kind = sd_methods.MethodKind(
    "probe",
    "decode:A, recording --probe_width",
    slots=("decode",),
    phases=("decode",),
    proposer=create,
    cost_key="adapter",
    options=(WIDTH,),
    check_options=_check_width,
  )
  monkeypatch.setitem(sd_methods.METHODS, "probe", kind)
  return seen


def _argv(out, *extra):
  return [
    "--random_models=tiny",
    "--prompt_len=12",
    "--num_samples=2",
    "--warmup=1",
    "--max_new_tokens=6",
    "--gamma=2",
    "--ignore_eos",
    "--methods=decode:b1,probe:b1",
    "--adapter=b1=random",
    "--runtimes=eager",
    "--bootstrap=20",
    "--no_progress",
    "--no_plots",
    f"--out={out}",
    *extra,
  ]


def test_a_new_kinds_option_is_a_flag_on_both_command_lines(probe):
  from tools.study import cli, live

  text = bench.build_parser().format_help()
  assert "--probe_width PROBE_WIDTH" in text
  assert "probe: the probe's width" in " ".join(text.split())
  assert "--tree_depth" in text  # the others stay
  args = bench.build_parser().parse_args(["--out=x", "--probe_width=5"])
  assert bench.settings(args).options["probe_width"] == 5
  args = bench.build_parser().parse_args(["--out=x"])
  assert bench.settings(args).options["probe_width"] == 2  # its default
  # The study passes it on to the benchmark it runs.
  args = cli.build_parser().parse_args(["--out=x", "--probe_width=7"])
  flags = live.option_flags(live.method_options(args))
  assert flags[flags.index("--probe_width") + 1] == "7"
  assert flags[flags.index("--tree_nodes") + 1] == "60"


def test_a_new_kinds_option_reaches_its_proposer(probe, tmp_path):
  out = tmp_path / "bench"
  assert bench.main(_argv(out, "--probe_width=3")) == 0
  # Every run of the kind (warm-up, shape warm-up, measured) saw it.
  assert probe and set(probe) == {3}
  res = json.loads((out / "results.json").read_text())
  assert res["config"]["options"]["probe_width"] == 3
  assert res["config"]["options"]["tree_nodes"] == 60
  agg = res["aggregate"]["probe:b1"]
  assert agg["n"] == 2 and agg["mismatched_samples"] == 0
  # Lossless: the same tokens as decode:b1, which it drafts like.
  for a, b in zip(
    res["per_sample"]["probe:b1"], res["per_sample"]["decode:b1"], strict=True
  ):
    assert a["tokens"] == b["tokens"]


def test_a_bad_value_is_one_error_line_naming_the_flag(probe, tmp_path, capsys):
  assert bench.main(_argv(tmp_path / "a", "--probe_width=0")) == 2
  err = capsys.readouterr().err.strip()
  assert err == "error: --probe_width must be >= 1, got 0"
  assert not probe  # refused before any run
  with pytest.raises(SystemExit) as e:
    bench.main(_argv(tmp_path / "b", "--probe_width=wide"))
  assert e.value.code == 2
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert "argument --probe_width: invalid int value: 'wide'" in last
  # The library refuses it too, and a name no kind declares.
  with pytest.raises(ValueError, match="--probe_width must be >= 1"):
    SDConfig(options={"probe_width": -1})
  with pytest.raises(ValueError, match="unknown method option"):
    SDConfig(options={"probe_widht": 3})
  assert SDConfig().options["probe_width"] == 2


def test_old_results_read_their_tree_record():
  old = {"tree": {"depth": 6, "topk": 10, "nodes": 60}}
  new = {"options": {"tree_depth": 6, "tree_topk": 10, "tree_nodes": 60}}
  assert sd_methods.recorded_options(old) == new["options"]
  assert sd_methods.recorded_options(new) == new["options"]
  assert sd_methods.recorded_options({}) == {}
