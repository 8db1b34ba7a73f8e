"""The pair a study runs on: the interface, and the pair given as specs.

A study asks its pair for the model specs, the samples of each split, the
hidden size and the generation length; what a pair knows beyond that (the
scenes pair's fact accuracy and wrong-kind counts) it adds to results.json
and RESULTS.md through `results_info` and `describe`. tools/scenes/
study_pair.py is the other implementation.
"""

from __future__ import annotations

import os


class StudyError(Exception):
  """A bad input or a failed stage: one `error:` line, exit status 2."""


class StudyPair:
  """What the study needs of a pair (override each method)."""

  # Written into study.json and the regenerate commands.
  name = "pair"
  # Exceptions of the pair's own code that mean a bad input (one line).
  errors: tuple[type[Exception], ...] = (StudyError,)

  def record(self) -> dict:
    """What study.json keeps to rebuild the pair (its `kind` included)."""
    raise NotImplementedError

  def warn_if_slow(self, args) -> None:
    """Warns on stderr when the asked budget does not fit this machine."""

  def pack_patterns(self) -> tuple[str, ...]:
    """Files under DIR that --pack adds (globs)."""
    return ()

  def prepare(self, study) -> dict:
    """The `pair` stage: makes or checks the pair; returns what to record."""
    raise NotImplementedError

  def check(self) -> None:
    """Raises StudyError when the pair cannot be used (before any stage)."""

  def target_spec(self) -> str:
    raise NotImplementedError

  def draft_spec(self) -> str:
    raise NotImplementedError

  def lm_head_args(self) -> list[str]:
    """tools/extract_lm_head.py's source flag for the target's head."""
    return ["--spec", self.target_spec()]

  def samples(self, study, split: str) -> str:
    """The samples.jsonl of SPLIT (written on first use if the pair makes
    its own)."""
    raise NotImplementedError

  def max_new_tokens(self) -> int | None:
    """The generation length when no --*_max_new_tokens is given."""
    return None

  def results_info(self, study_dir: str) -> dict | None:
    """The pair's own entry of results.json (None: nothing to add)."""
    return None

  def describe(self, pair_entry: dict | None) -> list[str]:
    """RESULTS.md lines about the pair, from its results.json entry."""
    return []

  def title(self) -> str:
    return "Results of the study"


class SpecPair(StudyPair):
  """Two models given as backend specs, with three samples files."""

  name = "specs"

  def __init__(self, target: str, draft: str, samples: str, max_new: int):
    self._target, self._draft = target, draft
    paths = [p for p in samples.split(",") if p]
    if len(paths) != 3:
      raise StudyError(
        f"--samples {samples!r}: expected TRAIN.jsonl,VAL.jsonl,TEST.jsonl"
      )
    self._samples = dict(zip(("train", "val", "test"), paths, strict=True))
    self._max_new = max_new

  def record(self) -> dict:
    return {
      "kind": "specs",
      "target": self._target,
      "draft": self._draft,
      "samples": ",".join(os.path.abspath(p) for p in self._samples.values()),
      "max_new_tokens": self._max_new,
    }

  def check(self) -> None:
    for split, path in self._samples.items():
      if not os.path.isfile(path):
        raise StudyError(f"--samples: the {split} file {path}: missing")

  def prepare(self, study) -> dict:
    self.check()
    return {
      "pair": self.name,
      "target": self._target,
      "draft": self._draft,
      "samples": {k: os.path.abspath(v) for k, v in self._samples.items()},
    }

  def target_spec(self) -> str:
    return self._target

  def draft_spec(self) -> str:
    return self._draft

  def samples(self, study, split: str) -> str:
    return os.path.abspath(self._samples[split])

  def max_new_tokens(self) -> int | None:
    return self._max_new

  def results_info(self, study_dir: str) -> dict | None:
    return {"target": self._target, "draft": self._draft}

  def describe(self, pair_entry: dict | None) -> list[str]:
    e = pair_entry or {}
    return [f"Target `{e.get('target')}`, drafter `{e.get('draft')}`."]
