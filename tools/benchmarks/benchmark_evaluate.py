r"""End-to-end timing of `python -m egpt_align.evaluate` at the paper's size.

  # GPU, full size (11,000 samples x ~34 positions, hidden 4096, vocab 32,064)
  python -m tools.benchmarks.benchmark_evaluate --data /tmp/bench_eval \
    --out bench.json
  # CPU smoke test
  python -m tools.benchmarks.benchmark_evaluate --small \
    --out /tmp/bench_small.json

Writes a random dataset (bf16 states, lengths uniform in [min_len, max_len],
draft_tokens, no stored target tokens so the target's argmax goes through the
LM head on device: the expensive path) and a random float16 LM head, unless
--data already holds them. Then runs the evaluate CLI as a subprocess with a
freshly initialised adapter (`--adapter`), `--repeats` times, and records the
wall time of each run (Python start, imports, compile, data read, metrics,
bootstrap, plots and report included) plus the evaluator's own timing. Run 0
starts with an empty persistent compilation cache (cold: compiles); later runs
reuse it (warm), as a user's second evaluation of the same adapter would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from egpt_align import lm_head
from egpt_align.data import DatasetWriter, open_dataset


def make_data(path: str, args) -> None:
  """Random paired states; the target is a noisy copy of the source."""
  rng = np.random.default_rng(0)
  # A pool of rows sliced per sample: generating 3e9 fresh normals would
  # dominate the setup time and the content does not change the timing.
  pool = rng.normal(size=(4 * args.max_len, args.hidden)).astype(np.float32)
  noise = rng.normal(size=(4 * args.max_len, args.hidden)).astype(np.float32)
  with DatasetWriter(
    path,
    source_dim=args.hidden,
    target_dim=args.hidden,
    dtype="bfloat16",
    resume=False,
    provenance={"source_model": "random", "target_model": "random"},
  ) as w:
    for i in range(args.num_samples):
      n = int(rng.integers(args.min_len, args.max_len + 1))
      a, b = rng.integers(0, len(pool) - n, 2)
      src = pool[a : a + n]
      tgt = 0.8 * src + 0.6 * noise[b : b + n]
      draft = rng.integers(0, args.vocab, n).astype(np.int32)
      w.append(src, tgt, draft_tokens=draft, meta={"id": f"b{i}"})


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--data", default="/tmp/egpt_bench_eval")
  parser.add_argument("--out", required=True, help="results JSON")
  parser.add_argument("--small", action="store_true", help="CPU smoke sizes")
  parser.add_argument("--num_samples", type=int, default=11000)
  parser.add_argument("--hidden", type=int, default=4096)
  parser.add_argument("--vocab", type=int, default=32064)
  parser.add_argument("--min_len", type=int, default=18)
  parser.add_argument("--max_len", type=int, default=50)
  parser.add_argument("--adapter", default="l5f")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--bootstrap", type=int, default=1000)
  parser.add_argument(
    "--logits_dtype", default="float32", choices=["float32", "bfloat16"]
  )
  parser.add_argument("--pad_multiple", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=2)
  return parser


def ensure_data(args, head_path) -> None:
  """The random dataset and LM head in --data, written unless there."""
  want = (args.num_samples, args.hidden, args.vocab)
  have = None
  if os.path.exists(head_path + ".json"):
    ds = open_dataset(args.data)
    have = (
      ds.num_samples,
      ds.source_dim,
      lm_head.load_lm_head(head_path).vocab_size,
    )
  if have != want:
    print(f"writing {args.num_samples} random samples to {args.data} ...")
    make_data(args.data, args)
    w = np.random.default_rng(1).normal(size=(args.vocab, args.hidden))
    lm_head.save_lm_head(
      head_path,
      (w / np.sqrt(args.hidden)).astype(np.float16),
      model_id="random",
    )


def run_evaluate(args, head_path, cache_dir, out_dir):
  """One `egpt_align.evaluate` process over the data: (0, its timings) or
  (its exit status, None) after printing its output's tail."""
  cmd = [
    sys.executable,
    "-m",
    "egpt_align.evaluate",
    f"--adapter={args.adapter}",
    f"--data={args.data}",
    f"--lm_head={head_path}",
    f"--out={out_dir}",
    "--overwrite",  # a repeated benchmark replaces its earlier runs
    f"--batch_size={args.batch_size}",
    f"--bootstrap={args.bootstrap}",
    f"--logits_dtype={args.logits_dtype}",
    f"--pad_multiple={args.pad_multiple}",
    # A fresh cache: run 0 compiles (cold), later runs reuse it (warm).
    f"--compilation_cache={cache_dir}",
  ]
  env = dict(os.environ)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  t = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t
  if proc.returncode != 0:
    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
    return proc.returncode, None
  with open(os.path.join(out_dir, "metrics.json")) as f:
    m = json.load(f)
  return 0, {
    "wall_s": wall,
    "evaluate_s": m["timing"]["evaluate_s"],
    "device_loop_s": m["timing"]["device_loop_s"],
    "compile_s": m["timing"]["compile_s"],
    "num_samples": m["data"]["num_samples"],
    "positions": m["data"]["total_valid_positions"],
    "num_batches": m["settings"]["num_batches"],
    "devices": m["settings"]["devices"],
  }


def _print_table(args, result) -> None:
  print(
    f"\nevaluate {args.adapter}: {args.num_samples} samples, hidden "
    f"{args.hidden}, vocab {args.vocab}, batch {args.batch_size}, "
    f"logits {args.logits_dtype}, device {result['device']}"
  )
  print(
    f"{'run':>4} {'positions':>10} {'wall s':>8} {'evaluate s':>11} "
    f"{'device loop s':>14} {'compile s':>10} {'positions/s':>12}"
  )
  for i, r in enumerate(result["runs"]):
    print(
      f"{i:>4} {r['positions']:>10} {r['wall_s']:>8.2f} "
      f"{r['evaluate_s']:>11.2f} {r['device_loop_s']:>14.2f} "
      f"{r['compile_s']:>10.2f} "
      f"{r['positions'] / r['device_loop_s']:>12.0f}"
    )


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.small:
    args.num_samples, args.hidden, args.vocab = 64, 64, 512
    args.batch_size, args.repeats, args.bootstrap = 16, 1, 100
    args.min_len, args.max_len = 4, 20
    if args.data == parser.get_default("data"):
      args.data = "/tmp/egpt_bench_eval_small"
  head_path = os.path.join(args.data, "lm_head")
  t0 = time.perf_counter()
  ensure_data(args, head_path)
  setup_s = time.perf_counter() - t0

  runs = []
  cache_dir = os.path.join(args.data, "xla_cache")
  shutil.rmtree(cache_dir, ignore_errors=True)
  for r in range(args.repeats):
    out_dir = os.path.join(args.data, f"eval_run{r}")
    status, run = run_evaluate(args, head_path, cache_dir, out_dir)
    if status != 0:
      return status
    runs.append(run)

  import jax

  result = {
    "config": vars(args),
    "device": str(jax.devices()[0].device_kind),
    "setup_s": setup_s,
    "runs": runs,
  }
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  _print_table(args, result)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  from egpt_align import cli

  sys.exit(cli.run(main))
