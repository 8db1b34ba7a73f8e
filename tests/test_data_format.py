"""Tests for the dataset format: writer -> reader, crashes, bad inputs."""

import json
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from egpt_align import data
from egpt_align.data import format as fmt

DS, DT = 32, 48


def _samples(n, seed=0, tokens=True):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    length = int(rng.integers(1, 20))
    s = {
      "source": rng.normal(size=(length, DS)).astype(np.float32) * 3,
      "target": rng.normal(size=(length, DT)).astype(np.float32),
      "meta": {"id": f"s{i}", "vl_text": f"text {i} é"},
    }
    if tokens:
      s["target_tokens"] = rng.integers(0, 32000, length).astype(np.int64)
      s["draft_tokens"] = rng.integers(0, 32000, length).astype(np.int32)
    out.append(s)
  return out


def _write(path, samples, dtype="bfloat16", per_shard=4, **kw):
  with data.DatasetWriter(
    path,
    source_dim=DS,
    target_dim=DT,
    dtype=dtype,
    samples_per_shard=per_shard,
    provenance={"source_model": "a", "target_model": "b"},
    **kw,
  ) as w:
    for s in samples:
      w.append(
        s["source"],
        s["target"],
        target_tokens=s.get("target_tokens"),
        draft_tokens=s.get("draft_tokens"),
        meta=s["meta"],
      )
  return path


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_round_trip_exact(tmp_path, dtype):
  samples = _samples(11)
  path = _write(str(tmp_path / "ds"), samples, dtype=dtype)
  ds = data.open_dataset(path)
  mem = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(
    dtype, np.float32
  )
  assert ds.num_samples == 11 and len(ds.shards) == 3
  assert ds.header["num_positions"] == sum(len(s["source"]) for s in samples)
  assert ds.header["provenance"]["convention"].startswith("h[t]")
  assert ds.has_target_tokens and ds.has_draft_tokens
  np.testing.assert_array_equal(ds.lengths, [len(s["source"]) for s in samples])
  for i, s in enumerate(samples):
    got = ds[i]
    assert got["source"].dtype == np.dtype(mem)
    # Exact up to the stored dtype: compare with numpy's own cast.
    np.testing.assert_array_equal(
      got["source"].astype(np.float32),
      s["source"].astype(mem).astype(np.float32),
    )
    np.testing.assert_array_equal(
      got["target"].astype(np.float32),
      s["target"].astype(mem).astype(np.float32),
    )
    np.testing.assert_array_equal(got["target_tokens"], s["target_tokens"])
    np.testing.assert_array_equal(got["draft_tokens"], s["draft_tokens"])
    assert got["meta"] == s["meta"]
    assert ds.meta(i) == s["meta"]  # shards of 4: samples 4.. are in later ones
  assert ds[-1]["meta"]["id"] == "s10"
  assert ds.meta(-1)["id"] == "s10"
  with pytest.raises(IndexError, match="out of range"):
    ds[11]


def test_read_batch_padding(tmp_path):
  samples = _samples(7, tokens=False)
  ds = data.open_dataset(_write(str(tmp_path / "ds"), samples))
  assert not ds.has_target_tokens
  idx = [5, -1, 0]
  b = ds.read_batch(idx, pad_to=24)
  assert b["source"].shape == (3, 24, DS) and b["target"].shape == (3, 24, DT)
  assert "target_tokens" not in b
  for j, i in enumerate(idx):
    n = 0 if i < 0 else len(samples[i]["source"])
    assert b["lengths"][j] == n and b["mask"][j].sum() == n
    assert not b["source"][j, n:].astype(np.float32).any()
    if i >= 0:
      np.testing.assert_array_equal(b["source"][j, :n], ds[i]["source"])
  with pytest.raises(ValueError, match="pad_to=2"):
    ds.read_batch([0, 1, 2, 3], pad_to=2)


def test_validate_and_checksums(tmp_path):
  path = _write(str(tmp_path / "ds"), _samples(6))
  ds = data.open_dataset(path)
  stats = ds.validate(progress=False)
  assert [s["num_samples"] for s in stats] == [4, 2]
  x = np.concatenate([ds[i]["source"].astype(np.float32) for i in range(4)])
  norms = np.linalg.norm(x, axis=1)
  np.testing.assert_allclose(
    stats[0]["source"]["norm_mean"], norms.mean(), 1e-5
  )
  assert stats[0]["source"]["nonfinite"] == 0


def _crash_script(path, n, per_shard, crash_after):
  return textwrap.dedent(f"""
    import os, numpy as np
    from egpt_align import data
    w = data.DatasetWriter({path!r}, source_dim={DS}, target_dim={DT},
                           samples_per_shard={per_shard})
    rng = np.random.default_rng(0)
    for i in range({n}):
      if i == {crash_after}:
        os._exit(3)  # a hard crash: no close, no flush
      w.append(rng.normal(size=(5, {DS})), rng.normal(size=(5, {DT})),
               meta={{"id": str(i)}})
  """)


def test_crash_mid_write_then_resume(tmp_path):
  path = str(tmp_path / "ds")
  proc = subprocess.run(
    [sys.executable, "-c", _crash_script(path, 30, 10, 25)],
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 3, proc.stderr
  # Two shards were finalised; the third (5 samples) is lost.
  ds = data.open_dataset(path)
  assert ds.num_samples == 20
  # Resume: the producer skips done_ids and regenerates the same stream.
  rng = np.random.default_rng(0)
  with data.DatasetWriter(
    path, source_dim=DS, target_dim=DT, samples_per_shard=10
  ) as w:
    assert w.done_ids == {str(i) for i in range(20)}
    for i in range(30):
      s, t = rng.normal(size=(5, DS)), rng.normal(size=(5, DT))
      if str(i) not in w.done_ids:
        w.append(s, t, meta={"id": str(i)})
  # Identical to an uninterrupted write.
  full = str(tmp_path / "full")
  rng = np.random.default_rng(0)
  with data.DatasetWriter(
    full, source_dim=DS, target_dim=DT, samples_per_shard=10
  ) as w:
    for i in range(30):
      w.append(
        rng.normal(size=(5, DS)), rng.normal(size=(5, DT)), meta={"id": str(i)}
      )
  a, b = data.open_dataset(path), data.open_dataset(full)
  assert a.num_samples == b.num_samples == 30
  for i in range(30):
    np.testing.assert_array_equal(a[i]["source"], b[i]["source"])
    np.testing.assert_array_equal(a[i]["target"], b[i]["target"])
    assert a[i]["meta"] == b[i]["meta"]


def test_crash_between_rename_and_header(tmp_path, monkeypatch):
  path = str(tmp_path / "ds")
  samples = _samples(6)
  real = fmt.write_json_atomic

  def failing(p, obj):
    if p.endswith(fmt.HEADER_FILE) and obj["shards"]:
      raise KeyboardInterrupt("simulated crash")
    real(p, obj)

  w = data.DatasetWriter(
    path, source_dim=DS, target_dim=DT, samples_per_shard=4
  )
  monkeypatch.setattr(fmt, "write_json_atomic", failing)
  with pytest.raises(KeyboardInterrupt):
    for s in samples:
      w.append(s["source"], s["target"], meta=s["meta"])
  monkeypatch.setattr(fmt, "write_json_atomic", real)
  # Also leave a half-written temporary shard behind.
  os.makedirs(os.path.join(path, fmt.TMP_PREFIX + "shard-00001"))
  w2 = data.DatasetWriter(path, source_dim=DS, target_dim=DT)
  assert w2.done_ids == {"s0", "s1", "s2", "s3"}  # the shard was adopted
  w2.close()
  assert not any(n.startswith(fmt.TMP_PREFIX) for n in os.listdir(path))
  ds = data.open_dataset(path)
  assert ds.num_samples == 4
  np.testing.assert_array_equal(
    ds[3]["target"].astype(np.float32),
    samples[3]["target"].astype(ml_dtypes.bfloat16).astype(np.float32),
  )


def test_resume_refuses_other_dims_and_fresh_overwrite(tmp_path):
  path = _write(str(tmp_path / "ds"), _samples(2))
  with pytest.raises(ValueError, match="source_dim"):
    data.DatasetWriter(path, source_dim=DS + 1, target_dim=DT)
  with pytest.raises(FileExistsError, match="resume"):
    data.DatasetWriter(path, source_dim=DS, target_dim=DT, resume=False)


# ----------------------------------------------------------- bad inputs


def test_writer_rejects_bad_samples(tmp_path):
  path = str(tmp_path / "ds")
  w = data.DatasetWriter(path, source_dim=DS, target_dim=DT)
  good_s = np.zeros((4, DS), np.float32)
  good_t = np.zeros((4, DT), np.float32)
  with pytest.raises(ValueError, match=r"sample 0 \(id 'x'\).*hidden size 31"):
    w.append(np.zeros((4, 31)), good_t, meta={"id": "x"})
  with pytest.raises(ValueError, match="target has 3"):
    w.append(good_s, np.zeros((3, DT)))
  bad = good_s.copy()
  bad[2, 5] = np.nan
  with pytest.raises(ValueError, match="NaN/Inf.*position 2, dim 5"):
    w.append(bad, good_t)
  bad_t = good_t.copy()
  bad_t[0, 0] = np.inf
  with pytest.raises(ValueError, match="target has 1 NaN/Inf"):
    w.append(good_s, bad_t)
  with pytest.raises(ValueError, match="overflows bfloat16|NaN"):
    w.append(np.full((4, DS), 1e39), good_t)
  with pytest.raises(ValueError, match="target_tokens must have shape"):
    w.append(good_s, good_t, target_tokens=np.zeros(3, np.int32))
  w.append(good_s, good_t)
  with pytest.raises(ValueError, match="draft_tokens given for some"):
    w.append(good_s, good_t, draft_tokens=np.zeros(4, np.int32))
  w.close()
  assert data.open_dataset(path).num_samples == 1


def test_missing_header(tmp_path):
  os.makedirs(tmp_path / "empty")
  with pytest.raises(fmt.DatasetFormatError, match="header.json is missing"):
    data.open_dataset(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.open_dataset(str(tmp_path / "nope"))
  (tmp_path / "empty" / "header.json").write_text("{not json")
  with pytest.raises(fmt.DatasetFormatError, match="not valid JSON"):
    data.open_dataset(str(tmp_path / "empty"))


def test_truncated_shard(tmp_path):
  path = _write(str(tmp_path / "ds"), _samples(6))
  f = os.path.join(path, "shard-00001", "source.npy")
  size = os.path.getsize(f)
  with open(f, "r+b") as fh:
    fh.truncate(size - 10)
  with pytest.raises(
    fmt.DatasetFormatError, match="shard-00001/source.npy.*truncated"
  ):
    data.open_dataset(path)


def _rewrite(path, shard, fname, arr):
  """Replaces a shard file and fixes its recorded size (a 'valid' edit)."""
  f = os.path.join(path, shard, fname)
  np.save(f, arr)
  hpath = os.path.join(path, "header.json")
  header = json.load(open(hpath))
  for s in header["shards"]:
    if s["name"] == shard:
      s["files"][fname]["size"] = os.path.getsize(f)
  json.dump(header, open(hpath, "w"))


def test_dims_mismatch_between_shards(tmp_path):
  path = _write(str(tmp_path / "ds"), _samples(6))
  f = os.path.join(path, "shard-00001", "target.npy")
  arr = np.load(f)
  _rewrite(
    path,
    "shard-00001",
    "target.npy",
    np.zeros((arr.shape[0], DT + 2), arr.dtype),
  )
  with pytest.raises(
    fmt.DatasetFormatError,
    match=rf"shard-00001/target.npy: shape .*{DT + 2}.*target_dim {DT}",
  ):
    data.open_dataset(path)


def test_length_longer_than_stored(tmp_path):
  samples = _samples(6)
  path = _write(str(tmp_path / "ds"), samples)
  lengths = np.load(os.path.join(path, "shard-00001", "lengths.npy"))
  lengths[1] += 1
  _rewrite(path, "shard-00001", "lengths.npy", lengths)
  with pytest.raises(
    fmt.DatasetFormatError,
    match=rf"lengths.npy: sample 5 \(shard sample 1\) has length {lengths[1]}",
  ):
    data.open_dataset(path)


@pytest.mark.parametrize("row_in_sample", [0, 1])
def test_nan_in_stored_shard_found_by_validate(tmp_path, row_in_sample):
  path = _write(str(tmp_path / "ds"), _samples(6))
  f = os.path.join(path, "shard-00001", "source.npy")
  arr = np.load(f)
  ds = data.open_dataset(path)
  # Shard sample 1 = sample 5: its first row (where sample 4 ends) or inside.
  assert ds.lengths[5] >= 2
  row = int(ds.shards[1].offsets[1]) + row_in_sample
  arr[row, 3] = np.array(np.nan, ml_dtypes.bfloat16).view(np.uint16)
  _rewrite(path, "shard-00001", "source.npy", arr)
  ds = data.open_dataset(path)  # opening stays cheap: no value scan
  with pytest.raises(fmt.DatasetFormatError, match="checksum"):
    ds.validate(progress=False)
  with pytest.raises(
    fmt.DatasetFormatError,
    match="source.npy: 1 NaN/Inf values, first in sample 5",
  ):
    for s in ds.shards:
      for info in s.info["files"].values():
        info.pop("crc32", None)
    ds.validate(progress=False)


def test_bad_header_fields(tmp_path):
  path = _write(str(tmp_path / "ds"), _samples(3))
  hpath = os.path.join(path, "header.json")
  header = json.load(open(hpath))
  header["num_samples"] = 99
  json.dump(header, open(hpath, "w"))
  with pytest.raises(fmt.DatasetFormatError, match="num_samples is 99"):
    data.open_dataset(path)
  header["num_samples"] = 3
  header["dtype"] = "int8"
  json.dump(header, open(hpath, "w"))
  with pytest.raises(fmt.DatasetFormatError, match="unknown state dtype"):
    data.open_dataset(path)
  del header["source_dim"]
  json.dump(header, open(hpath, "w"))
  with pytest.raises(
    fmt.DatasetFormatError, match="missing field 'source_dim'"
  ):
    data.open_dataset(path)
