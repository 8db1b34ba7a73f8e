"""The target's vision tower's health: where its heads look, and whether
its patch tokens still differ from one another.

`health(tower, pixels)` reads one tower on a batch of frames; `first_frames`
makes that batch from clips; `Monitor` reads a training tower every so
often through an uncompiled copy of it (`training.fit` records its
readings); `lines` and `summary` put readings into words. Used by
`tools.scenes.probe --probes tower` and by make_pair's training.

A tower whose heads put nearly all their attention on the class token with
next to no entropy, while the patches' common part outgrows their spread,
has lost what tells its patches apart: the shape and the place of what a
patch shows (docs/SCENES.md, "Where the shape is lost").
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from tools.scenes import models


def first_frames(clips: np.ndarray) -> torch.Tensor:
  """uint8 clips [N, F, H, W, 3] -> the pixel values of their first
  frames [N, 3, H, W] (`models.pixels`)."""
  return models.pixels(torch.from_numpy(clips[:, :1].copy()))[:, 0]


@torch.inference_mode()
def health(tower, pixels: torch.Tensor) -> dict:
  """Per layer of `tower` (a CLIP vision model) over the frames `pixels`
  [N, 3, H, W]: each head's attention entropy (nats; `uniform` = ln n when
  spread evenly over the n tokens) and its share of attention on the class
  token (mean over the patches' queries); and, at the input and after each
  layer, the patch tokens' common part (the norm of their mean) and their
  spread (the root mean square distance from that mean); means over the
  frames.

  Returns {"entropy": [layer][head], "on_class": [layer][head],
  "common": [input, layer 1, ...], "spread": [...], "uniform": ln n}.
  """
  param = next(tower.parameters())
  previous = tower.config._attn_implementation
  tower.set_attn_implementation("eager")  # the only one that returns them
  try:
    out = tower(
      pixels.to(param.device, param.dtype),
      output_hidden_states=True,
      output_attentions=True,
    )
  finally:
    tower.set_attn_implementation(previous)
  entropy, on_class = [], []
  for a in out.attentions:  # [frames, heads, tokens, tokens]
    a = a.float()
    h = -(a * a.clamp_min(1e-12).log()).sum(-1)
    entropy.append([round(x, 3) for x in h.mean((0, 2)).tolist()])
    share = a[:, :, 1:, 0].mean((0, 2))
    on_class.append([round(x, 3) for x in share.tolist()])
  common, spread = [], []
  for h in out.hidden_states:
    patches = h[:, 1:].float()
    mean = patches.mean(1, keepdim=True)
    common.append(round(float(mean.norm(dim=-1).mean()), 2))
    dist = (patches - mean).pow(2).sum(-1).mean(1).sqrt()
    spread.append(round(float(dist.mean()), 2))
  return {
    "entropy": entropy,
    "on_class": on_class,
    "common": common,
    "spread": spread,
    "uniform": round(float(np.log(out.attentions[0].shape[-1])), 3),
  }


class Monitor:
  """Reads a training tower's `health` on fixed frames when called.

  The reading goes through a copy of the tower made now, before training
  compiles anything in place, with the training weights loaded into it at
  each call: the training tower is neither run nor changed.
  """

  def __init__(self, tower, pixels: torch.Tensor):
    self.tower, self.pixels = tower, pixels
    self.copy = copy.deepcopy(tower).eval()

  def __call__(self) -> dict:
    self.copy.to(next(self.tower.parameters()).device)
    self.copy.load_state_dict(self.tower.state_dict())
    return health(self.copy, self.pixels)


def summary(got: dict) -> str:
  """One line of a reading: the first layer's lowest head entropy and
  highest class-token share, and the last layer's common part / spread."""
  return (
    f"tower layer 1: entropy min {min(got['entropy'][0]):.2f} of "
    f"{got['uniform']:.2f}, class share max {max(got['on_class'][0]):.2f}; "
    f"output common / spread {got['common'][-1]:.1f} / "
    f"{got['spread'][-1]:.1f}"
  )


def lines(got: dict) -> list[str]:
  """A reading, layer by layer."""
  out = [
    f"vision tower, per layer: attention entropy of each head (nats; even "
    f"spread {got['uniform']:.2f}), its share on the class token, and the "
    f"patch tokens' common part / spread at the layer's output (input: "
    f"{got['common'][0]:.1f} / {got['spread'][0]:.1f}):"
  ]
  rows = zip(got["entropy"], got["on_class"], strict=True)
  for i, (h, c) in enumerate(rows):
    out.append(
      f"  layer {i + 1}: entropy "
      + " ".join(f"{x:.2f}" for x in h)
      + "; on class "
      + " ".join(f"{x:.2f}" for x in c)
      + f"; common / spread {got['common'][i + 1]:.1f} / "
      f"{got['spread'][i + 1]:.1f}"
    )
  return out
