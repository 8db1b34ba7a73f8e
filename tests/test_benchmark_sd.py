"""Tests of tools/benchmark_sd.py: CLI smoke runs, adapters, aggregation."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tools import benchmark_sd as bench  # noqa: E402
from tools.lib import bridge, sd_bench, sd_engine, sd_results  # noqa: E402
from tools.lib import twins as ta  # noqa: E402
from tools.lib.sd_adapters import load_adapter  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
  # Tiny models: thread fan-out only adds contention on a busy CPU.
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


def _load(out):
  with open(out / "results.json") as f:
    return json.load(f)


def test_cli_random_models_end_to_end(tmp_path):
  out = tmp_path / "bench"
  methods = (
    "baseline,draft_tokens,prefill_hiding:l4,prefill_hiding:l2,decode:b1,"
    "decode:l5,decode:l5f,two_phase:l4+b1"
  )
  argv = [
    "--random_models=tiny",
    "--prompt_len=16",
    "--num_samples=3",
    "--warmup=1",
    "--max_new_tokens=9",
    "--gamma=3",
    "--prefill_gamma=auto",
    "--ignore_eos",
    "--methods",
    methods,
    "--bootstrap=50",
    "--no_progress",
    f"--out={out}",
  ]
  for a in ("l4", "l2", "b1", "l5", "l5f"):
    argv.append(f"--adapter={a}=random")
  assert bench.main(argv) == 0
  res = _load(out)
  assert res["config"]["methods"] == methods.split(",")
  assert res["num_measured"] == 3
  for m in methods.split(","):
    agg = res["aggregate"][m]
    assert agg["n"] == 3 and agg["mismatched_samples"] == 0, m
    recs = res["per_sample"][m]
    # Warm-up sample random0000 is excluded everywhere.
    assert [r["id"] for r in recs] == ["random0001", "random0002", "random0003"]
    assert all(len(r["tokens"]) == 9 for r in recs)
    tot = np.array([r["total_ms"] for r in recs])
    base = np.array([r["total_ms"] for r in res["per_sample"]["baseline"]])
    assert agg["speedup"] == pytest.approx(base.mean() / tot.mean())
    if m != "baseline":
      drafted = sum(r["drafted"] for r in recs)
      assert agg["drafted"] == drafted > 0
      assert agg["alpha"] == pytest.approx(
        sum(r["accepted"] for r in recs) / drafted
      )
  assert res["config"]["prefill_gamma"] == "auto"
  for r in res["per_sample"]["prefill_hiding:l4"]:
    assert 1 <= r["prefill_gamma"] <= sd_bench.AUTO_K_MAX
  # Overlap measured (sequential on CPU: 0) for the prefill-hiding methods.
  ov = res["aggregate"]["prefill_hiding:l4"]["prefill_overlap"]
  assert ov["overlap_ms"] == 0.0 and ov["concurrent"] is False
  costs = res["costs"]
  assert costs["target_decode_ms"] > 0
  assert costs["target_verify_ms"]["gamma+1"] > 0
  assert costs["draft_model_decode_ms"] > 0
  assert set(costs["adapter_step_ms"]) >= {"b1", "l5", "l5f"}
  assert set(costs["relative"]["c"]) >= {"draft_tokens", "decode:b1"}
  assert costs["relative"]["v"] == pytest.approx(
    costs["target_verify_ms"]["gamma+1"] / costs["target_decode_ms"]
  )
  for f in ("report.md", "speedup.png", "breakdown.png", "acceptance.png"):
    assert (out / f).stat().st_size > 0, f
  report = (out / "report.md").read_text()
  assert "two_phase:l4+b1" in report and "ratio of mean totals" in report
  # Both runtimes ran every method; speedups against both baselines.
  assert res["config"]["runtimes"] == ["fast", "eager"]
  assert set(res["costs_by_runtime"]) == {"fast", "eager"}
  assert res["costs"] == res["costs_by_runtime"]["fast"]
  assert res["fast_path"]["target"].startswith("static")
  for m in methods.split(","):
    assert res["aggregate"][f"{m}@eager"]["mismatched_samples"] == 0, m
    vs = res["aggregate"][m]["speedup_vs"]
    assert vs["fast"]["speedup"] == pytest.approx(
      res["aggregate"][m]["speedup"]
    )
    tot = np.mean([r["total_ms"] for r in res["per_sample"][m]])
    ebase = [r["total_ms"] for r in res["per_sample"]["baseline@eager"]]
    assert vs["eager"]["speedup"] == pytest.approx(np.mean(ebase) / tot)
  assert "vs eager baseline" in report and "(eager runtime)" in report


def test_costs_readable_by_speedup_model(tmp_path):
  speedup = pytest.importorskip("egpt_align.speedup")
  out = tmp_path / "b"
  argv = [
    "--random_models=tiny",
    "--prompt_len=8",
    "--num_samples=3",
    "--warmup=0",
    "--max_new_tokens=8",
    "--gamma=2",
    "--ignore_eos",
    "--methods=baseline,draft_tokens,decode:b1,prefill_hiding:l4",
    "--time_budget_s=0",  # stops after the first measured sample
    "--adapter=b1=random",
    "--adapter=l4=identity",
    "--random_same_drafter",
    "--bootstrap=0",
    "--no_plots",
    "--no_progress",
    f"--out={out}",
  ]
  assert bench.main(argv) == 0
  res = _load(out)
  assert res["num_measured"] == 1
  for name in ("b1", "drafter"):
    got = speedup.costs_from_bench(str(out / "results.json"), name, 2)
    c = res["costs"]
    assert got["target_decode_ms"] == pytest.approx(c["target_decode_ms"])
    assert got["verify_ms"] == pytest.approx(c["target_verify_ms"]["gamma+1"])
  assert res["aggregate"]["decode:b1"]["speedup_ci95"] is None
  # Drafter = a copy of the target: every draft token is accepted.
  assert res["aggregate"]["draft_tokens"]["alpha"] == 1.0
  assert res["aggregate"]["prefill_hiding:l4"]["alpha"] == 1.0
  assert set(res["costs"]["sd_loop_overhead_ms_per_iteration"]) == {
    "baseline",
    "draft_tokens",
    "decode:b1",
    "prefill_hiding:l4",
  }


def _export(tmp_path, name, module, cfg, fmt):
  params = bridge.state_dict_to_flax(name, module.state_dict())
  paths = bridge.export(params, name, cfg, tmp_path / name, fmt=fmt)
  return str(paths[0])


TOY = dict(hidden_dim=32, num_heads=4, ffn_dim=64)


def test_load_exported_adapters(tmp_path):
  torch.manual_seed(0)
  l5 = ta.build_torch_adapter("l5", **TOY, alpha_init=0.7).eval()
  l3 = ta.build_torch_adapter("l3", hidden_dim=32, bottleneck_dim=8).eval()
  with torch.no_grad():  # zero-initialised up-projections: make them count
    for p in l3.parameters():
      p.add_(0.05 * torch.randn_like(p))
  files = {
    "l5": _export(tmp_path, "l5", l5, TOY, "pt"),
    "l3": _export(
      tmp_path, "l3", l3, dict(hidden_dim=32, bottleneck_dim=8), "safetensors"
    ),
  }
  x = torch.randn(1, 6, 32)
  for name, src in (("l5", l5), ("l3", l3)):
    ad, info = load_adapter(
      name,
      files[name],
      hidden_dim=32,
      device=torch.device("cpu"),
      dtype=torch.float32,
    )
    assert ad.kind == name and info["kind"] == name
    with torch.no_grad():
      torch.testing.assert_close(ad.module(x), src(x))
  with pytest.raises(ValueError, match="hidden_dim"):
    load_adapter(
      "l5",
      files["l5"],
      hidden_dim=64,
      device=torch.device("cpu"),
      dtype=torch.float32,
    )
  # An L5 file asked for as L5F or B1 is refused, naming both types.
  for asked in ("l5f", "b1"):
    with pytest.raises(
      ValueError, match=f"holds a l5 adapter, not the {asked}"
    ):
      load_adapter(
        asked,
        files["l5"],
        hidden_dim=32,
        device=torch.device("cpu"),
        dtype=torch.float32,
      )


def test_cli_adapter_of_another_type_is_an_error(tmp_path, capsys):
  torch.manual_seed(0)
  l5 = ta.build_torch_adapter("l5", hidden_dim=64, num_heads=4, ffn_dim=64)
  path = _export(
    tmp_path,
    "l5",
    l5.eval(),
    dict(hidden_dim=64, num_heads=4, ffn_dim=64),
    "pt",
  )
  argv = [
    "--random_models=tiny",
    "--prompt_len=4",
    "--num_samples=1",
    "--warmup=0",
    "--methods=baseline,decode:l5f",
    f"--adapter=l5f={path}",
    f"--out={tmp_path / 'o'}",
    "--no_progress",
  ]
  assert bench.main(argv) == 2
  err = capsys.readouterr().err
  assert "l5f" in err and "holds a l5 adapter" in err


def test_cli_samples_file_plugin_and_exported_files(tmp_path):
  """Plugin backends, a samples JSONL and exported adapters end to end.

  The drafter is the target itself and L4 has alpha = 0 (an exact identity),
  so draft_tokens and prefill_hiding must accept every draft.
  """
  pytest.importorskip("tokenizers")
  l4 = ta.build_torch_adapter("l4", **TOY, alpha_init=0.0).eval()
  b1 = ta.build_torch_adapter("b1", **TOY).eval()
  f_l4 = _export(tmp_path, "l4", l4, TOY, "pt")
  f_b1 = _export(tmp_path, "b1", b1, TOY, "safetensors")
  samples = tmp_path / "samples.jsonl"
  with open(samples, "w") as f:
    for i in range(3):
      q = " ".join(f"w{(7 * i + j) % 40}" for j in range(6))
      row = {"id": f"s{i}", "question": q, "media": {"target": {"seed": i}}}
      f.write(json.dumps(row) + "\n")
  out = tmp_path / "o"
  argv = [
    "--target=tests.toy_plugin:make_backend:3",
    "--draft=tests.toy_plugin:make_backend:3",
    f"--samples={samples}",
    "--warmup=1",
    "--max_new_tokens=8",
    "--gamma=3",
    "--ignore_eos",
    "--methods=baseline,draft_tokens,prefill_hiding:l4,two_phase:l4+b1",
    "--overlap=thread",
    "--overlap_every=2",
    f"--adapter=l4={f_l4}",
    f"--adapter=b1={f_b1}",
    "--bootstrap=20",
    "--no_plots",
    "--no_progress",
    f"--out={out}",
  ]
  assert bench.main(argv) == 0
  res = _load(out)
  agg = res["aggregate"]
  assert res["num_measured"] == 2
  assert agg["draft_tokens"]["alpha"] == 1.0
  assert agg["prefill_hiding:l4"]["alpha"] == 1.0
  assert agg["two_phase:l4+b1"]["alpha_prefill"] == 1.0
  assert agg["prefill_hiding:l4"]["prefill_first_token_agree"] == 1.0
  assert all(a["mismatched_samples"] == 0 for a in agg.values())
  ov = agg["prefill_hiding:l4"]["prefill_overlap"]
  assert ov["concurrent"] is True and ov["drafter_alone_ms"] > 0
  # The saving is measured on measured samples 0, 2, ...: not on sample 1.
  recs = res["per_sample"]["prefill_hiding:l4"]
  assert [("overlap_ms" in r["overlap"]) for r in recs] == [True, False]
  assert all(r["overlap"]["concurrent"] for r in recs)
  assert ov["samples"] == 1 and res["config"]["overlap_every"] == 2
  assert "concurrent wall" in (out / "report.md").read_text()
  assert res["provenance"]["adapters"]["b1"]["kind"] == "b1"
  assert res["provenance"]["target"]["backend"] == "toy_plugin"


def test_aggregate_is_ratio_of_mean_totals():
  def rec(total, drafted=0, accepted=0, iters=0):
    return {
      "tokens": [1] * 4,
      "prefill_ms": 1.0,
      "decode_ms": total - 1.0,
      "total_ms": total,
      "drafted": drafted,
      "accepted": accepted,
      "verify_iterations": iters,
      "per_iteration": [["decode", drafted, accepted]] if drafted else [],
      "phases": {},
      "overlap": None,
      "first_draft_match": None,
      "match": True,
    }

  base = [rec(10.0), rec(100.0)]
  meth = [rec(5.0, 10, 9, 2), rec(100.0, 10, 1, 2)]
  a = sd_results.aggregate(meth, base, n_boot=200, seed=0)
  assert a["speedup"] == pytest.approx(110.0 / 105.0)
  # The reference's mean of per-sample ratios would say 1.5.
  assert a["speedup"] != pytest.approx(np.mean([10 / 5, 100 / 100]))
  assert a["alpha"] == pytest.approx(10 / 20)
  assert a["tau"] == pytest.approx((10 + 4) / 4)
  lo, hi = a["speedup_ci95"]
  assert lo <= a["speedup"] <= hi
  # Bootstrap resamples pairs: the CI spans the two per-sample ratios' range
  # of resampled means, i.e. stays within [min ratio, max ratio].
  assert 1.0 - 1e-9 <= lo and hi <= 2.0 + 1e-9
  err = sd_results.aggregate(
    [{"id": "a", "error": "x"}], base[:1], n_boot=0, seed=0
  )
  assert err == {"n": 0, "failed": 1}


@pytest.mark.parametrize(
  "extra, msg",
  [
    (["--adapter=l4"], "NAME=FILE"),
    (["--methods=baseline,decode"], "expected decode:ADAPTER"),
    (["--methods=baseline,prefill_hiding:b1", "--adapter=b1=random"], "needs"),
    (["--methods=baseline,decode:l5"], "no adapter named"),
    (["--prefill_gamma=x"], "--prefill_gamma"),
    (["--runtimes=fast,turbo"], "--runtimes"),
    (
      ["--adapter=l5=/nonexistent.pt", "--methods=baseline,decode:l5"],
      "no such",
    ),
  ],
)
def test_cli_errors(tmp_path, capsys, extra, msg):
  argv = [
    "--random_models=tiny",
    "--prompt_len=4",
    "--num_samples=1",
    "--warmup=0",
    f"--out={tmp_path}",
    "--no_progress",
    *extra,
  ]
  assert bench.main(argv) == 2
  assert msg in capsys.readouterr().err


@pytest.mark.parametrize("tie_margin, rc", [(1e9, 0), (0.0, 1)])
def test_mismatch_reported_with_margin(tmp_path, monkeypatch, tie_margin, rc):
  """A method whose output differs is counted, located and classified."""
  real = sd_bench.run_method

  def corrupt(method, *a, **kw):
    r = real(method, *a, **kw)
    if method == "decode:b1":
      r.tokens = r.tokens[:3] + [(r.tokens[3] + 1) % 128] + r.tokens[4:]
    return r

  monkeypatch.setattr(sd_bench, "run_method", corrupt)
  out = tmp_path / "m"
  argv = [
    "--random_models=tiny",
    "--prompt_len=6",
    "--num_samples=2",
    "--warmup=0",
    "--max_new_tokens=6",
    "--gamma=2",
    "--ignore_eos",
    "--methods=baseline,decode:b1",
    "--runtimes=fast",
    "--adapter=b1=random",
    f"--tie_margin={tie_margin}",
    "--bootstrap=0",
    "--no_plots",
    "--no_progress",
    f"--out={out}",
  ]
  assert bench.main(argv) == rc
  res = _load(out)
  assert res["aggregate"]["decode:b1"]["mismatched_samples"] == 2
  assert res["aggregate"]["decode:b1"]["near_tie_flips"] == (
    2 if rc == 0 else 0
  )
  assert [x["index"] for x in res["mismatches"]] == [3, 3]
  assert all(x["margin"] > 0 for x in res["mismatches"])
  assert "first difference at token 3" in (out / "report.md").read_text()


def test_prefill_window():
  w = sd_bench.PrefillWindow()
  assert w.drafts(5) == 5  # nothing measured yet

  def result(phases):
    r = sd_engine.SampleResult([], 0.0, 0.0, 0.0)
    r.phases = phases
    return r

  w.update(result({"target_prefill": {"ms": 100.0, "units": 1, "calls": 1}}))
  w.update(
    result(
      {
        "draft_prefill": {"ms": 20.0, "units": 1, "calls": 1},
        "prefill_draft_decode": {"ms": 30.0, "units": 3, "calls": 3},
        "prefill_adapter:l4": {"ms": 5.0, "units": 4, "calls": 1},
      }
    )
  )
  assert w.drafts(5) == 7  # (100 - 20 - 5) // 10
  w.update(result({"target_prefill": {"ms": 2000.0, "units": 1, "calls": 1}}))
  assert w.drafts(5) == sd_bench.AUTO_K_MAX
  w.update(result({"draft_prefill": {"ms": 5000.0, "units": 1, "calls": 1}}))
  assert w.drafts(5) == 1  # never below one draft
