"""Model backends for the torch side: one loaded model behind one interface.

A backend wraps a model and its preprocessing so that the dump tool and the
live benchmark can drive any drafter or target the same way:

* `prompt_inputs(sample)` turns one sample (question + this model's media)
  into batch-1 model inputs, `collate` left-pads several into a batch;
* `forward(...)` returns the FINAL post-norm last-layer states (never all
  layers), the LM-head logits of the positions asked for, and the KV cache.

Convention (docs/DESIGN.md): h[t] is the state whose LM-head argmax is
generated token t; h[0] is the last prompt position.

Specs accepted by `load_backend`:

* `causal_lm:PATH_OR_ID` - any HF causal LM + its tokenizer;
* `video_llava:PATH_OR_ID` - `VideoLlavaForConditionalGeneration` + its
  processor, frames sampled uniformly (np.linspace) from a video file or from
  image files;
* `module.path:factory[:ARG]` - a plugin (e.g. EventGPT, which is not in
  transformers): `factory(ARG, device=..., dtype=...)` returns a `Backend`.
  See docs/PLUGINS.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from tools.lib import media as media_lib

DTYPES = {
  "float32": torch.float32,
  "bfloat16": torch.bfloat16,
  "float16": torch.float16,
}

VICUNA_TEMPLATE = "USER: {question} ASSISTANT:"
# The reference extraction prompt (REFERENCE_NOTES §4.3 / D6); kept exactly.
VIDEO_LLAVA_TEMPLATE = "USER: <video>\n{question} ASSISTANT:"


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
  """Maps 'float32' | 'bfloat16' | 'float16' (or a torch dtype) to torch."""
  if isinstance(dtype, torch.dtype):
    return dtype
  if dtype not in DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
  return DTYPES[dtype]


def torch_device(name: str | None = None) -> torch.device:
  """The device `name` (a --device flag), else CUDA where present, else CPU."""
  return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def positions_from_mask(attention_mask: torch.Tensor, new: int) -> torch.Tensor:
  """Position ids of the last `new` columns of a left-padded [B, T] mask."""
  # Same rule as HF generate: count valid tokens; padding gets position 0
  # (its value is irrelevant because padding is masked out as a key).
  pos = attention_mask.long().cumsum(-1) - 1
  pos = pos.clamp(min=0)
  return pos[:, -new:]


def crop_cache(past_key_values, length: int):
  """Rolls a KV cache back to its first `length` positions (in place)."""
  if past_key_values is None:
    return None
  remove = cache_length(past_key_values) - int(length)
  if remove < 0:
    raise ValueError(
      f"crop_cache: the cache holds {cache_length(past_key_values)} "
      f"positions, cannot crop to {length}"
    )
  if hasattr(past_key_values, "crop"):
    # A negative argument means "remove that many" in every transformers
    # 4.4x-5.x release (5.2x rejects positive, absolute lengths).
    if remove:
      past_key_values.crop(-remove)
    return past_key_values
  # Legacy tuple-of-tuples cache: ((k [B, H, T, Dh], v), ...) per layer.
  return tuple(
    tuple(t[..., : int(length), :] for t in layer) for layer in past_key_values
  )


def cache_length(past_key_values) -> int:
  """Number of positions held in a KV cache (0 for None)."""
  if past_key_values is None:
    return 0
  if hasattr(past_key_values, "get_seq_length"):
    return int(past_key_values.get_seq_length())
  return int(past_key_values[0][0].shape[-2])


def left_pad(seqs: Sequence[torch.Tensor], pad_value: int) -> torch.Tensor:
  """Stacks 1-D tensors into [B, T], padding on the LEFT with `pad_value`."""
  width = max(int(s.shape[-1]) for s in seqs)
  out = seqs[0].new_full((len(seqs), width), pad_value)
  for i, s in enumerate(seqs):
    if s.shape[-1]:
      out[i, width - s.shape[-1] :] = s
  return out


class Backend:
  """One loaded model. Subclasses fill the attributes and the methods below.

  Attributes:
    name: backend kind ('causal_lm', 'video_llava', or a plugin's name).
    model_id: checkpoint path or hub id.
    device: torch device the model runs on.
    dtype: torch compute dtype of the model.
    eos_token_id: the id that ends greedy generation.
    eos_token_ids: every id that ends generation (eos_token_id included).
    pad_token_id: the id used for left padding (masked out, value irrelevant).
    hidden_size: D of the returned states.
    vocab_size: V of the LM head.
    prompt_template: how a question becomes the text prompt.
  """

  name: str = "backend"
  model_id: str = ""
  device: torch.device = torch.device("cpu")
  dtype: torch.dtype = torch.float32
  eos_token_id: int = 2
  eos_token_ids: tuple[int, ...] = (2,)
  pad_token_id: int = 0
  hidden_size: int = 0
  vocab_size: int = 0
  prompt_template: str = "{question}"

  def provenance(self) -> dict:
    """What produced the states: model id, template, media policy, dtype."""
    return {
      "backend": self.name,
      "model_id": self.model_id,
      "prompt_template": self.prompt_template,
      "dtype": str(self.dtype).replace("torch.", ""),
      "hidden_size": self.hidden_size,
      "vocab_size": self.vocab_size,
      "eos_token_id": self.eos_token_id,
      "states": "last layer, post final norm",
    }

  def prompt_inputs(self, sample: dict) -> dict:
    """Batch-1 model inputs for the prompt of `sample`.

    `sample` = {'id': str, 'question': str, 'media': dict} where `media` is
    this model's media entry from the samples file ({} if it has none).
    Returns {'input_ids': [1, P] long, 'attention_mask': [1, P], ...media
    tensors with a leading batch dim of 1}.
    """
    raise NotImplementedError

  def collate(self, inputs_list: Sequence[dict]) -> dict:
    """Batches prompt inputs: ids/mask LEFT padded, media concatenated."""
    if not inputs_list:
      raise ValueError("collate() needs at least one input")
    keys = set(inputs_list[0])
    for i, x in enumerate(inputs_list):
      if set(x) != keys:
        raise ValueError(
          f"collate(): input {i} has keys {sorted(x)}, input 0 has "
          f"{sorted(keys)}"
        )
    ids = [x["input_ids"].reshape(-1) for x in inputs_list]
    masks = [
      x.get("attention_mask", torch.ones_like(x["input_ids"])).reshape(-1)
      for x in inputs_list
    ]
    out = {
      "input_ids": left_pad(ids, self.pad_token_id).to(self.device),
      "attention_mask": left_pad(masks, 0).to(self.device),
    }
    for k in sorted(keys - {"input_ids", "attention_mask"}):
      vals = [x[k] for x in inputs_list]
      if not all(isinstance(v, torch.Tensor) for v in vals):
        raise ValueError(f"collate(): input field {k!r} is not a tensor")
      out[k] = torch.cat(vals, dim=0).to(self.device)
    return out

  def forward(
    self,
    inputs: dict | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    position_ids: torch.Tensor | None = None,
    use_cache: bool = True,
    logits_to_keep: int = 0,
  ):
    """Runs the model; returns (hidden_BTD, logits_BTV, past_key_values).

    The first call passes the prompt `inputs` (incl. media); later calls pass
    the new `input_ids` [B, T] and the cache. `attention_mask` always covers
    cache + new tokens ([B, past + T]). `hidden` is the final post-norm
    last-layer state of the T new positions; `logits` = lm_head(hidden) for
    the last `logits_to_keep` of them (0 = all).
    """
    raise NotImplementedError

  def lm_head_weight(self) -> torch.Tensor:
    """The LM head as a [V, D] tensor."""
    raise NotImplementedError

  def static_decoder(self, max_len: int, **options):
    """A `tools.static_kv.StaticLM`-like decoder over static KV buffers.

    Optional: the live SD runtime's fast path uses it for the decode steps
    after this backend's own prefill (`forward`), whose cache it copies in.
    The object needs `max_len`, `load_prefix(cache, length)` and
    `step(ids [1, T], position) -> (hidden [T, D], argmax [T])`. Backends
    that cannot provide one raise `static_kv.Unsupported`; the runtime then
    decodes with `forward` and the HF cache (the eager path).
    """
    from tools.lib import static_kv

    raise static_kv.Unsupported(f"{self.name} backend has no static decoder")


class HFBackend(Backend):
  """Shared forward for HF models split into a decoder and an lm_head."""

  def __init__(self, model, decoder, lm_head, *, model_id: str, name: str):
    self.model = model.eval()
    self.decoder = decoder
    self.lm_head = lm_head
    self.model_id = model_id
    self.name = name
    param = next(model.parameters())
    self.device = param.device
    self.dtype = param.dtype
    weight = lm_head.weight
    self.vocab_size, self.hidden_size = (
      int(weight.shape[0]),
      int(weight.shape[1]),
    )
    params = inspect.signature(decoder.forward).parameters
    # transformers 5.2x renamed `past_key_values` to `cache`; accept both.
    self._cache_kw = "cache" if "cache" in params else "past_key_values"
    self._accepts_position_ids = "position_ids" in params

  def _set_special_ids(self, model, tokenizer) -> None:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None and tokenizer is not None:
      eos = tokenizer.eos_token_id
    if eos is None:
      eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
      raise ValueError(
        f"{self.model_id}: no eos_token_id in the model/tokenizer"
      )
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    self.eos_token_id, self.eos_token_ids = eos_ids[0], eos_ids
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer else None
    if pad is None:
      pad = getattr(gen, "pad_token_id", None)
    self.pad_token_id = int(pad if pad is not None else self.eos_token_id)

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
    kw = dict(inputs or {})
    if input_ids is not None:
      kw["input_ids"] = input_ids
    if attention_mask is not None:
      kw["attention_mask"] = attention_mask
    if "input_ids" not in kw:
      raise ValueError("forward() needs input_ids (in `inputs` or as keyword)")
    kw = {
      k: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
      for k, v in kw.items()
    }
    new = kw["input_ids"].shape[1]
    if position_ids is None and kw.get("attention_mask") is not None:
      position_ids = positions_from_mask(kw["attention_mask"], new)
    if position_ids is not None and self._accepts_position_ids:
      kw["position_ids"] = position_ids.to(self.device)
    kw[self._cache_kw] = past_key_values
    out = self.decoder(**kw, use_cache=use_cache)
    if isinstance(out, tuple):  # a model configured with return_dict=False
      hidden, cache = out[0], (out[1] if len(out) > 1 else None)
    else:
      hidden = out.last_hidden_state
      cache = getattr(out, "cache", None)
      if cache is None:
        cache = getattr(out, "past_key_values", None)
    h_keep = hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    logits = self.lm_head(h_keep)
    return hidden, logits, cache

  def lm_head_weight(self) -> torch.Tensor:
    return self.lm_head.weight

  def static_decoder(self, max_len: int, **options):
    """Static-cache steps for a Llama-family decoder (see the base class)."""
    from tools.lib import static_kv

    return static_kv.StaticLM(
      self.decoder, self.lm_head.weight, max_len, **options
    )


class CausalLMBackend(HFBackend):
  """Any HF causal LM (Vicuna, Llama, ...) prompted with a text template."""

  def __init__(
    self,
    model,
    tokenizer,
    *,
    model_id: str = "",
    prompt_template: str = VICUNA_TEMPLATE,
  ):
    super().__init__(
      model,
      model.get_decoder(),
      model.get_output_embeddings(),
      model_id=model_id or getattr(model.config, "_name_or_path", ""),
      name="causal_lm",
    )
    self.tokenizer = tokenizer
    self.prompt_template = prompt_template
    self._set_special_ids(model, tokenizer)

  def prompt_inputs(self, sample: dict) -> dict:
    if not isinstance(sample.get("question"), str):
      raise ValueError(f"sample {sample.get('id')!r}: 'question' must be a str")
    text = self.prompt_template.format(question=sample["question"])
    enc = self.tokenizer(text, return_tensors="pt")
    return {
      "input_ids": enc["input_ids"],
      "attention_mask": enc.get(
        "attention_mask", torch.ones_like(enc["input_ids"])
      ),
    }


class VideoLlavaBackend(HFBackend):
  """VideoLlavaForConditionalGeneration + processor, uniform frames."""

  def __init__(
    self,
    model,
    tokenizer,
    image_processor,
    *,
    model_id: str = "",
    num_frames: int = 8,
    prompt_template: str = VIDEO_LLAVA_TEMPLATE,
  ):
    # `model.model` merges the video features into the embeddings and runs
    # the language model, whose last_hidden_state is already post-norm; the
    # lm_head is then applied only where logits are needed.
    super().__init__(
      model,
      model.model,
      model.get_output_embeddings(),
      model_id=model_id or getattr(model.config, "_name_or_path", ""),
      name="video_llava",
    )
    self.tokenizer = tokenizer
    self.image_processor = image_processor
    self.num_frames = int(num_frames)
    self.prompt_template = prompt_template
    self.video_token = "<video>"
    self.video_token_id = int(model.config.video_token_index)
    if tokenizer.convert_tokens_to_ids(self.video_token) != self.video_token_id:
      raise ValueError(
        f"{self.model_id}: tokenizer id of {self.video_token!r} is "
        f"{tokenizer.convert_tokens_to_ids(self.video_token)}, the model's "
        f"video_token_index is {self.video_token_id}"
      )
    self.patch_size = int(model.config.vision_config.patch_size)
    self._set_special_ids(model, tokenizer)
    media_ids = {self.video_token_id}
    image_id = getattr(model.config, "image_token_index", None)
    if image_id is not None:
      media_ids.add(int(image_id))
    if self.pad_token_id in media_ids:
      # Padding is masked out, but a pad id equal to a placeholder id would
      # be counted as a media slot when the features are scattered in.
      self.pad_token_id = self.eos_token_id

  def provenance(self) -> dict:
    prov = super().provenance()
    ip = self.image_processor
    prov["frame_policy"] = {
      "num_frames": self.num_frames,
      "sampling": "uniform: np.linspace(0, n - 1, num_frames).astype(int)",
      "preprocess": {
        "size": dict(getattr(ip, "size", {}) or {}),
        "crop_size": dict(getattr(ip, "crop_size", {}) or {}),
        "image_mean": list(getattr(ip, "image_mean", []) or []),
        "image_std": list(getattr(ip, "image_std", []) or []),
      },
    }
    return prov

  def video_tokens(self, height: int, width: int) -> int:
    """Placeholder tokens per video: frames x (patches + CLS), as HF does."""
    per_frame = (height // self.patch_size) * (width // self.patch_size) + 1
    return self.num_frames * per_frame

  def prompt_inputs(self, sample: dict) -> dict:
    sid = sample.get("id", "?")
    if not isinstance(sample.get("question"), str):
      raise ValueError(f"sample {sid!r}: 'question' must be a str")
    media = sample.get("media") or {}
    frames = media_lib.load_frames(media, self.num_frames, sample_id=sid)
    # Frames go through the (PIL/numpy) image processor one by one, which is
    # what VideoLlavaProcessor does for videos, without needing torchvision.
    enc = self.image_processor(images=frames, return_tensors="pt")
    # The key is 'pixel_values' or, in some 5.x releases, the legacy
    # 'pixel_values_images'.
    key = "pixel_values" if "pixel_values" in enc else "pixel_values_images"
    pix = enc[key]
    if pix.ndim != 4 or pix.shape[0] != self.num_frames:
      raise ValueError(
        f"sample {sid}: image processor gave pixel_values {tuple(pix.shape)}"
        f", expected [{self.num_frames}, 3, H, W]"
      )
    text = self.prompt_template.format(question=sample["question"])
    if text.count(self.video_token) != 1:
      raise ValueError(
        f"prompt template must contain {self.video_token!r} exactly once: "
        f"{self.prompt_template!r}"
      )
    n = self.video_tokens(int(pix.shape[-2]), int(pix.shape[-1]))
    text = text.replace(self.video_token, self.video_token * n)
    enc = self.tokenizer(text, return_tensors="pt")
    ids = enc["input_ids"]
    got = int((ids == self.video_token_id).sum())
    if got != n:
      raise ValueError(
        f"sample {sid}: tokenized prompt holds {got} video tokens, expected {n}"
      )
    return {
      "input_ids": ids,
      "attention_mask": enc.get("attention_mask", torch.ones_like(ids)),
      "pixel_values_videos": pix[None].to(self.dtype),
    }


def _load_causal_lm(path: str, *, device, dtype, **options) -> Backend:
  from transformers import AutoModelForCausalLM, AutoTokenizer

  tok = AutoTokenizer.from_pretrained(path)
  model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
  return CausalLMBackend(model.to(device), tok, model_id=path, **options)


def _load_video_llava(path: str, *, device, dtype, **options) -> Backend:
  from transformers import (
    AutoTokenizer,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
  )

  # The slow image processor needs no torchvision (the video processor does).
  image_processor = VideoLlavaImageProcessor.from_pretrained(path)
  tokenizer = AutoTokenizer.from_pretrained(path)
  model = VideoLlavaForConditionalGeneration.from_pretrained(
    path, dtype=torch_dtype(dtype)
  )
  return VideoLlavaBackend(
    model.to(device), tokenizer, image_processor, model_id=path, **options
  )


BUILTIN = {"causal_lm": _load_causal_lm, "video_llava": _load_video_llava}


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed model spec."""

  kind: str  # 'causal_lm' | 'video_llava' | 'plugin'
  target: str  # checkpoint for built-ins, 'module:factory' for plugins
  arg: str | None = None


def parse_spec(spec: str) -> Spec:
  """Parses 'causal_lm:PATH', 'video_llava:PATH' or 'module:factory[:ARG]'."""
  if not isinstance(spec, str) or ":" not in spec:
    raise ValueError(
      f"bad model spec {spec!r}: expected 'causal_lm:PATH_OR_ID', "
      "'video_llava:PATH_OR_ID' or 'module.path:factory[:ARG]'"
    )
  head, rest = spec.split(":", 1)
  if head in BUILTIN:
    if not rest:
      raise ValueError(f"bad model spec {spec!r}: missing the checkpoint path")
    return Spec(head, rest)
  factory, _, arg = rest.partition(":")
  if not head or not factory.isidentifier():
    raise ValueError(
      f"bad plugin spec {spec!r}: expected 'module.path:factory[:ARG]' "
      f"(built-in backends: {sorted(BUILTIN)})"
    )
  return Spec("plugin", f"{head}:{factory}", arg or None)


def load_backend(
  spec: str,
  *,
  device: str | torch.device = "cpu",
  dtype: str = "float32",
  **options: Any,
) -> Backend:
  """Loads a model backend from a spec (see module docstring).

  `options` go to the built-in backend constructors (e.g. prompt_template,
  num_frames for video_llava); plugins get them as keyword arguments too.
  """
  s = parse_spec(spec)
  device = torch.device(device)
  if s.kind in BUILTIN:
    return BUILTIN[s.kind](s.target, device=device, dtype=dtype, **options)
  module_name, factory_name = s.target.split(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(
      f"plugin spec {spec!r}: cannot import {module_name!r}: {e} (a plugin "
      "module must be importable: run `python -m tools.X` from the directory "
      "that holds it, or add that directory to PYTHONPATH)"
    ) from e
  factory = getattr(module, factory_name, None)
  if not callable(factory):
    raise ValueError(
      f"plugin spec {spec!r}: {module_name} has no callable {factory_name!r}"
    )
  backend = factory(s.arg, device=device, dtype=dtype, **options)
  missing = [
    m
    for m in (
      "prompt_inputs",
      "collate",
      "forward",
      "lm_head_weight",
      "provenance",
    )
    if not callable(getattr(backend, m, None))
  ]
  attrs = ("eos_token_id", "pad_token_id", "hidden_size", "vocab_size")
  missing += [a for a in attrs if getattr(backend, a, None) is None]
  if missing:
    raise ValueError(f"plugin {spec!r} returned an object without {missing}")
  if not getattr(backend, "eos_token_ids", None):
    backend.eos_token_ids = (int(backend.eos_token_id),)
  return backend
