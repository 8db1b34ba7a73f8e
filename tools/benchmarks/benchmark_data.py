r"""Input-pipeline throughput: valid tokens/s delivered to the device.

Writes a dataset of N samples at hidden D with reference-like lengths
(mean 34, std 10.4, min 5, max 50) to a temporary directory and measures,
with a consumer that, like the training loop, keeps at most --window batches
in flight (`block_until_ready` on batch k - window before taking batch k;
--window 0 waits for every batch):

  stream_cold  cache='none' (memory-mapped), page cache dropped for the
               shard files first (posix_fadvise DONTNEED; 'hot' if that fails),
               with the pipeline's background whole-file read-ahead
  stream_cold_mmap  the same without read-ahead: random reads page-faulted in
  stream_hot   cache='none', files in the page cache
  stream_hot_pinned  the same, uploads staged through pinned host memory
  host         cache='host' (this process's share in RAM, numpy gathers)
  device       cache='device' (dataset in accelerator memory, jitted gather)
  h2d          the upload ceiling: device_put of one ready padded batch
               (pageable numpy), repeated
  reference    the reference loader's approach (REFERENCE_NOTES §5.3, D14, D15):
               fp32 torch.save chunks of 1000 samples padded to 50,
               chunk-order shuffle + in-chunk randperm, per-sample Python
               batch assembly with padding to the batch maximum and a float
               mask, one-chunk prefetch thread, then device_put

Full size (GPU machine):
  python -m tools.benchmarks.benchmark_data --out bench_data.json
CPU smoke test:
  python -m tools.benchmarks.benchmark_data --num_samples 256 --hidden_dim 64 \
    --ref_chunks 1 --out /tmp/bench_data.json
"""

import argparse
import json
import os
import random
import shutil
import tempfile
import threading
import time

import jax
import numpy as np

from egpt_align import data
from tools.benchmarks.datasets import (
  reference_lengths,
  write_dataset,
)


def _reusable(path, lengths, dim) -> bool:
  """Whether `path` already holds this benchmark's dataset (--dir --keep)."""
  if not os.path.exists(os.path.join(path, "header.json")):
    return False
  try:
    ds = data.open_dataset(path)
  except Exception as e:  # noqa: BLE001 -- report, then refuse to guess
    raise SystemExit(f"{path}: existing dataset is unreadable ({e})") from e
  if ds.source_dim != dim or not np.array_equal(ds.lengths, lengths):
    raise SystemExit(
      f"{path} holds another dataset ({ds.num_samples} samples at hidden "
      f"{ds.source_dim}); use another --dir"
    )
  return True


def write_reference_chunks(path, lengths, dim, rng, chunk_size=1000):
  """The reference layout: fp32 [n, 50, D] zero-padded chunks + index.json."""
  import torch

  os.makedirs(os.path.join(path, "chunks"))
  pool = rng.standard_normal((4096 + 64, dim), dtype=np.float32)
  chunks = []
  for start in range(0, len(lengths), chunk_size):
    lens = lengths[start : start + chunk_size]
    egpt = np.zeros((len(lens), 50, dim), np.float32)
    vl = np.zeros_like(egpt)
    for i, n in enumerate(lens):
      a, b = rng.integers(0, 4096, 2)
      egpt[i, :n] = pool[a : a + n]
      vl[i, :n] = pool[b : b + n]
    name = f"chunk_{start:06d}.pt"
    torch.save(
      {
        "egpt_hidden": torch.from_numpy(egpt),
        "vl_hidden": torch.from_numpy(vl),
        "seq_lens": torch.from_numpy(lens.astype(np.int64)),
        "metadata": [{"seq_len": int(n)} for n in lens],
      },
      os.path.join(path, "chunks", name),
    )
    chunks.append({"path": name, "start_idx": start, "n_samples": len(lens)})
  with open(os.path.join(path, "index.json"), "w") as f:
    json.dump({"total_samples": len(lengths), "chunks": chunks}, f)


def drop_page_cache(paths) -> bool:
  """Asks the kernel to forget the files' cached pages (no root needed)."""
  ok = True
  for p in paths:
    try:
      fd = os.open(p, os.O_RDONLY)
      try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)
    except (OSError, AttributeError):
      ok = False
  return ok


def dataset_files(path):
  out = []
  for root, _, files in os.walk(path):
    out += [os.path.join(root, f) for f in files if f.endswith(".npy")]
  return out


class PinnedUpload:
  """The streaming pipeline with each host batch staged through page-locked
  host memory before the upload (two hops: a host copy, then a DMA).

  The variant the library dropped: the pipeline uploads directly. Reads its
  process-local numpy batches (no read-ahead threads, unlike `batches`).
  """

  def __init__(self, pipe, device):
    self.pipe = pipe
    self.pinned = jax.sharding.SingleDeviceSharding(
      device, memory_kind="pinned_host"
    )
    self.on_device = jax.sharding.SingleDeviceSharding(device)

  def __getattr__(self, name):  # plan, share_lengths, readahead, ...
    return getattr(self.pipe, name)

  def batches(self, epoch):
    for batch in self.pipe.numpy_batches(epoch):
      yield {
        k: jax.device_put(jax.device_put(v, self.pinned), self.on_device)
        for k, v in batch.items()
      }


def time_pipeline(pipe, epochs, max_steps, window=2):
  """Valid tokens/s over `epochs` epochs (at most max_steps batches each).

  Like a training loop, the consumer keeps at most `window` batches in
  flight: it waits for batch k - window to be on the device before taking
  batch k (window=0: wait for every batch as it arrives). Every batch has
  arrived when the clock stops.
  """
  import collections

  tokens = steps = padded = 0
  inflight = collections.deque()
  t0 = time.perf_counter()
  for epoch in range(epochs):
    plan = pipe.plan(epoch)[:max_steps]
    for (seq_len, pos), batch in zip(plan, pipe.batches(epoch), strict=False):
      inflight.append(batch)
      while len(inflight) > window:
        jax.block_until_ready(inflight.popleft())
      tokens += int(pipe.share_lengths[pos[pos >= 0]].sum())
      padded += len(pos) * seq_len
      steps += 1
      if steps >= max_steps * (epoch + 1):
        break
  while inflight:
    jax.block_until_ready(inflight.popleft())
  dt = time.perf_counter() - t0
  return {
    "window": window,
    "tokens": tokens,
    "steps": steps,
    "seconds": dt,
    "tokens_per_s": tokens / dt,
    "batches_per_s": steps / dt,
    "padding_fraction": 1 - tokens / max(padded, 1),
  }


def reference_loader(path, batch_size, device):
  """A re-implementation of the reference's chunked loader (§5.3, D15)."""
  import torch

  with open(os.path.join(path, "index.json")) as f:
    index = json.load(f)
  order = list(index["chunks"])
  random.shuffle(order)

  def load(c):
    return torch.load(
      os.path.join(path, "chunks", c["path"]), weights_only=True
    )

  nxt = {}

  def prefetch(k):
    nxt[k] = load(order[k])

  thread = threading.Thread(target=prefetch, args=(0,))
  thread.start()
  for k in range(len(order)):
    thread.join()
    chunk = nxt.pop(k)
    if k + 1 < len(order):
      thread = threading.Thread(target=prefetch, args=(k + 1,))
      thread.start()
    n = chunk["egpt_hidden"].shape[0]
    perm = torch.randperm(n)
    for start in range(0, n, batch_size):
      items = []
      for idx in perm[start : start + batch_size]:
        length = chunk["seq_lens"][idx].item()
        items.append(
          {
            "egpt": chunk["egpt_hidden"][idx, :length],
            "vl": chunk["vl_hidden"][idx, :length],
            "seq_len": length,
          }
        )
      max_len = max(it["seq_len"] for it in items)
      egpt, vl, mask = [], [], []
      for it in items:
        pad = max_len - it["seq_len"]
        dim = it["egpt"].shape[-1]
        egpt.append(torch.cat([it["egpt"], torch.zeros(pad, dim)]))
        vl.append(torch.cat([it["vl"], torch.zeros(pad, dim)]))
        m = torch.zeros(max_len)
        m[: it["seq_len"]] = 1.0
        mask.append(m)
      batch = {
        "egpt": torch.stack(egpt).numpy(),
        "vl": torch.stack(vl).numpy(),
        "mask": torch.stack(mask).numpy(),
      }
      tokens = int(sum(it["seq_len"] for it in items))
      yield jax.device_put(batch, device), tokens


def time_reference(path, batch_size, max_steps, device):
  tokens = steps = 0
  t0 = time.perf_counter()
  for batch, n in reference_loader(path, batch_size, device):
    jax.block_until_ready(batch)
    tokens += n
    steps += 1
    if steps >= max_steps:
      break
  dt = time.perf_counter() - t0
  return {
    "window": 0,
    "tokens": tokens,
    "steps": steps,
    "seconds": dt,
    "tokens_per_s": tokens / dt,
    "batches_per_s": steps / dt,
  }


PIPELINE_MODES = (
  "stream_cold",
  "stream_cold_mmap",
  "stream_hot",
  "stream_hot_pinned",
  "host",
  "device",
  "device_gather1",
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    description=(
      "Measure valid tokens/s delivered to the device by the input "
      "pipeline (streaming, host cache, device cache) against the "
      "reference loader's approach. Prints a table, writes JSON to --out."
    )
  )
  parser.add_argument("--num_samples", type=int, default=12000)
  parser.add_argument("--hidden_dim", type=int, default=4096)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--samples_per_shard", type=int, default=2048)
  parser.add_argument(
    "--ref_chunks",
    type=int,
    default=4,
    help="1000-sample fp32 chunks for the reference baseline (0 = skip)",
  )
  parser.add_argument(
    "--modes",
    default=(
      "stream_cold,stream_cold_mmap,stream_hot,stream_hot_pinned,"
      "host,device,device_gather1,h2d,reference"
    ),
    help="comma-separated subset of the modes to run",
  )
  parser.add_argument(
    "--num_workers",
    type=int,
    default=None,
    help="batch assembly threads (default: the pipeline's, half the cores)",
  )
  parser.add_argument("--prefetch", type=int, default=4)
  parser.add_argument(
    "--max_steps", type=int, default=10**9, help="cap on batches per epoch"
  )
  parser.add_argument(
    "--device_epochs",
    type=int,
    default=5,
    help="epochs timed in device mode (one epoch is short there)",
  )
  parser.add_argument(
    "--gather_batches",
    type=int,
    default=4,
    help="device mode: batches of a bucket gathered per dispatch "
    "(device_gather1 times 1, one dispatch per batch)",
  )
  parser.add_argument(
    "--window",
    type=int,
    default=2,
    help="batches the consumer keeps in flight (0: wait for each batch)",
  )
  parser.add_argument("--dir", help="work dir (default: a temporary one)")
  parser.add_argument("--keep", action="store_true", help="keep the files")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", help="write the results as JSON here")
  return parser


def time_mode(mode, ds, ds_path, args, device) -> dict:
  """One of PIPELINE_MODES: the pipeline built with its cache, warmed as
  the mode says, then timed."""
  cache = mode.split("_")[0] if mode.startswith(("host", "device")) else "none"
  t0 = time.perf_counter()
  gather = 1 if mode == "device_gather1" else args.gather_batches
  pipe = data.InputPipeline(
    ds,
    cache=cache,
    gather_batches=gather,
    global_batch_size=args.batch_size,
    seed=args.seed,
    num_workers=args.num_workers,
    prefetch=args.prefetch,
  )
  if mode.endswith("pinned"):
    pipe = PinnedUpload(pipe, device)
  build = time.perf_counter() - t0
  if pipe.steps_per_epoch == 0:
    raise SystemExit(
      f"{args.num_samples} samples give no full batch of "
      f"{args.batch_size} in any length bucket; raise --num_samples"
    )
  note = ""
  if mode.startswith("stream_cold"):
    if mode == "stream_cold_mmap":
      pipe.readahead = False
    note = (
      "cold (page cache dropped)"
      if drop_page_cache(dataset_files(ds_path))
      else "could not drop page cache: hot"
    )
    note += ", read-ahead " + ("on" if pipe.readahead else "off")
  elif mode.startswith("stream_hot"):
    time_pipeline(pipe, 1, min(args.max_steps, 20))  # warm + compile
    note = "files in page cache"
  else:
    time_pipeline(pipe, 1, 3)  # compile every bucket shape once
    time_pipeline(pipe, 1, args.max_steps)
  on_device = mode.startswith("device")
  epochs = args.device_epochs if on_device else 1
  r = time_pipeline(pipe, epochs, args.max_steps, args.window)
  if on_device and args.window:
    # The same with a wait on every batch (what earlier runs reported).
    r["tokens_per_s_window0"] = time_pipeline(pipe, epochs, args.max_steps, 0)[
      "tokens_per_s"
    ]
  r["cache_build_seconds"] = build
  r["note"] = note
  return r


def _upload_rate(upload, host, valid, nbytes, reps, note) -> dict:
  """`upload(host)` timed `reps` times after one untimed call."""
  jax.block_until_ready(upload(host))
  t0 = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(upload(host))
  dt = time.perf_counter() - t0
  return {
    "tokens": int(valid),
    "steps": reps,
    "seconds": dt,
    "tokens_per_s": valid / dt,
    "batches_per_s": reps / dt,
    "gbytes_per_s": nbytes / dt / 1e9,
    "note": note.format(gbps=nbytes / dt / 1e9),
  }


def time_h2d(args, lengths, rng, device) -> dict:
  """The streaming modes' ceiling: uploading one ready, padded batch (both
  streams, mean bucket length) again and again; 'h2d' as numpy, and
  'h2d_pinned' staged through pinned host memory where the backend can."""
  seq_len = int(np.ceil(lengths.mean() / 8) * 8)
  shape = (args.batch_size, seq_len, args.hidden_dim)
  host = {
    k: rng.integers(0, 1 << 15, shape, dtype=np.uint16)
    for k in ("source", "target")
  }
  reps = 30
  valid = reps * args.batch_size * lengths.mean()
  nbytes = reps * 2 * int(np.prod(shape)) * 2
  out = {}
  out["h2d"] = _upload_rate(
    lambda h: jax.device_put(h, device),
    host,
    valid,
    nbytes,
    reps,
    "device_put of a ready batch: {gbps:.1f} GB/s",
  )
  print(f"h2d: {out['h2d']['tokens_per_s']:,.0f} tokens/s", flush=True)
  # The same through pinned host memory (numpy -> pinned_host -> device),
  # to see whether staging through page-locked memory would pay.
  try:
    pinned = jax.sharding.SingleDeviceSharding(
      device, memory_kind="pinned_host"
    )
    on_device = jax.sharding.SingleDeviceSharding(device)
    out["h2d_pinned"] = _upload_rate(
      lambda h: jax.device_put(jax.device_put(h, pinned), on_device),
      host,
      valid,
      nbytes,
      reps,
      "numpy -> pinned_host -> device: {gbps:.1f} GB/s",
    )
  except Exception as e:  # noqa: BLE001 -- optional diagnostic
    print(f"h2d_pinned skipped: {e}", flush=True)
  return out


def _print_table(results, args, lengths, device) -> None:
  print()
  print(
    f"hidden {args.hidden_dim}, batch {args.batch_size}, "
    f"{args.num_samples} samples, mean length {lengths.mean():.1f}, "
    f"device {device}"
  )
  print(
    f"{'mode':16s} {'tokens/s':>14s} {'batches/s':>10s} {'steps':>7s} "
    f"{'pad %':>6s} {'build s':>8s}  note"
  )
  for mode, r in results["modes"].items():
    print(
      f"{mode:16s} {r['tokens_per_s']:14,.0f} {r['batches_per_s']:10.1f} "
      f"{r['steps']:7d} {100 * r.get('padding_fraction', 0):6.1f} "
      f"{r.get('cache_build_seconds', 0):8.2f}  {r.get('note', '')}"
    )


def main(argv=None):
  args = build_parser().parse_args(argv)
  modes = args.modes.split(",")

  work = args.dir or tempfile.mkdtemp(prefix="egpt_bench_data_")
  os.makedirs(work, exist_ok=True)
  rng = np.random.default_rng(args.seed)
  lengths = reference_lengths(args.num_samples, rng)
  device = jax.local_devices()[0]
  results = {
    "device": str(device),
    "platform": device.platform,
    "num_samples": args.num_samples,
    "hidden_dim": args.hidden_dim,
    "batch_size": args.batch_size,
    "mean_length": float(lengths.mean()),
    "max_length": int(lengths.max()),
    "modes": {},
  }
  try:
    ds_path = os.path.join(work, "dataset")
    t0 = time.perf_counter()
    if _reusable(ds_path, lengths, args.hidden_dim):
      print(f"reusing the dataset in {ds_path}")
    else:
      write_dataset(
        ds_path,
        lengths,
        args.hidden_dim,
        rng,
        samples_per_shard=args.samples_per_shard,
      )
    results["write_seconds"] = time.perf_counter() - t0
    ds = data.open_dataset(ds_path)
    for mode in PIPELINE_MODES:
      if mode in modes:
        r = time_mode(mode, ds, ds_path, args, device)
        results["modes"][mode] = r
        print(f"{mode}: {r['tokens_per_s']:,.0f} tokens/s", flush=True)
    if "h2d" in modes:
      results["modes"].update(time_h2d(args, lengths, rng, device))
    if "reference" in modes and args.ref_chunks > 0:
      ref_path = os.path.join(work, "reference")
      n_ref = min(args.ref_chunks * 1000, args.num_samples)
      write_reference_chunks(ref_path, lengths[:n_ref], args.hidden_dim, rng)
      time_reference(ref_path, args.batch_size, 2, device)  # warm
      r = time_reference(ref_path, args.batch_size, args.max_steps, device)
      r["note"] = "fp32 .pt chunks in page cache, as baseline-h100.md"
      results["modes"]["reference"] = r
      print(f"reference: {r['tokens_per_s']:,.0f} tokens/s", flush=True)
  finally:
    if not args.keep and not args.dir:
      shutil.rmtree(work, ignore_errors=True)
  _print_table(results, args, lengths, device)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  from egpt_align import cli

  cli.run(main)
