"""The scenes of a split written as a samples file and its media.

Used by the study (tools/scenes/study_pair.py) and by the command line
`python -m tools.scenes.samples` (its docstring describes the files).
"""

from __future__ import annotations

import json
import os

import numpy as np
import tqdm

from tools.scenes import text, world


def write_samples(
  out: str, split: str, num: int, offset: int = 0, qtypes=text.QTYPES
) -> str:
  """Writes the media and DIR/samples.jsonl; returns the samples path."""
  from PIL import Image

  seeds = world.split_seeds(split, num, offset)
  os.makedirs(os.path.join(out, "events"), exist_ok=True)
  lines = []
  for seed in tqdm.tqdm(seeds, desc=f"write {split} scenes", unit="scene"):
    _, frames = world.render(seed)
    clip = os.path.join("clips", str(seed))
    os.makedirs(os.path.join(out, clip), exist_ok=True)
    for t, frame in enumerate(frames):
      Image.fromarray(frame).save(os.path.join(out, clip, f"frame_{t}.png"))
    ev = os.path.join("events", f"{seed}.npy")
    np.save(os.path.join(out, ev), world.events(frames))
    for qtype in qtypes:
      lines.append(
        {
          "id": f"{seed}_{qtype}",
          "question": text.question(seed, qtype),
          "media": {"target": {"video": clip}, "draft": {"events": ev}},
          "seed": seed,
          "qtype": qtype,
          "group": str(seed),
        }
      )
  path = os.path.join(out, "samples.jsonl")
  with open(path, "w") as f:
    for line in lines:
      f.write(json.dumps(line) + "\n")
  return path
