"""The EventGPT backend: an `EventChatModel` behind the Backend interface.

`tools.plugins.eventgpt` finds and imports the user's EventGPT checkout and
loads the model (`make_backend`); this module drives the loaded model:
prompts from the checkout's conversation template, a sample's event media
as pixel frames (`read_event_stream` checks an event stream first), the
event placeholder widened to one slot per event feature, and the prompt
forward with the features spliced in by the model's own
`prepare_inputs_labels_for_multimodal`.
"""

from __future__ import annotations

import os
import types

import numpy as np
import torch

from tools.lib import backends as bk

CONV_MODE = "eventgpt_v1"
EVENT_KEYS = ("x", "y", "p", "t")
# common.process_event_data splits every event stream into this many images.
NUM_EVENT_IMAGES = 5


def read_event_stream(path: str, sample_id: str = "?") -> int:
  """Checks an EventGPT .npy event stream; returns its number of events."""
  where = f"sample {sample_id}: events file {path}"
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{where} does not exist")
  try:
    # The repository stores streams as a pickled dict (np.save of a dict).
    arr = np.load(path, allow_pickle=True)
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"{where}: not a .npy file ({e})") from e
  obj = arr
  if isinstance(arr, np.ndarray) and arr.dtype == object and arr.shape == ():
    obj = arr.item()
  expected = (
    "expected EventGPT's event stream, a dict of 1-D arrays "
    f"{', '.join(EVENT_KEYS)} of one length"
  )
  if not isinstance(obj, dict) or not set(EVENT_KEYS) <= set(obj):
    got = (
      f"a dict with keys {sorted(obj)}"
      if isinstance(obj, dict)
      else f"{type(obj).__name__} of shape {getattr(obj, 'shape', '?')}"
    )
    raise ValueError(f"{where}: {expected}; got {got}")
  shapes = {k: np.shape(obj[k]) for k in EVENT_KEYS}
  if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) > 1:
    raise ValueError(f"{where}: {expected}; got shapes {shapes}")
  num = shapes["t"][0]
  if num < NUM_EVENT_IMAGES:
    raise ValueError(
      f"{where}: holds {num} events; EventGPT splits a stream into "
      f"{NUM_EVENT_IMAGES} event images and needs at least that many"
    )
  for k in ("x", "y"):
    v = np.asarray(obj[k])
    if not np.issubdtype(v.dtype, np.integer) or v.min() < 0:
      raise ValueError(
        f"{where}: '{k}' must hold non-negative integer pixel coordinates "
        f"(got dtype {v.dtype}, min {v.min()})"
      )
  return int(num)


class EventGPTBackend(bk.HFBackend):
  """An `EventChatModel` with its tokenizer, event processor and template."""

  def __init__(
    self,
    model,
    tokenizer,
    event_processor,
    api: types.SimpleNamespace,
    *,
    model_id: str = "",
    conv_mode: str = CONV_MODE,
    prompt_template: str | None = None,
    source: dict | None = None,
  ):
    super().__init__(
      model,
      model.get_model(),
      model.get_output_embeddings(),
      model_id=model_id,
      name="eventgpt",
    )
    self.tokenizer = tokenizer
    self.event_processor = event_processor
    self.api = api
    if conv_mode not in api.conv_templates:
      raise ValueError(
        f"unknown EventGPT conv_mode {conv_mode!r}; the checkout has "
        f"{sorted(api.conv_templates)}"
      )
    self.conv_mode = conv_mode
    self.custom_template = prompt_template is not None
    self.prompt_template = (
      prompt_template
      if self.custom_template
      else api.prepare_event_prompt("{question}", conv_mode)
    )
    if (
      self.prompt_template.count(api.DEFAULT_EVENT_TOKEN) != 1
      or "{question}" not in self.prompt_template
    ):
      raise ValueError(
        f"EventGPT prompt template must contain {api.DEFAULT_EVENT_TOKEN!r} "
        f"exactly once and '{{question}}': {self.prompt_template!r}"
      )
    self.source = dict(source or {})
    self.patch_size = int(
      model.get_visual_tower().visual_tower.config.patch_size
    )
    self._set_special_ids(model, tokenizer)

  def provenance(self) -> dict:
    prov = super().provenance()
    ep = self.event_processor
    prov.update(self.source)
    prov["conv_mode"] = None if self.custom_template else self.conv_mode
    prov["event_policy"] = {
      "events": "common.process_event_data: 5 event images, the stream "
      "split by event count",
      "images": "common.load_image, one event frame per image",
      "features": "per-frame CLIP -> visual_projector -> feature_adaptor, "
      "then get_spatio_temporal_features (frames + CLIP tokens)",
      "preprocess": {
        "size": dict(getattr(ep, "size", {}) or {}),
        "crop_size": dict(getattr(ep, "crop_size", {}) or {}),
        "image_mean": list(getattr(ep, "image_mean", []) or []),
        "image_std": list(getattr(ep, "image_std", []) or []),
      },
    }
    return prov

  def prompt(self, question: str) -> str:
    """The text prompt of a question (the checkout's template)."""
    if self.custom_template:
      return self.prompt_template.format(question=question)
    return self.api.prepare_event_prompt(question, self.conv_mode)

  def event_frames(self, media: dict, sample_id: str = "?") -> torch.Tensor:
    """The event frames of one sample as pixel values [F, 3, H, W]."""
    api, cpu = self.api, torch.device("cpu")
    if "events" in media:
      path = media["events"]
      if not isinstance(path, str):
        raise ValueError(f"sample {sample_id}: media 'events' must be a path")
      read_event_stream(path, sample_id)
      _, frames = api.process_event_data(path, self.event_processor, cpu)
    elif "image" in media or "images" in media:
      paths = media.get("images", [media.get("image")])
      if (
        not isinstance(paths, list)
        or not paths
        or not all(isinstance(p, str) for p in paths)
      ):
        raise ValueError(
          f"sample {sample_id}: media 'image' must be a path, 'images' a "
          "non-empty list of paths"
        )
      frames = []
      for p in paths:
        if not os.path.isfile(p):
          raise FileNotFoundError(
            f"sample {sample_id}: event image {p} does not exist"
          )
        img = np.array(api.load_image(p))
        pix = self.event_processor(img, return_tensors="pt")["pixel_values"]
        # bfloat16 as the repository's loaders hand frames to the model.
        frames.append(pix[0].to(torch.bfloat16))
    else:
      raise ValueError(
        f"sample {sample_id}: EventGPT needs media {{'events': FILE.npy}}, "
        f"{{'image': FILE}} or {{'images': [FILES]}}, got keys {sorted(media)}"
      )
    return torch.stack(frames).to(self.dtype)

  def num_event_tokens(self, pixel_values: torch.Tensor) -> int:
    """Features per sample: one per frame + one per CLIP token (CLS too)."""
    frames, _, height, width = pixel_values.shape
    clip_tokens = (height // self.patch_size) * (width // self.patch_size) + 1
    return int(frames) + clip_tokens

  def prompt_inputs(self, sample: dict) -> dict:
    sid = sample.get("id", "?")
    if not isinstance(sample.get("question"), str):
      raise ValueError(f"sample {sid!r}: 'question' must be a str")
    frames = self.event_frames(sample.get("media") or {}, sid)
    ids = self.api.tokenizer_event_token(
      self.prompt(sample["question"]),
      self.tokenizer,
      self.api.EVENT_TOKEN_INDEX,
      return_tensors="pt",
    )
    slot = (ids == self.api.EVENT_TOKEN_INDEX).nonzero().flatten()
    if len(slot) != 1:
      raise ValueError(
        f"sample {sid}: the tokenized prompt holds {len(slot)} event "
        "placeholders, expected 1"
      )
    k = int(slot[0])
    wide = ids.new_full((self.num_event_tokens(frames),), ids[k])
    ids = torch.cat([ids[:k], wide, ids[k + 1 :]])[None]
    return {
      "input_ids": ids,
      "attention_mask": torch.ones_like(ids),
      "event_tensors": frames[None],
    }

  def collate(self, inputs_list):
    shapes = {tuple(x["event_tensors"].shape[1:]) for x in inputs_list}
    if len(shapes) > 1:
      raise ValueError(
        f"collate(): samples with different event frame shapes {shapes} "
        "cannot share a batch"
      )
    return super().collate(inputs_list)

  def _spliced_embeddings(self, inputs: dict) -> torch.Tensor:
    """Left-padded input embeddings of a prompt batch with its events."""
    ids = inputs["input_ids"].to(self.device)
    mask = inputs["attention_mask"].to(self.device).bool()
    frames = inputs["event_tensors"].to(self.device, self.dtype)
    ev = self.api.EVENT_TOKEN_INDEX
    rows = []
    for b in range(ids.shape[0]):
      row = ids[b][mask[b]]
      is_ev = row == ev
      # Back to the single placeholder the model's own splicing expects.
      compact = row[~is_ev | (is_ev.cumsum(0) == 1)]
      out = self.model.prepare_inputs_labels_for_multimodal(
        compact[None],
        None,
        None,
        None,
        None,
        event_tensors=[list(frames[b])],
      )
      emb = out[4][0]
      if emb.shape[0] != row.shape[0]:
        raise ValueError(
          f"EventGPT spliced {emb.shape[0]} positions for a prompt of "
          f"{row.shape[0]} (events + text); the visual tower and "
          "num_event_tokens disagree"
        )
      rows.append(emb)
    full = rows[0].new_zeros((*ids.shape, rows[0].shape[-1]))
    for b, emb in enumerate(rows):
      full[b, mask[b]] = emb.to(full.dtype)
    return full.to(self.dtype)

  @torch.inference_mode()
  def forward(
    self,
    inputs=None,
    *,
    input_ids=None,
    attention_mask=None,
    past_key_values=None,
    position_ids=None,
    use_cache=True,
    logits_to_keep=0,
  ):
    if not inputs or "event_tensors" not in inputs:
      return super().forward(
        inputs,
        input_ids=input_ids,
        attention_mask=attention_mask,
        past_key_values=past_key_values,
        position_ids=position_ids,
        use_cache=use_cache,
        logits_to_keep=logits_to_keep,
      )
    if past_key_values is not None or input_ids is not None:
      raise ValueError(
        "EventGPT: the prompt call (with event_tensors) starts a new cache "
        "and takes its ids from `inputs`"
      )
    mask = inputs["attention_mask"].to(self.device)
    embeds = self._spliced_embeddings(inputs)
    if position_ids is None:
      position_ids = bk.positions_from_mask(mask, mask.shape[1])
    out = self.decoder(
      inputs_embeds=embeds,
      attention_mask=mask,
      position_ids=position_ids.to(self.device),
      use_cache=use_cache,
    )
    hidden = out.last_hidden_state
    cache = getattr(out, "cache", None)
    if cache is None:
      cache = getattr(out, "past_key_values", None)
    h_keep = hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden, self.lm_head(h_keep), cache
