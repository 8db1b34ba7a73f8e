"""Datasets the benchmarks share: random states at reference-like lengths."""

import numpy as np

from egpt_align import data


def reference_lengths(n, rng, *, mean=34.3, std=10.4, lo=5, hi=50):
  """Lengths like the reference's test set (B.1: mean 34.3, std 10.4)."""
  return np.clip(np.rint(rng.normal(mean, std, n)), lo, hi).astype(np.int32)


def write_dataset(path, lengths, dim, rng, *, samples_per_shard):
  """Writes random bf16 states fast (rows copied from a random pool)."""
  pool = rng.standard_normal((4096 + 64, dim), dtype=np.float32)
  with data.DatasetWriter(
    path,
    source_dim=dim,
    target_dim=dim,
    samples_per_shard=samples_per_shard,
    provenance={"source_model": "benchmark-random"},
    resume=False,
  ) as w:
    for i, n in enumerate(data_progress(lengths, "write dataset")):
      a, b = rng.integers(0, 4096, 2)
      w.append(pool[a : a + n], pool[b : b + n] * 0.5, meta={"id": str(i)})


def data_progress(it, desc):
  from tqdm import tqdm

  return tqdm(it, desc=desc, unit="sample", mininterval=2.0)
