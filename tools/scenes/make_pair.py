"""Trains the scenes pair: a VideoLlava target and an event drafter.

  python -m tools.scenes.make_pair --out DIR --preset gpu|tiny [--device D]

Deterministic for a preset and --seed (same data order, same init). Trains
the tokenizer, then the target on (clip, question, answer), then the drafter
on (event frames, question, answer), saves both (layout: tools/scenes/
models.py), reloads them through the backends (`video_llava:DIR/target` and
`tools.scenes.drafter:make_backend:DIR`) and prints, per question type, the
share of held-out (test) scenes whose greedy answer states exactly the true
facts, plus the target's mean next-token entropy on its answers. The
results go into DIR/pair.json. A DIR that already holds the same finished
pair is reported and kept; one holding anything else is refused.

Presets: `gpu` (hidden 256, target 16 layers with 520 visual tokens,
drafter 3 layers with 64 event tokens) and `tiny` (seconds on a CPU, for
tests).

Goals (held-out test scenes, docs/SCENES.md): the target states exactly the
true facts for >= 95% of scenes per question type; the drafter is high on
motion and clearly lower on static objects (the `moving/motion` and
`still/cells` partial scores); target decode >= 8x one B1 adapter step and
target prefill >= 3x drafter prefill (tools/scenes/costs.py).
Measured (H100, 2026-11-27, the `gpu` preset): target 25/31/41/72%
(describe/moving/still/count), drafter 6/33/27/16%, 431 s of training: the
accuracy and time goals were NOT met; the cost ratios (19.2x, 4.0x) were.
A variant with patch 12 (208 visual tokens) and 3000/2000 steps at lr 1.5e-3
did worse (target 7/11/24/54%) and was dropped; docs/SCENES.md has both.
Training: AdamW (fused on CUDA), bf16 autocast, batches of one fixed width
(longest prompt + max_new_tokens), both models torch.compile'd on CUDA
(--no_compile to train eagerly).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time

import numpy as np
import torch
import tqdm

from tools.lib import backends as bk
from tools.lib import generation
from tools.scenes import models, text, world

PAIR_FILE = "pair.json"


class PairError(Exception):
  """A bad input: reported as one line, exit status 2."""


# --------------------------------------------------------------------------
# Training data.


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


def _schedule(preset: models.Preset, steps: int):
  def lr(step):
    if step < preset.warmup:
      return (step + 1) / preset.warmup
    t = (step - preset.warmup) / max(1, steps - preset.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

  return lr


def compiled(model, device, compile_model: bool):
  """The model's forward, compiled on CUDA (batches have one fixed shape,
  so it compiles once), else the model itself."""
  if compile_model and device.type == "cuda":
    return torch.compile(model)
  return model


def _train(model, loss_fn, batches, name, preset, steps, device, executor):
  """AdamW (fused on CUDA) + warmup/cosine, bf16 autocast on GPU, clip 1.

  Returns the final loss, the loss every 100 steps, the first step's
  seconds (compilation, on CUDA) and the mean ms of the steps after it.
  """
  model.to(device).train()
  opt = torch.optim.AdamW(
    model.parameters(),
    lr=preset.lr,
    betas=(0.9, 0.98),
    weight_decay=0.01,
    fused=device.type == "cuda",
  )
  sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(preset, steps))
  autocast = torch.autocast(
    "cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"
  )
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
    with autocast:
      loss = loss_fn(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    if step % 25 == 0 or step == steps - 1:
      loss_val = float(loss.detach())  # also waits for the step
      bar.set_postfix(loss=f"{loss_val:.4f}")
      if step % 100 == 0:
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


def target_loss(forward, batch, frames_dev, device):
  """Mean answer-token cross-entropy of the target on one training batch.

  No attention mask: batches are right-padded and the padding is
  unlabelled, so under causal attention no real token ever sees a pad and
  the loss equals the masked one; without a mask SDPA takes its causal
  (flash) kernel instead of a masked one.
  """
  idx, ids, _, labels = (torch.as_tensor(x).to(device) for x in batch)
  return forward(
    input_ids=ids,
    pixel_values_videos=models.pixels(frames_dev[idx]),
    labels=labels,
  ).loss


def drafter_loss(forward, lm_head, batch, events_dev, device):
  """The drafter's answer-token cross-entropy (no mask: see target_loss)."""
  idx, ids, _, labels = (torch.as_tensor(x).to(device) for x in batch)
  hidden = forward(
    ids, use_cache=False, event_frames=events_dev[idx]
  ).last_hidden_state
  logits = lm_head(hidden[:, :-1]).float()
  return torch.nn.functional.cross_entropy(
    logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
  )


def train_target(
  model, batches, preset, frames, device, executor=None, compile_model=True
):
  """Trains the target on (clip, question, answer) batches."""
  frames_dev = torch.from_numpy(frames).to(device)
  forward = compiled(model.to(device), device, compile_model)
  return _train(
    model,
    lambda batch: target_loss(forward, batch, frames_dev, device),
    batches,
    "target",
    preset,
    preset.target_steps,
    device,
    executor,
  )


def train_drafter(
  model, batches, preset, events, device, executor=None, compile_model=True
):
  """Trains the drafter on (event frames, question, answer) batches."""
  events_dev = torch.from_numpy(events).to(device)
  forward = compiled(model.to(device), device, compile_model)
  return _train(
    model,
    lambda batch: drafter_loss(
      forward, model.lm.lm_head, batch, events_dev, device
    ),
    batches,
    "drafter",
    preset,
    preset.drafter_steps,
    device,
    executor,
  )


# --------------------------------------------------------------------------
# Held-out evaluation through the backends.


def target_prompts(backend) -> models.Prompts:
  """Prompt ids of the target backend (its own count of video tokens)."""
  count = backend.video_tokens(world.SIZE, world.SIZE)
  return models.Prompts(backend.tokenizer, "<video>", count)


def target_inputs(backend, prompts, question, frames) -> dict:
  """Batch-1 target inputs from a question and a uint8 clip [F, H, W, 3]."""
  ids = torch.tensor([prompts(question)])
  pix = models.pixels(torch.from_numpy(frames)[None]).to(backend.dtype)
  return {
    "input_ids": ids,
    "attention_mask": torch.ones_like(ids),
    "pixel_values_videos": pix,
  }


@torch.inference_mode()
def evaluate(target, drafter, seeds, max_new_tokens, batch_size=50) -> dict:
  """Per-question-type fact accuracy of both models on scenes `seeds`."""
  tok = target.tokenizer
  prompts = target_prompts(target)
  results = {"target": {}, "drafter": {}}
  entropies = []
  rendered = {s: world.render(s) for s in seeds}
  for qtype in tqdm.tqdm(text.QTYPES, desc="evaluate", unit="qtype"):
    right = {"target": 0, "drafter": 0}
    partial = {"target": 0, "drafter": 0}
    for lo in range(0, len(seeds), batch_size):
      chunk = seeds[lo : lo + batch_size]
      qs = [text.question(s, qtype) for s in chunk]
      t_in = [
        target_inputs(target, prompts, q, rendered[s][1])
        for s, q in zip(chunk, qs, strict=True)
      ]
      d_in = [
        drafter.encode(q, torch.from_numpy(world.events(rendered[s][1]))[None])
        for s, q in zip(chunk, qs, strict=True)
      ]
      for role, backend, inputs in (
        ("target", target, t_in),
        ("drafter", drafter, d_in),
      ):
        gen = generation.greedy_generate(
          backend, backend.collate(inputs), max_new_tokens
        )
        for i, s in enumerate(chunk):
          n = int(gen.lengths[i])
          answer = models.decode_answer(tok, gen.tokens[i, :n].tolist())
          right[role] += text.correct(answer, rendered[s][0], qtype)
          if qtype in text.PARTIAL:
            partial[role] += text.partial_correct(answer, rendered[s][0], qtype)
        if role == "target":
          logits = gen.hidden.float() @ backend.lm_head_weight().float().T
          logp = torch.log_softmax(logits, -1)
          ent = -(logp.exp() * logp).sum(-1)
          valid = torch.arange(ent.shape[1], device=ent.device)[None] < (
            gen.lengths[:, None].to(ent.device)
          )
          entropies.extend(ent[valid].tolist())
    for role in right:
      results[role][qtype] = right[role] / len(seeds)
      if qtype in text.PARTIAL:
        name = f"{qtype}/{text.PARTIAL[qtype][0]}"
        results[role][name] = partial[role] / len(seeds)
  results["target_mean_entropy_nats"] = float(np.mean(entropies))
  results["eval_scenes_per_qtype"] = len(seeds)
  return results


# --------------------------------------------------------------------------
# The command.


def fingerprint(preset: models.Preset, seed: int) -> dict:
  return {"preset": dataclasses.asdict(preset), "seed": seed}


def check_out(out: str, fp: dict) -> dict | None:
  """The finished pair.json already in `out` for `fp`, else None.

  Raises PairError when `out` holds anything else.
  """
  if not os.path.exists(out):
    return None
  if not os.path.isdir(out):
    raise PairError(f"{out}: exists and is not a directory")
  path = os.path.join(out, PAIR_FILE)
  if not os.path.isfile(path):
    if os.listdir(out):
      raise PairError(
        f"{out}: not empty and holds no {PAIR_FILE}; choose a new --out"
      )
    return None
  with open(path) as f:
    info = json.load(f)
  if info.get("fingerprint") != fp:
    raise PairError(
      f"{path}: holds another pair (preset "
      f"{info.get('fingerprint', {}).get('preset', {}).get('name')!r}, seed "
      f"{info.get('fingerprint', {}).get('seed')!r}); choose a new --out"
    )
  if not info.get("complete"):
    raise PairError(
      f"{path}: an unfinished run of this pair; delete {out} and rerun"
    )
  return info


def versions() -> dict:
  import tokenizers
  import transformers

  return {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "tokenizers": tokenizers.__version__,
    "python": sys.version.split()[0],
  }


def make_pair(
  out: str, preset: models.Preset, seed: int, device, compile_model=True
) -> dict:
  """Trains, saves, reloads and evaluates the pair; returns pair.json.

  compile_model: torch.compile both models for training (CUDA only).
  """
  fp = fingerprint(preset, seed)
  done = check_out(out, fp)
  if done is not None:
    print(f"{out}: already holds this pair; kept")
    return done
  os.makedirs(out, exist_ok=True)
  info = {"fingerprint": fp, "complete": False, "versions": versions()}
  with open(os.path.join(out, PAIR_FILE), "w") as f:
    json.dump(info, f, indent=1)
  t0 = time.time()
  torch.manual_seed(seed)
  np.random.seed(seed)
  tokenizer = text.train_tokenizer(
    world.split_seeds("train", preset.tokenizer_scenes), preset.vocab_size
  )
  pool = world.split_seeds("train", preset.pool_scenes)
  scenes = [world.make_scene(s) for s in pool]
  batches = {
    "target": Batches(
      tokenizer,
      scenes,
      "<video>",
      models.video_tokens(preset),
      seed,
      preset.batch_size,
      max_answer=preset.max_new_tokens,
    ),
    "drafter": Batches(
      tokenizer,
      scenes,
      "<event>",
      models.event_tokens(preset),
      seed + 1,
      preset.batch_size,
      max_answer=preset.max_new_tokens,
    ),
  }
  with contextlib.ExitStack() as stack:
    executor = make_executor(batches, preset.workers)
    if executor is not None:
      stack.enter_context(executor)
    frames, events = render_pool(pool, executor)
    target = models.build_target(preset, tokenizer)
    t1 = time.time()
    t_fit = train_target(
      target,
      batches["target"],
      preset,
      frames,
      device,
      executor,
      compile_model,
    )
    drafter = models.build_drafter(preset, tokenizer)
    t2 = time.time()
    d_fit = train_drafter(
      drafter,
      batches["drafter"],
      preset,
      events,
      device,
      executor,
      compile_model,
    )
    t3 = time.time()
  train_s = t3 - t0
  save_dtype = bk.torch_dtype(preset.save_dtype)
  target.to(save_dtype).save_pretrained(os.path.join(out, "target"))
  tokenizer.save_pretrained(os.path.join(out, "target"))
  models.image_processor().save_pretrained(os.path.join(out, "target"))
  models.save_drafter(
    drafter, tokenizer, os.path.join(out, "drafter"), save_dtype
  )
  del target, drafter
  eval_dtype = preset.save_dtype
  if device.type == "cpu" and eval_dtype != "float32":
    eval_dtype = "float32"
  t_backend = bk.load_backend(
    f"video_llava:{os.path.join(out, 'target')}",
    device=device,
    dtype=eval_dtype,
  )
  d_backend = bk.load_backend(
    f"tools.scenes.drafter:make_backend:{out}", device=device, dtype=eval_dtype
  )
  results = evaluate(
    t_backend,
    d_backend,
    world.split_seeds("test", preset.eval_scenes),
    preset.max_new_tokens,
  )
  results.update(
    final_train_loss={
      "target": t_fit.pop("loss"),
      "drafter": d_fit.pop("loss"),
    },
    training={"target": t_fit, "drafter": d_fit},
    train_seconds=round(train_s, 1),
    train_seconds_target=round(t2 - t1, 1),
    train_seconds_drafter=round(t3 - t2, 1),
    eval_dtype=eval_dtype,
    compiled=bool(compile_model and device.type == "cuda"),
    device=str(
      torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ),
    params={
      "target": sum(p.numel() for p in t_backend.model.parameters()),
      "drafter": sum(p.numel() for p in d_backend.model.parameters()),
    },
    visual_tokens={
      "target": models.video_tokens(preset),
      "drafter": models.event_tokens(preset),
    },
    vocab_size=len(tokenizer),
  )
  info.update(results=results, complete=True)
  with open(os.path.join(out, PAIR_FILE), "w") as f:
    json.dump(info, f, indent=1)
  return info


def report(info: dict) -> str:
  r = info["results"]
  lines = [f"{'question':14s} {'target':>8s} {'drafter':>8s}"]
  for q in r["target"]:
    lines.append(f"{q:14s} {r['target'][q]:8.1%} {r['drafter'][q]:8.1%}")
  lines.append(
    f"held-out test scenes per type: {r['eval_scenes_per_qtype']}; target "
    f"mean next-token entropy {r['target_mean_entropy_nats']:.3f} nats; "
    f"trained in {r['train_seconds']:.0f} s on {r['device']}"
  )
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--out", required=True, help="pair directory to write")
  p.add_argument(
    "--preset", required=True, help=f"one of {list(models.PRESETS)}"
  )
  p.add_argument("--seed", type=int, default=0, help="init and data order")
  p.add_argument(
    "--device", default=None, help="torch device (default: cuda if present)"
  )
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="change one field of the preset (repeatable), e.g. "
    "--set target_steps=4000; the pair's fingerprint records the result",
  )
  p.add_argument(
    "--no_compile",
    action="store_true",
    help="train without torch.compile (it is used on CUDA by default)",
  )
  args = p.parse_args(argv)
  if args.preset not in models.PRESETS:
    print(
      f"error: --preset {args.preset!r}: unknown; expected one of "
      f"{list(models.PRESETS)}",
      file=sys.stderr,
    )
    return 2
  try:
    preset = models.override(models.PRESETS[args.preset], args.set)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  device = torch.device(
    args.device or ("cuda" if torch.cuda.is_available() else "cpu")
  )
  try:
    info = make_pair(
      args.out,
      preset,
      args.seed,
      device,
      compile_model=not args.no_compile,
    )
  except (PairError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report(info))
  return 0


if __name__ == "__main__":
  sys.exit(main())
