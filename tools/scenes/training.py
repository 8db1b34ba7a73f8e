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
- The losses (`target_loss`, `drafter_loss`): the models' forward passes with
  the media spliced in at the prompts' fixed span, causal attention without
  a mask (`causal_attention`), scored after the media only, fact tokens
  optionally weighted above wording (`token_weights`, `preset.fact_weight`).
- Per model ('target' or 'drafter'): `make_batches`, `make_loss`, `make_step`
  and `train`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import math
import multiprocessing
import os
import time

import numpy as np
import torch
import tqdm

from tools.scenes import models, text, world

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


def examples(
  scenes, seed: int, step: int, size: int, turns: int = 1, cell_turns: int = 0
):
  """The `size` examples of a step: (scene index, [(question, answer)] of
  `turns` distinct question types in a random order, then `cell_turns`
  questions about one cell each (`text.cell_question`: an object's start
  cell three times in four, an empty cell otherwise)).

  Seeded by (seed, step) alone, so batches can be made in any process and
  in any order and the data stream stays the same; the cell questions draw
  from a stream of their own, so the rest is the same with or without them.
  """
  rng = np.random.default_rng([seed, step, 3])
  cell_rng = np.random.default_rng([seed, step, 5])
  out = []
  for i in rng.integers(len(scenes), size=size):
    scene = scenes[int(i)]
    qas = []
    for q in rng.permutation(len(text.QTYPES))[:turns]:
      qtype, v = text.QTYPES[int(q)], int(rng.integers(1 << 30))
      qas.append(
        (text.question(scene.seed, qtype, v), text.answer(scene, qtype, v))
      )
    if cell_turns:
      qas += _cell_qas(scene, cell_turns, cell_rng)
    out.append((int(i), qas))
  return out


def _cell_qas(scene, n: int, rng) -> list[tuple[str, str]]:
  """`n` (question, answer) turns about one cell of `scene` each: an
  object's start cell three times in four, an empty cell otherwise."""
  taken = [t.cell for t in scene.things]
  empty = [c for c in world.CELLS if c not in taken]
  qas = []
  for _ in range(n):
    cells = taken if rng.random() < 0.75 else empty
    cell = cells[int(rng.integers(len(cells)))]
    v = int(rng.integers(1 << 30))
    qas.append(
      (
        text.cell_question(scene.seed, cell, v),
        text.cell_answer(scene, cell, v),
      )
    )
  return qas


class Batches:
  """Token batches of a training stream: (scene idx, ids, mask, labels).

  Each sequence is one scene's conversation of up to `turns` question/answer
  turns and then `cell_turns` questions about one cell (`examples`): the
  first turn is the prompt as asked at inference (media, first question),
  each later one `USER: {question} ASSISTANT:` after the last answer's EOS;
  every answer token is labelled. The media tokens and their gradients are
  shared by all the turns, which costs little next to the hundreds of media
  tokens and multiplies the supervision a clip gives.
  """

  def __init__(
    self,
    tokenizer,
    scenes,
    media_token,
    count,
    seed,
    size,
    max_answer=None,
    turns=1,
    turn_room=0,
    cell_turns=0,
  ):
    """max_answer: answer tokens (EOS included) the first turn has room for;
    batches are then all (longest prompt + max_answer + turn_room) wide (one
    shape to compile) and a later turn that would not fit is left out of
    its sequence (so every sequence keeps its first turn whole)."""
    self.tokenizer = tokenizer
    self.scenes = scenes
    self.prompts = models.Prompts(tokenizer, media_token, count)
    self.media_id = tokenizer.convert_tokens_to_ids(media_token)
    self.seed, self.size, self.turns = seed, size, turns
    self.cell_turns = cell_turns
    self.max_answer = max_answer
    self.width = None
    if max_answer is not None:
      self.width = self.prompts.longest() + max_answer + turn_room

  def conversation(self, scene_idx: int, qas, step: int):
    """(token ids, labels) of one scene's turns."""
    ids, labels = [], []
    for k, (question, answer) in enumerate(qas):
      head = self.prompts.follow_up(question) if k else self.prompts(question)
      ans = models.answer_ids(self.tokenizer, answer)
      if k == 0 and self.max_answer is not None and len(ans) > self.max_answer:
        raise ValueError(
          f"training scene {self.scenes[scene_idx].seed} (step {step}): an "
          f"answer of {len(ans)} tokens, over the {self.max_answer} the "
          "preset's max_new_tokens allows"
        )
      if (
        k
        and self.width is not None
        and len(ids) + len(head) + len(ans) > self.width
      ):
        break
      ids += head + ans
      labels += [-100] * len(head) + ans
    return ids, labels

  def __call__(self, step: int):
    batch = examples(
      self.scenes, self.seed, step, self.size, self.turns, self.cell_turns
    )
    convs = [self.conversation(i, qas, step) for i, qas in batch]
    ids, mask, labels = models.pad_batch(
      [c[0] for c in convs],
      [c[1] for c in convs],
      self.tokenizer.pad_token_id,
      self.width,
    )
    first, end = self.prompts.media_span()
    if (ids[:, first:end] != self.media_id).any():
      raise AssertionError(f"step {step}: media tokens off {first}..{end}")
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


def prefetch(executor) -> int:
  """Batches the stream keeps in flight ahead of the step (0 without
  workers)."""
  return 0 if executor is None else 4 * executor._max_workers


def stream(batches: Batches, name: str, steps: int, executor=None):
  """Yields batches(0..steps-1) in order, made ahead by the executor."""
  if executor is None:
    yield from (batches(step) for step in range(steps))
    return
  pending = collections.deque()
  window = prefetch(executor)
  for step in range(steps):
    pending.append(executor.submit(_worker_batch, (name, step)))
    if len(pending) > window:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()


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
  model, preset: models.Preset, steps: int, device, capturable=False
):
  """AdamW (fused on CUDA) and its warm-up/cosine schedule over `steps`.

  capturable: the learning rate and the step count live on the device
  (the schedule writes into the rate), so a CUDA graph can replay the step.
  """
  lr = preset.lr
  if capturable:
    lr = torch.tensor(preset.lr, dtype=torch.float32, device=device)
  opt = torch.optim.AdamW(
    model.parameters(),
    lr=lr,
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

  def __init__(self, model, loss_fn, preset, steps, device, mode="none"):
    self.loss_fn, self.device = loss_fn, device
    self.graphs = mode in GRAPH_MODES and device.type == "cuda"
    self.opt, self.sched = optimizer(
      model, preset, steps, device, capturable=self.graphs
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


def fit(model, step: TrainStep, batches, name, steps, executor):
  """Trains `model` for `steps` of `batches` with `step` (see the module
  docstring), leaving the step's average of the weights in it
  (`TrainStep.finish`).

  Returns the final loss, the loss every 100 steps and at the last, the
  first step's seconds (compilation, on CUDA) and the mean ms of the steps
  after it.
  """
  model.train()
  bar = tqdm.tqdm(
    stream(batches, name, steps, executor),
    total=steps,
    desc=f"train {name}",
    unit="step",
  )
  loss_val = float("nan")
  curve = []
  t_start = t_first = time.perf_counter()
  for i, batch in enumerate(bar):
    loss = step(batch)
    if i % 25 == 0 or i == steps - 1:
      loss_val = float(loss)  # also waits for the step
      bar.set_postfix(loss=f"{loss_val:.4f}")
      if i % 100 == 0 or i == steps - 1:
        curve.append([i, round(loss_val, 4)])
    if i == 0:
      t_first = time.perf_counter()
  step.finish()
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


def device_batch(batch, device) -> list:
  """The (scene idx, ids, labels) of a `Batches` batch on `device`: what a
  loss of `make_loss` takes."""
  idx, ids, _, labels = batch
  return [to_device(x, device) for x in (idx, ids, labels)]


def splice(embed, ids, feats, start: int):
  """Input embeddings of `ids` [B, T] with `feats` [B, N, D] in place of the
  positions start..start+N (the media placeholders). Only the text is
  looked up: the embedding's backward then adds up a few hundred rows a
  sequence, not also the hundreds of placeholders that all hit one row."""
  text_before = embed(ids[:, :start])
  text_after = embed(ids[:, start + feats.shape[1] :])
  feats = feats.to(text_before.dtype)
  return torch.cat([text_before, feats, text_after], dim=1)


def answer_loss(lm_head, hidden, labels, first: int, weights=None):
  """Cross-entropy of the labelled tokens of a batch, none of which comes
  before position `first` (the text after the media): logits are made only
  from there. Their mean, or with `weights` ([vocab], `token_weights`)
  their mean weighted by each label's weight."""
  logits = lm_head(hidden[:, first - 1 : -1]).float()
  logits = logits.reshape(-1, logits.shape[-1])
  labels = labels[:, first:].reshape(-1)
  if weights is None:
    return torch.nn.functional.cross_entropy(logits, labels)
  ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
  w = weights[labels.clamp(min=0)] * (labels != -100)
  return (ce * w).sum() / w.sum()


def token_weights(tokenizer, fact_weight: float) -> torch.Tensor:
  """[vocab] weights of the answer loss: `fact_weight` for the tokens that
  spell a fact word (`text.FACT_WORDS`, each one token of the scenes'
  tokenizer), 1 for the rest.

  An answer's wording varies by seed and carries most of its loss, while
  the facts that make it right (which cell, which colour) are a few tokens
  of it: weighting them makes the facts a larger share of the gradient.
  """
  weights = torch.ones(len(tokenizer))
  for token, i in tokenizer.get_vocab().items():
    word = tokenizer.convert_tokens_to_string([token]).strip().lower()
    if word in text.FACT_WORDS:
      weights[i] = fact_weight
  return weights


# The losses below are the models' own forward passes with the media spliced
# in at a fixed position (every prompt starts with the same prefix, so the
# placeholders of a batch sit at one known span): the models' generic
# placeholder search (a data-dependent mask and a count check) would make
# the host wait for the GPU every step and break the compiled graph. Neither
# takes an attention mask: batches are right-padded and the padding is
# unlabelled, so under causal attention no real token ever sees a pad and
# the loss equals the masked one, while SDPA takes its causal kernel.


def target_loss(model, ids, labels, frames, start: int, weights=None):
  """The target's answer-token loss (`weights`: as `answer_loss` takes);
  `frames`: uint8 clips of the batch, `start`: first media position."""
  inner = model.model
  px = models.pixels(frames)
  out = inner.video_tower(px.flatten(0, 1), output_hidden_states=True)
  feats = inner.multi_modal_projector(
    out.hidden_states[model.config.vision_feature_layer]
  )
  feats = feats.reshape(px.shape[0], -1, feats.shape[-1])
  lm = inner.language_model
  embeds = splice(lm.get_input_embeddings(), ids, feats, start)
  hidden = lm(inputs_embeds=embeds, use_cache=False).last_hidden_state
  first = start + feats.shape[1]
  return answer_loss(model.lm_head, hidden, labels, first, weights)


def drafter_loss(model, ids, labels, events, start: int, weights=None):
  """The drafter's answer-token loss (`weights`: as `answer_loss` takes);
  `events`: event frames of the batch."""
  lm = model.lm.model
  feats = model.encoder(events)
  embeds = splice(lm.embed_tokens, ids, feats, start)
  hidden = lm(inputs_embeds=embeds, use_cache=False).last_hidden_state
  first = start + feats.shape[1]
  return answer_loss(model.lm.lm_head, hidden, labels, first, weights)


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
    turns=preset.turns,
    turn_room=preset.turn_room,
    cell_turns=preset.cell_turns,
  )


CAUSAL_ATTENTION = "scenes_causal_sdpa"


def language_model(name: str, model):
  """The transformers text model inside model `name`."""
  return model.model.language_model if name == "target" else model.lm.model


def causal_attention(lm) -> None:
  """Sets the text model `lm` to transformers' own SDPA attention under a
  name of its own (`train` restores the implementation it had before the
  model is used with padding).

  transformers builds no attention mask for an implementation without a
  registered mask function, so SDPA always takes its causal path. Under
  torch.compile (torch < 2.14) the stock "sdpa" builds an explicit causal
  mask instead, and the masked kernels took twice the time on an H100.
  Training batches are right-padded and unlabelled there, so no mask is
  needed (see the losses above).
  """
  from transformers import AttentionInterface
  from transformers.integrations.sdpa_attention import sdpa_attention_forward

  AttentionInterface.register(CAUSAL_ATTENTION, sdpa_attention_forward)
  lm.set_attn_implementation(CAUSAL_ATTENTION)


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
  (`causal_attention`; `train` restores it), the loss is compiled as
  `compile_mode` says: one graph (tests/test_scenes_world.py). With
  `fact_weight` != 1 the answer tokens are weighted (`token_weights`)."""
  media_dev = torch.from_numpy(media).to(device)
  model.to(device)
  causal_attention(language_model(name, model))
  start = batches.prompts.media_span()[0]
  loss = target_loss if name == "target" else drafter_loss
  if fact_weight != 1:
    weights = token_weights(batches.tokenizer, fact_weight).to(device)
    loss = functools.partial(loss, weights=weights)
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
  (`make_loss`, answer tokens weighted by `preset.fact_weight`)."""
  loss_fn = make_loss(
    name, model, media, batches, device, compile_mode, preset.fact_weight
  )
  return TrainStep(model, loss_fn, preset, steps, device, compile_mode)


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
  model leaves with the attention implementation it came with."""
  steps = preset.target_steps if name == "target" else preset.drafter_steps
  lm = language_model(name, model)
  previous = lm.config._attn_implementation
  step = make_step(
    name, model, media, batches, preset, steps, device, compile_mode
  )
  try:
    return fit(model, step, batches, name, steps, executor)
  finally:
    lm.set_attn_implementation(previous)
