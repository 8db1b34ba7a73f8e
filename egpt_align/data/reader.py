"""open_dataset: memory-mapped random access to a hidden-state dataset."""

import json
import os
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from egpt_align.data import format as fmt


class _Shard:
  """One shard's memory-mapped arrays."""

  def __init__(self, root: str, info: dict, header: dict, first: int):
    self.name = info["name"]
    self.dir = os.path.join(root, self.name)
    self.first = first  # global index of its first sample
    self.num_samples = info["num_samples"]
    self.info = info
    if not os.path.isdir(self.dir):
      raise fmt.DatasetFormatError(
        f"{self.dir}: shard listed in header.json is missing"
      )
    for fname, finfo in info["files"].items():
      fpath = os.path.join(self.dir, fname)
      if not os.path.exists(fpath):
        raise fmt.DatasetFormatError(f"{fpath}: file missing")
      size = os.path.getsize(fpath)
      if size != finfo["size"]:
        raise fmt.DatasetFormatError(
          f"{fpath}: {size} bytes but header.json records {finfo['size']}; "
          "the shard is truncated or was modified"
        )
    self.offsets = self._load(fmt.OFFSETS_FILE, (self.num_samples + 1,))
    self.lengths = self._load(fmt.LENGTHS_FILE, (self.num_samples,))
    self.offsets = np.asarray(self.offsets, np.int64)
    self.lengths = np.asarray(self.lengths, np.int32)
    rows = int(self.offsets[-1])
    if self.offsets[0] != 0 or np.any(np.diff(self.offsets) < 0):
      raise fmt.DatasetFormatError(
        f"{self.dir}/{fmt.OFFSETS_FILE}: offsets must start at 0 and "
        "never decrease"
      )
    stored = np.diff(self.offsets)
    bad = np.flatnonzero((self.lengths > stored) | (self.lengths < 1))
    if bad.size:
      i = int(bad[0])
      raise fmt.DatasetFormatError(
        f"{self.dir}/{fmt.LENGTHS_FILE}: sample {first + i} (shard sample "
        f"{i}) has length {self.lengths[i]} but {stored[i]} stored positions"
      )
    disk = fmt.disk_dtype(header["dtype"])
    mem = fmt.memory_dtype(header["dtype"])
    self.states = {}
    self.raw = {}
    for stream in fmt.STATE_STREAMS:
      dim = header[f"{stream}_dim"]
      arr = self._load(fmt.stream_file(stream), None)
      if arr.ndim != 2 or arr.shape[1] != dim:
        raise fmt.DatasetFormatError(
          f"{self.dir}/{fmt.stream_file(stream)}: shape {arr.shape}, expected"
          f" [{rows}, {dim}] ({stream}_dim {dim} in header.json)"
        )
      if arr.shape[0] != rows:
        raise fmt.DatasetFormatError(
          f"{self.dir}/{fmt.stream_file(stream)}: {arr.shape[0]} rows but "
          f"offsets say {rows}"
        )
      if arr.dtype != disk:
        raise fmt.DatasetFormatError(
          f"{self.dir}/{fmt.stream_file(stream)}: dtype {arr.dtype}, "
          f"expected {disk} for {header['dtype']}"
        )
      self.states[stream] = arr.view(mem)
      # Plain ndarray views of the on-disk bits: cheap to slice, and copies
      # of uint16 stay in numpy's fast (GIL-free) paths.
      self.raw[stream] = np.asarray(arr)
    self.tokens = {}
    for stream in fmt.TOKEN_STREAMS:
      if header[f"has_{stream}"]:
        arr = self._load(fmt.stream_file(stream), (rows,))
        if arr.dtype != np.int32:
          raise fmt.DatasetFormatError(
            f"{self.dir}/{fmt.stream_file(stream)}: dtype {arr.dtype}, "
            "expected int32"
          )
        self.tokens[stream] = arr
        self.raw[stream] = np.asarray(arr)
    self._meta = None

  def _load(self, fname: str, shape) -> np.ndarray:
    fpath = os.path.join(self.dir, fname)
    try:
      arr = np.load(fpath, mmap_mode="r")
    except FileNotFoundError as e:
      raise fmt.DatasetFormatError(f"{fpath}: file missing") from e
    except (ValueError, OSError) as e:
      raise fmt.DatasetFormatError(
        f"{fpath}: unreadable or truncated .npy ({e})"
      ) from e
    if shape is not None and arr.shape != shape:
      raise fmt.DatasetFormatError(
        f"{fpath}: shape {arr.shape}, expected {shape}"
      )
    return arr

  @property
  def meta(self) -> list[dict]:
    if self._meta is None:
      path = os.path.join(self.dir, fmt.META_FILE)
      with open(path) as f:
        self._meta = [json.loads(line) for line in f]
      if len(self._meta) != self.num_samples:
        raise fmt.DatasetFormatError(
          f"{path}: {len(self._meta)} lines for {self.num_samples} samples"
        )
    return self._meta


class HiddenStateDataset:
  """Random access to the samples of a dataset directory (memory-mapped)."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    self.header = fmt.read_header(self.path)
    h = self.header
    self.source_dim = h["source_dim"]
    self.target_dim = h["target_dim"]
    self.dtype = fmt.memory_dtype(h["dtype"])
    self.has_target_tokens = h["has_target_tokens"]
    self.has_draft_tokens = h["has_draft_tokens"]
    self.shards: list[_Shard] = []
    first = 0
    for info in h["shards"]:
      self.shards.append(_Shard(self.path, info, h, first))
      first += info["num_samples"]
    self.num_samples = first
    self._lists = None  # python lists of the index arrays, for fast loops
    if self.shards:
      self.lengths = np.concatenate([s.lengths for s in self.shards])
      # Global sample -> (shard, first row in that shard's packed arrays).
      self.shard_of = np.concatenate(
        [np.full(s.num_samples, k, np.int32) for k, s in enumerate(self.shards)]
      )
      self.row_of = np.concatenate([s.offsets[:-1] for s in self.shards])
    else:
      self.lengths = np.zeros(0, np.int32)
      self.shard_of = np.zeros(0, np.int32)
      self.row_of = np.zeros(0, np.int64)

  @property
  def token_fields(self) -> tuple[str, ...]:
    """The token-id streams this dataset stores."""
    return tuple(n for n in fmt.TOKEN_STREAMS if self.header[f"has_{n}"])

  @property
  def fields(self) -> tuple[str, ...]:
    """All per-position streams: states first, then token ids."""
    return fmt.STATE_STREAMS + self.token_fields

  def disk_dtype(self, field: str) -> np.dtype:
    """dtype of a stream's bits on disk (uint16 for bfloat16 states)."""
    if field in fmt.STATE_STREAMS:
      return fmt.disk_dtype(self.header["dtype"])
    return self.field_spec(field)[1]

  def field_spec(self, field: str) -> tuple[tuple[int, ...], np.dtype]:
    """Per-position (trailing shape, dtype) of a stream."""
    if field in fmt.STATE_STREAMS:
      return (self.header[f"{field}_dim"],), self.dtype
    if field in self.token_fields:
      return (), np.dtype(np.int32)
    raise KeyError(
      f"{self.path}: no field {field!r}; it has {list(self.fields)}"
    )

  def __len__(self) -> int:
    return self.num_samples

  def _check_index(self, i) -> int:
    i = int(i)
    if i < 0:
      i += self.num_samples
    if not 0 <= i < self.num_samples:
      raise IndexError(
        f"{self.path}: sample {i} out of range [0, {self.num_samples})"
      )
    return i

  def _slice(self, i: int, field: str, raw: bool = False) -> np.ndarray:
    shard = self.shards[self.shard_of[i]]
    row = self.row_of[i]
    length = self.lengths[i]
    if raw:
      return shard.raw[field][row : row + length]
    src = shard.states if field in fmt.STATE_STREAMS else shard.tokens
    return src[field][row : row + length]

  def __getitem__(self, i) -> dict:
    i = self._check_index(i)
    out = {f: np.asarray(self._slice(i, f)) for f in self.fields}
    shard = self.shards[self.shard_of[i]]
    out["meta"] = shard.meta[i - shard.first]
    return out

  def meta(self, i) -> dict:
    """Per-sample metadata (texts, ids) of sample i."""
    i = self._check_index(i)
    shard = self.shards[self.shard_of[i]]
    return shard.meta[i - shard.first]

  def groups(self, indices: Sequence[int] | None = None) -> np.ndarray | None:
    """The samples' `group` labels (meta 'group': the unit that is really
    independent, e.g. the scene several questions share), or None when no
    sample has one. Some samples with a group and some without is an error
    that names the first without."""
    idx = range(self.num_samples) if indices is None else indices
    labels = [self.meta(int(i)).get("group") for i in idx]
    if all(g is None for g in labels):
      return None
    if any(g is None for g in labels):
      i = int(list(idx)[labels.index(None)])
      shard = self.shards[self.shard_of[i]]
      raise fmt.DatasetFormatError(
        f"{os.path.join(shard.dir, fmt.META_FILE)}: sample "
        f"{self.meta(i).get('id', i)!r} has no 'group' while others have "
        "one (give every sample a group, or none)"
      )
    return np.array([str(g) for g in labels])

  def read_batch(
    self,
    indices: Sequence[int],
    pad_to: int,
    fields: Sequence[str] | None = None,
    out: dict | None = None,
  ) -> dict:
    """Zero-padded numpy batch of samples; index -1 gives an empty row.

    `out` optionally maps fields to reusable buffers [n, pad_to, ...] of the
    on-disk dtype (see `disk_dtype`); reusing them avoids a fresh allocation
    (page faults, munmap) per batch, which is what limits multi-threaded
    assembly.
    """
    indices = np.asarray(indices, np.int64)
    n = len(indices)
    fields = tuple(fields or self.fields)
    valid = indices >= 0
    if np.any(indices >= self.num_samples):
      raise IndexError(
        f"{self.path}: index {indices.max()} out of range "
        f"[0, {self.num_samples})"
      )
    lengths = np.where(valid, self.lengths[np.where(valid, indices, 0)], 0)
    lengths = lengths.astype(np.int32)
    if n and lengths.max() > pad_to:
      j = int(np.argmax(lengths))
      raise ValueError(
        f"{self.path}: sample {indices[j]} has length {lengths[j]} > "
        f"pad_to={pad_to}"
      )
    bufs = {}
    for f in fields:
      trailing, _ = self.field_spec(f)
      shape = (n, pad_to) + trailing
      if out is None:
        bufs[f] = np.zeros(shape, self.disk_dtype(f))
      else:
        bufs[f] = out[f]
        if bufs[f].shape != shape or bufs[f].dtype != self.disk_dtype(f):
          raise ValueError(
            f"out[{f!r}] is {bufs[f].shape} {bufs[f].dtype}, expected "
            f"{shape} {self.disk_dtype(f)}"
          )
    if self._lists is None:
      self._lists = (
        self.shard_of.tolist(),
        self.row_of.tolist(),
        self.lengths.tolist(),
      )
    shard_of, row_of, lens = self._lists
    raws = [s.raw for s in self.shards]
    for j, i in enumerate(indices.tolist()):
      if i < 0:
        if out is not None:
          for f in fields:
            bufs[f][j] = 0
        continue
      raw, r, length = raws[shard_of[i]], row_of[i], lens[i]
      for f in fields:
        bufs[f][j, :length] = raw[f][r : r + length]
        if out is not None and length < pad_to:
          bufs[f][j, length:] = 0
    out = {f: bufs[f].view(self.field_spec(f)[1]) for f in fields}
    out["mask"] = np.arange(pad_to)[None, :] < lengths[:, None]
    out["lengths"] = lengths
    out["index"] = indices.astype(np.int32)
    return out

  def file_bytes(self, fields: Sequence[str] | None = None) -> int:
    """Bytes on disk of the given streams over all shards."""
    fields = tuple(fields or self.fields)
    return sum(
      s.info["files"][fmt.stream_file(f)]["size"]
      for s in self.shards
      for f in fields
    )

  def readahead(self, fields: Sequence[str] | None = None) -> None:
    """Asks the kernel to read the streams' files into the page cache.

    One sequential read-ahead per file (posix_fadvise WILLNEED) instead of
    the small random faults of memory-mapped random access; a no-op where
    unsupported.
    """
    fields = tuple(fields or self.fields)
    for s in self.shards:
      for f in fields:
        path = os.path.join(s.dir, fmt.stream_file(f))
        try:
          fd = os.open(path, os.O_RDONLY)
          try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
          finally:
            os.close(fd)
        except (OSError, AttributeError):
          return

  def validate(self, *, check_values: bool = True, progress: bool = True):
    """Full check: checksums and NaN/Inf; returns per-shard statistics."""
    stats = []
    it = tqdm(self.shards, desc="validate", disable=not progress, unit="shard")
    for shard in it:
      for fname, finfo in shard.info["files"].items():
        fpath = os.path.join(shard.dir, fname)
        if "crc32" in finfo and fmt.file_crc32(fpath) != finfo["crc32"]:
          raise fmt.DatasetFormatError(
            f"{fpath}: checksum mismatch (corrupted shard)"
          )
      shard.meta  # noqa: B018 -- parses and checks the metadata file
      entry = {"name": shard.name, "num_samples": shard.num_samples}
      if check_values:
        for stream, arr in shard.states.items():
          s = shard_value_stats(arr, shard.offsets)
          entry[stream] = s
          if s["nonfinite"]:
            i = shard.first + s["first_bad_sample"]
            raise fmt.DatasetFormatError(
              f"{shard.dir}/{fmt.stream_file(stream)}: {s['nonfinite']} "
              f"NaN/Inf values, first in sample {i}"
            )
      stats.append(entry)
    return stats

  def __reduce__(self):
    # Reopen from the path instead of pickling memory-mapped arrays (which
    # would copy the data), e.g. when grain sends a source to its workers.
    return (HiddenStateDataset, (self.path,))

  def __repr__(self):
    return (
      f"HiddenStateDataset({self.path!r}, samples={self.num_samples}, "
      f"source_dim={self.source_dim}, target_dim={self.target_dim}, "
      f"dtype={self.header['dtype']})"
    )


def shard_value_stats(
  arr: np.ndarray, offsets: np.ndarray, rows_per_chunk: int = 65536
) -> dict:
  """NaN/Inf count and per-position L2-norm statistics of packed states."""
  nonfinite = 0
  first_bad_row = -1
  norms = []
  for a in range(0, arr.shape[0], rows_per_chunk):
    x = np.asarray(arr[a : a + rows_per_chunk], np.float32)
    finite = np.isfinite(x)
    bad = ~finite.all(axis=1)
    if bad.any():
      nonfinite += int(x.size - finite.sum())
      if first_bad_row < 0:
        first_bad_row = a + int(np.argmax(bad))
    norms.append(np.linalg.norm(np.where(finite, x, 0.0), axis=1))
  norms = np.concatenate(norms) if norms else np.zeros(0)
  out = {
    "nonfinite": nonfinite,
    "norm_mean": float(norms.mean()) if norms.size else float("nan"),
    "norm_std": float(norms.std()) if norms.size else float("nan"),
    "norm_min": float(norms.min()) if norms.size else float("nan"),
    "norm_max": float(norms.max()) if norms.size else float("nan"),
  }
  if first_bad_row >= 0:
    out["first_bad_sample"] = int(
      np.searchsorted(offsets, first_bad_row, side="right") - 1
    )
  return out


def open_dataset(path: str) -> HiddenStateDataset:
  """Opens a dataset directory (validates header and shard structure)."""
  return HiddenStateDataset(path)
