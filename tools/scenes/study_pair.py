"""The scenes pair as a study pair (`python -m tools.study --scenes ...`).

Implements the interface of tools/study/pair.py (StudyPair) by its method
names, without importing the study (the study imports this, not the other
way round): the pair made with tools.scenes.make_pair or reused, samples
written per split by tools.scenes.samples (a `group` per scene), and what
the pair adds to the results: the preset, make_pair's held-out fact
accuracy and its wrong-kind counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tools.scenes import text

QUESTIONS_PER_SCENE = len(text.QTYPES)


class ScenesPairError(Exception):
  """A bad input about the scenes pair: one `error:` line."""


class ScenesPair:
  """`--scenes PRESET` (made in DIR/pair) or `--scenes PAIR_DIR` (reused)."""

  name = "scenes"
  errors = (ScenesPairError,)

  def __init__(self, source: str, out: str, args):
    self.source = source
    self.args = args
    self.reused = os.path.isdir(source)
    self.dir = (
      os.path.abspath(source)
      if self.reused
      else os.path.join(os.path.abspath(out), "pair")
    )

  def record(self) -> dict:
    src = os.path.abspath(self.source) if self.reused else self.source
    return {"kind": "scenes", "source": src}

  def info(self) -> dict:
    path = os.path.join(self.dir, "pair.json")
    if not os.path.isfile(path):
      raise ScenesPairError(
        f"{path}: missing; run the pair stage or pass --scenes PAIR_DIR (a "
        "directory written by python -m tools.scenes.make_pair)"
      )
    with open(path) as f:
      info = json.load(f)
    if not info.get("complete"):
      raise ScenesPairError(f"{path}: an unfinished pair (complete is false)")
    return info

  def check(self) -> None:
    self.info()

  def preset(self) -> dict:
    return self.info()["fingerprint"]["preset"]

  def prepare(self, study) -> dict:
    if self.reused:
      return {
        "pair": self.dir,
        "made_here": False,
        "preset": self.preset()["name"],
      }
    args = self.args
    cmd = [
      sys.executable, "-m", "tools.scenes.make_pair", "--out", self.dir,
      "--preset", self.source, "--seed", str(args.seed),
    ]  # fmt: skip
    if args.device:
      cmd += ["--device", args.device]
    for a in args.set or ():
      cmd += ["--set", a]
    print("+ " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, check=False, start_new_session=True).returncode
    if rc:
      raise ScenesPairError(f"make_pair failed (exit status {rc})")
    return {
      "pair": "pair",
      "made_here": True,
      "preset": self.source,
      "pair_results": self.info().get("results"),
    }

  def target_spec(self) -> str:
    return f"video_llava:{os.path.join(self.dir, 'target')}"

  def draft_spec(self) -> str:
    return f"tools.scenes.drafter:make_backend:{self.dir}"

  def lm_head_args(self) -> list[str]:
    return ["--model", os.path.join(self.dir, "target")]

  def max_new_tokens(self) -> int:
    return int(self.preset()["max_new_tokens"])

  def scenes(self, split: str) -> int:
    return getattr(self.args, f"{split}_scenes")

  def samples(self, study, split: str) -> str:
    """DIR/samples/SPLIT/samples.jsonl, written once (deterministic)."""
    from tools.scenes import splits

    out = study.p("samples", split)
    path = os.path.join(out, "samples.jsonl")
    marker = os.path.join(out, "scenes.json")
    num = self.scenes(split)
    if os.path.isfile(marker) and os.path.isfile(path):
      with open(marker) as f:
        if json.load(f).get("num") == num:
          return path
    splits.write_samples(out, split, num)
    with open(marker, "w") as f:
      json.dump({"split": split, "num": num}, f)
    return path

  def warn_if_slow(self, args) -> None:
    name = self.source if not self.reused else self.preset().get("name")
    if name != "gpu" or (args.device or "").startswith("cuda"):
      return
    import torch

    if torch.cuda.is_available() and args.device in (None, ""):
      return
    print(
      "warning: the gpu preset's recipe and budget are sized for one H100; "
      "on this CPU it takes many hours. For a CPU study: python -m "
      "tools.study --out DIR --scenes tiny --train_scenes 16 --val_scenes 4 "
      "--test_scenes 4 --epochs 2 --bench_samples 4 --eager_samples 4 "
      "--bench_max_new_tokens 16 --dtype float32",
      file=sys.stderr,
    )

  def pack_patterns(self) -> tuple[str, ...]:
    return () if self.reused else ("pair/**",)

  def results_info(self, study_dir: str) -> dict | None:
    path = os.path.join(self.dir, "pair.json")
    if not os.path.isfile(path):
      return None
    with open(path) as f:
      pair = json.load(f)
    return {
      "preset": pair["fingerprint"]["preset"],
      "results": pair.get("results"),
      "versions": pair.get("versions"),
    }

  def title(self) -> str:
    return "Results on the scenes pair"

  def describe(self, entry: dict | None) -> list[str]:
    entry = entry or {}
    preset = entry.get("preset") or {}
    r = entry.get("results") or {}
    lines = [
      f"Preset `{preset.get('name')}`: hidden {preset.get('hidden')}, "
      f"target {preset.get('target_layers')} layers, drafter "
      f"{preset.get('drafter_layers')} layers (tools/scenes/models.py)."
    ]
    if r.get("target"):
      lines.append(
        "Held-out fact accuracy from make_pair (share of "
        f"{r.get('eval_scenes_per_qtype')} test scenes per question type "
        "whose greedy answer states exactly the true facts; `type/part` "
        "entries are partial scores): "
        + ", ".join(
          f"{q} target {_pct(r['target'][q])} / drafter "
          f"{_pct(r['drafter'].get(q))}"
          for q in r["target"]
        )
        + "."
      )
    for q in text.FILTERED:
      kinds = r.get(f"{q}_wrong_kind_by_form")
      if not kinds:
        continue
      lines.append(
        f"Objects of the wrong kind named in `{q}` answers (wrong / "
        "sentences, by sentence form): "
        + "; ".join(
          f"{role} "
          + ", ".join(f"{form} {a}/{b}" for form, (a, b) in forms.items())
          for role, forms in kinds.items()
        )
        + "."
      )
    return lines


def _pct(x) -> str:
  return "–" if x is None else f"{100 * x:.1f}%"
