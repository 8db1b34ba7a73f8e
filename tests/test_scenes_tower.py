"""The vision tower's health and its monitor (tools/scenes/tower.py)."""

import dataclasses

import numpy as np
import pytest
import torch

from tools.scenes import models, text, train_data, training, world
from tools.scenes import tower as tower_lib

TINY = models.PRESETS["tiny"]


def _target():
  torch.manual_seed(0)
  return models.build_target(TINY, text.train_tokenizer(range(50), 512))


def _sharpen(tower):
  """Sharp attention in layer 1, unlike from frame to frame."""
  attn = tower.encoder.layers[0].self_attn
  torch.manual_seed(1)
  with torch.no_grad():
    for proj in (attn.q_proj, attn.k_proj):
      proj.weight.normal_(0.0, 0.6)


def _pixels(n=3):
  clips = np.stack([world.render(s)[1] for s in world.split_seeds("test", n)])
  return tower_lib.first_frames(clips), clips


def test_first_frames_are_the_clips_first_frames_as_pixels():
  pix, clips = _pixels()
  want = models.pixels(torch.from_numpy(clips))[:, 0]
  assert torch.equal(pix, want)


def test_health_reads_the_towers_attention_and_tokens():
  """Layer 1's entropy and class-token share are those of the attention
  written out from its weights (from the patches' queries; the class
  token's key); common part and spread are those of the patch tokens;
  the tower's attention implementation comes back."""
  tower = _target().model.video_tower
  _sharpen(tower)
  before = tower.config._attn_implementation
  pix, _ = _pixels()
  got = tower_lib.health(tower, pix)
  assert tower.config._attn_implementation == before
  layer = tower.encoder.layers[0]
  with torch.no_grad():
    states = tower(pix, output_hidden_states=True).hidden_states
    x = layer.layer_norm1(states[0])
    b, n, _ = x.shape
    heads = tower.config.num_attention_heads

    def split(t):
      return t.view(b, n, heads, -1).transpose(1, 2)

    q, k = split(layer.self_attn.q_proj(x)), split(layer.self_attn.k_proj(x))
    att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
  ent = -(att * att.clamp_min(1e-12).log()).sum(-1).mean((0, 2))
  assert ent.max() < 0.9 * np.log(n)  # far from even
  np.testing.assert_allclose(got["entropy"][0], ent.numpy(), atol=2e-3)
  share = att[:, :, 1:, 0].mean((0, 2))
  np.testing.assert_allclose(got["on_class"][0], share.numpy(), atol=2e-3)
  assert got["uniform"] == pytest.approx(np.log(n), abs=1e-3)
  assert len(got["common"]) == len(got["spread"]) == len(states)
  for i, h in enumerate(states):
    p = h[:, 1:]
    mean = p.mean(1, keepdim=True)
    common = float(mean.norm(dim=-1).mean())
    spread = float((p - mean).norm(dim=-1).pow(2).mean(1).sqrt().mean())
    assert got["common"][i] == pytest.approx(common, abs=0.01)
    assert got["spread"][i] == pytest.approx(spread, abs=0.01)
  assert len(tower_lib.lines(got)) == 1 + len(got["entropy"])
  assert "entropy min" in tower_lib.summary(got)


def test_monitor_reads_the_towers_weights_of_now_and_leaves_it_alone():
  tower = _target().model.video_tower
  pix, _ = _pixels()
  monitor = tower_lib.Monitor(tower, pix)
  _sharpen(tower)  # after the monitor was made: it must read these
  weights = {k: v.clone() for k, v in tower.state_dict().items()}
  mode = tower.training
  assert monitor() == tower_lib.health(tower, pix)
  assert tower.training == mode
  for k, v in tower.state_dict().items():
    assert torch.equal(v, weights[k]), k


def test_training_records_the_tower_and_trains_as_without_it():
  """`train` reads the target's tower at steps 0, 100, ... and the last,
  and the weights it leaves are those of the same steps unmonitored."""
  cpu = torch.device("cpu")
  tok = text.train_tokenizer(range(50), 512)
  scenes = [world.make_scene(s) for s in range(8)]
  frames = np.stack([world.render(s.seed)[1] for s in scenes])
  preset = dataclasses.replace(TINY, target_steps=3)
  got = {}
  for monitored in (True, False):
    torch.manual_seed(0)
    model = models.build_target(preset, tok)
    batches = train_data.make_batches("target", tok, scenes, preset, 0)
    if monitored:
      fit = training.train("target", model, batches, preset, frames, cpu)
      assert [i for i, _ in fit["tower_every_100_steps"]] == [0, 2]
      first, last = (r for _, r in fit["tower_every_100_steps"])
      assert first != last
    else:
      step = training.make_step(
        "target", model, frames, batches, preset, 3, cpu, "none"
      )
      fit = training.fit(model, step, batches, "target", 3, None)
      assert "tower_every_100_steps" not in fit
    got[monitored] = [p.detach().clone() for p in model.parameters()]
  for a, b in zip(got[True], got[False], strict=True):
    assert torch.equal(a, b)


def test_step_times_leave_the_readings_out(monkeypatch):
  """On a clock where each step takes 1 s and each reading 100 s, `fit`
  reports 1 s a step, the first step's 1 s, and 300 s of readings (steps
  0, 100 and the last of 150)."""
  now = [0.0]
  monkeypatch.setattr(training.time, "perf_counter", lambda: now[0])

  def step(batch):
    now[0] += 1.0
    return torch.tensor(0.5)

  step.finish = lambda: None

  def monitor():
    now[0] += 100.0
    return {
      "entropy": [[1.0]],
      "on_class": [[0.0]],
      "common": [1.0, 1.0],
      "spread": [1.0, 1.0],
      "uniform": 1.0,
    }

  model = torch.nn.Linear(1, 1)
  fit = training.fit(model, step, lambda i: i, "target", 150, None, monitor)
  assert fit["ms_per_step"] == pytest.approx(1000.0)
  assert fit["first_step_s"] == pytest.approx(1.0)
  assert fit["monitor_s"] == pytest.approx(300.0)
  assert [i for i, _ in fit["tower_every_100_steps"]] == [0, 100, 149]
