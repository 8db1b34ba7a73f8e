"""DIR/study.json (what each stage produced) and the packed parts."""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import tarfile

from tools.lib.sd_methods import all_options
from tools.study import layout
from tools.study.pair import StudyError

BENCH_SETTINGS = (
  "bench_samples",
  "eager_samples",
  "headline_samples",
  "headline_budget_s",
  "gamma",
  "bench_max_new_tokens",
  "runtimes",
)  # and the method kinds' options (the tree flags): `Study.settings`
# The settings each stage's outputs depend on: a finished stage run with
# other values is refused (use another --out or --redo it).
STAGE_SETTINGS = {
  "pair": ("seed", "set"),
  "dump": ("train_scenes", "val_scenes", "test_scenes", "dump_max_new_tokens"),
  "train": ("epochs", "batch_size", "prefill_widths"),
  "evaluate": ("bootstrap", "gamma"),
  "bench1": BENCH_SETTINGS,
  "bench2": BENCH_SETTINGS,
}
# Stages that keep their earlier adapters when a run adds more (`missing`):
# their time is the sum of those runs'.
ADDITIVE_STAGES = ("train", "evaluate", "export")
# What each stage writes under DIR: a --redo removes it first, so the stage
# starts clean (a dump resumes only what this run began).
STAGE_OUTPUTS = {
  "dump": ("data", "samples"),
  "lm_head": ("lm_head.npy", "lm_head.json"),
  "train": ("runs",),
  "evaluate": ("eval",),
  "export": ("exports",),
  "bench1": (os.path.join("bench", "gpus1"),),
  "bench2": (os.path.join("bench", "gpus2"),),
  "results": ("report",),
}


class Study:
  """DIR/study.json: settings, the pair, and what each stage produced."""

  def __init__(self, out: str, args, pair):
    self.out = os.path.abspath(out)
    self.args = args
    self.pair = pair
    self.path = os.path.join(self.out, layout.STUDY_FILE)
    # The adapters this run asks for (--adapters; all by default).
    self.adapters = layout.parse_adapters(getattr(args, "adapters", None))
    self.state = {"stages": {}, "created": layout.now()}
    if os.path.isfile(self.path):
      with open(self.path) as f:
        self.state = json.load(f)

  def p(self, *parts) -> str:
    return os.path.join(self.out, *parts)

  def done(self, stage: str) -> bool:
    return bool(self.state["stages"].get(stage, {}).get("done"))

  def missing(self, stage: str) -> list[str]:
    """What this run's adapters need of a finished stage that its record
    lacks (adapters, or live methods): the stage runs again for them."""
    rec = self.state["stages"].get(stage, {})
    if stage in ("train", "evaluate"):
      have = rec.get("adapters", {})
    elif stage == "export":
      have = rec.get("files", {})
    elif stage in layout.BENCH_DIRS:
      have = rec.get("methods", ())
      return [m for m in layout.methods_of(self.adapters) if m not in have]
    else:
      return []
    return [a for a in self.adapters if a not in have]

  def settings(self, stage: str) -> dict:
    names = STAGE_SETTINGS.get(stage, ())
    if stage in layout.BENCH_DIRS:
      names += tuple(o.name for o in all_options())
    return {k: getattr(self.args, k, None) for k in names}

  def check(self, stage: str) -> None:
    """Refuses a finished stage whose settings differ from this run's (a
    setting its record predates is not compared)."""
    rec = self.state["stages"].get(stage, {})
    if not rec.get("done"):
      return
    for k, v in self.settings(stage).items():
      if k not in rec.get("settings", {}):
        continue
      old = rec["settings"][k]
      if old != v:
        raise StudyError(
          f"{self.path}: stage {stage} was run with --{k} {old!r}, this run "
          f"has {v!r}; use another --out or --redo {stage}"
        )

  def record(self, stage: str, seconds: float, **info) -> None:
    """Marks the stage done. A run that adds adapters to a stage that keeps
    its earlier ones (ADDITIVE_STAGES) adds its seconds to theirs."""
    earlier = self.state["stages"].get(stage, {})
    if stage in ADDITIVE_STAGES and earlier.get("done"):
      seconds += earlier.get("seconds") or 0.0
    self.state["stages"][stage] = {
      "done": True,
      "seconds": round(seconds, 1),
      "finished": layout.now(),
      "settings": self.settings(stage),
      **info,
    }
    self.save()

  def forget(self, stage: str) -> None:
    """Drops the stage's record and its outputs (a redo starts clean)."""
    self.state["stages"].pop(stage, None)
    if stage == "train":
      self.state["stages"].pop("train_partial", None)
    for rel in STAGE_OUTPUTS.get(stage, ()):
      path = self.p(rel)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
    self.save()

  def save(self) -> None:
    os.makedirs(self.out, exist_ok=True)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.state, f, indent=1)
    os.replace(tmp, self.path)


# --------------------------------------------------------------------------
# Pack and unpack.

PACK_PREFIX = "study.tar.part"
PACK_PATTERNS = (
  layout.STUDY_FILE,
  layout.COSTS_7B_FILE,
  "lm_head.npy",
  "lm_head.json",
  "exports/*",
  "eval/*/*.json",
  "eval/*/*.md",
  "bench/*/*/results.json",
  "bench/*/*/report.md",
  "report/*",
  "report/*/*",
  "data/*/header.json",
  "runs/*/*.json",  # config, history (not the checkpoints)
  "runs/*/*.jsonl",
)


def pack_files(study: Study, extra=()) -> list[str]:
  """The small outputs (relative to DIR) that later stages and docs need."""
  files = set()
  for pat in PACK_PATTERNS + tuple(extra):
    for path in glob.glob(study.p(pat), recursive=True):
      if os.path.isfile(path):
        files.add(os.path.relpath(path, study.out))
  return sorted(files)


def _is_export(rel: str) -> bool:
  return rel.startswith("exports" + os.sep) and rel.endswith(".pt")


def _half_export(path: str) -> bytes:
  """An exported adapter with its float weights stored as float16.

  The benchmark casts adapters to its --adapter_dtype (float16 on GPU by
  default) when it loads them, so on a GPU nothing changes; the file halves.
  """
  import torch

  ckpt = torch.load(path, map_location="cpu", weights_only=True)
  ckpt["model_state_dict"] = {
    k: v.half() if v.is_floating_point() else v
    for k, v in ckpt["model_state_dict"].items()
  }
  ckpt["egpt_align_packed_dtype"] = "float16"
  buf = io.BytesIO()
  torch.save(ckpt, buf)
  return buf.getvalue()


def pack(
  study: Study, dest: str, part_mib: float, dtype: str, extra=()
) -> list[str]:
  """Writes DEST/study.tar.partNN (each <= part_mib MiB)."""
  files = pack_files(study, extra)
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for rel in files:
      if dtype == "float16" and _is_export(rel):
        blob = _half_export(study.p(rel))
        info = tarfile.TarInfo(rel)
        info.size = len(blob)
        info.mtime = int(os.path.getmtime(study.p(rel)))
        tar.addfile(info, io.BytesIO(blob))
      else:
        tar.add(study.p(rel), arcname=rel)
  data = buf.getvalue()
  size = int(part_mib * 2**20)
  os.makedirs(dest, exist_ok=True)
  for old in glob.glob(os.path.join(dest, PACK_PREFIX + "*")):
    os.remove(old)
  paths = []
  for i, lo in enumerate(range(0, len(data), size)):
    path = os.path.join(dest, f"{PACK_PREFIX}{i:02d}")
    with open(path, "wb") as f:
      f.write(data[lo : lo + size])
    paths.append(path)
  print(
    f"packed {len(files)} files, {len(data) / 2**20:.1f} MiB, "
    f"into {len(paths)} part(s) in {dest}"
  )
  return paths


def unpack(src: str, out: str) -> int:
  """Extracts SRC/study.tar.part* into OUT; returns the number of files."""
  parts = sorted(glob.glob(os.path.join(src, PACK_PREFIX + "*")))
  if not parts:
    raise StudyError(f"--unpack {src}: no {PACK_PREFIX}NN files there")
  data = b"".join(open(p, "rb").read() for p in parts)  # noqa: SIM115
  os.makedirs(out, exist_ok=True)
  try:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
      members = tar.getmembers()
      tar.extractall(out, filter="data")
  except tarfile.TarError as e:
    raise StudyError(
      f"--unpack {src}: the parts do not form a tar ({e}); are parts missing?"
    ) from e
  return len(members)
