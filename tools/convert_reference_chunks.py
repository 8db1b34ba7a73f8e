r"""Converts the reference's chunked hidden-state dumps into our dataset format.

The reference (REFERENCE_NOTES §4.1) writes `SRC/index.json` and
`SRC/chunks/chunk_XXXXXX.pt`, each a torch.save dict with `egpt_hidden` and
`vl_hidden` float32 [n, S, 4096] (zero padded), `seq_lens` [n] and a
`metadata` list. This streams them, one chunk in memory at a time, into
DST (source = egpt_hidden, target = vl_hidden, bf16 by default), keeping the
metadata texts. Rerunning after a crash skips finished chunks and samples.
A single-file dump (REFERENCE_NOTES §4.2, `hidden_states_*.pt`) is accepted as
SRC too.

Example:
  python tools/convert_reference_chunks.py \
    data/chunked_train_1s_4bit data/train_bf16
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from egpt_align.data import DatasetWriter
from egpt_align.data.format import read_header

# What the reference extraction does (REFERENCE_NOTES §4.3); recorded so live
# inference can match training.
REFERENCE_PROVENANCE = {
  "source_model": "EventGPT-7B (Vicuna-7B), NF4, bf16 compute",
  "target_model": "Video-LLaVA-7B, NF4, bf16 compute",
  "source_state": "last layer, post final RMSNorm",
  "target_state": "last layer, post final RMSNorm",
  "source_prompt": "eventgpt_v1 conversation template",
  "target_prompt": "USER: <video>\n{query} ASSISTANT:",
  "source_frames": "first event image only",
  "target_frames": "8 frames, np.linspace uniform over the mp4",
  "pairing": (
    "reference: both models generate greedily and independently (max 50 "
    "new tokens); pairs by step index, truncated to the shorter, dropped "
    "if < 5 (REFERENCE_NOTES D3: prefixes differ after the texts diverge)"
  ),
  "token_ids": "not stored by the reference",
  "converted_from": "reference fp32 chunks (cast to the stored dtype)",
}


def _load(path: str) -> dict:
  """A reference chunk; an unreadable one is an error naming the file."""
  try:
    # mmap keeps only the pages we touch resident (zipfile-format files).
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except FileNotFoundError:
    raise
  except Exception:  # Legacy (non-zip) files cannot be memory-mapped.
    pass
  try:
    chunk = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as e:
    raise ValueError(
      f"{path}: cannot read this reference chunk, it is truncated or "
      f"corrupt ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    ) from e
  if not isinstance(chunk, dict):
    raise ValueError(
      f"{path}: expected a dict of tensors, got {type(chunk).__name__}"
    )
  return chunk


def list_chunks(src: str) -> tuple[list[dict], dict]:
  """[(path, start_idx, n_samples)] and the config of a reference dump."""
  if os.path.isfile(src):
    return [{"path": src, "start_idx": 0, "n_samples": None}], {}
  index_path = os.path.join(src, "index.json")
  if not os.path.exists(index_path):
    raise FileNotFoundError(
      f"{index_path} missing: SRC must be a reference chunk directory "
      "(index.json + chunks/) or a single .pt dump"
    )
  with open(index_path) as f:
    index = json.load(f)
  if "chunks" not in index:
    raise ValueError(f"{index_path}: no 'chunks' list")
  chunks = []
  for k, c in enumerate(index["chunks"]):
    for key in ("path", "start_idx", "n_samples"):
      if key not in c:
        raise ValueError(f"{index_path}: chunks[{k}] has no {key!r}")
    path = os.path.join(src, "chunks", c["path"])
    if not os.path.exists(path):
      path = os.path.join(src, c["path"])
    chunks.append(
      {"path": path, "start_idx": c["start_idx"], "n_samples": c["n_samples"]}
    )
  config = dict(index.get("config", {}))
  config["total_samples"] = index.get("total_samples")
  config["created"] = index.get("created")
  return chunks, config


def convert(
  src: str,
  dst: str,
  *,
  dtype: str = "bfloat16",
  samples_per_shard: int = 2048,
  skip_nonfinite: bool = False,
  progress: bool = True,
) -> dict:
  """Converts SRC into DST; returns counts (written, skipped, bad)."""
  chunks, config = list_chunks(src)
  writer = None
  if os.path.exists(os.path.join(dst, "header.json")):
    header = read_header(dst)
    writer = DatasetWriter(
      dst,
      source_dim=header["source_dim"],
      target_dim=header["target_dim"],
      dtype=header["dtype"],
      samples_per_shard=samples_per_shard,
      resume=True,
    )
  counts = {"written": 0, "already_done": 0, "nonfinite_skipped": 0}
  bar = tqdm(chunks, desc="chunks", unit="chunk", disable=not progress)
  try:
    for c in bar:
      n = c["n_samples"]
      if writer is not None and n is not None:
        ids = [f"ref-{c['start_idx'] + i}" for i in range(n)]
        if all(i in writer.done_ids for i in ids):
          counts["already_done"] += n
          continue  # without loading 1.6 GB
      chunk = _load(c["path"])
      for key in ("egpt_hidden", "vl_hidden", "seq_lens", "metadata"):
        if key not in chunk:
          raise ValueError(f"{c['path']}: missing key {key!r}")
      egpt, vl = chunk["egpt_hidden"], chunk["vl_hidden"]
      seq_lens = [int(x) for x in chunk["seq_lens"]]
      meta = chunk["metadata"]
      n = len(seq_lens)
      if egpt.shape[0] != n or vl.shape[0] != n or len(meta) != n:
        raise ValueError(
          f"{c['path']}: egpt_hidden {tuple(egpt.shape)}, vl_hidden "
          f"{tuple(vl.shape)}, {n} seq_lens and {len(meta)} metadata entries "
          "disagree on the number of samples"
        )
      if egpt.ndim != 3 or vl.ndim != 3 or egpt.shape[1] != vl.shape[1]:
        raise ValueError(
          f"{c['path']}: expected egpt_hidden and vl_hidden [n, S, D] with "
          f"one S, got {tuple(egpt.shape)} and {tuple(vl.shape)}"
        )
      if writer is None:
        provenance = dict(REFERENCE_PROVENANCE)
        provenance["reference_config"] = config
        provenance["reference_dir"] = os.path.abspath(src)
        writer = DatasetWriter(
          dst,
          source_dim=int(egpt.shape[-1]),
          target_dim=int(vl.shape[-1]),
          dtype=dtype,
          samples_per_shard=samples_per_shard,
          provenance=provenance,
          resume=True,
        )
      for i in range(n):
        sample_id = f"ref-{c['start_idx'] + i}"
        if sample_id in writer.done_ids:
          counts["already_done"] += 1
          continue
        length = seq_lens[i]
        if not 1 <= length <= egpt.shape[1]:
          raise ValueError(
            f"{c['path']}: sample {i} (global {c['start_idx'] + i}) has "
            f"seq_len {length} but {egpt.shape[1]} stored positions"
          )
        source = egpt[i, :length].float().numpy()
        target = vl[i, :length].float().numpy()
        bad = [
          name
          for name, x in (("egpt_hidden", source), ("vl_hidden", target))
          if not np.isfinite(x).all()
        ]
        if bad and skip_nonfinite:
          counts["nonfinite_skipped"] += 1
          continue
        if bad:
          raise ValueError(
            f"{c['path']}: sample {i} ({sample_id}) has NaN/Inf in "
            f"{' and '.join(bad)}; pass --skip_nonfinite to skip such samples"
          )
        m = dict(meta[i]) if isinstance(meta[i], dict) else {"meta": meta[i]}
        m["id"] = sample_id
        m["reference_chunk"] = os.path.basename(c["path"])
        writer.append(source, target, meta=m)
        counts["written"] += 1
      del chunk, egpt, vl
  finally:
    if writer is not None:
      writer.close()
  return counts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=(
      "Convert the reference's fp32 chunk directory (index.json + "
      "chunks/chunk_*.pt) into an egpt_align dataset (bf16, memory-mapped). "
      "Resumable: rerun the same command after a crash."
    )
  )
  parser.add_argument("src", help="reference chunk dir or single .pt dump")
  parser.add_argument("dst", help="output dataset directory")
  parser.add_argument(
    "--dtype",
    default="bfloat16",
    choices=["bfloat16", "float16", "float32"],
    help="stored state dtype (default bfloat16)",
  )
  parser.add_argument(
    "--samples_per_shard",
    type=int,
    default=2048,
    help="samples per output shard (default 2048, ~1.1 GB at 4096 bf16)",
  )
  parser.add_argument(
    "--skip_nonfinite",
    action="store_true",
    help="skip samples with NaN/Inf instead of stopping with an error",
  )
  args = parser.parse_args(argv)
  dst_header = os.path.join(args.dst, "header.json")
  if os.path.exists(dst_header):
    print(f"resuming into {args.dst}", file=sys.stderr)
  counts = convert(
    args.src,
    args.dst,
    dtype=args.dtype,
    samples_per_shard=args.samples_per_shard,
    skip_nonfinite=args.skip_nonfinite,
  )
  print(json.dumps(counts))
  return 0


if __name__ == "__main__":
  from egpt_align import cli

  sys.exit(cli.run(main))
