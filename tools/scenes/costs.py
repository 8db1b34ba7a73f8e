"""Per-call costs of the scenes pair and of one B1 adapter step (batch 1).

  python -m tools.scenes.costs (--pair DIR | --preset NAME) [--device cuda]
      [--dtype float16] [--runtime eager,fast] [--repeats 50]
      [--json OUT.json]

`--pair` measures a pair made by tools.scenes.make_pair; `--preset` one
built untrained from that preset (costs do not depend on the weights), in
a temporary directory. On the prompt of one held-out scene, the median of
`--repeats` calls after warm-up, each timed as the live benchmark times its
spans (CUDA events around the call, the device synchronised between
calls; perf_counter on a CPU), on each runtime of the live SD benchmark:
  eager  the backends' HF forward with a KV cache (cropped back after each
         decode call); the B1 adapter twin's cached `decode_step` and an
         argmax over the target's LM head;
  fast   what the fast runtime runs (tools/lib/static_kv.py): the prefill
         is the backend's forward plus the copy of its cache into static
         buffers; a decode step is one `StaticLM.step` (compiled layers
         replayed as a CUDA graph); the B1 step is one `StaticAdapter`
         step, the target's LM head and argmax included.
Rows: target_prefill / drafter_prefill (the prompt, media included),
target_decode / drafter_decode (one token on top of that prompt), b1_step
(the B1 twin with the experiments' defaults at the pair's hidden size).
Prints, per runtime, the ratios the study's pair is designed for (GOALS):
drafter decode / target decode >= 0.8 and B1 step / target decode <= 0.07
(the real pair's drafter and target both decode with Vicuna-7B), target
prefill / drafter prefill >= 3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from egpt_align.data.format import write_json_atomic
from tools.lib import adapter_steps, static_kv, twins
from tools.lib import backends as bk
from tools.scenes import models, text, world
from tools.scenes import pair as pair_lib

RUNTIMES = ("eager", "fast")
# Ratio: (comparison, bound) the study's pair is designed to meet.
GOALS = {
  "drafter_decode_over_target_decode": (">=", 0.8),
  "b1_step_over_target_decode": ("<=", 0.07),
  "target_prefill_over_drafter_prefill": (">=", 3.0),
}
# The position of the B1 step (an answer this long so far).
B1_POSITION = 64


def median_ms(fn, device, repeats: int, warmup: int = 3) -> float:
  """Median ms of `fn()` over `repeats` calls after `warmup` ones: CUDA
  events around each call, the device synchronised between calls (as the
  live benchmark's spans); perf_counter on a CPU."""
  device = torch.device(device)
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    if device.type == "cuda":
      torch.cuda.synchronize(device)
      start = torch.cuda.Event(enable_timing=True)
      end = torch.cuda.Event(enable_timing=True)
      start.record()
      fn()
      end.record()
      torch.cuda.synchronize(device)
      times.append(start.elapsed_time(end))
    else:
      t0 = time.perf_counter()
      fn()
      times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def _prefill(backend, inputs):
  """(batch, cache, prompt length, greedy next token [1, 1])."""
  batch = backend.collate([inputs])
  _, logits, cache = backend.forward(batch, logits_to_keep=1)
  nxt = logits[:, -1].argmax(-1, keepdim=True)
  return batch, cache, bk.cache_length(cache), nxt


@torch.inference_mode()
def eager_costs(backend, inputs, repeats: int) -> dict:
  """Prefill and one-token decode ms of a backend on the HF path."""
  batch, cache, base, nxt = _prefill(backend, inputs)

  def decode():
    backend.forward(input_ids=nxt, past_key_values=cache, logits_to_keep=1)
    bk.crop_cache(cache, base)

  return {
    "prefill_ms": median_ms(
      lambda: backend.forward(batch, logits_to_keep=1), backend.device, repeats
    ),
    "decode_ms": median_ms(decode, backend.device, repeats),
    "prompt_tokens": int(batch["input_ids"].shape[1]),
  }


@torch.inference_mode()
def fast_costs(backend, inputs, repeats: int) -> dict:
  """Prefill and one-token decode ms of a backend as the fast runtime runs
  them: the forward plus the copy of its cache into a `StaticLM`, then one
  `StaticLM.step` (a captured graph on CUDA)."""
  batch, cache, base, nxt = _prefill(backend, inputs)
  lm = backend.static_decoder(
    static_kv.static_length(base + B1_POSITION + 1), lengths=(1,)
  )

  def prefill():
    _, _, c = backend.forward(batch, logits_to_keep=1)
    lm.load_prefix(c, base)

  lm.load_prefix(cache, base)
  return {
    "prefill_ms": median_ms(prefill, backend.device, repeats),
    # Decoding at one position over and over: a rollback is free.
    "decode_ms": median_ms(lambda: lm.step(nxt, base), lm.device, repeats),
    "prompt_tokens": int(batch["input_ids"].shape[1]),
    "mode": lm.mode,
  }


def _b1(hidden: int, device, dtype):
  adapter = twins.build_torch_adapter("b1", hidden_dim=hidden)
  return adapter.to(device, dtype).eval()


@torch.inference_mode()
def eager_b1_ms(hidden: int, lm_head, repeats: int) -> tuple[float, str]:
  """One cached B1 decode step + LM-head argmax at B1_POSITION: (ms,
  'eager')."""
  device, dtype = lm_head.device, lm_head.dtype
  adapter = _b1(hidden, device, dtype)
  cache = adapter.init_cache(1, adapter.max_seq_len)
  prefix = torch.randn(1, B1_POSITION, hidden, device=device, dtype=dtype)
  adapter.decode_step(prefix, cache)
  x = torch.randn(1, 1, hidden, device=device, dtype=dtype)

  def step():
    y, _ = adapter.decode_step(x, cache, position=B1_POSITION)
    (y[0, -1] @ lm_head.T).argmax(-1)

  return median_ms(step, device, repeats), "eager"


@torch.inference_mode()
def fast_b1_ms(hidden: int, lm_head, repeats: int) -> tuple[float, str]:
  """One `StaticAdapter` B1 step (LM head and argmax included) at
  B1_POSITION, as the fast runtime drafts: (ms, the step's mode)."""
  device, dtype = lm_head.device, lm_head.dtype
  adapter = _b1(hidden, device, dtype)
  length = static_kv.static_length(B1_POSITION + 1)
  step = adapter_steps.StaticAdapter(
    adapter,
    lm_head,
    1,
    min(length, adapter.max_seq_len),
    device=device,
    dtype=dtype,
    lengths=(1,),
  )
  x = torch.randn(1, 1, hidden, device=device, dtype=dtype)
  ms = median_ms(lambda: step.step([x], B1_POSITION), device, repeats)
  return ms, step.mode


def ratios(got: dict) -> dict:
  """The GOALS' ratios of one runtime's costs, and whether each is met."""
  t, d = got["target"], got["drafter"]
  values = {
    "drafter_decode_over_target_decode": d["decode_ms"] / t["decode_ms"],
    "b1_step_over_target_decode": got["b1_step_ms"] / t["decode_ms"],
    "target_prefill_over_drafter_prefill": t["prefill_ms"] / d["prefill_ms"],
  }
  met = {}
  for name, (cmp, bound) in GOALS.items():
    v = values[name]
    met[name] = bool(v >= bound if cmp == ">=" else v <= bound)
  return {"values": values, "met": met}


def measure(pair: str, device, dtype: str, repeats: int, runtimes=RUNTIMES):
  """Costs of the pair in directory `pair` on each of `runtimes`."""
  target = bk.load_backend(
    f"video_llava:{os.path.join(pair, 'target')}", device=device, dtype=dtype
  )
  drafter = bk.load_backend(
    f"tools.scenes.drafter:make_backend:{pair}", device=device, dtype=dtype
  )
  seed = world.split_seeds("test", 1)[0]
  _, frames = world.render(seed)
  question = text.question(seed, "describe")
  prompts = pair_lib.target_prompts(target)
  t_in = pair_lib.target_inputs(target, prompts, question, frames)
  d_in = drafter.encode(question, torch.from_numpy(world.events(frames))[None])
  head = target.lm_head_weight().detach()
  per_runtime = {
    "eager": (eager_costs, eager_b1_ms),
    "fast": (fast_costs, fast_b1_ms),
  }
  out = {
    "dtype": dtype,
    "device": (
      torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ),
    "repeats": repeats,
    "shapes": shapes(pair),
  }
  for runtime in runtimes:
    model_fn, b1_fn = per_runtime[runtime]
    b1_ms, b1_mode = b1_fn(target.hidden_size, head, repeats)
    got = {
      "target": model_fn(target, t_in, repeats),
      "drafter": model_fn(drafter, d_in, repeats),
      "b1_step_ms": b1_ms,
      "b1_mode": b1_mode,
    }
    got["ratios"] = ratios(got)
    out[runtime] = got
  return out


def shapes(pair: str) -> dict:
  """The language models' shapes of both models of a pair directory."""
  with open(os.path.join(pair, "target", "config.json")) as f:
    config = json.load(f)
  t = config["text_config"]
  with open(os.path.join(pair, "drafter", models.DRAFTER_CONFIG)) as f:
    d = json.load(f)
  keys = ("hidden_size", "num_hidden_layers", "intermediate_size")
  keys += ("num_attention_heads", "num_key_value_heads")
  return {
    "target": {k: t[k] for k in keys},
    "drafter": {k: d["llama"][k] for k in keys},
    "visual_tokens": {
      "target": config["video_seq_length"],
      "drafter": d["num_event_tokens"],
    },
  }


def table(out: dict) -> str:
  """The costs and the goals' ratios, one block per runtime."""
  lines = [f"{out['device']}, {out['dtype']}, median of {out['repeats']}"]
  for runtime in RUNTIMES:
    got = out.get(runtime)
    if got is None:
      continue
    lines.append(f"{runtime} runtime:")
    for role in ("target", "drafter"):
      r = got[role]
      lines.append(
        f"  {role:8s} prefill ({r['prompt_tokens']} tokens) "
        f"{r['prefill_ms']:8.3f} ms   decode {r['decode_ms']:8.3f} ms"
      )
    lines.append(f"  b1 step (LM head + argmax)  {got['b1_step_ms']:8.3f} ms")
    for name, v in got["ratios"]["values"].items():
      cmp, bound = GOALS[name]
      ok = "met" if got["ratios"]["met"][name] else "MISSED"
      lines.append(f"  {name:38s} {v:7.3f}  (goal {cmp} {bound}: {ok})")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--pair", help="pair directory (make_pair)")
  src.add_argument(
    "--preset", help=f"an untrained pair of this preset, {list(models.PRESETS)}"
  )
  p.add_argument("--device", default=None, help="default: cuda if present")
  p.add_argument("--dtype", default="float16", choices=list(bk.DTYPES))
  p.add_argument(
    "--runtime",
    default=",".join(RUNTIMES),
    help=f"comma-separated, from {list(RUNTIMES)}",
  )
  p.add_argument("--repeats", type=int, default=50)
  p.add_argument("--json", default=None, help="write the results here")
  args = p.parse_args(argv)
  runtimes = args.runtime.split(",")
  bad = [r for r in runtimes if r not in RUNTIMES]
  if bad or args.repeats < 1:
    print(
      f"error: --runtime {args.runtime!r} / --repeats {args.repeats}: "
      f"expected runtimes from {list(RUNTIMES)} and repeats >= 1",
      file=sys.stderr,
    )
    return 2
  device = bk.torch_device(args.device)
  with tempfile.TemporaryDirectory() as tmp:
    path = args.pair
    if args.preset is not None:
      try:
        preset = models.resolve_preset(args.preset)
      except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
      path = os.path.join(tmp, "pair")
      pair_lib.save_untrained(path, preset, pair_lib.DEFAULT_SEED)
    elif not os.path.isfile(os.path.join(path, pair_lib.PAIR_FILE)):
      print(
        f"error: {os.path.join(path, pair_lib.PAIR_FILE)}: missing; --pair "
        "must be a directory written by tools.scenes.make_pair",
        file=sys.stderr,
      )
      return 2
    out = measure(path, device, args.dtype, args.repeats, runtimes)
  out["pair"] = args.pair or f"untrained preset {args.preset}"
  print(table(out))
  if args.json:
    write_json_atomic(args.json, out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
