"""The scenes step benchmark: its FLOP count and its rows (CPU, tiny)."""

import json

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tools.benchmarks import benchmark_scenes_step as bench
from tools.scenes import models, text, train_data, training, world

TINY = models.PRESETS["tiny"]


@pytest.mark.parametrize("role", ["target", "drafter"])
def test_weight_flops_match_torch_s_count_of_a_training_step(role):
  """torch's FlopCounterMode counts every product with weights of one
  forward + backward (it does not count CPU attention kernels, which
  step_flops reports apart)."""
  tok = text.train_tokenizer(range(100), 512)
  scenes = [world.make_scene(s) for s in range(20)]
  frames = np.stack([world.render(s.seed)[1] for s in scenes])
  cpu = torch.device("cpu")
  torch.manual_seed(0)
  if role == "target":
    model, media = models.build_target(TINY, tok), frames
  else:
    model = models.build_drafter(TINY, tok)
    media = np.stack([world.events(f) for f in frames])
  batches = train_data.make_batches(role, tok, scenes, TINY, 0)
  assert batches.turns > 1  # a packed batch, as make_pair trains
  loss_fn = training.make_loss(role, model, media, batches, cpu, "none")
  with FlopCounterMode(display=False) as counter:
    loss_fn(*train_data.device_batch(batches(0), cpu)).backward()
  positions = bench.text_positions(batches)
  got = bench.step_flops(TINY, role, batches.width, len(tok), positions)
  assert got["weights"] == counter.get_total_flops()
  assert got["attention"] > 0


def test_rows_and_bad_inputs(tmp_path, capsys):
  out = tmp_path / "step.json"
  argv = ["--preset", "tiny", "--steps", "1", "--modes", "none"]
  argv += ["--stream_modes", "none", "--roles", "drafter", "--json", str(out)]
  argv += ["--set", "workers=2"]
  assert bench.main(argv) == 0
  got = json.loads(out.read_text())
  assert [r["mode"] for r in got["rows"]] == ["none", "none/stream"]
  # The stream row steps through what the 2 workers made ahead untimed.
  assert [r["untimed_steps"] for r in got["rows"]] == [1, 1 + 4 * 2]
  for row in got["rows"]:
    assert row["role"] == "drafter" and row["ms_per_step"] > 0
    assert row["floor_ms"] == round(row["tflop_per_step"] / 785.0 * 1e3, 2)
  assert got["meta"]["preset"] == "tiny" and got["meta"]["steps"] == 1
  capsys.readouterr()
  assert bench.main(["--preset", "tiny", "--modes", "fast"]) == 2
  err = capsys.readouterr().err.strip()
  assert "--modes" in err and "'fast'" in err and len(err.splitlines()) == 1
  assert bench.main(["--preset", "tiny", "--set", "bogus=1"]) == 2
  assert "bogus" in capsys.readouterr().err
  assert bench.main(["--preset", "big"]) == 2
  err = capsys.readouterr().err.strip()
  assert "--preset 'big'" in err and len(err.splitlines()) == 1


def test_a_failing_row_is_reported_and_the_others_run(tmp_path, capsys):
  out = tmp_path / "step.json"
  argv = ["--preset", "tiny", "--steps", "1", "--modes", "none,model"]
  argv += ["--stream_modes", "", "--roles", "target", "--json", str(out)]
  argv += ["--set", "max_new_tokens=2"]  # every answer is longer: all fail
  assert bench.main(argv) == 1
  rows = json.loads(out.read_text())["rows"]
  assert [r["mode"] for r in rows] == ["none", "model"]
  assert all("max_new_tokens" in r["error"] for r in rows)
  assert capsys.readouterr().out.count("FAILED") == 2
