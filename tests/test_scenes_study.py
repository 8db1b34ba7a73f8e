"""The scenes study end to end on the tiny preset, and its results writer.

The end-to-end test makes a tiny pair, runs every stage of
tools.scenes.reproduce (dump, LM head, seven adapters trained, evaluated and
exported, the live benchmark twice), packs and unpacks its outputs and
regenerates RESULTS.md from the unpacked copy. It takes a few minutes on
a CPU; the property tests beside it take seconds.
"""

import json
import os
import re
import shutil

import numpy as np
import pytest

from tools.scenes import layout
from tools.scenes import reproduce as rp
from tools.scenes import results as rs

# ---------------------------------------------------------------------------
# Fast properties.


class _FakeEval:
  def __init__(self, arrays):
    self.arrays = arrays


def test_accept_cis_split_samples_by_reading():
  # Three identical samples of 3 positions: the `next` reading has 2 valid
  # positions each, so every resample gives the same share and the CI is a
  # point. Splitting at the `same` lengths would mix samples and widen it.
  flat_next = np.array([0.96, 0.5] * 3)
  flat_same = np.array([0.96, 0.5, 0.86] * 3)
  out = rp.accept_cis(
    _FakeEval(
      {
        "adapter/next/cos": flat_next,
        "adapter/same/cos": flat_same,
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
  lo, hi = rp.ratio_ci(num, den, resamples=200, seed=1)
  assert lo <= num.sum() / den.sum() <= hi
  assert rp.ratio_ci(num, den, resamples=0, seed=1) is None


def _entry(top1, ci, params=1000):
  m = {"value": top1, "ci95": ci}
  return {"params": params, "metrics": {"token_top1": m, "accept_90": m}}


@pytest.mark.parametrize(
  "l5f, b1, verdict",
  [
    ((0.6, [0.55, 0.65]), (0.4, [0.35, 0.45]), "holds"),
    ((0.5, [0.40, 0.60]), (0.45, [0.35, 0.55]), "partly"),
    ((0.4, [0.35, 0.45]), (0.6, [0.55, 0.65]), "fails"),
  ],
)
def test_claim_l5f_over_b1_follows_its_rule(l5f, b1, verdict):
  data = {"adapters": {"l5f": _entry(*l5f), "b1": _entry(*b1)}, "live": {}}
  c = rs.claim_l5f_b1(data)
  assert c["verdict"] == verdict
  assert f"{100 * l5f[0]:.1f}%" in c["text"]


@pytest.mark.parametrize(
  "tops, verdict",
  [
    ([0.50, 0.51, 0.52, 0.50], "holds"),  # overlapping CIs
    ([0.50, 0.52, 0.53, 0.54], "partly"),  # separated, gap 4 points
    ([0.30, 0.40, 0.50, 0.60], "fails"),
  ],
)
def test_claim_plateau_follows_its_rule(tops, verdict):
  width = 0.02 if verdict == "holds" else 0.005
  ads = {
    a: _entry(t, [t - width, t + width])
    for a, t in zip(rp.PREFILL_ADAPTERS, tops, strict=True)
  }
  assert rs.claim_plateau({"adapters": ads, "live": {}})["verdict"] == verdict


def _live(speedup, ci, accepted, overlap):
  row = {
    "n": 4,
    "alpha": 0.5,
    "alpha_ci95": [0.4, 0.6],
    "tau": 2.0,
    "tau_ci95": [1.8, 2.2],
    "speedup": speedup,
    "speedup_ci95": ci,
    "decode_speedup": speedup,
    "decode_speedup_ci95": ci,
    "accepted_in_prefill_per_sample": accepted,
    "prefill_overlap_ms": overlap,
  }
  return {
    "gpus2": {
      "runtimes": ["eager"],
      "by_runtime": {
        "eager": {
          "methods": {
            "prefill_hiding:l4": row,
            "two_phase:l4+b1": row,
          }
        }
      },
    }
  }


@pytest.mark.parametrize(
  "speedup, ci, accepted, overlap, prefill, two_phase",
  [
    (1.3, [1.1, 1.5], 2.0, 5.0, "holds", "holds"),
    (1.05, [0.9, 1.2], 2.0, 5.0, "partly", "partly"),
    (1.3, [1.1, 1.5], 2.0, -1.0, "partly", "holds"),
    (0.8, [0.7, 0.9], 0.0, 5.0, "fails", "fails"),
  ],
)
def test_live_claims_follow_their_rules(
  speedup, ci, accepted, overlap, prefill, two_phase
):
  data = {"adapters": {}, "live": _live(speedup, ci, accepted, overlap)}
  assert rs.claim_prefill(data)["verdict"] == prefill
  assert rs.claim_two_phase(data)["verdict"] == two_phase
  assert "two GPUs" in rs.claim_two_phase(data)["text"]


def test_stages_and_groups_parse_in_order_and_refuse_unknown_names():
  assert rp.parse_stages("bench1,dump") == ["dump", "bench1"]
  assert rp.parse_stages("B") == ["bench1", "bench2", "results"]
  assert rp.parse_stages("A")[-2:] == ["bench1", "results"]
  with pytest.raises(rp.StudyError, match="unknown stage 'trian'"):
    rp.parse_stages("dump,trian")


def test_stages_without_a_pair_stop_with_one_line(tmp_path, capsys):
  assert rp.main(["--out", str(tmp_path / "s"), "--stages", "lm_head"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0
  assert "pair.json: missing; run the pair stage or pass --pair" in err
  assert rp.main(["--out", str(tmp_path / "s"), "--pair", "/nope"]) == 2
  assert "--pair /nope: not a directory" in capsys.readouterr().err


def test_default_seed_is_make_pairs():
  from tools.scenes import pair

  args = rp.build_parser().parse_args(["--out", "x"])
  assert args.seed == pair.DEFAULT_SEED


def test_pair_stage_passes_preset_changes_to_make_pair(tmp_path, capfd):
  argv = ["--out", str(tmp_path / "s"), "--stages", "pair", "--preset", "tiny"]
  assert rp.main(argv + ["--set", "bogus=1"]) == 2
  err = capfd.readouterr().err
  # make_pair itself refused the field, so it was handed over.
  assert "error: --set 'bogus=1': expected FIELD=VALUE" in err
  assert "make_pair failed (exit status 2)" in err


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_pack_parts_respect_the_size_and_unpack_restores(tmp_path, dtype):
  import torch

  src = tmp_path / "study"
  rng = np.random.default_rng(0)
  blobs = {
    "eval/l1/metrics.json": rng.bytes(300_000),
    "bench/gpus1/results.json": b'{"a": 1}',
    "study.json": json.dumps({"stages": {}}).encode(),
    "data/train/shard0.bin": rng.bytes(1000),  # large data stays behind
  }
  for rel, b in blobs.items():
    (src / rel).parent.mkdir(parents=True, exist_ok=True)
    (src / rel).write_bytes(b)
  weight = torch.randn(64, 64)
  (src / "exports").mkdir()
  torch.save(
    {"model_state_dict": {"w": weight, "n": torch.tensor(3)}, "epoch": 1},
    src / "exports" / "l1.pt",
  )
  args = rp.build_parser().parse_args(
    ["--out", str(src), "--pair", "X", "--pack_dtype", dtype]
  )
  parts = rp.pack(rp.Study(str(src), args), str(tmp_path / "parts"), 0.1)
  assert len(parts) >= 3
  assert all(os.path.getsize(p) <= 0.1 * 2**20 for p in parts)
  dst = tmp_path / "copy"
  rp.unpack(str(tmp_path / "parts"), str(dst))
  for rel, b in blobs.items():
    if rel.startswith("data/"):
      assert not (dst / rel).exists()
    else:
      assert (dst / rel).read_bytes() == b
  ckpt = torch.load(dst / "exports" / "l1.pt", weights_only=True)
  w = ckpt["model_state_dict"]["w"]
  assert w.dtype == getattr(torch, dtype)
  assert torch.equal(w.float(), weight.to(getattr(torch, dtype)).float())
  assert ckpt["model_state_dict"]["n"].item() == 3 and ckpt["epoch"] == 1
  os.remove(parts[1])
  with pytest.raises(rp.StudyError, match="do not form a tar"):
    rp.unpack(str(tmp_path / "parts"), str(tmp_path / "copy2"))


# ---------------------------------------------------------------------------
# End to end on the tiny preset.


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_scenes_pair):
  root = tmp_path_factory.mktemp("scenes_study")
  pair, _ = tiny_scenes_pair
  out = str(root / "study")
  argv = [
    "--out",
    out,
    "--pair",
    pair,
    "--stages",
    "all",
    "--train_scenes",
    "4",
    "--val_scenes",
    "2",
    "--test_scenes",
    "2",
    "--epochs",
    "1",
    "--batch_size",
    "8",
    "--bootstrap",
    "50",
    "--bench_scenes",
    "1",
    "--warmup",
    "1",
    "--bench_max_new_tokens",
    "8",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--draft_device2",
    "cpu",
    "--runtimes",
    "fast,eager",
    "--no_progress",
    "--pack",
    str(root / "parts"),
  ]
  assert rp.main(argv) == 0
  return {"root": root, "out": out, "pair": pair, "argv": argv}


def test_every_method_is_lossless_in_fp32(study):
  for sub in ("gpus1", "gpus2"):
    with open(os.path.join(study["out"], "bench", sub, "results.json")) as f:
      bench = json.load(f)
    assert bench["config"]["dtype"] == "float32"
    assert bench["mismatches"] == []
    labels = set(bench["aggregate"])
    for m in rp.METHODS:
      assert m in labels
    for lab, a in bench["aggregate"].items():
      assert a["n"] == 4, lab
      assert a["mismatched_samples"] == 0, lab


def test_results_json_has_every_adapter_method_and_claim(study):
  with open(
    os.path.join(study["out"], "report", "results", "results.json")
  ) as f:
    data = json.load(f)
  assert list(data["adapters"]) == list(rp.ADAPTERS)
  for name, a in data["adapters"].items():
    want = "next" if name in rp.DECODE_ADAPTERS else "same"
    assert a["primary_reading"] == want
    assert a["params"] > 0 and a["epochs"] == 1
    for key, _ in rs.SEED_COLUMNS:
      m = a["metrics"][key]
      assert m["value"] is not None and m["ci95"] is not None, (name, key)
      assert m["ci95"][0] <= m["value"] + 1e-9 <= m["ci95"][1] + 2e-9
    assert "untrained" in a["baselines"]
  assert "copy_target" in data["adapters"]["b1"]["baselines"]
  assert "raw_source" in data["adapters"]["l1"]["baselines"]
  for sub in ("gpus1", "gpus2"):
    live = data["live"][sub]
    for rt, block in live["by_runtime"].items():
      assert set(block["methods"]) == set(rp.METHODS), (sub, rt)
      for m, r in block["methods"].items():
        assert r["n"] == 4 and r["mismatches"] == 0, (sub, rt, m)
        if m != "baseline":
          assert r["speedup"] > 0
  assert [c["verdict"] for c in data["claims"]] != []
  for c in data["claims"]:
    assert c["verdict"] in ("holds", "partly", "fails"), c
  t = data["target"]
  vocab = data["pair"]["results"]["vocab_size"]
  assert 0 <= t["mean_entropy_nats"] <= np.log(vocab) + 1e-6
  assert 1 / vocab <= t["mean_top1_prob"] <= 1


def test_next_adapters_train_their_recipe_with_objective_next(study):
  for name in rp.ADAPTERS:
    with open(os.path.join(study["out"], "runs", name, "config.json")) as f:
      config = json.load(f)
    assert config["model"]["name"] == layout.kind(name)
    want = "next" if name.endswith("_next") else "reference"
    assert config["loss"]["objective"] == want, name
  assert {layout.kind(n) for n in layout.NEXT_ADAPTERS} == {"l5", "b1", "l5f"}


def test_results_md_has_every_section(study):
  with open(os.path.join(study["out"], "report", "RESULTS.md")) as f:
    text = f.read()
  for heading in (
    "## The pair and the task",
    "## The seed's table",
    "## Live speculative decoding",
    "### one GPU",
    "### two GPUs",
    "## The seed's claims",
    "## The 2× goal",
    "## Plots",
    "## How to regenerate",
  ):
    assert heading in text, heading
  for name in rp.ADAPTERS:
    assert f"| {layout.title(name)} |" in text
  assert "## The reference's dual objective" in text
  for name in ("L5", "B1", "L5F"):
    assert f"| {name} | " in text.split("## The reference's dual objective")[1]
  for m in rp.METHODS:
    assert f"| {m} |" in text
  for c in (
    "L1–L4 plateau",
    "B1 ≫ L5",
    "L5F > B1",
    "Prefill hiding",
    "two-phase pipeline",
  ):
    assert c in text
  assert "mean next-token entropy" in text
  # Each run of the study is listed with the versions it ran under.
  assert re.search(r"reproduce .*` \(python [0-9.]+, jax ", text)
  assert "Held-out fact accuracy from make_pair" in text
  assert "### two GPUs, fast runtime" in text
  assert "Fast path per model: target: " in text
  assert "Adapters trained and evaluated on " in text and " x cpu. " in text
  for png in ("accept.png", "token_top1.png", "speedup.png"):
    assert os.path.isfile(os.path.join(study["out"], "report", "results", png))


def test_rerun_keeps_finished_stages_and_refuses_changed_settings(
  study, capsys
):
  argv = [a for a in study["argv"]]
  i = argv.index("--pack")
  del argv[i : i + 2]
  argv[argv.index("--stages") + 1] = "dump,train,evaluate,export"
  capsys.readouterr()
  assert rp.main(argv) == 0
  out = capsys.readouterr().out
  for stage in ("dump", "train", "evaluate", "export"):
    assert f"== {stage}: done earlier, kept" in out
  argv[argv.index("--epochs") + 1] = "2"
  assert rp.main(argv) == 2
  err = capsys.readouterr().err
  assert "stage train was run with --epochs 1" in err


def test_unpacked_parts_regenerate_the_results(study, tmp_path):
  copy = str(tmp_path / "copy")
  argv = [
    "--out",
    copy,
    "--pair",
    study["pair"],
    "--unpack",
    str(study["root"] / "parts"),
    "--stages",
    "results",
  ]
  assert rp.main(argv) == 0
  for f in ("exports/l5f.pt", "lm_head.npy", "bench/gpus2/results.json"):
    assert os.path.isfile(os.path.join(copy, f)), f
  assert not os.path.exists(os.path.join(copy, "data", "train", "shard_0"))
  with open(os.path.join(copy, "report", "results", "results.json")) as f:
    again = json.load(f)
  with open(
    os.path.join(study["out"], "report", "results", "results.json")
  ) as f:
    first = json.load(f)
  assert again["adapters"] == first["adapters"]
  assert again["live"] == first["live"]
  assert again["claims"] == first["claims"]


def test_a_study_without_the_next_adapters_still_renders(study, tmp_path):
  """Results of a study made before the *_next adapters: the seed's seven,
  no objective section, and the table says why."""
  copy = str(tmp_path / "old")
  shutil.copytree(study["out"], copy, ignore=shutil.ignore_patterns("data"))
  path = os.path.join(copy, layout.STUDY_FILE)
  with open(path) as f:
    state = json.load(f)
  for name in layout.NEXT_ADAPTERS:
    del state["stages"]["evaluate"]["adapters"][name]
    shutil.rmtree(os.path.join(copy, "eval", name))
  with open(path, "w") as f:
    json.dump(state, f)
  data = rs.collect(copy, study["pair"])
  assert list(data["adapters"]) == list(layout.SEED_ADAPTERS)
  text = rs.render(data, [])
  assert "This study predates the `(objective next)` adapters." in text
  assert "## The reference's dual objective" not in text
