r"""Speed of the scenes pair's training step, per compile mode (torch, CUDA).

Rows (each in a fresh subprocess with its own inductor cache, so one row's
compilation never warms another's):
  MODE          the training step of tools.scenes.training (`TrainStep`:
                bf16 autocast, fused AdamW, clipping) with the model compiled
                as MODE (training.COMPILE_MODES; `graphs` and `eager-graphs`
                also capture the whole step as one CUDA graph), on batches
                made beforehand and already on the device;
  MODE/stream   the same with batches made by the preset's forked workers and
                uploaded each step, as make_pair trains (the batches the
                workers made ahead during the first step are stepped through
                untimed, so the timed steps measure the sustained stream).
A row that fails is reported (its last error line, in the table and the
JSON) and the others still run; the exit status is then 1.
For each: the untimed steps' seconds (compilation and warm-up) and the mean ms
of the next --steps steps (one synchronisation at the end), beside the
step's FLOPs and their time at --peak_tflops (the floor a step could reach
if it were bound by matrix arithmetic alone).

GPU (one H100):
  python -m tools.benchmarks.benchmark_scenes_step --preset gpu \
    --json $OUT/scenes_step.json
CPU smoke test:
  python -m tools.benchmarks.benchmark_scenes_step --preset tiny --steps 2 \
    --modes none --roles target
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from tools.lib import backends as bk
from tools.lib.environment import environment
from tools.scenes import models, text, train_data, training, world


def step_flops(
  preset: models.Preset, role: str, width: int, vocab: int, scored: int
):
  """FLOPs of one training step of `role` on batches `width` tokens wide,
  `scored` of them after the media (the positions the LM head scores):
  {"weights": products with weights (2 per weight per token, x 3 for
  forward + backward; x 2 for the patch convolutions, whose input needs no
  gradient), "attention": the two T x T products per layer (counted in
  full, as the kernels compute them; x 3)}."""
  b, h = preset.batch_size, preset.hidden
  layers = preset.target_layers if role == "target" else preset.drafter_layers
  kv = h * preset.kv_heads // preset.heads
  per_token = layers * (2 * h * h + 2 * h * kv + 3 * h * preset.intermediate)
  weights = 3 * 2 * b * width * per_token
  weights += 3 * 2 * b * scored * h * vocab  # the LM head
  attention = 3 * layers * b * 4 * width * width * h
  if role == "target":
    v, imgs = preset.vision_hidden, b * world.NUM_FRAMES
    patches = (world.SIZE // preset.patch) ** 2
    n = patches + 1  # + CLS
    weights += 3 * 2 * imgs * n * (preset.vision_layers * 12 * v * v)
    weights += 3 * 2 * imgs * n * (v * h + h * h)  # the projector
    weights += 2 * 2 * imgs * patches * 3 * preset.patch**2 * v
    attention += 3 * preset.vision_layers * imgs * 4 * n * n * v
  else:
    n, enc = models.event_tokens(preset), 2 * h
    chans = 2 * (world.NUM_FRAMES - 1)
    weights += 3 * 2 * b * n * (enc * h + h * h)
    weights += 2 * 2 * b * n * chans * preset.event_patch**2 * enc
  return {"weights": float(weights), "attention": float(attention)}


def text_positions(batches) -> int:
  """Positions of a batch after the media (where the LM head scores)."""
  return batches.width - batches.prompts.media_span()[1]


def measure(preset, role: str, mode: str, stream: bool, steps: int, device):
  """One row: build, compile, train 1 + prefetched + `steps` steps
  (make_pair's batches, loss and step; the last `steps` timed); returns
  the timings."""
  tokenizer = text.train_tokenizer(
    world.split_seeds("train", preset.tokenizer_scenes), preset.vocab_size
  )
  pool = world.split_seeds("train", min(preset.pool_scenes, 512))
  scenes = [world.make_scene(s) for s in pool]
  batches = train_data.make_batches(role, tokenizer, scenes, preset, 0)
  executor = None
  if stream:
    executor = train_data.make_executor({role: batches}, preset.workers)
  frames, events = train_data.render_pool(pool, executor)
  torch.manual_seed(0)
  build = models.build_target if role == "target" else models.build_drafter
  model = build(preset, tokenizer).to(device)
  media = frames if role == "target" else events
  # The stream's first batches were made while the first step compiled:
  # they are stepped through untimed, so the timed steps are fed as fast
  # as the workers make batches.
  drain = train_data.prefetch(executor)
  if mode in training.GRAPH_MODES:  # warm-up and capture are untimed too
    drain = max(drain, training.TrainStep.WARMUP)
  total = 1 + drain + steps
  step = training.make_step(
    role, model, media, batches, preset, total, device, mode
  )
  if stream:
    source = train_data.stream(batches, role, total, executor)
  else:
    made = [batches(i) for i in range(total)]
    source = iter([[train_data.to_device(x, device) for x in b] for b in made])
  model.train()
  sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
  sync()
  t0 = time.perf_counter()
  for _ in range(1 + drain):
    step(next(source))
  sync()
  t1 = time.perf_counter()
  for batch in source:
    loss = step(batch)
  sync()
  t2 = time.perf_counter()
  if executor is not None:
    executor.shutdown()
  flops = step_flops(
    preset, role, batches.width, len(tokenizer), text_positions(batches)
  )
  flops = sum(flops.values())
  return {
    "role": role,
    "mode": mode + ("/stream" if stream else ""),
    "first_step_s": round(t1 - t0, 2),  # with the drained ones
    "untimed_steps": 1 + drain,
    "ms_per_step": round(1e3 * (t2 - t1) / steps, 2),
    "tflop_per_step": round(flops / 1e12, 3),
    "batch": [preset.batch_size, batches.width],
    "final_loss": float(loss),
  }


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--preset", default="gpu", help=f"one of {list(models.PRESETS)}"
  )
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="change one field of the preset (as make_pair --set)",
  )
  p.add_argument("--roles", default="target,drafter")
  p.add_argument(
    "--modes",
    default="none,model,layers",
    help=f"compile modes, from {list(training.COMPILE_MODES)}",
  )
  p.add_argument(
    "--stream_modes",
    default="model",
    help="modes also measured with make_pair's worker stream ('' for none)",
  )
  p.add_argument("--steps", type=int, default=50, help="timed steps a row")
  p.add_argument("--peak_tflops", type=float, default=785.0)
  p.add_argument("--device", default=None)
  p.add_argument("--json", default=None, help="write the rows here")
  p.add_argument("--row", default=None, help=argparse.SUPPRESS)
  return p


def _split(value: str) -> list[str]:
  return [v.strip() for v in value.split(",") if v.strip()]


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    preset = models.resolve_preset(args.preset, args.set)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  device = bk.torch_device(args.device)
  modes, streams = _split(args.modes), _split(args.stream_modes)
  roles = _split(args.roles)
  for name, values, allowed in (
    ("--modes", modes + streams, training.COMPILE_MODES),
    ("--roles", roles, ("target", "drafter")),
  ):
    if bad := sorted(set(values) - set(allowed)):
      print(
        f"error: {name}: {bad} unknown; expected {allowed}", file=sys.stderr
      )
      return 2
  if args.row:  # one row, in this (fresh) process
    role, mode, stream = args.row.split(":")
    row = measure(preset, role, mode, stream == "1", args.steps, device)
    print(json.dumps(row))
    return 0
  rows, failed = [], 0
  plan = [(r, m, "0") for r in roles for m in modes]
  plan += [(r, m, "1") for r in roles for m in streams]
  for role, mode, stream in plan:
    with tempfile.TemporaryDirectory() as cache:
      env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
      cmd = [sys.executable, "-m", __spec__.name, "--row"]
      cmd += [f"{role}:{mode}:{stream}"] + (argv or sys.argv[1:])
      out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    name = mode + ("/stream" if stream == "1" else "")
    if out.returncode:  # reported, and the other rows still run
      failed += 1
      lines = out.stderr.strip().splitlines() or ["(no output)"]
      rows.append({"role": role, "mode": name, "error": lines[-1]})
      print(f"{role:8s} {name:14s} FAILED: {lines[-1]}", flush=True)
      continue
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["floor_ms"] = round(row["tflop_per_step"] / args.peak_tflops * 1e3, 2)
    rows.append(row)
    print(
      f"{row['role']:8s} {row['mode']:14s} first step "
      f"{row['first_step_s']:7.2f} s  {row['ms_per_step']:8.2f} ms/step  "
      f"({row['tflop_per_step']:.2f} TFLOP: {row['floor_ms']:.2f} ms at "
      f"{args.peak_tflops:g} TFLOP/s)",
      flush=True,
    )
  if args.json:
    meta = {
      "device": torch.cuda.get_device_name(device)
      if device.type == "cuda"
      else platform.processor() or "cpu",
      **environment(("torch",)),
      "preset": args.preset,
      "set": args.set,
      "steps": args.steps,
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
