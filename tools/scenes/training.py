"""Training the scenes pair: compilation, the loop, each model's step.

The library under `tools.scenes.make_pair` (the command) and
`tools.benchmarks.benchmark_scenes_step` (the step's speed per compile mode);
the data stream is `tools.scenes.train_data`, the losses
`tools.scenes.train_losses`.

- Compilation (`compiled`, CUDA only): `none`, `model` (torch.compile of the
  whole model), `layers` (each transformer layer compiled in place; the
  layers of a stack are alike, so they share one compiled graph and the
  warm-up is a fraction of the whole model's), `graphs` (the whole model
  compiled and the whole step, AdamW included, replayed as one CUDA graph:
  `TrainStep`) or `eager-graphs` (the same step uncompiled: no compilation
  to wait for, for a model small enough that its step is short either way)
  or `layers-graphs` (each layer compiled as in `layers`, the whole step
  replayed as in `graphs`: a deep stack compiles one layer, not all of
  them); docs/SCENES.md has the measured times.
- The loop (`TrainStep`, `fit`): AdamW (fused on CUDA), linear warm-up then
  cosine down to the preset's floor, bf16 autocast on GPU, gradient
  clipping at 1; the model keeps the moving average of its weights
  (`preset.ema`).
- Per model ('target' or 'drafter'): `make_loss` (the model's loss, on the
  device, compiled), `make_step` and `train`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time

import torch
import tqdm

from tools.scenes import models, train_losses
from tools.scenes import tower as tower_lib
from tools.scenes.train_data import Batches, device_batch, stream

COMPILE_MODES = (
  "none",
  "model",
  "layers",
  "graphs",
  "eager-graphs",
  "layers-graphs",
)
# Modes whose whole training step is replayed as one CUDA graph (`TrainStep`).
GRAPH_MODES = ("graphs", "eager-graphs", "layers-graphs")
# Modes that compile each transformer layer in place (`compiled`).
LAYER_MODES = ("layers", "layers-graphs")
# Training clips whose first frames the target's tower is read on (`train`).
MONITORED = 16


# --------------------------------------------------------------------------
# Compilation and the loop.


def schedule(preset: models.Preset, steps: int):
  """Learning-rate factor of a step: linear warm-up, then cosine down to
  `preset.lr_floor` at the last step."""

  def lr(step):
    if step < preset.warmup:
      return (step + 1) / preset.warmup
    t = (step - preset.warmup) / max(1, steps - 1 - preset.warmup)
    low = preset.lr_floor
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * t))

  return lr


@contextlib.contextmanager
def deterministic_kernels(on: bool = True):
  """Within it, training is bitwise reproducible on a GPU (`on`): only
  deterministic kernels (`torch.use_deterministic_algorithms`, which
  torch.compile follows too) and cuBLAS with a fixed workspace; the previous
  setting comes back on leaving. Enter it before any CUDA work; an op
  without a deterministic kernel then raises instead of running. A CPU run
  is reproducible without it. `on=False` leaves torch as it is."""
  before = torch.are_deterministic_algorithms_enabled()
  if on:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
  try:
    yield
  finally:
    torch.use_deterministic_algorithms(before)


def _is_layer(module) -> bool:
  name = type(module).__name__
  return name.endswith("DecoderLayer") or name.endswith("EncoderLayer")


def compiled(fn, model, device, mode: str):
  """What a training step calls for the loss `fn` of `model`: `fn` itself
  (modes `none` and `eager-graphs`, or any device but CUDA),
  `torch.compile(fn)` (`model`, and `graphs`, whose step `TrainStep` then
  captures whole: the forward is one graph either way), or `fn` with each
  transformer layer of `model` compiled in place (`layers`, and
  `layers-graphs`, whose step `TrainStep` captures whole).

  Batches have one fixed shape, so each compiles once; the layers of a
  stack are alike and share one compiled graph (the recompile limit is
  raised to the number of layers, so a layer that did guard on something
  of its own would still be compiled, never left eager).
  """
  if mode not in COMPILE_MODES:
    raise ValueError(f"compile mode {mode!r}: expected one of {COMPILE_MODES}")
  if mode in ("none", "eager-graphs") or device.type != "cuda":
    return fn
  if mode in ("model", "graphs"):
    return torch.compile(fn)
  layers = [m for m in model.modules() if _is_layer(m)]
  if not layers:
    raise ValueError(
      f"{type(model).__name__}: no transformer layers to compile"
    )
  from torch._dynamo import config as dynamo_config

  for name in ("recompile_limit", "cache_size_limit"):
    if hasattr(dynamo_config, name):
      limit = max(getattr(dynamo_config, name), len(layers) + 8)
      setattr(dynamo_config, name, limit)
  for layer in layers:
    layer.compile()
  return fn


def optimizer(
  model,
  preset: models.Preset,
  steps: int,
  device,
  capturable=False,
  tower=None,
):
  """AdamW (fused on CUDA) and its warm-up/cosine schedule over `steps`.
  The parameters of `tower` (a submodule of `model`, or None) are a group
  of their own at `preset.tower_lr` times the rate of the rest, under the
  same schedule.

  capturable: the learning rate and the step count live on the device
  (the schedule writes into the rate), so a CUDA graph can replay the step.
  """
  tower_params = [] if tower is None else list(tower.parameters())
  in_tower = {id(p) for p in tower_params}
  groups = [([p for p in model.parameters() if id(p) not in in_tower], 1.0)]
  if tower_params:
    groups.append((tower_params, preset.tower_lr))

  def rate(share):
    if capturable:
      return torch.tensor(preset.lr * share, dtype=torch.float32, device=device)
    return preset.lr * share

  opt = torch.optim.AdamW(
    [{"params": params, "lr": rate(share)} for params, share in groups],
    lr=rate(1.0),
    betas=(0.9, 0.98),
    weight_decay=0.01,
    fused=device.type == "cuda",
    capturable=capturable,
  )
  return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule(preset, steps))


def autocast(device):
  """bf16 autocast on CUDA; a no-op elsewhere."""
  return torch.autocast(
    "cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"
  )


class TrainStep:
  """One optimiser step per call on a batch (host arrays, as `Batches`
  makes them): bf16 autocast, the loss, backward, clipping at 1, AdamW,
  then the schedule. Returns the loss (detached: no step keeps an earlier
  one's autograd graph alive), valid until the next call.

  With `preset.ema` > 0 each step also moves an exponential moving average
  of the weights towards them (`average`), and `finish` writes the average
  into the model: it smooths the last steps' jitter around where the
  schedule leaves the weights (measured so far: no effect beyond the
  spread between seeds; docs/SCENES.md).

  Compile modes `graphs` and `eager-graphs` (GRAPH_MODES) on CUDA: the
  first `WARMUP` steps run as they are (on a side stream: compilation,
  cuBLAS and AdamW state set themselves up there), the next is captured
  whole (forward, backward, clipping and AdamW) as one CUDA graph over
  fixed input buffers, and from then on a step is three copies into those
  buffers and one replay. A step launches hundreds of kernels and the host
  could not keep up with the GPU (docs/SCENES.md); a replay costs the host
  next to nothing. The replayed kernels are the ones the step runs without
  the graph.
  """

  WARMUP = 3

  def __init__(
    self, model, loss_fn, preset, steps, device, mode="none", tower=None
  ):
    self.loss_fn, self.device = loss_fn, device
    self.graphs = mode in GRAPH_MODES and device.type == "cuda"
    self.opt, self.sched = optimizer(
      model, preset, steps, device, capturable=self.graphs, tower=tower
    )
    self.params = [p for p in model.parameters() if p.requires_grad]
    self.ema = preset.ema
    self.average = None
    if self.ema:
      self.average = [p.detach().clone() for p in self.params]
    self.calls = 0
    self.side = torch.cuda.Stream(device) if self.graphs else None
    self.graph = None
    self.inputs = self.loss = None

  def _step(self, inputs) -> torch.Tensor:
    with autocast(self.device):
      loss = self.loss_fn(*inputs)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, 1.0)
    self.opt.step()
    if self.average is not None:
      with torch.no_grad():
        torch._foreach_lerp_(self.average, self.params, 1.0 - self.ema)
    return loss

  @torch.no_grad()
  def finish(self) -> None:
    """Writes the average of the weights into the model (no-op without
    `preset.ema`)."""
    if self.average is not None:
      torch._foreach_copy_(self.params, self.average)

  def _capture(self, inputs) -> None:
    self.inputs = [x.clone() for x in inputs]
    self.opt.zero_grad(set_to_none=True)  # the graph makes the gradients
    self.graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(self.graph):
      self.loss = self._step(self.inputs).detach()

  def __call__(self, batch) -> torch.Tensor:
    self.calls += 1
    if not self.graphs:
      inputs = device_batch(batch, self.device)
      self.opt.zero_grad(set_to_none=True)
      loss = self._step(inputs)
    elif self.calls <= self.WARMUP:
      self.side.wait_stream(torch.cuda.current_stream(self.device))
      with torch.cuda.stream(self.side):
        inputs = device_batch(batch, self.device)
        self.opt.zero_grad(set_to_none=True)
        loss = self._step(inputs)
      torch.cuda.current_stream(self.device).wait_stream(self.side)
    else:
      inputs = device_batch(batch, self.device)
      if self.graph is None:
        self._capture(inputs)
      else:
        for buf, x in zip(self.inputs, inputs, strict=True):
          buf.copy_(x, non_blocking=True)
      self.graph.replay()
      loss = self.loss
    self.sched.step()
    return loss.detach()


def fit(model, step: TrainStep, batches, name, steps, executor, monitor=None):
  """Trains `model` for `steps` of `batches` with `step` (see the module
  docstring), leaving the step's average of the weights in it
  (`TrainStep.finish`).

  Returns the final loss, the loss every 100 steps and at the last, the
  first step's seconds (compilation, on CUDA) and the mean ms of the steps
  after it; with a `monitor` (`tower.Monitor`), its readings at the same
  steps (`tower_every_100_steps`), each also printed as one line, and the
  seconds they took (`monitor_s`, left out of the step times).
  """
  model.train()
  bar = tqdm.tqdm(
    stream(batches, name, steps, executor),
    total=steps,
    desc=f"train {name}",
    unit="step",
  )
  loss_val = float("nan")
  curve, readings = [], []
  monitor_s = first_monitor_s = 0.0
  t_start = t_first = time.perf_counter()
  for i, batch in enumerate(bar):
    loss = step(batch)
    if i % 25 == 0 or i == steps - 1:
      loss_val = float(loss)  # also waits for the step
      bar.set_postfix(loss=f"{loss_val:.4f}")
      if i % 100 == 0 or i == steps - 1:
        curve.append([i, round(loss_val, 4)])
        if monitor is not None:
          t_read = time.perf_counter()
          got = monitor()
          readings.append([i, got])
          bar.write(f"{name} step {i}: {tower_lib.summary(got)}")
          monitor_s += time.perf_counter() - t_read
    if i == 0:
      t_first = time.perf_counter()
      first_monitor_s = monitor_s
  step.finish()
  model.eval()
  t_end = time.perf_counter()
  later = (t_end - t_first) - (monitor_s - first_monitor_s)
  out = {
    "loss": loss_val,
    "loss_every_100_steps": curve,
    "first_step_s": round(t_first - t_start - first_monitor_s, 2),
    "ms_per_step": round(1e3 * later / max(1, steps - 1), 2),
  }
  if monitor is not None:
    out["tower_every_100_steps"] = readings
    out["monitor_s"] = round(monitor_s, 2)
  return out


# --------------------------------------------------------------------------
# The two models' losses and training.


def make_loss(
  name: str,
  model,
  media,
  batches: Batches,
  device,
  compile_mode,
  fact_weight: float = 1.0,
):
  """The training loss of model `name` on a batch's (idx, ids, labels)
  tensors on `device` (`device_batch`): the pool's media (clips for the
  target, event frames for the drafter) go to the device once and are
  gathered there, the language model attends causally without a mask
  (`train_losses.causal_attention`; `train` restores it), the loss is
  compiled as `compile_mode` says: one graph (tests/test_scenes_world.py).
  With `fact_weight` != 1 the answer tokens are weighted
  (`train_losses.token_weights`)."""
  media_dev = torch.from_numpy(media).to(device)
  model.to(device)
  train_losses.causal_attention(train_losses.language_model(name, model))
  start = batches.prompts.media_span()[0]
  loss = train_losses.drafter_loss
  if name == "target":
    loss = train_losses.target_loss
  if fact_weight != 1:
    weights = train_losses.token_weights(batches.tokenizer, fact_weight)
    loss = functools.partial(loss, weights=weights.to(device))
  # transformers installs output hooks on a model's first call, under a
  # lock dynamo cannot trace (two graph breaks in every compiled step):
  # make that call eagerly, on one row.
  idx, ids, labels = (x[:1] for x in device_batch(batches(0), device))
  with torch.no_grad():
    loss(model, ids, labels, media_dev[idx], start)
  fn = compiled(
    lambda ids, labels, m: loss(model, ids, labels, m, start),
    model,
    device,
    compile_mode,
  )

  def batch_loss(idx, ids, labels):
    return fn(ids, labels, media_dev[idx])

  return batch_loss


def make_step(
  name, model, media, batches, preset, steps, device, compile_mode
) -> TrainStep:
  """The `TrainStep` of model `name` over `steps`, with its loss
  (`make_loss`, answer tokens weighted by `preset.fact_weight`); the
  target's vision tower trains at `preset.tower_lr` times the rate."""
  loss_fn = make_loss(
    name, model, media, batches, device, compile_mode, preset.fact_weight
  )
  tower = model.model.video_tower if name == "target" else None
  return TrainStep(
    model, loss_fn, preset, steps, device, compile_mode, tower=tower
  )


def train(
  name,
  model,
  batches,
  preset,
  media,
  device,
  executor=None,
  compile_mode="model",
):
  """Trains model `name` ('target' or 'drafter') for its preset steps; the
  model leaves with the attention implementation it came with. The
  target's vision tower is read every 100 steps on the first frames of
  the pool's first `MONITORED` clips (`tower.Monitor`)."""
  steps = preset.target_steps if name == "target" else preset.drafter_steps
  lm = train_losses.language_model(name, model)
  previous = lm.config._attn_implementation
  monitor = None
  if name == "target":  # before make_step compiles layers in place
    pixels = tower_lib.first_frames(media[:MONITORED])
    monitor = tower_lib.Monitor(model.model.video_tower, pixels)
  step = make_step(
    name, model, media, batches, preset, steps, device, compile_mode
  )
  try:
    return fit(model, step, batches, name, steps, executor, monitor)
  finally:
    lm.set_attn_implementation(previous)
