"""The scenes pair's training step (tools/scenes/training.py: TrainStep)."""

import dataclasses

import numpy as np
import pytest
import torch

from tools.scenes import models, text, training, world

TINY = models.PRESETS["tiny"]


def _setup(device, mode, steps):
  """A tiny drafter, its loss and `steps` batches on `device`."""
  tok = text.train_tokenizer(range(50), 512)
  scenes = [world.make_scene(s) for s in range(12)]
  frames = np.stack([world.render(s.seed)[1] for s in scenes])
  events = np.stack([world.events(f) for f in frames])
  preset = dataclasses.replace(TINY, warmup=2, lr=3e-3)
  batches = training.make_batches("drafter", tok, scenes, preset, 0)
  torch.manual_seed(0)
  model = models.build_drafter(preset, tok).to(device)
  loss_fn = training.make_loss("drafter", model, events, batches, device, mode)
  return model, loss_fn, preset, [batches(i) for i in range(steps)]


def _by_hand(model, loss_fn, preset, made, device, weights=None):
  """The step written out: AdamW, clipping at 1, the schedule; losses.
  `weights`: a list that gets a copy of the weights after each step."""
  opt = torch.optim.AdamW(
    model.parameters(), lr=preset.lr, betas=(0.9, 0.98), weight_decay=0.01
  )
  factor = training.schedule(preset, len(made))
  losses = []
  for i, batch in enumerate(made):
    for group in opt.param_groups:
      group["lr"] = preset.lr * factor(i)
    opt.zero_grad()
    with training.autocast(device):
      loss = loss_fn(*training.device_batch(batch, device))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    losses.append(float(loss.detach()))
    if weights is not None:
      weights.append([p.detach().clone() for p in model.parameters()])
  return losses


def test_train_step_is_the_step_written_out():
  """AdamW with the warm-up/cosine schedule and clipping, one batch a call,
  each batch fed to the loss in turn."""
  cpu = torch.device("cpu")
  steps = 5
  model, loss_fn, preset, made = _setup(cpu, "none", steps)
  step = training.TrainStep(model, loss_fn, preset, steps, cpu, "graphs")
  assert not step.graphs  # CUDA graphs on CUDA only
  got = [float(step(b)) for b in made]
  # A fresh model of the same init, stepped by hand on the same batches.
  twin, twin_loss, _, _ = _setup(cpu, "none", 0)
  want = _by_hand(twin, twin_loss, preset, made, cpu)
  assert got == pytest.approx(want, rel=1e-6)
  assert len(set(got)) == steps
  for (name, p), q in zip(
    model.named_parameters(), twin.parameters(), strict=True
  ):
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_finish_leaves_the_moving_average_of_the_weights():
  """With preset.ema, the step keeps avg <- ema * avg + (1 - ema) * weights
  after every step, from the init; `finish` puts it in the model."""
  cpu = torch.device("cpu")
  steps, ema = 4, 0.6
  model, loss_fn, preset, made = _setup(cpu, "none", steps)
  preset = dataclasses.replace(preset, ema=ema)
  step = training.TrainStep(model, loss_fn, preset, steps, cpu)
  twin, twin_loss, _, _ = _setup(cpu, "none", 0)
  want = [p.detach().clone() for p in twin.parameters()]
  weights = []
  _by_hand(twin, twin_loss, preset, made, cpu, weights)
  for w in weights:
    want = [ema * a + (1 - ema) * p for a, p in zip(want, w, strict=True)]
  for b in made:
    step(b)
  last = [p.detach().clone() for p in model.parameters()]
  step.finish()
  for p, q in zip(model.parameters(), want, strict=True):
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
  pairs = zip(model.parameters(), last, strict=True)
  moved = [not torch.equal(p, r) for p, r in pairs]
  assert sum(moved) > len(moved) // 2  # the average, not the last step's


def test_fit_leaves_the_average_in_the_model():
  cpu = torch.device("cpu")
  steps = 3
  model, loss_fn, preset, made = _setup(cpu, "none", steps)
  step = training.TrainStep(model, loss_fn, preset, steps, cpu)
  assert preset.ema > 0
  training.fit(model, step, lambda i: made[i], "drafter", steps, None)
  for p, a in zip(model.parameters(), step.average, strict=True):
    assert torch.equal(p, a)
  assert not model.training


def test_without_ema_finish_keeps_the_last_weights():
  cpu = torch.device("cpu")
  model, loss_fn, preset, made = _setup(cpu, "none", 2)
  preset = dataclasses.replace(preset, ema=0.0)
  step = training.TrainStep(model, loss_fn, preset, 2, cpu)
  for b in made:
    step(b)
  last = [p.detach().clone() for p in model.parameters()]
  step.finish()
  assert step.average is None
  for p, q in zip(model.parameters(), last, strict=True):
    assert torch.equal(p, q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
  "graphed, plain", [("graphs", "model"), ("eager-graphs", "none")]
)
def test_graphed_step_replays_the_step(graphed, plain):
  """On CUDA, a graph mode (warm-up, capture, replays over fixed buffers)
  trains as its ungraphed twin does: each replay is fed its own batch (the
  losses match step by step) and its own learning rate (the weights match
  at the end)."""
  cuda = torch.device("cuda")
  steps = training.TrainStep.WARMUP + 4
  runs = {}
  for mode in (plain, graphed):
    torch._dynamo.reset()
    model, loss_fn, preset, made = _setup(cuda, mode, steps)
    step = training.TrainStep(model, loss_fn, preset, steps, cuda, mode)
    losses = [float(step(b)) for b in made]
    assert step.graphs == (mode == graphed)
    assert preset.ema > 0
    weights = [p.detach().float().cpu() for p in model.parameters()]
    step.finish()  # the average is part of the replayed step too
    average = [p.detach().float().cpu() for p in model.parameters()]
    runs[mode] = losses, weights + average
  assert runs[graphed][0] == pytest.approx(runs[plain][0], rel=2e-3)
  assert len(set(runs[graphed][0])) == steps
  for p, q in zip(runs[graphed][1], runs[plain][1], strict=True):
    torch.testing.assert_close(p, q, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("floor", [0.0, 0.25])
def test_schedule_warms_up_then_anneals_to_the_floor(floor):
  preset = dataclasses.replace(TINY, warmup=4, lr_floor=floor)
  steps = 25
  f = [training.schedule(preset, steps)(i) for i in range(steps)]
  assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
  assert f[4] == pytest.approx(1.0)
  assert f[-1] == pytest.approx(floor)  # the last step's rate
  assert f[4 + 10] == pytest.approx((1 + floor) / 2)  # half-way down
  assert all(a > b for a, b in zip(f[4:-1], f[5:], strict=True))


def test_patch_position_head_reads_rows_and_columns():
  """The head's labels are each patch's row and column (patches row by
  row after the CLS token): features that are one-hot in them give a loss
  near 0 through an identity read-out, the CLS token is not scored, and
  the same features with rows and columns swapped score high."""
  side = 4
  head = training.PatchPositionHead(2 * side, side)
  with torch.no_grad():
    head.proj.weight.copy_(30.0 * torch.eye(2 * side))
    head.proj.bias.zero_()
  rows, cols = np.divmod(np.arange(side * side), side)
  feats = torch.zeros(3, 1 + side * side, 2 * side)
  feats[:, 1 + np.arange(side * side), rows] = 1.0
  feats[:, 1 + np.arange(side * side), side + cols] = 1.0
  feats[:, 0] = torch.randn(3, 2 * side)  # CLS: anything
  swapped = torch.cat([feats[..., side:], feats[..., :side]], dim=-1)
  with torch.no_grad():
    assert float(head.loss(feats)) < 1e-3
    assert float(head.loss(swapped)) > 1.0


def _tiny_target(steps=3, **changes):
  tok = text.train_tokenizer(range(50), 512)
  scenes = [world.make_scene(s) for s in range(8)]
  frames = np.stack([world.render(s.seed)[1] for s in scenes])
  preset = dataclasses.replace(TINY, target_steps=steps, **changes)
  torch.manual_seed(0)
  model = models.build_target(preset, tok)
  batches = training.make_batches("target", tok, scenes, preset, 0)
  return model, batches, frames, preset


def test_target_loss_adds_the_weighted_position_loss():
  model, batches, frames, _ = _tiny_target()
  start = batches.prompts.media_span()[0]
  idx, ids, _, labels = batches(0)
  ids, labels = torch.as_tensor(ids), torch.as_tensor(labels)
  clips = torch.from_numpy(frames)[torch.as_tensor(idx)]
  head = training.PatchPositionHead(model.config.text_config.hidden_size, 4)
  with torch.no_grad():
    plain = training.target_loss(model, ids, labels, clips, start)
    both = training.target_loss(
      model, ids, labels, clips, start, head=head, weight=0.5
    )
    px = models.pixels(clips).flatten(0, 1)
    out = model.model.video_tower(px, output_hidden_states=True)
    feats = model.model.multi_modal_projector(
      out.hidden_states[model.config.vision_feature_layer]
    )
    assert feats.shape[1] == 1 + 4 * 4  # tiny: 4 x 4 patches and CLS
    want = plain + 0.5 * head.loss(feats)
  assert float(both) == pytest.approx(float(want), rel=1e-6)
  assert float(both) > float(plain)


def test_pos_aux_trains_the_tower_and_leaves_only_the_models_weights():
  """With `pos_aux` the head's loss reaches the model (its projector ends
  elsewhere than without, from the same init and batches), and the model
  keeps exactly its own parameters (nothing of the head is saved)."""
  cpu = torch.device("cpu")
  got = {}
  for aux in (0.0, 1.0):
    model, batches, frames, preset = _tiny_target(pos_aux=aux)
    keys = set(model.state_dict())
    training.train("target", model, batches, preset, frames, cpu, None, "none")
    assert set(model.state_dict()) == keys
    got[aux] = model.model.multi_modal_projector.linear_1.weight.detach()
  assert not torch.equal(got[0.0], got[1.0])
