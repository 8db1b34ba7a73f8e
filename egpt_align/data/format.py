"""On-disk format of hidden-state datasets: constants and header validation.

A dataset is a directory::

  header.json                 the source of truth (written last, atomically)
  shard-00000/                one finalised shard (renamed into place whole)
    shard.json                the shard's own manifest (sizes, checksums)
    source.npy                [T, Ds] states of all its samples, packed
    target.npy                [T, Dt]
    offsets.npy               int64 [n + 1]: sample i is rows offsets[i]:
                              offsets[i + 1] of the packed arrays
    lengths.npy               int32 [n]: valid positions of each sample
    target_tokens.npy         int32 [T] (optional)
    draft_tokens.npy          int32 [T] (optional)
    meta.jsonl                n lines of per-sample metadata (texts, ids)
  shard-00001/ ...

bfloat16 states are stored as their uint16 bit patterns (plain ``.npy`` has
no bfloat16 type) and viewed as ``ml_dtypes.bfloat16`` when read. See
docs/DATA_FORMAT.md.
"""

import json
import math
import os
import zlib
from collections.abc import Mapping

import ml_dtypes
import numpy as np

FORMAT_NAME = "egpt_align.hidden_states"
FORMAT_VERSION = 1
HEADER_FILE = "header.json"
SHARD_MANIFEST = "shard.json"
SHARD_PREFIX = "shard-"
TMP_PREFIX = ".tmp-"
META_FILE = "meta.jsonl"
OFFSETS_FILE = "offsets.npy"
LENGTHS_FILE = "lengths.npy"
STATE_STREAMS = ("source", "target")
TOKEN_STREAMS = ("target_tokens", "draft_tokens")
CONVENTION = (
  "h[t] is the state whose LM-head argmax is generated token t "
  "(h[0] is the last prompt position)"
)

# Name in the header -> (dtype used in memory, dtype of the bits on disk).
DTYPES = {
  "bfloat16": (np.dtype(ml_dtypes.bfloat16), np.dtype(np.uint16)),
  "float16": (np.dtype(np.float16), np.dtype(np.float16)),
  "float32": (np.dtype(np.float32), np.dtype(np.float32)),
}


class DatasetFormatError(ValueError):
  """A dataset directory or one of its files is not as the format says."""


def shard_name(k: int) -> str:
  """Directory name of shard number k."""
  return f"{SHARD_PREFIX}{k:05d}"


def stream_file(stream: str) -> str:
  """File name of a stream inside a shard directory."""
  return f"{stream}.npy"


def memory_dtype(name: str) -> np.dtype:
  """The numpy dtype states of a stored dtype name have in memory."""
  if name not in DTYPES:
    raise DatasetFormatError(
      f"unknown state dtype {name!r}; expected one of {sorted(DTYPES)}"
    )
  return DTYPES[name][0]


def disk_dtype(name: str) -> np.dtype:
  """The numpy dtype of the bits stored on disk for a dtype name."""
  memory_dtype(name)
  return DTYPES[name][1]


def file_crc32(path: str, chunk_bytes: int = 1 << 24) -> int:
  """CRC-32 of a whole file, read in chunks."""
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(chunk_bytes):
      crc = zlib.crc32(chunk, crc)
  return crc


def to_jsonable(obj):
  """A JSON-clean copy (arrays and scalars to Python, non-finite to None)."""
  if isinstance(obj, Mapping):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, list | tuple):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray | np.generic) or hasattr(obj, "__array__"):
    return to_jsonable(np.asarray(obj).tolist())
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON to a temporary file and renames it over path."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=False)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def new_header(
  *,
  source_dim: int,
  target_dim: int,
  dtype: str,
  samples_per_shard: int,
  provenance: dict | None,
) -> dict:
  """A header for an empty dataset."""
  memory_dtype(dtype)
  provenance = dict(provenance or {})
  provenance.setdefault("convention", CONVENTION)
  return {
    "format": FORMAT_NAME,
    "version": FORMAT_VERSION,
    "source_dim": int(source_dim),
    "target_dim": int(target_dim),
    "dtype": dtype,
    "num_samples": 0,
    "num_positions": 0,
    "has_target_tokens": False,
    "has_draft_tokens": False,
    "samples_per_shard": int(samples_per_shard),
    "provenance": provenance,
    "shards": [],
  }


_REQUIRED = {
  "format": str,
  "version": int,
  "source_dim": int,
  "target_dim": int,
  "dtype": str,
  "num_samples": int,
  "num_positions": int,
  "has_target_tokens": bool,
  "has_draft_tokens": bool,
  "provenance": dict,
  "shards": list,
}
_SHARD_REQUIRED = {
  "name": str,
  "num_samples": int,
  "num_positions": int,
  "files": dict,
}


def check_header(header, path: str) -> dict:
  """Validates a parsed header; raises DatasetFormatError naming the field."""
  if not isinstance(header, dict):
    raise DatasetFormatError(f"{path}: expected a JSON object")
  for key, typ in _REQUIRED.items():
    if key not in header:
      raise DatasetFormatError(f"{path}: missing field {key!r}")
    if not isinstance(header[key], typ):
      raise DatasetFormatError(
        f"{path}: field {key!r} should be {typ.__name__}, got "
        f"{type(header[key]).__name__}"
      )
  if header["format"] != FORMAT_NAME:
    raise DatasetFormatError(
      f"{path}: format is {header['format']!r}, expected {FORMAT_NAME!r}"
    )
  if header["version"] > FORMAT_VERSION:
    raise DatasetFormatError(
      f"{path}: format version {header['version']} is newer than this "
      f"reader ({FORMAT_VERSION})"
    )
  memory_dtype(header["dtype"])
  for key in ("source_dim", "target_dim"):
    if header[key] <= 0:
      raise DatasetFormatError(f"{path}: {key} must be positive")
  total_n = total_t = 0
  for i, shard in enumerate(header["shards"]):
    for key, typ in _SHARD_REQUIRED.items():
      if not isinstance(shard.get(key), typ):
        raise DatasetFormatError(
          f"{path}: shards[{i}] field {key!r} missing or not {typ.__name__}"
        )
    total_n += shard["num_samples"]
    total_t += shard["num_positions"]
  if total_n != header["num_samples"]:
    raise DatasetFormatError(
      f"{path}: num_samples is {header['num_samples']} but the shards hold "
      f"{total_n}"
    )
  if total_t != header["num_positions"]:
    raise DatasetFormatError(
      f"{path}: num_positions is {header['num_positions']} but the shards "
      f"hold {total_t}"
    )
  return header


def read_header(path: str) -> dict:
  """Reads and validates DIR/header.json."""
  hpath = os.path.join(path, HEADER_FILE)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"dataset directory {path} does not exist")
  if not os.path.exists(hpath):
    raise DatasetFormatError(
      f"{hpath} is missing: {path} is not a finished egpt_align dataset "
      "(or its writer never closed a shard)"
    )
  try:
    with open(hpath) as f:
      header = json.load(f)
  except json.JSONDecodeError as e:
    raise DatasetFormatError(f"{hpath}: not valid JSON ({e})") from e
  return check_header(header, hpath)
