"""Tests for `python -m egpt_align.data inspect` and the benchmark smoke run."""

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from egpt_align import data
from egpt_align.data import __main__ as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dataset(path, n=9):
  rng = np.random.default_rng(0)
  with data.DatasetWriter(
    path,
    source_dim=16,
    target_dim=24,
    samples_per_shard=4,
    provenance={"target_model": "vl-test"},
  ) as w:
    for i in range(n):
      length = 3 + i
      w.append(
        rng.normal(size=(length, 16)),
        2 * rng.normal(size=(length, 24)),
        meta={"id": str(i)},
      )
  return path


def test_inspect_summary_and_stats(tmp_path, capsys):
  path = _dataset(str(tmp_path / "ds"))
  rc = cli.main(
    ["inspect", path, "--checksums", "--json", str(tmp_path / "r.json")]
  )
  assert rc == 0
  text = capsys.readouterr().out
  assert "samples    9" in text and "source 16, target 24" in text
  assert "vl-test" in text and "length histogram" in text
  report = json.load(open(tmp_path / "r.json"))
  assert [s["num_samples"] for s in report["shards"]] == [4, 4, 1]
  # Norm statistics against an independent numpy computation.
  ds = data.open_dataset(path)
  rows = np.concatenate([ds[i]["target"].astype(np.float32) for i in range(4)])
  norms = np.linalg.norm(rows, axis=1)
  s = report["shards"][0]["target"]
  np.testing.assert_allclose(
    [s["norm_mean"], s["norm_min"], s["norm_max"]],
    [norms.mean(), norms.min(), norms.max()],
    rtol=1e-5,
  )
  assert s["nonfinite"] == 0


def test_inspect_counts_nan_and_fails(tmp_path, capsys):
  path = _dataset(str(tmp_path / "ds"))
  f = os.path.join(path, "shard-00002", "source.npy")
  arr = np.load(f)
  inf = np.array([np.inf, np.nan], ml_dtypes.bfloat16).view(np.uint16)
  arr[0, :2] = inf
  with open(f, "r+b") as fh:  # same size: only a value scan can notice
    np.save(fh, arr)
  rc = cli.main(["inspect", path])
  out = capsys.readouterr().out
  assert rc == 1 and "FOUND 2 NaN/Inf" in out
  line = [x for x in out.splitlines() if "shard-00002" in x and "source" in x]
  assert line and line[0].split()[3] == "2"
  rc = cli.main(["inspect", str(tmp_path / "missing")])
  assert rc == 2


def test_synthetic_subcommand(tmp_path, capsys):
  path = str(tmp_path / "syn")
  rc = cli.main(
    [
      "synthetic",
      path,
      "--num_samples",
      "12",
      "--hidden_dim",
      "16",
      "--max_len",
      "9",
      "--lm_head",
      str(tmp_path / "h"),
    ]
  )
  assert rc == 0
  ds = data.open_dataset(path)
  assert ds.num_samples == 12 and ds.source_dim == 16
  assert ds.lengths.max() <= 9 and ds.has_target_tokens
  info = json.load(open(tmp_path / "h.json"))
  assert info["vocab_size"] == 256 and info["hidden_dim"] == 16
  assert cli.main(["synthetic", path]) == 2  # refuses to overwrite


def test_histogram_counts_everything():
  lengths = np.array([5, 5, 6, 20, 50, 50, 50])
  lines = cli.length_histogram(lengths, bins=5)
  assert sum(int(x.split()[1]) for x in lines) == len(lengths)


def test_benchmark_smoke(tmp_path):
  pytest.importorskip("torch")
  out = str(tmp_path / "b.json")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "tools.benchmarks.benchmark_data",
      "--num_samples",
      "130",
      "--hidden_dim",
      "32",
      "--ref_chunks",
      "1",
      "--batch_size",
      "16",
      "--device_epochs",
      "1",
      "--out",
      out,
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.load(open(out))
  assert set(result["modes"]) >= {
    "stream_cold",
    "stream_cold_mmap",
    "stream_hot",
    "stream_hot_pinned",
    "host",
    "device",
    "h2d",
    "reference",
  }
  for r in result["modes"].values():
    assert r["tokens"] > 0 and r["tokens_per_s"] > 0
