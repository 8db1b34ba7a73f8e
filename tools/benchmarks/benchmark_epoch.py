r"""End-to-end training throughput: valid tokens/s of whole trainer epochs.

Writes a dataset of N samples at hidden D with reference-like lengths (mean
34, max 50; tools/benchmarks/datasets.py) to a directory, then runs the real
trainer (`egpt_align.train.train_and_evaluate`) on it for each level and
data mode (`cache=none`: memory-mapped streaming from disk; `cache=device`:
the dataset uploaded to accelerator memory once) and reads the epoch's
valid tokens/s from the run's metrics JSONL. The first epoch includes
compilation, so the figure is taken from the last epoch; checkpoints are
off and validation (a 1% hold-out) falls outside the timed train loop.

  # GPU, full size:
  python -m tools.benchmarks.benchmark_epoch --levels l1,l4,l5f \
    --out runs/bench_epoch
  # CPU smoke test:
  python -m tools.benchmarks.benchmark_epoch --small --out /tmp/bench_epoch
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from egpt_align import train  # noqa: E402
from egpt_align.configs import base  # noqa: E402
from tools.benchmarks import datasets  # noqa: E402
from tools.lib.environment import environment


def run_level(name, data_dir, workdir, *, cache, batch_size, epochs, dtype):
  """Trains `epochs` epochs; returns the per-epoch train records."""
  config = base.get_config()
  config.model.name = name
  config.model.dtype = dtype
  config.data.train = data_dir
  config.data.val_fraction = 0.01  # a token hold-out; not timed
  config.data.cache = cache
  config.batch_size = batch_size
  config.num_epochs = epochs
  config.eval_at_start = False
  config.early_stopping_patience = 0
  config.log_every_steps = 1_000_000  # one host fetch per epoch
  config.checkpoint.enabled = False
  config.progress_bar = False
  t0 = time.perf_counter()
  train.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - t0
  records = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if "train/tokens_per_sec" in rec:
        records.append(rec)
  return records, wall


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--levels", default="l1,l4,l5f")
  p.add_argument("--caches", default="none,device")
  p.add_argument("--num_samples", type=int, default=8192)
  p.add_argument("--hidden_dim", type=int, default=4096)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--dtype", default="auto")
  p.add_argument("--data_dir", default=None, help="reuse/keep the dataset")
  p.add_argument("--small", action="store_true", help="CPU smoke test sizes")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  if args.small:
    args.num_samples, args.hidden_dim, args.batch_size = 128, 64, 16
    args.epochs = 2
  rng = np.random.default_rng(0)
  data_dir = args.data_dir or tempfile.mkdtemp(prefix="bench_epoch_data_")
  if not os.path.exists(os.path.join(data_dir, "header.json")):
    lengths = datasets.reference_lengths(args.num_samples, rng)
    datasets.write_dataset(
      data_dir, lengths, args.hidden_dim, rng, samples_per_shard=4096
    )
  info = {
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    **environment(("jax",)),
    "device": str(jax.devices()[0].device_kind),
    "num_samples": args.num_samples,
    "hidden_dim": args.hidden_dim,
    "batch_size": args.batch_size,
  }
  print(f"# {info}", flush=True)
  rows = []
  for name in [x for x in args.levels.split(",") if x]:
    for cache in [x for x in args.caches.split(",") if x]:
      workdir = tempfile.mkdtemp(prefix=f"bench_epoch_{name}_{cache}_")
      records, wall = run_level(
        name,
        data_dir,
        workdir,
        cache=cache,
        batch_size=args.batch_size,
        epochs=args.epochs,
        dtype=args.dtype,
      )
      row = {
        "level": name,
        "cache": cache,
        "tokens_per_s_last_epoch": records[-1]["train/tokens_per_sec"],
        "tokens_per_s_epochs": [r["train/tokens_per_sec"] for r in records],
        "wall_s": wall,
      }
      rows.append(row)
      print(json.dumps(row), flush=True)
  print()
  print("| level | data | valid tokens/s (last epoch) |")
  print("|---|---|---|")
  for r in rows:
    print(
      f"| {r['level']} | {r['cache']} | {r['tokens_per_s_last_epoch']:,.0f} |"
    )
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmark_epoch.json"), "w") as f:
      json.dump({"info": info, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  from egpt_align import cli

  sys.exit(cli.run(main))
