"""The samples file and each sample's media (images, video frames).

Schema of the samples JSONL: docs/PLUGINS.md.
"""

from __future__ import annotations

import json
import os

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _read_image(path: str) -> np.ndarray:
  from PIL import Image

  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def _decode_video(path: str) -> list[np.ndarray]:
  """All frames of a video file as RGB arrays (PyAV, then imageio)."""
  try:
    import av  # type: ignore

    with av.open(path) as container:
      return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
  except ImportError:
    pass
  try:
    import imageio.v3 as iio  # type: ignore

    return list(iio.imiter(path))
  except ImportError:
    pass
  raise RuntimeError(
    f"cannot decode video {path!r}: neither PyAV (`av`) nor imageio is "
    "installed; install one, or give the frames as image files "
    "(media 'video': DIR of images, or 'frames': [paths])"
  )


def uniform_indices(num_available: int, num_frames: int) -> np.ndarray:
  """Frame indices sampled uniformly like the reference (np.linspace)."""
  return np.linspace(0, num_available - 1, num_frames).astype(int)


def load_frames(media: dict, num_frames: int, *, sample_id: str = "?") -> list:
  """`num_frames` RGB frames sampled uniformly from a video or image files.

  `media` is {'video': FILE_OR_DIR} or {'frames': [image paths]}. A directory
  is read as its image files in sorted name order.
  """
  if "frames" in media:
    paths = list(media["frames"])
    if not paths or not all(isinstance(p, str) for p in paths):
      raise ValueError(
        f"sample {sample_id}: media 'frames' must be a list of paths"
      )
    picked = [paths[i] for i in uniform_indices(len(paths), num_frames)]
    return [_read_image(p) for p in picked]
  if "video" not in media:
    raise ValueError(
      f"sample {sample_id}: video_llava needs media {{'video': FILE_OR_DIR}} "
      f"or {{'frames': [paths]}}, got keys {sorted(media)}"
    )
  path = media["video"]
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"sample {sample_id}: video {path!r} does not exist"
    )
  if os.path.isdir(path):
    names = sorted(
      n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES)
    )
    if not names:
      raise ValueError(f"sample {sample_id}: no image files in {path!r}")
    picked = [names[i] for i in uniform_indices(len(names), num_frames)]
    return [_read_image(os.path.join(path, n)) for n in picked]
  frames = _decode_video(path)
  if not frames:
    raise ValueError(f"sample {sample_id}: video {path!r} has no frames")
  return [frames[i] for i in uniform_indices(len(frames), num_frames)]


ROLES = ("target", "draft")


def _resolve(value, root: str):
  """Joins relative path strings (that exist under `root`) onto `root`."""
  if isinstance(value, str):
    if not os.path.isabs(value) and os.path.exists(os.path.join(root, value)):
      return os.path.join(root, value)
    return value
  if isinstance(value, list):
    return [_resolve(v, root) for v in value]
  if isinstance(value, dict):
    return {k: _resolve(v, root) for k, v in value.items()}
  return value


def read_samples(path: str, media_root: str | None = None) -> list[dict]:
  """Reads and validates the samples JSONL; errors name the line and field."""
  root = media_root or os.path.dirname(os.path.abspath(path))
  samples, seen = [], {}
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from e
      if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object per line")
      sid = obj.get("id")
      if not isinstance(sid, (str, int)) or isinstance(sid, bool):
        raise ValueError(f"{where}: 'id' must be a string, got {sid!r}")
      sid = str(sid)
      if sid in seen:
        raise ValueError(f"{where}: id {sid!r} repeats line {seen[sid]}")
      seen[sid] = lineno
      if not isinstance(obj.get("question"), str):
        raise ValueError(f"{where} (id {sid!r}): 'question' must be a string")
      media = obj.get("media", {})
      if not isinstance(media, dict) or any(
        not isinstance(media.get(r, {}), dict) for r in ROLES
      ):
        raise ValueError(
          f"{where} (id {sid!r}): 'media' must be "
          '{"target": {...}, "draft": {...}}'
        )
      unknown = sorted(set(media) - set(ROLES))
      if unknown:
        raise ValueError(
          f"{where} (id {sid!r}): unknown media roles {unknown}; "
          f"expected {list(ROLES)}"
        )
      sample = {
        "id": sid,
        "question": obj["question"],
        "media": {r: _resolve(media.get(r, {}), root) for r in ROLES},
      }
      if "group" in obj:
        group = obj["group"]
        if not isinstance(group, (str, int)) or isinstance(group, bool):
          raise ValueError(
            f"{where} (id {sid!r}): 'group' must be a string, got {group!r}"
          )
        sample["group"] = str(group)
      samples.append(sample)
  grouped = ["group" in x for x in samples]
  if any(grouped) and not all(grouped):
    raise ValueError(
      f"{path}: sample {samples[grouped.index(False)]['id']!r} has no "
      "'group' while others have one (give every sample a group, or none)"
    )
  return samples


def one_per_group_in_turn(samples: list[dict]) -> list[dict]:
  """The samples reordered so each round takes the next sample of every
  group, groups in order of first appearance: a run cut short by its
  sample count or time budget covers as many groups, the units its CIs
  resample, as it can. Group i starts at its (i mod size)-th sample (file
  order, wrapping), so the first round mixes the questions as the file
  does (a scene's questions come in a fixed order of types). Ungrouped
  samples keep their order."""
  groups: dict[str, list[dict]] = {}
  for x in samples:
    if "group" not in x:
      return list(samples)
    groups.setdefault(x["group"], []).append(x)
  turns = [
    g[i % len(g) :] + g[: i % len(g)] for i, g in enumerate(groups.values())
  ]
  rounds = max((len(g) for g in turns), default=0)
  return [g[r] for r in range(rounds) for g in turns if r < len(g)]


def role_view(sample: dict, role: str) -> dict:
  """One model's view of a sample: its id, question and own media.

  Random-model samples carry their prompt as `input_ids`, kept as is.
  """
  media = sample.get("media") or {}
  return {
    "id": sample["id"],
    "question": sample.get("question", ""),
    "media": media.get(role, {}) if isinstance(media, dict) else {},
    **({"input_ids": sample["input_ids"]} if "input_ids" in sample else {}),
  }
