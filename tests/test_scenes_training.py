"""The scenes pair's training step (tools/scenes/training.py: TrainStep)."""

import dataclasses
import re

import numpy as np
import pytest
import torch

from tools.scenes import models, text, train_data, train_losses, training, world

TINY = models.PRESETS["tiny"]


def _setup(device, mode, steps):
  """A tiny drafter, its loss and `steps` batches on `device`."""
  tok = text.train_tokenizer(range(50), 512)
  scenes = [world.make_scene(s) for s in range(12)]
  frames = np.stack([world.render(s.seed)[1] for s in scenes])
  events = np.stack([world.events(f) for f in frames])
  preset = dataclasses.replace(TINY, warmup=2, lr=3e-3)
  batches = train_data.make_batches("drafter", tok, scenes, preset, 0)
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
      loss = loss_fn(*train_data.device_batch(batch, device))
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


def _tiny_target(steps=3, **changes):
  tok = text.train_tokenizer(range(50), 512)
  scenes = [world.make_scene(s) for s in range(8)]
  frames = np.stack([world.render(s.seed)[1] for s in scenes])
  preset = dataclasses.replace(TINY, target_steps=steps, **changes)
  torch.manual_seed(0)
  model = models.build_target(preset, tok)
  batches = train_data.make_batches("target", tok, scenes, preset, 0)
  return model, batches, frames, preset


def test_token_weights_weigh_exactly_the_fact_words():
  """Each fact word of a generated answer is one token of the scenes'
  tokenizer, and that token (and no other) gets the fact weight."""
  tok = text.train_tokenizer(range(50), 512)
  weights = train_losses.token_weights(tok, 7.0)
  assert weights.shape == (len(tok),)
  facts = 0
  for seed in range(100, 130):
    scene = world.make_scene(seed)
    for qtype in text.QTYPES:
      answer = " " + text.answer(scene, qtype, seed)
      enc = tok(answer, add_special_tokens=False, return_offsets_mapping=True)
      spans = set()
      pairs = zip(enc["input_ids"], enc["offset_mapping"], strict=True)
      for i, (a, b) in pairs:
        word = answer[a:b].strip().lower()
        is_fact = word in text.FACT_WORDS
        assert float(weights[i]) == (7.0 if is_fact else 1.0), word
        if is_fact:
          spans.add((a + len(answer[a:b]) - len(answer[a:b].lstrip()), b))
      for m in re.finditer(r"[A-Za-z]+", answer):
        if m.group().lower() in text.FACT_WORDS:
          assert m.span() in spans, (answer, m.group())
          facts += 1
  assert facts > 500


def test_answer_loss_weighs_each_label_by_its_tokens_weight():
  """With weights, the loss is the labelled tokens' cross-entropy averaged
  with each label's weight (ignored positions count for nothing); with
  all weights 1 it is the plain mean."""
  torch.manual_seed(0)
  vocab, dim, first = 11, 6, 3
  head = torch.nn.Linear(dim, vocab, bias=False)
  hidden = torch.randn(2, 9, dim)
  labels = torch.randint(vocab, (2, 9))
  labels[:, :first] = -100
  labels[0, 5] = labels[1, 8] = -100
  weights = torch.rand(vocab) + 0.5
  with torch.no_grad():
    got = train_losses.answer_loss(head, hidden, labels, first, weights)
    plain = train_losses.answer_loss(head, hidden, labels, first)
    ones = train_losses.answer_loss(
      head, hidden, labels, first, torch.ones(vocab)
    )
    num = den = 0.0
    for b in range(2):
      for t in range(first, 9):
        if labels[b, t] < 0:
          continue
        logp = torch.log_softmax(head(hidden[b, t - 1]), -1)
        w = float(weights[labels[b, t]])
        num += -w * float(logp[labels[b, t]])
        den += w
  assert float(got) == pytest.approx(num / den, rel=1e-5)
  assert float(ones) == pytest.approx(float(plain), rel=1e-6)
  assert float(got) != pytest.approx(float(plain), rel=1e-3)


def test_make_loss_weighs_the_fact_tokens():
  """make_loss with fact_weight w is the model's loss under
  `token_weights(tokenizer, w)`, not the plain one."""
  cpu = torch.device("cpu")
  model, batches, frames, _ = _tiny_target()
  start = batches.prompts.media_span()[0]
  idx, ids, labels = train_data.device_batch(batches(0), cpu)
  weights = train_losses.token_weights(batches.tokenizer, 4.0)
  loss_fn = training.make_loss(
    "target", model, frames, batches, cpu, "none", fact_weight=4.0
  )
  clips = torch.from_numpy(frames)[idx]
  with torch.no_grad():
    got = loss_fn(idx, ids, labels)
    want = train_losses.target_loss(model, ids, labels, clips, start, weights)
    plain = train_losses.target_loss(model, ids, labels, clips, start)
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  assert float(got) != pytest.approx(float(plain), rel=1e-3)


def test_train_follows_the_presets_fact_weight():
  """The preset's fact_weight reaches training: from the same init and
  batches the target ends elsewhere with it than without."""
  cpu = torch.device("cpu")
  got = {}
  for w in (1.0, 5.0):
    model, batches, frames, preset = _tiny_target(fact_weight=w)
    training.train("target", model, batches, preset, frames, cpu, None, "none")
    got[w] = model.lm_head.weight.detach().clone()
  assert not torch.equal(got[1.0], got[5.0])


def _one_step(share: float):
  """The tiny target's weights (named) before and after one `make_step`
  step at tower_lr `share`, from one init, on one batch; its rates."""
  cpu = torch.device("cpu")
  model, batches, frames, preset = _tiny_target(tower_lr=share, ema=0.0)
  before = {n: p.detach().clone() for n, p in model.named_parameters()}
  step = training.make_step(
    "target", model, frames, batches, preset, 4, cpu, "none"
  )
  step(batches(0))
  after = dict(model.named_parameters())
  moved = {n: (after[n] - p).detach() for n, p in before.items()}
  return moved, step.sched.get_last_lr()


def test_the_vision_tower_trains_at_its_share_of_the_rate():
  """With tower_lr s, one step moves the vision tower's weights s times as
  far as at s = 1 (AdamW's step is linear in the rate) and every other
  weight as at s = 1; the schedule keeps the two rates in that ratio."""
  same, rates = _one_step(1.0)
  got, scaled = _one_step(0.25)
  assert scaled[1] == pytest.approx(0.25 * scaled[0], rel=1e-6)
  assert rates[0] == pytest.approx(scaled[0], rel=1e-6)
  towers = 0
  for name, d in got.items():
    if not same[name].any():
      continue
    if ".video_tower." in f".{name}":
      towers += 1
      torch.testing.assert_close(d, 0.25 * same[name], rtol=1e-3, atol=1e-9)
    else:
      torch.testing.assert_close(d, same[name], rtol=1e-5, atol=1e-9)
  assert towers > 10
