r"""Benchmarks the hidden-state dump against the reference extraction method.

Two Llama models of a given shape (Vicuna-7B by default) with random weights
stand in for the drafter and the target; random token prompts of about
--prompt_len tokens stand in for the visual tokens + question, so no media is
needed. EOS is suppressed so every generation runs --max_new_tokens steps
and both methods do the same amount of decoding. Measured in the same run:

  reference       per sample and per model, HF `generate(do_sample=False,
                  output_hidden_states=True, return_dict_in_generate=True)`,
                  keeping the last layer at every step, moved to the CPU as
                  float32 (REFERENCE_NOTES §4.3 / D16);
  teacher_forced  our dump (tools/dump_hidden_states.run_batch): batched
                  greedy target generation with a KV cache, final post-norm
                  state only, then one batched drafter forward over the
                  target's tokens; states to the CPU;
  free_running    our batched version of the reference's pairing.

Disk writes are excluded from both. Prints a table and writes JSON to --out.

GPU (the lead runs this on the H100):
  python -m tools.benchmarks.benchmark_dump --out bench_dump.json
CPU smoke test:
  python -m tools.benchmarks.benchmark_dump --small --out /tmp/bench_dump.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import tqdm

from egpt_align.data.format import write_json_atomic
from tools.lib import backends as bk
from tools.lib import generation, media, random_models
from tools.lib.environment import environment

SMALL = {
  "hidden": 64,
  "layers": 2,
  "heads": 4,
  "intermediate": 128,
  "vocab": 256,
  "prompt_len": 48,
  "prompt_jitter": 8,
  "max_new_tokens": 8,
  "num_samples": 8,
  "ref_samples": 4,
  "batch_size": 4,
  "dtype": "float32",
}


class TokenPromptBackend(bk.HFBackend):
  """A causal LM whose 'prompt' is a ready token-id list in the sample."""

  def __init__(self, model, *, name: str, eos_token_id: int = 2):
    super().__init__(
      model,
      model.get_decoder(),
      model.get_output_embeddings(),
      model_id=f"random:{name}",
      name=name,
    )
    self.eos_token_id, self.eos_token_ids = eos_token_id, (eos_token_id,)
    self.pad_token_id = 0

  def prompt_inputs(self, sample: dict) -> dict:
    ids = torch.tensor([sample["media"]["input_ids"]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def build_model(args, seed: int, device, dtype):
  """A random-weight LlamaForCausalLM of the requested shape."""
  model = random_models.random_llama(
    dict(
      vocab_size=args.vocab,
      hidden_size=args.hidden,
      intermediate_size=args.intermediate,
      num_hidden_layers=args.layers,
      num_attention_heads=args.heads,
      num_key_value_heads=args.heads,
      max_position_embeddings=max(4096, args.prompt_len + args.max_new_tokens),
      bos_token_id=1,
      eos_token_id=2,
      pad_token_id=0,
    ),
    seed=seed,
    device=device,
    dtype=dtype,
  )
  model.generation_config.eos_token_id = 2
  model.generation_config.pad_token_id = 0
  return model


def make_samples(args, n: int, seed: int) -> list[dict]:
  """Random token prompts (lengths prompt_len - jitter .. prompt_len)."""
  g = torch.Generator().manual_seed(seed)
  out = []
  for i in range(n):
    per_role = {}
    for role in ("target", "draft"):
      span = args.prompt_jitter + 1
      length = args.prompt_len - int(torch.randint(0, span, (), generator=g))
      ids = torch.randint(3, args.vocab, (length,), generator=g)
      per_role[role] = {"input_ids": [1] + ids.tolist()[1:]}
    out.append({"id": f"b{i}", "question": "", "media": per_role})
  return out


def _sync(device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def reference_dump(models, samples, args) -> int:
  """The reference method; returns the number of stored positions."""
  positions = 0
  for s in tqdm.tqdm(samples, desc="reference", unit="sample", leave=False):
    lengths = []
    for role, model in models.items():
      ids = torch.tensor([s["media"][role]["input_ids"]], device=model.device)
      out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=args.max_new_tokens,
        suppress_tokens=[2],
        output_hidden_states=True,
        return_dict_in_generate=True,
      )
      states = torch.stack([h[-1][0, -1] for h in out.hidden_states])
      lengths.append(states.float().cpu().shape[0])
    positions += min(lengths)
  return positions


def our_dump(backends, samples, args, pairing: str) -> int:
  """Our batched dump (dump_hidden_states.run_batch); returns positions."""
  target, draft = backends["target"], backends["draft"]
  positions = 0
  bs = args.batch_size
  for k in tqdm.tqdm(range(0, len(samples), bs), desc=pairing, leave=False):
    items = []
    for s in samples[k : k + bs]:
      t_in = target.prompt_inputs(media.role_view(s, "target"))
      d_in = draft.prompt_inputs(media.role_view(s, "draft"))
      items.append((s, t_in, d_in))
    results = generation.run_batch(
      target,
      draft,
      items,
      pairing=pairing,
      max_new_tokens=args.max_new_tokens,
      suppress_tokens=[2],
    )
    for s, rec in results:
      if isinstance(rec, str):
        raise RuntimeError(f"sample {s['id']} failed: {rec}")
      positions += len(rec["target_tokens"])
  return positions


def timed(fn, device, *a):
  _sync(device)
  start = time.perf_counter()
  out = fn(*a)
  _sync(device)
  return out, time.perf_counter() - start


def build_parser() -> argparse.ArgumentParser:
  """The command-line interface."""
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--hidden", type=int, default=4096)
  p.add_argument("--layers", type=int, default=32)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--intermediate", type=int, default=11008)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--prompt_len", type=int, default=600, help="prompt tokens")
  p.add_argument(
    "--prompt_jitter", type=int, default=16, help="prompt lengths vary by"
  )
  p.add_argument("--max_new_tokens", type=int, default=50)
  p.add_argument("--num_samples", type=int, default=64, help="ours")
  p.add_argument(
    "--ref_samples", type=int, default=8, help="reference (it is slow)"
  )
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--dtype", default=None, choices=sorted(bk.DTYPES))
  p.add_argument("--device", default=None, help="default: cuda if available")
  p.add_argument(
    "--methods",
    default="reference,teacher_forced,free_running",
    help="comma list of reference, teacher_forced, free_running",
  )
  p.add_argument("--small", action="store_true", help="tiny CPU smoke test")
  p.add_argument("--out", default=None, help="write the results JSON here")
  return p


def main(argv=None) -> int:
  """Runs the benchmark; returns the exit status."""
  p = build_parser()
  args = p.parse_args(argv)
  if args.small:
    given = {a for a in (argv if argv is not None else sys.argv[1:])}
    for k, v in SMALL.items():
      if f"--{k}" not in given:
        setattr(args, k, v)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = set(methods) - {"reference", "teacher_forced", "free_running"}
  if unknown:
    p.error(f"unknown --methods {sorted(unknown)}")
  if args.prompt_jitter >= args.prompt_len:
    p.error("--prompt_jitter must be < --prompt_len")
  device = bk.torch_device(args.device)
  dtype_name = args.dtype or (
    "bfloat16" if device.type == "cuda" else "float32"
  )
  dtype = bk.torch_dtype(dtype_name)
  torch.set_grad_enabled(False)

  print(f"building 2 random models on {device} ({dtype_name})", file=sys.stderr)
  models = {
    "target": build_model(args, 0, device, dtype),
    "draft": build_model(args, 1, device, dtype),
  }
  params = sum(x.numel() for x in models["target"].parameters())
  backends = {r: TokenPromptBackend(m, name=r) for r, m in models.items()}
  samples = make_samples(args, args.num_samples, seed=0)
  warm = make_samples(args, min(2, args.batch_size), seed=1)

  results = {}
  for method in methods:
    n = args.ref_samples if method == "reference" else args.num_samples
    todo = samples[:n]
    if method == "reference":
      reference_dump(models, warm[:1], args)  # warm-up
      pos, secs = timed(reference_dump, device, models, todo, args)
    else:
      our_dump(backends, warm, args, method)  # warm-up
      pos, secs = timed(our_dump, device, backends, todo, args, method)
    results[method] = {
      "samples": len(todo),
      "positions": pos,
      "seconds": secs,
      "samples_per_s": len(todo) / secs,
      "positions_per_s": pos / secs,
    }
  if "reference" in results:
    ref = results["reference"]["samples_per_s"]
    for r in results.values():
      r["speedup_vs_reference"] = r["samples_per_s"] / ref

  dev_name = (
    torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
  )
  report = {
    "benchmark": "tools/benchmarks/benchmark_dump.py",
    "device": dev_name,
    "dtype": dtype_name,
    **environment(("torch", "transformers")),
    "params_per_model": params,
    "config": {
      k: getattr(args, k)
      for k in (
        "hidden",
        "layers",
        "heads",
        "intermediate",
        "vocab",
        "prompt_len",
        "prompt_jitter",
        "max_new_tokens",
        "num_samples",
        "ref_samples",
        "batch_size",
      )
    },
    "results": results,
  }
  if device.type == "cuda":
    report["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

  print(
    f"\n{dev_name}, {dtype_name}, {params / 1e9:.2f}B params/model, prompt "
    f"~{args.prompt_len}, {args.max_new_tokens} new tokens, batch "
    f"{args.batch_size}"
  )
  print(
    f"{'method':<16}{'samples':>8}{'seconds':>10}{'samples/s':>11}"
    f"{'pos/s':>10}{'speedup':>9}"
  )
  for name, r in results.items():
    sp = r.get("speedup_vs_reference")
    print(
      f"{name:<16}{r['samples']:>8}{r['seconds']:>10.2f}"
      f"{r['samples_per_s']:>11.3f}{r['positions_per_s']:>10.1f}"
      f"{(f'{sp:.1f}x' if sp else '-'):>9}"
    )
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  from egpt_align import cli

  sys.exit(cli.run(main))
