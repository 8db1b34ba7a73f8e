"""DatasetWriter: appends paired hidden-state samples into atomic shards."""

import json
import os
import shutil
import time

import numpy as np

from egpt_align.data import format as fmt


def _as_states(x, name: str, dim: int, where: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{where}: {name} must be [length, {dim}], got {x.shape}")
  if x.shape[1] != dim:
    raise ValueError(
      f"{where}: {name} has hidden size {x.shape[1]}, the dataset's "
      f"{name}_dim is {dim}"
    )
  if not np.issubdtype(x.dtype, np.floating) and x.dtype.kind != "V":
    raise ValueError(f"{where}: {name} must be floating point, got {x.dtype}")
  return x


def _as_tokens(x, name: str, length: int, where: str) -> np.ndarray:
  x = np.asarray(x)
  if x.shape != (length,):
    raise ValueError(
      f"{where}: {name} must have shape ({length},) like the states, got "
      f"{x.shape}"
    )
  if not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f"{where}: {name} must be integers, got {x.dtype}")
  if x.size and (x.min() < 0 or x.max() > np.iinfo(np.int32).max):
    raise ValueError(f"{where}: {name} out of int32 token-id range")
  return x.astype(np.int32)


def _shard_manifest(path: str) -> dict | None:
  try:
    with open(os.path.join(path, fmt.SHARD_MANIFEST)) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def _shard_ids(shard_dir: str) -> list[str]:
  """The `meta['id']` of each sample of a shard that has one, in order."""
  ids = []
  with open(os.path.join(shard_dir, fmt.META_FILE)) as f:
    for line in f:
      sample_id = json.loads(line).get("id")
      if sample_id is not None:
        ids.append(str(sample_id))
  return ids


class DatasetWriter:
  """Appends samples to a dataset directory, one atomic shard at a time.

  Samples are buffered until `samples_per_shard` are collected; the shard is
  then written into a temporary directory, renamed into place and recorded
  in header.json (written last). A crash loses at most the unfinished shard;
  reopening with `resume=True` continues after the last finished one, and
  `done_ids` tells a producer which samples (by `meta['id']`) to skip.
  """

  def __init__(
    self,
    path: str,
    *,
    source_dim: int,
    target_dim: int,
    dtype: str = "bfloat16",
    samples_per_shard: int = 2048,
    provenance: dict | None = None,
    resume: bool = True,
  ):
    if samples_per_shard < 1:
      raise ValueError("samples_per_shard must be >= 1")
    self.path = os.fspath(path)
    self.samples_per_shard = int(samples_per_shard)
    self._memory_dtype = fmt.memory_dtype(dtype)
    self._disk_dtype = fmt.disk_dtype(dtype)
    os.makedirs(self.path, exist_ok=True)
    hpath = os.path.join(self.path, fmt.HEADER_FILE)
    fresh = fmt.new_header(
      source_dim=source_dim,
      target_dim=target_dim,
      dtype=dtype,
      samples_per_shard=samples_per_shard,
      provenance=provenance,
    )
    if os.path.exists(hpath):
      if not resume:
        raise FileExistsError(
          f"{hpath} exists; pass resume=True to append to it or choose an "
          "empty directory"
        )
      header = fmt.read_header(self.path)
      for key in ("source_dim", "target_dim", "dtype"):
        if header[key] != fresh[key]:
          raise ValueError(
            f"{hpath}: cannot resume, the dataset has {key}="
            f"{header[key]!r} but the writer was given {fresh[key]!r}"
          )
      if provenance:
        header["provenance"].update(provenance)
    else:
      leftovers = [
        n for n in os.listdir(self.path) if n.startswith(fmt.SHARD_PREFIX)
      ]
      if leftovers and not resume:
        raise FileExistsError(
          f"{self.path} holds shards but no header; pass resume=True"
        )
      header = fresh
    self.header = header
    self._recover()
    self.done_ids: set[str] = set()
    for shard in self.header["shards"]:
      self.done_ids.update(_shard_ids(os.path.join(self.path, shard["name"])))
    self._buffer: list[dict] = []
    self._closed = False

  def _recover(self) -> None:
    """Removes temporaries; adopts complete shards the header missed."""
    recorded = {s["name"] for s in self.header["shards"]}
    changed = False
    for name in sorted(os.listdir(self.path)):
      full = os.path.join(self.path, name)
      if name.startswith(fmt.TMP_PREFIX):
        # An unfinished shard from a crashed writer: its samples are lost.
        shutil.rmtree(full, ignore_errors=True)
      elif name.startswith(fmt.SHARD_PREFIX) and name not in recorded:
        # Renamed into place, but the crash came before the header update.
        manifest = _shard_manifest(full)
        expected = fmt.shard_name(len(self.header["shards"]))
        if (
          manifest is not None
          and name == expected
          and self._files_ok(full, manifest)
        ):
          self._record(manifest)
          changed = True
        else:
          shutil.rmtree(full, ignore_errors=True)
    if changed:
      self._write_header()

  def _files_ok(self, shard_dir: str, manifest: dict) -> bool:
    for fname, info in manifest.get("files", {}).items():
      fpath = os.path.join(shard_dir, fname)
      if not os.path.exists(fpath) or os.path.getsize(fpath) != info["size"]:
        return False
    return True

  def _record(self, manifest: dict) -> None:
    h = self.header
    h["shards"].append(manifest)
    h["num_samples"] += manifest["num_samples"]
    h["num_positions"] += manifest["num_positions"]
    for stream in fmt.TOKEN_STREAMS:
      if manifest.get(f"has_{stream}"):
        h[f"has_{stream}"] = True

  def _write_header(self) -> None:
    self.header["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    fmt.write_json_atomic(os.path.join(self.path, fmt.HEADER_FILE), self.header)

  @property
  def num_samples(self) -> int:
    """Samples appended so far, including the unfinished shard."""
    return self.header["num_samples"] + len(self._buffer)

  def append(
    self,
    source,
    target,
    *,
    target_tokens=None,
    draft_tokens=None,
    meta: dict | None = None,
  ) -> None:
    """Adds one sample: states [L, Ds] and [L, Dt], optional token ids [L]."""
    if self._closed:
      raise RuntimeError(f"DatasetWriter({self.path}) is closed")
    meta = dict(meta or {})
    index = self.num_samples
    where = f"{self.path}: sample {index}"
    if "id" in meta:
      where += f" (id {meta['id']!r})"
    h = self.header
    source = _as_states(source, "source", h["source_dim"], where)
    target = _as_states(target, "target", h["target_dim"], where)
    length = source.shape[0]
    if target.shape[0] != length:
      raise ValueError(
        f"{where}: source has {length} positions but target has "
        f"{target.shape[0]}; pairs must be truncated to a common length"
      )
    if length < 1:
      raise ValueError(f"{where}: empty sequence")
    sample = {"length": length, "meta": meta}
    for name, x in (("source", source), ("target", target)):
      with np.errstate(over="ignore", invalid="ignore"):
        x32 = x.astype(np.float32)
      if not np.isfinite(x32).all():
        bad = np.argwhere(~np.isfinite(x32))[0]
        raise ValueError(
          f"{where}: {name} has {np.size(x32) - np.isfinite(x32).sum()} "
          f"NaN/Inf values (first at position {bad[0]}, dim {bad[1]})"
        )
      with np.errstate(over="ignore", invalid="ignore"):
        y = x.astype(self._memory_dtype)
      if not np.isfinite(y.astype(np.float32)).all():
        raise ValueError(
          f"{where}: {name} overflows {h['dtype']} (values up to "
          f"{np.abs(x32).max():g})"
        )
      sample[name] = y.view(self._disk_dtype)
    for name, x in (
      ("target_tokens", target_tokens),
      ("draft_tokens", draft_tokens),
    ):
      if x is not None:
        sample[name] = _as_tokens(x, name, length, where)
      elif self._buffer and name in self._buffer[0]:
        raise ValueError(
          f"{where}: {name} missing, but earlier samples of this shard have it"
        )
    if self._buffer:
      for name in fmt.TOKEN_STREAMS:
        if (name in sample) != (name in self._buffer[0]):
          raise ValueError(
            f"{where}: {name} given for some samples of a shard but not all"
          )
    try:
      json.dumps(meta)
    except TypeError as e:
      raise ValueError(f"{where}: meta is not JSON serialisable ({e})") from e
    self._buffer.append(sample)
    if len(self._buffer) >= self.samples_per_shard:
      self.flush()

  def flush(self) -> None:
    """Finalises the buffered samples as a shard (no-op when empty)."""
    if not self._buffer:
      return
    name = fmt.shard_name(len(self.header["shards"]))
    tmp = os.path.join(self.path, fmt.TMP_PREFIX + name)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    samples = self._buffer
    lengths = np.array([s["length"] for s in samples], np.int32)
    offsets = np.zeros(len(samples) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    arrays = {
      fmt.OFFSETS_FILE: offsets,
      fmt.LENGTHS_FILE: lengths,
    }
    streams = list(fmt.STATE_STREAMS) + [
      n for n in fmt.TOKEN_STREAMS if n in samples[0]
    ]
    for stream in streams:
      arrays[fmt.stream_file(stream)] = np.concatenate(
        [s[stream] for s in samples], axis=0
      )
    files = {}
    for fname, arr in arrays.items():
      fpath = os.path.join(tmp, fname)
      with open(fpath, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
      files[fname] = {
        "size": os.path.getsize(fpath),
        "crc32": fmt.file_crc32(fpath),
      }
    meta_path = os.path.join(tmp, fmt.META_FILE)
    with open(meta_path, "w") as f:
      for s in samples:
        f.write(json.dumps(s["meta"]) + "\n")
    files[fmt.META_FILE] = {
      "size": os.path.getsize(meta_path),
      "crc32": fmt.file_crc32(meta_path),
    }
    manifest = {
      "name": name,
      "num_samples": len(samples),
      "num_positions": int(offsets[-1]),
      "max_length": int(lengths.max()),
      "files": files,
    }
    for stream in fmt.TOKEN_STREAMS:
      manifest[f"has_{stream}"] = stream in samples[0]
    if self.header["shards"]:
      for stream in fmt.TOKEN_STREAMS:
        if manifest[f"has_{stream}"] != self.header[f"has_{stream}"]:
          raise ValueError(
            f"{self.path}: shard {name} has_{stream}="
            f"{manifest[f'has_{stream}']} but earlier shards have "
            f"{self.header[f'has_{stream}']}; give token ids for all "
            "samples or none"
          )
    fmt.write_json_atomic(os.path.join(tmp, fmt.SHARD_MANIFEST), manifest)
    os.replace(tmp, os.path.join(self.path, name))
    self._record(manifest)
    self._write_header()
    for s in samples:
      if "id" in s["meta"]:
        self.done_ids.add(str(s["meta"]["id"]))
    self._buffer = []

  def adopt(self, shard_dir: str, manifest: dict) -> None:
    """Appends a finished shard of another dataset of the same dims and
    dtype (`manifest`: its entry in that dataset's header) as the next
    shard, after any buffered samples (flushed first), as `flush` does:
    its files hard-linked (copied where a link fails) into a temporary
    directory, checked against the manifest's sizes, renamed into place,
    then recorded. The other dataset is left as it was."""
    if self._closed:
      raise RuntimeError(f"DatasetWriter({self.path}) is closed")
    self.flush()
    where = f"{shard_dir}: cannot adopt it into {self.path}"
    if not self._files_ok(shard_dir, manifest):
      raise ValueError(f"{where}: its files differ from its manifest")
    if self.header["shards"]:
      for stream in fmt.TOKEN_STREAMS:
        if manifest.get(f"has_{stream}") != self.header[f"has_{stream}"]:
          raise ValueError(
            f"{where}: it has has_{stream}={manifest.get(f'has_{stream}')} "
            f"but the dataset has {self.header[f'has_{stream}']}"
          )
    name = fmt.shard_name(len(self.header["shards"]))
    tmp = os.path.join(self.path, fmt.TMP_PREFIX + name)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for fname in list(manifest["files"]) + [fmt.SHARD_MANIFEST]:
      src, dst = os.path.join(shard_dir, fname), os.path.join(tmp, fname)
      try:
        os.link(src, dst)
      except OSError:
        shutil.copyfile(src, dst)
    manifest = dict(manifest, name=name)
    # A new file: the other dataset's manifest (linked) stays as it was.
    os.remove(os.path.join(tmp, fmt.SHARD_MANIFEST))
    fmt.write_json_atomic(os.path.join(tmp, fmt.SHARD_MANIFEST), manifest)
    os.replace(tmp, os.path.join(self.path, name))
    self._record(manifest)
    self._write_header()
    self.done_ids.update(_shard_ids(os.path.join(self.path, name)))

  def close(self) -> None:
    """Finalises the last shard and the header."""
    if self._closed:
      return
    self.flush()
    if not self.header["shards"]:
      self._write_header()  # an empty but valid dataset
    self._closed = True

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    # Buffered samples were validated on append, so keep them even when the
    # producer stops with an exception (e.g. KeyboardInterrupt).
    self.close()
    return False


def join_datasets(
  path: str, parts, provenance: dict | None = None
) -> DatasetWriter:
  """Appends the samples of the datasets `parts`, in order, to the dataset
  at `path` (made if missing; `provenance` merged into its header, as a
  writer's): every shard of each part is adopted whole (`adopt`), so the
  joined dataset reads sample for sample as the parts one after the other.
  A part's shard whose samples `path` already holds (by `meta['id']`, from
  an earlier join that stopped half way) is skipped; one that holds some of
  them is an error. The parts must share dims and dtype (the error names
  the part). Returns the closed writer."""
  parts = list(parts)
  if not parts:
    raise ValueError(f"{path}: no datasets to join")
  first = fmt.read_header(parts[0])
  writer = DatasetWriter(
    path,
    source_dim=first["source_dim"],
    target_dim=first["target_dim"],
    dtype=first["dtype"],
    samples_per_shard=first["samples_per_shard"],
    provenance=provenance,
    resume=True,
  )
  with writer:
    for part in parts:
      header = fmt.read_header(part)
      for key in ("source_dim", "target_dim", "dtype"):
        if header[key] != first[key]:
          raise ValueError(
            f"{part}: {key}={header[key]!r}, but {parts[0]} has "
            f"{first[key]!r}; only datasets of one setup can be joined"
          )
      for manifest in header["shards"]:
        shard_dir = os.path.join(part, manifest["name"])
        ids = _shard_ids(shard_dir)
        held = [i for i in ids if i in writer.done_ids]
        if ids and len(held) == len(ids):
          continue
        if held:
          raise ValueError(
            f"{shard_dir}: {len(held)} of its {len(ids)} samples are in "
            f"{path} already (first {held[0]!r}); cannot join it"
          )
        writer.adopt(shard_dir, manifest)
  return writer
