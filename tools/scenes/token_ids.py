"""Token ids of the scenes pair's conversations: prompts, answers, batches.

A prompt is `text.prompt` with the model's media placeholder repeated once
per media token (`Prompts`: the target's `<video>`, the drafter's
`<event>`); an answer is its tokens and EOS (`answer_ids`); training
sequences are right-padded to one width (`pad_batch`).
"""

from __future__ import annotations

import numpy as np
import torch

from tools.scenes import text


class Prompts:
  """Prompt token ids per question text, for one model's media token."""

  def __init__(self, tokenizer, media_token: str, count: int):
    self.tokenizer = tokenizer
    self.media_token, self.count = media_token, count
    self.media = media_token * count
    self._cache: dict = {}

  def longest(self) -> int:
    """Tokens of the longest prompt over every question wording."""
    return max(
      len(self(q)) for wordings in text.QUESTIONS.values() for q in wordings
    )

  def __call__(self, question: str) -> list[int]:
    if question not in self._cache:
      full = text.prompt(question, "<m>").replace("<m>", self.media)
      self._cache[question] = self.tokenizer(full)["input_ids"]
    return self._cache[question]

  def media_span(self) -> tuple[int, int]:
    """(first, end) positions of the media tokens; the same in every prompt
    (they follow the fixed prefix)."""
    ids = self(text.QUESTIONS[text.QTYPES[0]][0])
    media_id = self.tokenizer.convert_tokens_to_ids(self.media_token)
    first = ids.index(media_id)
    return first, first + self.count

  def follow_up(self, question: str) -> list[int]:
    """Token ids of a later turn's question in a multi-turn sequence (after
    the previous answer's EOS): `USER: {question} ASSISTANT:`, no media."""
    key = ("follow_up", question)
    if key not in self._cache:
      full = f"{text.PROMPT_PREFIX} {question} {text.PROMPT_SUFFIX}"
      self._cache[key] = self.tokenizer(full, add_special_tokens=False)[
        "input_ids"
      ]
    return self._cache[key]


def answer_ids(tokenizer, answer: str) -> list[int]:
  """Token ids of an answer as the model generates it (EOS appended)."""
  ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
  return ids + [tokenizer.eos_token_id]


def decode_answer(tokenizer, ids) -> str:
  return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def pad_batch(seqs, labels, pad_id: int, width: int | None = None):
  """Right-padded (input_ids, attention_mask, labels) of token sequences and
  their labels (-100 where unlabelled).

  `width`: pad every batch to this many tokens (one shape for every step,
  so a compiled model compiles once); a longer sequence is an error.
  """
  longest = max(len(s) for s in seqs)
  if width is not None and longest > width:
    raise ValueError(
      f"a training sequence has {longest} tokens, over the fixed width {width}"
    )
  width = width or longest
  ids = np.full((len(seqs), width), pad_id, np.int64)
  mask = np.zeros((len(seqs), width), np.int64)
  out = np.full((len(seqs), width), -100, np.int64)
  for i, (s, lab) in enumerate(zip(seqs, labels, strict=True)):
    ids[i, : len(s)] = s
    mask[i, : len(s)] = 1
    out[i, : len(lab)] = lab
  return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(out)
