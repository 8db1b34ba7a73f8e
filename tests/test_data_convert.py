"""Tests for tools/convert_reference_chunks.py on tiny fake reference dumps."""

import importlib.util
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from egpt_align import data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_reference_chunks.py")
D = 32


def _tool():
  spec = importlib.util.spec_from_file_location("convert_ref", TOOL)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def make_reference_dir(root, chunk_sizes, seed=0, max_seq=12):
  """A chunk dir laid out as REFERENCE_NOTES §4.1 describes (fp32, padded)."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "chunks"))
  chunks, truth, start = [], [], 0
  for n in chunk_sizes:
    lens = rng.integers(5, max_seq + 1, n)
    egpt = np.zeros((n, max_seq, D), np.float32)
    vl = np.zeros((n, max_seq, D), np.float32)
    meta = []
    for i, length in enumerate(lens):
      egpt[i, :length] = rng.normal(size=(length, D))
      vl[i, :length] = rng.normal(size=(length, D)) * 5
      meta.append(
        {
          "sample_idx": (start + i) // 3,
          "question_idx": (start + i) % 3,
          "question": f"q{start + i}?",
          "egpt_text": f"e{start + i}",
          "vl_text": f"v{start + i}",
          "seq_len": int(length),
        }
      )
      truth.append((egpt[i, :length].copy(), vl[i, :length].copy(), meta[-1]))
    name = f"chunk_{start:06d}.pt"
    torch.save(
      {
        "egpt_hidden": torch.from_numpy(egpt),
        "vl_hidden": torch.from_numpy(vl),
        "seq_lens": torch.from_numpy(lens.astype(np.int64)),
        "metadata": meta,
        "chunk_id": start,
        "n_samples": n,
      },
      os.path.join(root, "chunks", name),
    )
    chunks.append({"path": name, "start_idx": start, "n_samples": n})
    start += n
  index = {
    "total_samples": start,
    "chunk_size": max(chunk_sizes),
    "chunks": chunks,
    "created": "2025-01-01T00:00:00",
    "config": {
      "split": "test",
      "duration": "1s",
      "quant": "4bit",
      "max_questions": 3,
      "max_new_tokens": 50,
      "hidden_dim": D,
    },
  }
  with open(os.path.join(root, "index.json"), "w") as f:
    json.dump(index, f)
  return truth


def _check(dst, truth):
  ds = data.open_dataset(dst)
  assert ds.num_samples == len(truth)
  for i, (e, v, m) in enumerate(truth):
    got = ds[i]
    np.testing.assert_array_equal(
      got["source"].astype(np.float32),
      e.astype(ml_dtypes.bfloat16).astype(np.float32),
    )
    np.testing.assert_array_equal(
      got["target"].astype(np.float32),
      v.astype(ml_dtypes.bfloat16).astype(np.float32),
    )
    assert got["meta"]["vl_text"] == m["vl_text"]
    assert got["meta"]["question"] == m["question"]
    assert got["meta"]["id"] == f"ref-{i}"
  return ds


def test_convert_round_trip_cli(tmp_path):
  src, dst = str(tmp_path / "ref"), str(tmp_path / "out")
  truth = make_reference_dir(src, [7, 7, 4])
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "tools.convert_reference_chunks",
      src,
      dst,
      "--samples_per_shard",
      "5",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout.strip().splitlines()[-1])["written"] == 18
  ds = _check(dst, truth)
  prov = ds.header["provenance"]
  assert prov["reference_config"]["split"] == "test"
  assert "independently" in prov["pairing"]


def test_convert_crash_then_resume(tmp_path, monkeypatch):
  src, dst = str(tmp_path / "ref"), str(tmp_path / "out")
  truth = make_reference_dir(src, [6, 6, 6], seed=1)
  tool = _tool()
  real_load, loads = tool._load, []

  def crashing_load(path):
    loads.append(os.path.basename(path))
    if len(loads) == 3:
      raise KeyboardInterrupt("simulated crash while reading chunk 3")
    return real_load(path)

  monkeypatch.setattr(tool, "_load", crashing_load)
  with pytest.raises(KeyboardInterrupt):
    tool.convert(src, dst, samples_per_shard=4, progress=False)
  # The writer flushed what it had; rerun resumes without reloading chunks
  # that are complete.
  monkeypatch.setattr(tool, "_load", real_load)
  loads.clear()
  monkeypatch.setattr(
    tool, "_load", lambda p: (loads.append(p), real_load(p))[1]
  )
  counts = tool.convert(src, dst, samples_per_shard=4, progress=False)
  assert counts == {"written": 6, "already_done": 12, "nonfinite_skipped": 0}
  assert [os.path.basename(p) for p in loads] == ["chunk_000012.pt"]
  _check(dst, truth)


def test_convert_bad_inputs(tmp_path):
  tool = _tool()
  with pytest.raises(FileNotFoundError, match="index.json missing"):
    tool.convert(str(tmp_path), str(tmp_path / "o"), progress=False)
  src = str(tmp_path / "ref")
  make_reference_dir(src, [3], seed=2)
  path = os.path.join(src, "chunks", "chunk_000000.pt")
  chunk = torch.load(path, weights_only=True)
  chunk["seq_lens"][1] = 99
  torch.save(chunk, path)
  with pytest.raises(ValueError, match="chunk_000000.pt: sample 1.*seq_len 99"):
    tool.convert(src, str(tmp_path / "o1"), progress=False)
  chunk["seq_lens"][1] = 5
  chunk["vl_hidden"][2, 0, 3] = float("nan")
  torch.save(chunk, path)
  # Reported against the source chunk file and sample, not the destination.
  with pytest.raises(
    ValueError, match="chunk_000000.pt: sample 2 \\(ref-2\\) has NaN.*vl_hidden"
  ):
    tool.convert(src, str(tmp_path / "o2"), progress=False)
  counts = tool.convert(
    src, str(tmp_path / "o3"), progress=False, skip_nonfinite=True
  )
  assert counts["nonfinite_skipped"] == 1 and counts["written"] == 2
  # A truncated chunk: one error naming the chunk file, no bare OSError.
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(ValueError, match="chunk_000000.pt: cannot read"):
    tool.convert(src, str(tmp_path / "o4"), progress=False)
