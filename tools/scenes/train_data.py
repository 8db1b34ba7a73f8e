"""The scenes pair's training data: rendered scenes to fixed-width batches.

Scenes are rendered once into arrays (`render_pool`); each step's examples
are drawn from `(seed, step)` alone (`examples`), tokenised and padded to
one fixed width (`Batches`; `make_batches` per model), made ahead by forked
workers in step order (`make_executor`, `stream`), so the stream is the same
with any number of workers; `device_batch` puts a batch on the device as
the losses of `tools.scenes.training.make_loss` take it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing

import numpy as np
import torch
import tqdm

from tools.scenes import models, text, token_ids, world


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
    self.prompts = token_ids.Prompts(tokenizer, media_token, count)
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
      ans = token_ids.answer_ids(self.tokenizer, answer)
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
    ids, mask, labels = token_ids.pad_batch(
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
  loss of `training.make_loss` takes."""
  idx, ids, _, labels = batch
  return [to_device(x, device) for x in (idx, ids, labels)]
