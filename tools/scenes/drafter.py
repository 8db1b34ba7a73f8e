"""The scenes drafter as a backend plugin (an EventGPT-style plugin).

Spec: `tools.scenes.drafter:make_backend:DIR`, where DIR is a pair directory
(its `drafter/` is used) or the drafter directory itself. Media read from a
sample: `{"events": FILE.npy}`, uint8 event frames [F - 1, 2, H, W] as
written by `python -m tools.scenes.samples` (tools/scenes/world.py:events).

The prompt is the target's with `<event>` in place of `<video>`:
`USER: <event>\n{question} ASSISTANT:`, the placeholder expanded to one token
per event patch; the event features replace those tokens' embeddings in the
prompt (first) call only, as EventGPT splices its image features.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from tools.lib import backends as bk
from tools.scenes import models, text, token_ids, world

EVENT_TEMPLATE = text.prompt("{question}", "<event>")


class SceneDrafterBackend(bk.HFBackend):
  """Event frames + question -> the drafter's states (see module doc)."""

  def __init__(self, model: models.SceneDrafter, tokenizer, *, model_id=""):
    super().__init__(
      model, model, model.lm.lm_head, model_id=model_id, name="scenes_drafter"
    )
    self.tokenizer = tokenizer
    self.num_event_tokens = int(model.config["num_event_tokens"])
    self.prompt_template = EVENT_TEMPLATE
    self.prompts = token_ids.Prompts(
      tokenizer, "<event>", self.num_event_tokens
    )
    self._set_special_ids(model, tokenizer)

  def provenance(self) -> dict:
    prov = super().provenance()
    prov["media_policy"] = {
      "events": f"uint8 [{world.NUM_FRAMES - 1}, 2, {world.SIZE}, "
      f"{world.SIZE}] event counts, threshold {world.CONTRAST_THRESHOLD}",
      "event_tokens": self.num_event_tokens,
    }
    return prov

  def static_decoder(self, max_len: int, **options):
    """Static-cache steps of the drafter's Llama after its spliced prefill.

    Events enter only through the prompt's embeddings, so every later step
    is a plain Llama step: the fast runtime decodes the drafter as it does a
    Llama target.
    """
    from tools.lib import static_kv

    return static_kv.StaticLM(
      self.model.lm.model, self.lm_head.weight, max_len, **options
    )

  def event_frames(self, media: dict, sample_id: str) -> torch.Tensor:
    """The [1, F - 1, 2, H, W] event frames of a sample's media."""
    path = media.get("events")
    if not isinstance(path, str):
      raise ValueError(
        f"sample {sample_id}: the scenes drafter needs media "
        f'{{"events": FILE.npy}}, got keys {sorted(media)}'
      )
    if not os.path.isfile(path):
      raise FileNotFoundError(f"sample {sample_id}: {path!r} does not exist")
    ev = np.load(path)
    want = (world.NUM_FRAMES - 1, 2, world.SIZE, world.SIZE)
    if ev.shape != want or ev.dtype != np.uint8:
      raise ValueError(
        f"sample {sample_id}: {path}: events {ev.dtype}{list(ev.shape)}, "
        f"expected uint8{list(want)}"
      )
    return torch.from_numpy(ev)[None]

  def encode(self, question: str, events: torch.Tensor) -> dict:
    """Batch-1 inputs from a question and event frames [1, F-1, 2, H, W]."""
    ids = torch.tensor([self.prompts(question)])
    return {
      "input_ids": ids,
      "attention_mask": torch.ones_like(ids),
      "event_frames": events,
    }

  def prompt_inputs(self, sample: dict) -> dict:
    sid = sample.get("id", "?")
    if not isinstance(sample.get("question"), str):
      raise ValueError(f"sample {sid!r}: 'question' must be a str")
    media = sample.get("media") or {}
    return self.encode(sample["question"], self.event_frames(media, sid))


def drafter_dir(path: str) -> str:
  """The drafter directory of a pair directory (or `path` itself)."""
  sub = os.path.join(path, "drafter")
  return sub if os.path.isdir(sub) else path


def make_backend(arg, *, device="cpu", dtype="float32", **options):
  """Plugin factory: `tools.scenes.drafter:make_backend:DIR`."""
  if not arg:
    raise ValueError(
      "tools.scenes.drafter:make_backend needs the pair directory: "
      "tools.scenes.drafter:make_backend:DIR"
    )
  if options:
    raise ValueError(f"scenes drafter: unknown options {sorted(options)}")
  path = drafter_dir(arg)
  model, tokenizer = models.load_drafter(path, bk.torch_dtype(dtype))
  return SceneDrafterBackend(model.to(device), tokenizer, model_id=path)
