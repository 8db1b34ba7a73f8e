"""The scenes pair's costs (tools/scenes/costs.py) and the presets' shapes."""

import json

import pytest
import torch

from tools.scenes import costs, models, text, world

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
  return text.train_tokenizer(world.split_seeds("train", 50), 512)


def _lm_shape(config) -> dict:
  keys = ("hidden_size", "num_hidden_layers", "intermediate_size")
  keys += ("num_attention_heads", "num_key_value_heads", "vocab_size")
  return {k: getattr(config, k) for k in keys}


def test_gpu_preset_drafter_lm_is_the_targets(tokenizer):
  """As both real models decode with Vicuna-7B: the drafter's language
  model has the target's depth and width; only the media differ (64 event
  tokens against 520 visual tokens)."""
  preset = models.PRESETS["gpu"]
  target = models.build_target(preset, tokenizer)
  drafter = models.build_drafter(preset, tokenizer)
  t = _lm_shape(target.config.text_config)
  assert t == _lm_shape(drafter.lm.config)
  # Deep enough that one B1 step is a small share of a target step.
  assert t["num_hidden_layers"] >= 36
  assert models.video_tokens(preset) == 520
  assert models.event_tokens(preset) == 64
  assert drafter.config["num_event_tokens"] == 64
  assert target.config.video_seq_length == 520


def test_gpu16x3_keeps_the_earlier_shapes(tokenizer):
  preset = models.PRESETS["gpu16x3"]
  assert (preset.hidden, preset.target_layers, preset.drafter_layers) == (
    256,
    16,
    3,
  )


def test_ratios_and_goals():
  got = {
    "target": {"prefill_ms": 9.0, "decode_ms": 2.0},
    "drafter": {"prefill_ms": 3.0, "decode_ms": 1.6},
    "b1_step_ms": 0.14,
  }
  r = costs.ratios(got)
  assert r["values"] == pytest.approx(
    {
      "drafter_decode_over_target_decode": 0.8,
      "b1_step_over_target_decode": 0.07,
      "target_prefill_over_drafter_prefill": 3.0,
    }
  )
  assert all(r["met"].values())  # every bound is inclusive
  got["b1_step_ms"] = 0.2
  got["drafter"]["decode_ms"] = 1.0
  got["target"]["prefill_ms"] = 5.0
  assert not any(costs.ratios(got)["met"].values())


def test_costs_of_an_untrained_preset_on_both_runtimes(tmp_path, capsys):
  out = tmp_path / "costs.json"
  argv = ["--preset", "tiny", "--device", "cpu", "--dtype", "float32"]
  assert costs.main(argv + ["--repeats", "1", "--json", str(out)]) == 0
  res = json.loads(out.read_text())
  assert res["pair"] == "untrained preset tiny"
  tiny = models.PRESETS["tiny"]
  assert res["shapes"]["target"]["num_hidden_layers"] == tiny.target_layers
  assert res["shapes"]["drafter"]["num_hidden_layers"] == tiny.drafter_layers
  assert res["shapes"]["visual_tokens"] == {
    "target": models.video_tokens(tiny),
    "drafter": models.event_tokens(tiny),
  }
  for runtime in costs.RUNTIMES:
    got = res[runtime]
    t, d = got["target"], got["drafter"]
    # The prompt of one test scene: its media tokens and its question.
    assert t["prompt_tokens"] - d["prompt_tokens"] == (
      models.video_tokens(tiny) - models.event_tokens(tiny)
    )
    assert got["ratios"]["values"]["b1_step_over_target_decode"] == (
      pytest.approx(got["b1_step_ms"] / t["decode_ms"])
    )
  # No CUDA here: the fast runtime's steps run eagerly.
  assert res["fast"]["target"]["mode"] == "eager"
  assert "fast runtime:" in capsys.readouterr().out


def test_costs_refuses_bad_arguments(tmp_path, capsys):
  assert costs.main(["--pair", str(tmp_path), "--device", "cpu"]) == 2
  assert "pair.json: missing" in capsys.readouterr().err
  assert costs.main(["--preset", "big", "--device", "cpu"]) == 2
  assert "--preset 'big': unknown" in capsys.readouterr().err
  argv = ["--preset", "tiny", "--runtime", "fast,slow"]
  assert costs.main(argv) == 2
  assert "--runtime 'fast,slow'" in capsys.readouterr().err
