"""Training the scenes pair: the data stream, compilation, the loop, the losses.

The library under `tools.scenes.make_pair` (the command) and
`tools.benchmarks.benchmark_scenes_step` (the step's speed per compile mode).

- Data: scenes are rendered once into arrays (`render_pool`); each step's
  examples are drawn from `(seed, step)` alone (`examples`), tokenised and
  padded to one fixed width (`Batches`), made ahead by forked workers in step
  order (`make_executor`, `stream`), so the stream is the same with any
  number of workers.
- Compilation (`compiled`, CUDA only): `none`, `model` (torch.compile of the
  whole model), `layers` (each transformer layer compiled in place; the
  layers of a stack are alike, so they share one compiled graph and the
  warm-up is a fraction of the whole model's) or `graphs` (the whole model
  with CUDA graphs, torch.compile's "reduce-overhead": the step is bound by
  kernel launches, not arithmetic).
- The loop (`fit`): AdamW (fused on CUDA), linear warm-up then cosine to 10%,
  bf16 autocast on GPU, gradient clipping at 1.
- Per model ('target' or 'drafter'): `make_batches`, `make_loss` and `train`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import multiprocessing
import time

import numpy as np
import torch
import tqdm

from tools.scenes import models, text, world

COMPILE_MODES = ("none", "model", "layers", "graphs")

# --------------------------------------------------------------------------
# Data.


def _render_chunk(seeds):
  frames = np.stack([world.render(s)[1] for s in seeds])
  return frames, np.stack([world.events(f) for f in frames])


def render_pool(seeds, executor=None):
  """(frames [N, F, H, W, 3], events [N, F-1, 2, H, W]) of `seeds`."""
  seeds = list(seeds)
  chunks = [seeds[i : i + 500] for i in range(0, len(seeds), 500)]
  parts = map(_render_chunk, chunks)
  if executor is not None:
    parts = executor.map(_render_chunk, chunks)
  bar = tqdm.tqdm(total=len(seeds), desc="render scenes", unit="scene")
  done = []
  for part in parts:
    done.append(part)
    bar.update(len(part[0]))
  bar.close()
  return (
    np.concatenate([p[0] for p in done]),
    np.concatenate([p[1] for p in done]),
  )


def examples(scenes, seed: int, step: int, size: int):
  """The `size` (scene index, question, answer) examples of a step.

  Seeded by (seed, step) alone, so batches can be made in any process and
  in any order and the data stream stays the same.
  """
  rng = np.random.default_rng([seed, step, 3])
  idx = rng.integers(len(scenes), size=size)
  qts = rng.integers(len(text.QTYPES), size=size)
  variants = rng.integers(1 << 30, size=size)
  out = []
  for i, q, v in zip(idx, qts, variants, strict=True):
    scene, qtype = scenes[int(i)], text.QTYPES[int(q)]
    out.append(
      (
        int(i),
        text.question(scene.seed, qtype, int(v)),
        text.answer(scene, qtype, int(v)),
      )
    )
  return out


class Batches:
  """Token batches of a training stream: (scene idx, ids, mask, labels)."""

  def __init__(
    self, tokenizer, scenes, media_token, count, seed, size, max_answer=None
  ):
    """max_answer: answer tokens (EOS included) every batch has room for:
    batches are then all prompt + max_answer wide (one shape to compile)."""
    self.tokenizer = tokenizer
    self.scenes = scenes
    self.prompts = models.Prompts(tokenizer, media_token, count)
    self.seed, self.size = seed, size
    self.max_answer = max_answer
    self.width = None
    if max_answer is not None:
      self.width = self.prompts.longest() + max_answer

  def __call__(self, step: int):
    batch = examples(self.scenes, self.seed, step, self.size)
    answers = [models.answer_ids(self.tokenizer, b[2]) for b in batch]
    if self.max_answer is not None:
      for (i, _, _), a in zip(batch, answers, strict=True):
        if len(a) > self.max_answer:
          raise ValueError(
            f"training scene {self.scenes[i].seed} (step {step}): an answer "
            f"of {len(a)} tokens, over the {self.max_answer} the preset's "
            "max_new_tokens allows"
          )
    ids, mask, labels = models.lm_batch(
      [self.prompts(b[1]) for b in batch],
      answers,
      self.tokenizer.pad_token_id,
      self.width,
    )
    return np.array([b[0] for b in batch]), ids, mask, labels


_WORKER_BATCHES: dict = {}


def _init_worker(batches: dict):
  # Batch making is single-threaded numpy and tokenisation: a worker that
  # kept torch's thread pool (one thread per core) would crowd the host.
  torch.set_num_threads(1)
  _WORKER_BATCHES.update(batches)


def _worker_batch(task):
  name, step = task
  return _WORKER_BATCHES[name](step)


def make_executor(batches: dict, workers: int):
  """Worker processes holding `batches` ({name: Batches}); None if <= 1.

  Forked (all at the first task, which make_pair submits before CUDA is
  initialised), so the batch makers are inherited, not pickled.
  """
  if workers <= 1:
    return None
  return concurrent.futures.ProcessPoolExecutor(
    workers,
    mp_context=multiprocessing.get_context("fork"),
    initializer=_init_worker,
    initargs=(batches,),
  )


def stream(batches: Batches, name: str, steps: int, executor=None):
  """Yields batches(0..steps-1) in order, made ahead by the executor."""
  if executor is None:
    yield from (batches(step) for step in range(steps))
    return
  pending = collections.deque()
  window = 4 * executor._max_workers
  for step in range(steps):
    pending.append(executor.submit(_worker_batch, (name, step)))
    if len(pending) > window:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()


# --------------------------------------------------------------------------
# Compilation and the loop.


def schedule(preset: models.Preset, steps: int):
  """Learning-rate factor of a step: linear warm-up, then cosine to 0.1."""

  def lr(step):
    if step < preset.warmup:
      return (step + 1) / preset.warmup
    t = (step - preset.warmup) / max(1, steps - preset.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

  return lr


def _is_layer(module) -> bool:
  name = type(module).__name__
  return name.endswith("DecoderLayer") or name.endswith("EncoderLayer")


def compiled(model, device, mode: str):
  """The callable a training step runs: `model` itself (mode `none`, or any
  device but CUDA), `torch.compile(model)` (`model`), the same replayed as
  CUDA graphs (`graphs`), or `model` with each transformer layer compiled in
  place (`layers`).

  Batches have one fixed shape, so each compiles once.
  """
  if mode not in COMPILE_MODES:
    raise ValueError(f"compile mode {mode!r}: expected one of {COMPILE_MODES}")
  if mode == "none" or device.type != "cuda":
    return model
  if mode == "model":
    return torch.compile(model)
  if mode == "graphs":
    return torch.compile(model, mode="reduce-overhead")
  layers = [m for m in model.modules() if _is_layer(m)]
  if not layers:
    raise ValueError(
      f"{type(model).__name__}: no transformer layers to compile"
    )
  for layer in layers:
    layer.compile()
  return model


def optimizer(model, preset: models.Preset, steps: int, device):
  """AdamW (fused on CUDA) and its warm-up/cosine schedule over `steps`."""
  opt = torch.optim.AdamW(
    model.parameters(),
    lr=preset.lr,
    betas=(0.9, 0.98),
    weight_decay=0.01,
    fused=device.type == "cuda",
  )
  return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule(preset, steps))


def autocast(device):
  """bf16 autocast on CUDA; a no-op elsewhere."""
  return torch.autocast(
    "cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"
  )


def train_step(model, opt, sched, loss_fn, batch, device) -> torch.Tensor:
  """One optimiser step on `batch`; returns the (undetached) loss, valid
  until the next step (CUDA graphs reuse their outputs' memory)."""
  torch.compiler.cudagraph_mark_step_begin()
  with autocast(device):
    loss = loss_fn(batch)
  opt.zero_grad(set_to_none=True)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
  opt.step()
  sched.step()
  return loss


def fit(model, loss_fn, batches, name, preset, steps, device, executor):
  """Trains `model` for `steps` of `batches` (see the module docstring).

  Returns the final loss, the loss every 100 steps and at the last, the
  first step's seconds (compilation, on CUDA) and the mean ms of the steps
  after it.
  """
  model.to(device).train()
  opt, sched = optimizer(model, preset, steps, device)
  bar = tqdm.tqdm(
    stream(batches, name, steps, executor),
    total=steps,
    desc=f"train {name}",
    unit="step",
  )
  loss_val = float("nan")
  curve = []
  t_start = t_first = time.perf_counter()
  for step, batch in enumerate(bar):
    loss = train_step(model, opt, sched, loss_fn, batch, device)
    if step % 25 == 0 or step == steps - 1:
      loss_val = float(loss.detach())  # also waits for the step
      bar.set_postfix(loss=f"{loss_val:.4f}")
      if step % 100 == 0 or step == steps - 1:
        curve.append([step, round(loss_val, 4)])
    if step == 0:
      t_first = time.perf_counter()
  model.eval()
  t_end = time.perf_counter()
  return {
    "loss": loss_val,
    "loss_every_100_steps": curve,
    "first_step_s": round(t_first - t_start, 2),
    "ms_per_step": round(1e3 * (t_end - t_first) / max(1, steps - 1), 2),
  }


# --------------------------------------------------------------------------
# The two models' losses and training.


def to_device(x, device) -> torch.Tensor:
  """`x` on `device`; to CUDA through pinned memory without waiting.

  A copy from pageable memory makes the host wait for the GPU to finish
  the work queued before it (the previous step), so the next step's
  launches would not overlap it; a pinned, non-blocking copy is queued.
  """
  x = torch.as_tensor(x)
  if device.type != "cuda" or x.device.type == "cuda":
    return x.to(device)
  return x.pin_memory().to(device, non_blocking=True)


def target_loss(forward, batch, frames_dev, device):
  """Mean answer-token cross-entropy of the target on one training batch.

  No attention mask: batches are right-padded and the padding is
  unlabelled, so under causal attention no real token ever sees a pad and
  the loss equals the masked one; without a mask SDPA takes its causal
  (flash) kernel instead of a masked one.
  """
  idx, ids, _, labels = (to_device(x, device) for x in batch)
  return forward(
    input_ids=ids,
    pixel_values_videos=models.pixels(frames_dev[idx]),
    labels=labels,
  ).loss


def drafter_loss(forward, lm_head, batch, events_dev, device):
  """The drafter's answer-token cross-entropy (no mask: see target_loss)."""
  idx, ids, _, labels = (to_device(x, device) for x in batch)
  hidden = forward(
    ids, use_cache=False, event_frames=events_dev[idx]
  ).last_hidden_state
  logits = lm_head(hidden[:, :-1]).float()
  return torch.nn.functional.cross_entropy(
    logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
  )


def make_batches(name: str, tokenizer, scenes, preset, seed: int) -> Batches:
  """The training batches of model `name` ('target': clips behind `<video>`
  tokens, 'drafter': event frames behind `<event>`), preset.max_new_tokens
  of answer room."""
  media, count = "<video>", models.video_tokens(preset)
  if name == "drafter":
    media, count = "<event>", models.event_tokens(preset)
  return Batches(
    tokenizer,
    scenes,
    media,
    count,
    seed,
    preset.batch_size,
    max_answer=preset.max_new_tokens,
  )


def make_loss(name: str, model, media, device, compile_mode: str):
  """The training loss of model `name` on a batch: the pool's media (clips
  for the target, event frames for the drafter) go to the device once, the
  model is compiled as `compile_mode` says."""
  media_dev = torch.from_numpy(media).to(device)
  forward = compiled(model.to(device), device, compile_mode)
  if name == "target":
    return lambda batch: target_loss(forward, batch, media_dev, device)
  head = model.lm.lm_head
  return lambda batch: drafter_loss(forward, head, batch, media_dev, device)


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
  """Trains model `name` ('target' or 'drafter') for its preset steps."""
  steps = preset.target_steps if name == "target" else preset.drafter_steps
  loss_fn = make_loss(name, model, media, device, compile_mode)
  return fit(model, loss_fn, batches, name, preset, steps, device, executor)
