"""Per-call costs of the scenes pair and of one B1 adapter step (batch 1).

  python -m tools.scenes.costs --pair DIR [--device cuda] [--dtype float16]
      [--json OUT.json]

Times, through the backends (HF eager, KV cache), the median of `--repeats`
calls after warm-up, with the device synchronised around each call:
  target_prefill / drafter_prefill: the prompt of one held-out scene;
  target_decode / drafter_decode: one token on top of that prompt's cache
    (the cache is cropped back after every call);
  b1_step: one cached decode step of the B1 adapter twin
    (tools/lib/twins.py, the experiments' defaults at the pair's hidden
    size) plus the argmax over the target's LM head, i.e. the cost of one
    EAGLE-style draft token.
Prints the ratios the pair is designed for: target decode / B1 step (>= 8)
and target prefill / drafter prefill (>= 3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from tools.lib import backends as bk
from tools.lib import twins
from tools.scenes import make_pair, text, world


def _sync(device):
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def median_ms(fn, device, repeats: int, warmup: int = 3) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


@torch.inference_mode()
def model_costs(backend, inputs, repeats: int) -> dict:
  """Prefill and one-token decode times (ms) of a backend at batch 1."""
  batch = backend.collate([inputs])
  device = backend.device
  _, logits, cache = backend.forward(batch, logits_to_keep=1)
  base = bk.cache_length(cache)
  nxt = logits[:, -1].argmax(-1, keepdim=True)

  def decode():
    backend.forward(input_ids=nxt, past_key_values=cache, logits_to_keep=1)
    bk.crop_cache(cache, base)

  return {
    "prefill_ms": median_ms(
      lambda: backend.forward(batch, logits_to_keep=1), device, repeats
    ),
    "decode_ms": median_ms(decode, device, repeats),
    "prompt_tokens": int(batch["input_ids"].shape[1]),
  }


@torch.inference_mode()
def adapter_step_ms(hidden: int, lm_head, device, dtype, repeats: int):
  """One cached B1 decode step + LM-head argmax at position 64 (ms)."""
  adapter = twins.build_torch_adapter("b1", hidden_dim=hidden, max_seq_len=1024)
  adapter = adapter.to(device, dtype).eval()
  cache = adapter.init_cache(1, 1024)
  adapter.decode_step(
    torch.randn(1, 64, hidden, device=device, dtype=dtype), cache
  )
  x = torch.randn(1, 1, hidden, device=device, dtype=dtype)

  def step():
    y, _ = adapter.decode_step(x, cache, position=64)
    (y[0, -1] @ lm_head.T).argmax(-1)

  return median_ms(step, device, repeats)


def measure(pair: str, device, dtype: str, repeats: int) -> dict:
  target = bk.load_backend(
    f"video_llava:{os.path.join(pair, 'target')}", device=device, dtype=dtype
  )
  drafter = bk.load_backend(
    f"tools.scenes.drafter:make_backend:{pair}", device=device, dtype=dtype
  )
  seed = world.split_seeds("test", 1)[0]
  _, frames = world.render(seed)
  question = text.question(seed, "describe")
  prompts = make_pair.target_prompts(target)
  t_in = make_pair.target_inputs(target, prompts, question, frames)
  d_in = drafter.encode(question, torch.from_numpy(world.events(frames))[None])
  out = {
    "target": model_costs(target, t_in, repeats),
    "drafter": model_costs(drafter, d_in, repeats),
    "b1_step_ms": adapter_step_ms(
      target.hidden_size,
      target.lm_head_weight(),
      target.device,
      target.dtype,
      repeats,
    ),
    "dtype": dtype,
    "device": (
      torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ),
    "runtime": "HF eager (transformers backends), batch 1, KV cache",
  }
  out["ratios"] = {
    "target_decode_over_b1_step": out["target"]["decode_ms"]
    / out["b1_step_ms"],
    "target_prefill_over_drafter_prefill": out["target"]["prefill_ms"]
    / out["drafter"]["prefill_ms"],
    "drafter_decode_over_target_decode": out["drafter"]["decode_ms"]
    / out["target"]["decode_ms"],
  }
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--pair", required=True, help="pair directory (make_pair)")
  p.add_argument("--device", default=None, help="default: cuda if present")
  p.add_argument("--dtype", default="float16", choices=list(bk.DTYPES))
  p.add_argument("--repeats", type=int, default=50)
  p.add_argument("--json", default=None, help="write the results here")
  args = p.parse_args(argv)
  if not os.path.isfile(os.path.join(args.pair, make_pair.PAIR_FILE)):
    print(
      f"error: {os.path.join(args.pair, make_pair.PAIR_FILE)}: missing; "
      "--pair must be a directory written by tools.scenes.make_pair",
      file=sys.stderr,
    )
    return 2
  device = bk.torch_device(args.device)
  out = measure(args.pair, device, args.dtype, args.repeats)
  print(json.dumps(out, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
