"""`python -m egpt_align.data inspect|synthetic DIR`: dataset tools."""

import argparse
import json
import os
import sys

import numpy as np
from tqdm import tqdm

from egpt_align.data import format as fmt
from egpt_align.data.reader import open_dataset, shard_value_stats


def length_histogram(lengths: np.ndarray, *, bins: int = 10, width: int = 40):
  """Lines of a text histogram of sequence lengths."""
  if lengths.size == 0:
    return ["(no samples)"]
  lo, hi = int(lengths.min()), int(lengths.max())
  edges = np.linspace(lo, hi + 1, min(bins, hi - lo + 1) + 1)
  counts, _ = np.histogram(lengths, bins=edges)
  top = max(1, counts.max())
  lines = []
  for c, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
    a_i, b_i = int(np.ceil(a)), int(np.ceil(b)) - 1
    bar = "#" * int(round(width * c / top))
    lines.append(f"  {a_i:5d}-{b_i:<5d} {c:8d} {bar}")
  return lines


def inspect(path: str, *, values: bool = True, checksums: bool = False):
  """Prints a summary; returns (report dict, number of NaN/Inf values)."""
  ds = open_dataset(path)
  h = ds.header
  lengths = ds.lengths
  print(f"dataset    {path}")
  print(f"format     {h['format']} v{h['version']}")
  print(f"samples    {ds.num_samples}")
  print(f"positions  {h['num_positions']}")
  print(f"dims       source {ds.source_dim}, target {ds.target_dim}")
  print(f"dtype      {h['dtype']}")
  print(
    f"tokens     target_tokens={ds.has_target_tokens} "
    f"draft_tokens={ds.has_draft_tokens}"
  )
  print(f"shards     {len(ds.shards)}")
  if lengths.size:
    print(
      f"lengths    mean {lengths.mean():.2f} std {lengths.std():.2f} "
      f"min {lengths.min()} max {lengths.max()}"
    )
  print("length histogram")
  for line in length_histogram(lengths):
    print(line)
  print("provenance")
  for k, v in h["provenance"].items():
    print(f"  {k}: {json.dumps(v)}")
  report = {
    "path": path,
    "num_samples": ds.num_samples,
    "num_positions": h["num_positions"],
    "source_dim": ds.source_dim,
    "target_dim": ds.target_dim,
    "dtype": h["dtype"],
    "provenance": h["provenance"],
    "shards": [],
  }
  total_bad = 0
  if values or checksums:
    print("shards")
    print(
      f"  {'name':12s} {'samples':>8s} {'stream':>7s} {'nan/inf':>8s} "
      f"{'|h| mean':>9s} {'std':>8s} {'min':>8s} {'max':>8s}"
    )
    rows = []
    for shard in tqdm(ds.shards, desc="checking shards", unit="shard"):
      entry = {"name": shard.name, "num_samples": shard.num_samples}
      if checksums:
        bad = [
          f
          for f, info in shard.info["files"].items()
          if "crc32" in info
          and fmt.file_crc32(f"{shard.dir}/{f}") != info["crc32"]
        ]
        entry["checksum_errors"] = bad
      if values:
        for stream, arr in shard.states.items():
          s = shard_value_stats(arr, shard.offsets)
          entry[stream] = s
          total_bad += s["nonfinite"]
      rows.append(entry)
    for entry in rows:
      for stream in fmt.STATE_STREAMS if values else ():
        s = entry[stream]
        print(
          f"  {entry['name']:12s} {entry['num_samples']:8d} {stream:>7s} "
          f"{s['nonfinite']:8d} {s['norm_mean']:9.3f} {s['norm_std']:8.3f} "
          f"{s['norm_min']:8.3f} {s['norm_max']:8.3f}"
        )
      if entry.get("checksum_errors"):
        print(
          f"  {entry['name']}: CHECKSUM MISMATCH {entry['checksum_errors']}"
        )
    report["shards"] = rows
  if total_bad:
    print(f"FOUND {total_bad} NaN/Inf values")
  return report, total_bad


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m egpt_align.data",
    description="Tools for egpt_align hidden-state datasets.",
  )
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser(
    "inspect",
    help="summary and sanity check of a dataset directory",
    description=(
      "Prints samples, length histogram, dims, dtype, provenance and, per "
      "shard, NaN/Inf counts and L2-norm statistics of the states. Exits "
      "with status 1 if any NaN/Inf (or checksum mismatch) is found."
    ),
  )
  p.add_argument("dir", help="dataset directory (holds header.json)")
  p.add_argument(
    "--no-values",
    action="store_true",
    help="skip the per-shard value scan (reads every state)",
  )
  p.add_argument(
    "--checksums", action="store_true", help="also verify CRC-32 of files"
  )
  p.add_argument("--json", help="also write the report as JSON here")
  p = sub.add_parser(
    "synthetic",
    help="write a learnable synthetic dataset (demo, tests)",
    description=(
      "Writes paired synthetic sequences (AR(1) source, nonlinear temporal "
      "target map plus noise; see egpt_align/data/synthetic.py) and, with "
      "--lm_head, the matching LM head in the lm_head file format."
    ),
  )
  p.add_argument("dir", help="output dataset directory (must not exist)")
  p.add_argument("--num_samples", type=int, default=2000)
  p.add_argument("--hidden_dim", type=int, default=128)
  p.add_argument("--min_len", type=int, default=5)
  p.add_argument("--max_len", type=int, default=50)
  p.add_argument("--seed", type=int, default=0, help="sample seed")
  p.add_argument(
    "--mapping_seed",
    type=int,
    default=0,
    help="seed of the source->target map; keep it equal for train and val",
  )
  p.add_argument("--vocab_size", type=int, default=256)
  p.add_argument("--lm_head", help="also write the LM head to PATH(.npy)")
  args = parser.parse_args(argv)
  if args.command == "synthetic":
    from egpt_align.data import synthetic

    if os.path.exists(os.path.join(args.dir, fmt.HEADER_FILE)):
      print(f"error: {args.dir} already holds a dataset", file=sys.stderr)
      return 2
    synthetic.write_synthetic_dataset(
      args.dir,
      args.num_samples,
      hidden_dim=args.hidden_dim,
      min_len=args.min_len,
      max_len=args.max_len,
      seed=args.seed,
      mapping_seed=args.mapping_seed,
      vocab_size=args.vocab_size,
      lm_head_path=args.lm_head,
    )
    print(f"wrote {args.num_samples} samples to {args.dir}")
    return 0
  try:
    report, bad = inspect(
      args.dir, values=not args.no_values, checksums=args.checksums
    )
  except (fmt.DatasetFormatError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  crc_bad = any(s.get("checksum_errors") for s in report["shards"])
  return 1 if bad or crc_bad else 0


if __name__ == "__main__":
  from egpt_align import cli

  sys.exit(cli.run(main))
