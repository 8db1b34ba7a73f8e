"""The scenes pair: presets, the target and drafter models, save and load.

Target: `VideoLlavaForConditionalGeneration` (CLIP vision tower + Llama),
num_frames x (patches + 1) visual tokens per clip. Drafter (`SceneDrafter`):
event frames -> a convolutional patch encoder -> a few tens of tokens -> a
Llama of the target's hidden size with fewer layers. Both share one
tokenizer (tools/scenes/text.py).

Layout of a pair directory:
  pair.json            preset, fingerprint, results of make_pair
  target/              save_pretrained of the target, tokenizer, image processor
  drafter/             drafter_config.json, model.safetensors, tokenizer
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os

import torch
from torch import nn

from tools.scenes import text, world

DRAFTER_CONFIG = "drafter_config.json"
DRAFTER_WEIGHTS = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class Preset:
  """Sizes and training budget of one pair."""

  name: str
  hidden: int  # LM hidden size of both models (= the adapters' hidden_dim)
  heads: int
  kv_heads: int
  intermediate: int
  target_layers: int
  drafter_layers: int
  vision_hidden: int
  vision_layers: int
  vision_heads: int
  patch: int  # target vision patch size (64 // patch patches a side)
  event_patch: int  # drafter encoder patch size
  vocab_size: int  # BPE target size (the trained vocabulary may be smaller)
  tokenizer_scenes: int
  pool_scenes: int  # distinct training scenes
  target_steps: int
  drafter_steps: int
  batch_size: int
  turns: int  # question/answer turns packed into one training sequence
  turn_room: int  # training tokens for turns after the first (see Batches)
  # Training-only questions about one cell appended to each conversation
  # (train_data.examples, text.cell_question): the object at a named place.
  cell_turns: int
  lr: float
  lr_floor: float  # the learning rate's share of `lr` at the last step
  # Init of the patch position embeddings (target vision tower and drafter
  # event encoder): "grid" (2-D sin/cos of the patch's row and column, see
  # `grid_positions`) or "normal" (the modules' own small random init).
  pos_init: str
  # The grid codes' size against a patch's content at init (1: equal).
  pos_scale: float
  # Weight of a fact token (`text.FACT_WORDS`: colours, shapes, cells,
  # motions, numbers) against a wording token in both models' answer loss
  # (1: every answer token alike; see train_losses.token_weights).
  fact_weight: float
  # Decay per step of the exponential moving average of the weights that
  # training leaves in the model (0: the last step's weights).
  ema: float
  warmup: int
  eval_scenes: int  # held-out (test) scenes per question type
  max_new_tokens: int
  workers: int  # processes rendering the training pool
  save_dtype: str  # dtype of the saved weights
  # Fields with a default came after pairs had been made: at the default
  # they stay out of a pair's fingerprint (`pair.fingerprint`), so those
  # pairs keep theirs.
  # The target's vision tower's learning rate as a share of `lr` (1: the
  # rate of the rest; see training.optimizer).
  tower_lr: float = 1.0


POS_INITS = ("grid", "normal")

# `gpu`, the study's pair: costs shaped like the real pair's (EventGPT and
# Video-LLaVA both decode with Vicuna-7B): the drafter's language model is
# the target's shape (64 event tokens against 520 visual tokens), deep and
# narrow so that a decode step is many launch-bound layers against the one
# layer of a B1 adapter step (docs/SCENES.md, "Costs"). `gpu16x3`: the
# pair before it (target 16 layers of 256, drafter 3), whose drafter steps
# at a quarter of the target's cost.
PRESETS = {
  "gpu": Preset(
    name="gpu",
    hidden=128,
    heads=4,
    kv_heads=2,
    intermediate=384,
    target_layers=40,
    drafter_layers=40,
    vision_hidden=192,
    vision_layers=4,
    vision_heads=6,
    patch=8,
    event_patch=8,
    vocab_size=1024,
    tokenizer_scenes=2000,
    pool_scenes=12000,
    target_steps=6000,
    drafter_steps=2000,
    batch_size=64,
    turns=4,
    turn_room=96,
    cell_turns=2,
    lr=2e-3,
    lr_floor=0.1,
    pos_init="grid",
    pos_scale=1.0,
    fact_weight=1.0,
    ema=0.998,
    warmup=100,
    eval_scenes=100,
    max_new_tokens=96,
    workers=12,
    save_dtype="float16",
    tower_lr=0.25,
  ),
  "tiny": Preset(
    name="tiny",
    hidden=64,
    heads=4,
    kv_heads=2,
    intermediate=128,
    target_layers=2,
    drafter_layers=1,
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    patch=16,
    event_patch=16,
    vocab_size=512,
    tokenizer_scenes=200,
    pool_scenes=64,
    target_steps=30,
    drafter_steps=30,
    batch_size=8,
    turns=2,
    turn_room=32,
    cell_turns=0,
    lr=3e-3,
    lr_floor=0.1,
    pos_init="grid",
    pos_scale=1.0,
    fact_weight=1.0,
    ema=0.9,
    warmup=5,
    eval_scenes=3,
    max_new_tokens=64,
    workers=0,
    save_dtype="float32",
  ),
}
PRESETS["gpu16x3"] = dataclasses.replace(
  PRESETS["gpu"],
  name="gpu16x3",
  hidden=256,
  heads=8,
  kv_heads=4,
  intermediate=768,
  target_layers=16,
  drafter_layers=3,
  target_steps=4500,
  lr=1e-3,
  tower_lr=1.0,
)


def override(preset: Preset, assignments) -> Preset:
  """`preset` with FIELD=VALUE assignments applied (values parsed as the
  field's type); ValueError naming the field on an unknown field or a bad
  value."""
  fields = {f.name: f for f in dataclasses.fields(Preset)}
  changes = {}
  for a in assignments:
    name, sep, value = a.partition("=")
    if not sep or name not in fields or name == "name":
      raise ValueError(
        f"--set {a!r}: expected FIELD=VALUE with FIELD one of "
        f"{sorted(set(fields) - {'name'})}"
      )
    kind = type(getattr(preset, name))
    try:
      changes[name] = kind(value)
    except ValueError:
      raise ValueError(
        f"--set {a!r}: {name} takes a {kind.__name__}, not {value!r}"
      ) from None
  out = dataclasses.replace(preset, **changes)
  if out.pos_init not in POS_INITS:
    raise ValueError(
      f"--set pos_init={out.pos_init}: expected one of {list(POS_INITS)}"
    )
  if out.cell_turns < 0:
    raise ValueError(f"--set cell_turns={out.cell_turns}: expected >= 0")
  if not out.fact_weight > 0:
    raise ValueError(f"--set fact_weight={out.fact_weight}: expected > 0")
  if not out.pos_scale > 0:
    raise ValueError(f"--set pos_scale={out.pos_scale}: expected > 0")
  if not out.tower_lr > 0:
    raise ValueError(f"--set tower_lr={out.tower_lr}: expected > 0")
  if not 0 <= out.ema < 1:
    raise ValueError(f"--set ema={out.ema}: expected 0 <= ema < 1")
  if not 1 <= out.turns <= len(text.QTYPES):
    raise ValueError(
      f"--set turns={out.turns}: expected 1 to {len(text.QTYPES)} (one turn "
      "per question type)"
    )
  return out


def resolve_preset(name: str, assignments=()) -> Preset:
  """PRESETS[name] with `--set` assignments applied (see `override`);
  ValueError (one line, naming the flag) on an unknown name."""
  if name not in PRESETS:
    raise ValueError(
      f"--preset {name!r}: unknown; expected one of {list(PRESETS)}"
    )
  return override(PRESETS[name], assignments)


def video_tokens(preset: Preset) -> int:
  """Visual tokens of the target per clip: frames x (patches + CLS)."""
  per_frame = (world.SIZE // preset.patch) ** 2 + 1
  return world.NUM_FRAMES * per_frame


def event_tokens(preset: Preset) -> int:
  """Visual tokens of the drafter per clip (one per event patch)."""
  return (world.SIZE // preset.event_patch) ** 2


def llama_config(preset: Preset, tokenizer, layers: int):
  from transformers import LlamaConfig

  return LlamaConfig(
    vocab_size=len(tokenizer),
    hidden_size=preset.hidden,
    intermediate_size=preset.intermediate,
    num_hidden_layers=layers,
    num_attention_heads=preset.heads,
    num_key_value_heads=preset.kv_heads,
    max_position_embeddings=1024,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
    pad_token_id=tokenizer.pad_token_id,
    tie_word_embeddings=False,
  )


def image_processor():
  """The target's image processor: frames are used as drawn, scaled to ±1."""
  from transformers import VideoLlavaImageProcessor

  return VideoLlavaImageProcessor(
    do_resize=False,
    do_center_crop=False,
    size={"shortest_edge": world.SIZE},
    crop_size={"height": world.SIZE, "width": world.SIZE},
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
  )


def pixels(frames: torch.Tensor) -> torch.Tensor:
  """uint8 clips [B, F, H, W, 3] -> pixel_values_videos [B, F, 3, H, W].

  The same numbers as `image_processor()` gives (rescale 1/255, mean and
  std 0.5); used in training to skip the per-frame processor.
  """
  x = frames.permute(0, 1, 4, 2, 3).float() * (1 / 255.0)
  return (x - 0.5) / 0.5


def grid_positions(side: int, dim: int) -> torch.Tensor:
  """[side * side, dim] 2-D sin/cos codes of the patches of a side x side
  grid, row-major: the first half of the dims codes the row, the second the
  column, each as sin and cos at dim // 4 wavelengths from 2 to 4 * side
  patches (geometric); dims left over by dim % 4 are 0."""
  n = dim // 4
  waves = 2.0 * (2.0 * side) ** (torch.arange(n) / max(n - 1, 1))
  angles = torch.arange(side)[:, None] * (2 * math.pi / waves)  # [side, n]
  code = torch.cat([angles.sin(), angles.cos()], dim=1)  # [side, 2n]
  rows = code[:, None].expand(side, side, 2 * n)
  cols = code[None, :].expand(side, side, 2 * n)
  out = torch.zeros(side * side, dim)
  out[:, : 4 * n] = torch.cat([rows, cols], dim=2).reshape(side * side, -1)
  return out


@torch.no_grad()
def init_grid_positions(
  positions: torch.Tensor, patch_weight, ratio: float = 1.0
) -> None:
  """Writes `grid_positions` into the patch position embeddings
  `positions` [side * side, dim], scaled to `ratio` times what the patch
  embedding (`patch_weight`, a conv [dim, in, k, k]) gives a unit-RMS patch
  at init (1: position and content start at one scale).

  With the modules' own init (normal, std 0.02) the position is a few per
  cent of a patch's embedding; on the seed measured both ways the target
  learnt faster from the grid codes (docs/SCENES.md).
  """
  side = math.isqrt(positions.shape[0])
  scale = (
    ratio * patch_weight.float().std() * math.sqrt(patch_weight[0].numel())
  )
  code = grid_positions(side, positions.shape[1]) * scale
  positions.copy_(code.to(positions.dtype))


def build_target(preset: Preset, tokenizer):
  """A fresh (seeded by the caller) VideoLlava target."""
  from transformers import (
    CLIPVisionConfig,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
  )

  vision = CLIPVisionConfig(
    hidden_size=preset.vision_hidden,
    intermediate_size=4 * preset.vision_hidden,
    num_hidden_layers=preset.vision_layers,
    num_attention_heads=preset.vision_heads,
    image_size=world.SIZE,
    patch_size=preset.patch,
    projection_dim=preset.vision_hidden,
  )
  patches = (world.SIZE // preset.patch) ** 2
  config = VideoLlavaConfig(
    vision_config=vision,
    text_config=llama_config(preset, tokenizer, preset.target_layers),
    image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
    vision_feature_layer=-1,
    image_seq_length=patches,
    video_seq_length=video_tokens(preset),
  )
  config.pad_token_id = tokenizer.pad_token_id
  model = VideoLlavaForConditionalGeneration(config)
  if preset.pos_init == "grid":  # both towers (image and video)
    for emb in model.modules():
      if type(emb).__name__ == "CLIPVisionEmbeddings":
        init_grid_positions(
          emb.position_embedding.weight[1:],
          emb.patch_embedding.weight,
          preset.pos_scale,
        )
  _set_generation(model, tokenizer)
  return model


def _set_generation(model, tokenizer) -> None:
  gen = model.generation_config
  gen.bos_token_id = tokenizer.bos_token_id
  gen.eos_token_id = tokenizer.eos_token_id
  gen.pad_token_id = tokenizer.pad_token_id


class EventEncoder(nn.Module):
  """Event frames [B, F-1, 2, H, W] (counts) -> tokens [B, N, D].

  All event frames of a clip are stacked as channels (their order carries
  the direction of motion) and cut into patches; each patch is one token.
  """

  def __init__(self, frames: int, patch: int, hidden: int, width: int):
    super().__init__()
    self.patch_embed = nn.Conv2d(2 * frames, width, patch, stride=patch)
    self.proj = nn.Sequential(
      nn.GELU(), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden)
    )
    n = (world.SIZE // patch) ** 2
    self.pos_embed = nn.Parameter(torch.randn(1, n, width) * 0.02)

  def forward(self, event_frames: torch.Tensor) -> torch.Tensor:
    b = event_frames.shape[0]
    x = torch.log1p(event_frames.float()).flatten(1, 2)
    x = self.patch_embed(x.to(self.patch_embed.weight.dtype))
    x = x.flatten(2).transpose(1, 2) + self.pos_embed
    return self.proj(x).reshape(b, -1, self.proj[-1].out_features)


class SceneDrafter(nn.Module):
  """EventGPT-like drafter: event encoder + Llama (same hidden size)."""

  def __init__(self, config: dict):
    super().__init__()
    from transformers import LlamaConfig, LlamaForCausalLM

    self.config = dict(config)
    self.event_token_id = int(config["event_token_id"])
    self.encoder = EventEncoder(
      world.NUM_FRAMES - 1,
      int(config["event_patch"]),
      int(config["llama"]["hidden_size"]),
      int(config["encoder_width"]),
    )
    self.lm = LlamaForCausalLM(LlamaConfig(**config["llama"]))
    params = inspect.signature(self.lm.model.forward).parameters
    # transformers 5.2x renamed `past_key_values` to `cache` in some models.
    self._cache_kw = "cache" if "cache" in params else "past_key_values"

  @property
  def generation_config(self):
    return self.lm.generation_config

  def embed(self, input_ids, event_frames=None):
    """Token embeddings with the event tokens spliced in."""
    embeds = self.lm.model.embed_tokens(input_ids)
    if event_frames is not None:
      feats = self.encoder(event_frames).to(embeds.dtype)
      slots = (input_ids == self.event_token_id)[..., None]
      if int(slots.sum()) != feats.shape[0] * feats.shape[1]:
        raise ValueError(
          f"prompt holds {int(slots.sum())} <event> tokens, the events give "
          f"{feats.shape[0] * feats.shape[1]}"
        )
      embeds = embeds.masked_scatter(slots.expand_as(embeds), feats)
    return embeds

  def forward(
    self,
    input_ids,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    use_cache=True,
    event_frames=None,
  ):
    """Decoder outputs (post-norm last_hidden_state and the KV cache)."""
    kw = {self._cache_kw: past_key_values}
    return self.lm.model(
      inputs_embeds=self.embed(input_ids, event_frames),
      attention_mask=attention_mask,
      position_ids=position_ids,
      use_cache=use_cache,
      **kw,
    )


def drafter_config(preset: Preset, tokenizer) -> dict:
  return {
    "preset": preset.name,
    "event_patch": preset.event_patch,
    "encoder_width": 2 * preset.hidden,
    "num_event_tokens": event_tokens(preset),
    "event_token_id": tokenizer.convert_tokens_to_ids("<event>"),
    "llama": llama_config(preset, tokenizer, preset.drafter_layers).to_dict(),
  }


def build_drafter(preset: Preset, tokenizer) -> SceneDrafter:
  model = SceneDrafter(drafter_config(preset, tokenizer))
  if preset.pos_init == "grid":
    enc = model.encoder
    init_grid_positions(
      enc.pos_embed[0], enc.patch_embed.weight, preset.pos_scale
    )
  _set_generation(model.lm, tokenizer)
  return model


def save_target(model, tokenizer, path: str, dtype) -> None:
  """The target as Video-LLaVA is published: save_pretrained weights and
  config, the tokenizer and the image processor, loadable by
  `video_llava:PATH`."""
  model.to(dtype).save_pretrained(path)
  tokenizer.save_pretrained(path)
  image_processor().save_pretrained(path)


def save_drafter(model: SceneDrafter, tokenizer, path: str, dtype) -> None:
  from safetensors.torch import save_file

  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, DRAFTER_CONFIG), "w") as f:
    json.dump(model.config, f, indent=1, sort_keys=True)
  state = {
    k: v.detach().to("cpu", dtype).contiguous()
    for k, v in model.state_dict().items()
  }
  save_file(state, os.path.join(path, DRAFTER_WEIGHTS))
  tokenizer.save_pretrained(path)


def load_drafter(path: str, dtype=torch.float32):
  """(SceneDrafter, tokenizer) saved by `save_drafter` in `path`."""
  from safetensors.torch import load_file
  from transformers import AutoTokenizer

  for name in (DRAFTER_CONFIG, DRAFTER_WEIGHTS, "tokenizer.json"):
    if not os.path.isfile(os.path.join(path, name)):
      raise FileNotFoundError(
        f"{os.path.join(path, name)}: missing; {path!r} is not a scenes "
        "drafter directory (make one with python -m tools.scenes.make_pair)"
      )
  with open(os.path.join(path, DRAFTER_CONFIG)) as f:
    config = json.load(f)
  model = SceneDrafter(config)
  model.load_state_dict(load_file(os.path.join(path, DRAFTER_WEIGHTS)))
  tokenizer = AutoTokenizer.from_pretrained(path)
  _set_generation(model.lm, tokenizer)
  return model.to(dtype).eval(), tokenizer
