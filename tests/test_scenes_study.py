"""The scenes pair as a study pair (tools/scenes/study_pair.py) and the
study's command line around it; the study itself runs end to end on the
toy pair in tests/test_study.py."""

import argparse
import json
import os

import numpy as np
import pytest

from tools.scenes.study_pair import ScenesPair
from tools.study import cli, state


def _args(**kw):
  args = cli.build_parser().parse_args(["--out", "x"])
  for k, v in kw.items():
    setattr(args, k, v)
  return args


class _Study:
  def __init__(self, out):
    self.out = out

  def p(self, *parts):
    return os.path.join(self.out, *parts)


def test_stages_and_groups_parse_in_order_and_refuse_unknown_names():
  assert cli.parse_stages("bench1,dump") == ["dump", "bench1"]
  assert cli.parse_stages("B") == ["bench1", "bench2", "results"]
  assert cli.parse_stages("A")[-2:] == ["bench1", "results"]
  with pytest.raises(cli.StudyError, match="unknown stage 'trian'"):
    cli.parse_stages("dump,trian")


def test_a_missing_pair_stops_with_one_line(tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  argv = ["--out", str(tmp_path / "s"), "--scenes", str(empty)]
  assert cli.main(argv + ["--stages", "lm_head"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0
  assert "pair.json: missing; run the pair stage or pass --scenes" in err
  assert cli.main(["--out", str(tmp_path / "t"), "--stages", "dump"]) == 2
  assert "no pair: pass --scenes" in capsys.readouterr().err
  assert cli.main(["--out", "u", "--scenes", "tiny", "--target", "a"]) == 2
  assert "pass one" in capsys.readouterr().err


def test_default_seed_is_make_pairs():
  from tools.scenes import pair

  assert _args().seed == pair.DEFAULT_SEED


def test_pair_stage_passes_preset_changes_to_make_pair(tmp_path, capfd):
  argv = ["--out", str(tmp_path / "s"), "--stages", "pair", "--scenes", "tiny"]
  assert cli.main(argv + ["--set", "bogus=1"]) == 2
  err = capfd.readouterr().err
  # make_pair itself refused the field, so it was handed over.
  assert "error: --set 'bogus=1': expected FIELD=VALUE" in err
  assert "make_pair failed (exit status 2)" in err


def test_the_gpu_preset_on_a_cpu_warns(tmp_path, capsys):
  ScenesPair("gpu", str(tmp_path), _args(device="cpu")).warn_if_slow(
    _args(device="cpu")
  )
  err = capsys.readouterr().err
  assert err.startswith("warning: the gpu preset") and "--scenes tiny" in err
  ScenesPair("tiny", str(tmp_path), _args()).warn_if_slow(_args())
  assert capsys.readouterr().err == ""


def test_the_scenes_pair_gives_the_study_its_specs_samples_and_facts(
  tiny_scenes_pair, tmp_path
):
  path, info = tiny_scenes_pair
  args = _args(train_scenes=2, val_scenes=1, test_scenes=1)
  pair = ScenesPair(path, str(tmp_path), args)
  pair.check()
  assert pair.record() == {"kind": "scenes", "source": path}
  assert pair.target_spec() == f"video_llava:{path}/target"
  assert pair.draft_spec() == f"tools.scenes.drafter:make_backend:{path}"
  assert (
    pair.max_new_tokens() == info["fingerprint"]["preset"]["max_new_tokens"]
  )
  assert pair.pack_patterns() == ()
  samples = pair.samples(_Study(str(tmp_path)), "train")
  with open(samples) as f:
    lines = [json.loads(line) for line in f]
  assert len(lines) == 2 * 4
  assert {x["group"] for x in lines} == {str(x["seed"]) for x in lines}
  entry = pair.results_info(str(tmp_path))
  assert entry["preset"]["name"] == "tiny"
  text = "\n".join(pair.describe(entry))
  assert text.startswith("Preset `tiny`: hidden ")
  assert "Held-out fact accuracy from make_pair" in text
  for q in ("moving", "still"):
    if entry["results"].get(f"{q}_wrong_kind_by_form"):
      assert f"Objects of the wrong kind named in `{q}` answers" in text
  made = ScenesPair("tiny", str(tmp_path), args)
  assert made.dir == os.path.join(str(tmp_path), "pair")
  assert made.pack_patterns() == ("pair/**",)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_pack_parts_respect_the_size_and_unpack_restores(tmp_path, dtype):
  import torch

  src = tmp_path / "study"
  rng = np.random.default_rng(0)
  blobs = {
    "eval/l1/metrics.json": rng.bytes(300_000),
    "bench/gpus1/fast/results.json": b'{"a": 1}',
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
  study = state.Study(str(src), argparse.Namespace(), None)
  parts = state.pack(study, str(tmp_path / "parts"), 0.1, dtype)
  assert len(parts) >= 3
  assert all(os.path.getsize(p) <= 0.1 * 2**20 for p in parts)
  dst = tmp_path / "copy"
  state.unpack(str(tmp_path / "parts"), str(dst))
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
  with pytest.raises(cli.StudyError, match="do not form a tar"):
    state.unpack(str(tmp_path / "parts"), str(tmp_path / "copy2"))


def test_a_redo_removes_the_stages_outputs(tmp_path):
  study = state.Study(str(tmp_path), argparse.Namespace(), None)
  for rel in ("data/train/header.json", "samples/test/samples.jsonl"):
    os.makedirs(os.path.dirname(study.p(rel)), exist_ok=True)
    open(study.p(rel), "w").close()
  open(study.p("lm_head.npy"), "w").close()
  study.record("dump", 1.0)
  study.forget("dump")
  assert not study.done("dump")
  assert not os.path.exists(study.p("data"))
  assert not os.path.exists(study.p("samples"))
  assert os.path.exists(study.p("lm_head.npy"))  # another stage's


def test_an_interrupt_ends_the_running_tool_and_reaches_the_study(tmp_path):
  import signal
  import sys
  import threading

  from tools.study import stages

  pid_file = tmp_path / "pid"
  child = (
    "import os, time; "
    f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
  )

  def interrupt():
    while not pid_file.exists() or not pid_file.read_text():
      threading.Event().wait(0.05)
    os.kill(os.getpid(), signal.SIGINT)

  threading.Thread(target=interrupt, daemon=True).start()
  with pytest.raises(KeyboardInterrupt):
    stages.run_tool([sys.executable, "-c", child], "sleeper")
  with pytest.raises(ProcessLookupError):  # ended and reaped
    os.kill(int(pid_file.read_text()), 0)
