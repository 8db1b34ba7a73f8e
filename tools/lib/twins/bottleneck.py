"""Torch twins of the bottleneck adapters L1, L2 and L3, with their tables.

The reference's state-dict key names, shapes, order and initialisation
(REFERENCE_NOTES §2). All three are position-wise, so `mask` is accepted and
not needed.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tools.lib.twins.naming import Entry, Naming, dense, ln, scalar


@dataclasses.dataclass
class HiddenAdapterConfig:
  """L1 configuration, field for field as the reference's dataclass."""

  hidden_dim: int = 4096
  bottleneck_dim: int = 256
  num_layers: int = 1
  dropout: float = 0.1
  alpha: float = 0.1
  use_layer_norm: bool = True
  use_gelu: bool = True


class BottleneckAdapter(nn.Module):
  """y = x + a * W_up(Dropout(GELU(W_down(LN(x))))), no biases."""

  def __init__(
    self,
    hidden_dim: int = 4096,
    bottleneck_dim: int = 256,
    dropout: float = 0.1,
    alpha: float = 0.1,
    use_layer_norm: bool = True,
    use_gelu: bool = True,
  ):
    super().__init__()
    self.down_proj = nn.Linear(hidden_dim, bottleneck_dim, bias=False)
    self.up_proj = nn.Linear(bottleneck_dim, hidden_dim, bias=False)
    self.layer_norm = (
      nn.LayerNorm(hidden_dim) if use_layer_norm else nn.Identity()
    )
    self.act = nn.GELU() if use_gelu else nn.ReLU()
    self.dropout = nn.Dropout(dropout)
    self.alpha_param = nn.Parameter(torch.tensor(float(alpha)))
    nn.init.kaiming_normal_(
      self.down_proj.weight, mode="fan_in", nonlinearity="linear"
    )
    nn.init.zeros_(self.up_proj.weight)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.dropout(self.act(self.down_proj(self.layer_norm(x))))
    return x + self.alpha_param * self.up_proj(h)


def _bottleneck_params(stack: str):
  """L1 / L2: `stack` bottleneck blocks, then a final LayerNorm."""

  def params(depth: int) -> list[Entry]:
    table: list[Entry] = []
    for i in range(depth):
      f, t = (f"{stack}_{i}",), f"{stack}.{i}"
      table += scalar(f + ("alpha_param",), t + ".alpha_param")
      table += dense(f + ("down_proj",), t + ".down_proj", bias=False)
      table += dense(f + ("up_proj",), t + ".up_proj", bias=False)
      table += ln(f + ("layer_norm",), t + ".layer_norm")
    return table + ln(("final_norm",), "final_norm")

  return params


class HiddenStateAdapter(nn.Module):
  """L1: `num_layers` bottleneck blocks, then a final LayerNorm.

  Built from the reference's config object, or from its fields.
  """

  naming = Naming(
    params=_bottleneck_params("layers"),
    stack="layers",
    depth="num_layers",
    dims={
      "hidden_dim": ("final_norm.weight", 0),
      "bottleneck_dim": ("layers.0.down_proj.weight", 0),
    },
    reference=(
      "hidden_dim",
      "bottleneck_dim",
      "num_layers",
      "dropout",
      "alpha",
    ),
    fixed={"use_layer_norm": True, "use_gelu": True},
    config_class=HiddenAdapterConfig,
  )

  def __init__(self, config: HiddenAdapterConfig | None = None, **fields):
    super().__init__()
    if config is not None and fields:
      raise TypeError("pass a HiddenAdapterConfig or its fields, not both")
    self.config = config = config or HiddenAdapterConfig(**fields)
    self.layers = nn.ModuleList(
      [
        BottleneckAdapter(
          config.hidden_dim,
          config.bottleneck_dim,
          config.dropout,
          config.alpha,
          config.use_layer_norm,
          config.use_gelu,
        )
        for _ in range(config.num_layers)
      ]
    )
    self.final_norm = nn.LayerNorm(config.hidden_dim)

  def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
    """Position-wise, so `mask` is accepted and not needed."""
    del mask
    for layer in self.layers:
      x = layer(x)
    return self.final_norm(x)


class MultiLayerBottleneckAdapter(nn.Module):
  """L2: `num_blocks` bottleneck blocks, then a final LayerNorm."""

  naming = Naming(
    params=_bottleneck_params("blocks"),
    stack="blocks",
    depth="num_blocks",
    dims={
      "hidden_dim": ("final_norm.weight", 0),
      "bottleneck_dim": ("blocks.0.down_proj.weight", 0),
    },
    reference=(
      "hidden_dim",
      "bottleneck_dim",
      "num_blocks",
      "dropout",
      "alpha",
    ),
  )

  def __init__(
    self,
    hidden_dim: int = 4096,
    bottleneck_dim: int = 256,
    num_blocks: int = 3,
    dropout: float = 0.1,
    alpha: float = 0.1,
  ):
    super().__init__()
    self.hidden_dim = hidden_dim
    self.bottleneck_dim = bottleneck_dim
    self.num_blocks = num_blocks
    self.blocks = nn.ModuleList(
      [
        BottleneckAdapter(hidden_dim, bottleneck_dim, dropout, alpha)
        for _ in range(num_blocks)
      ]
    )
    self.final_norm = nn.LayerNorm(hidden_dim)

  def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
    """Position-wise, so `mask` is accepted and not needed."""
    del mask
    for block in self.blocks:
      x = block(x)
    return self.final_norm(x)


def _wide_params(depth: int) -> list[Entry]:
  table = ln(("input_norm",), "input_norm")
  for i in range(depth):
    f, t = (f"blocks_{i}",), f"blocks.{i}"
    table += dense(f + ("down",), t + ".0", bias=False)
    table += ln(f + ("norm",), t + ".1")
    table += dense(f + ("up",), t + ".4", bias=False)
  for i in range(depth):
    table += scalar((f"alphas_{i}",), f"alphas.{i}")
  return table + ln(("final_norm",), "final_norm")


class WideBottleneckAdapter(nn.Module):
  """L3: x = LN_in(h); x += a_i * Drop(W2(Drop(GELU(LN(W1 x))))); LN."""

  naming = Naming(
    params=_wide_params,
    stack="blocks",
    depth="num_blocks",
    dims={
      "hidden_dim": ("final_norm.weight", 0),
      "bottleneck_dim": ("blocks.0.0.weight", 0),
    },
    reference=(
      "hidden_dim",
      "bottleneck_dim",
      "num_blocks",
      "dropout",
      "alpha",
    ),
  )

  def __init__(
    self,
    hidden_dim: int = 4096,
    bottleneck_dim: int = 1024,
    num_blocks: int = 2,
    dropout: float = 0.1,
    alpha: float = 0.1,
  ):
    super().__init__()
    self.hidden_dim = hidden_dim
    self.bottleneck_dim = bottleneck_dim
    self.num_blocks = num_blocks
    self.input_norm = nn.LayerNorm(hidden_dim)
    self.blocks = nn.ModuleList(
      [
        nn.Sequential(
          nn.Linear(hidden_dim, bottleneck_dim, bias=False),
          nn.LayerNorm(bottleneck_dim),
          nn.GELU(),
          nn.Dropout(dropout),
          nn.Linear(bottleneck_dim, hidden_dim, bias=False),
          nn.Dropout(dropout),
        )
        for _ in range(num_blocks)
      ]
    )
    self.alphas = nn.ParameterList(
      [nn.Parameter(torch.tensor(float(alpha))) for _ in range(num_blocks)]
    )
    self.final_norm = nn.LayerNorm(hidden_dim)
    for block in self.blocks:
      # The reference leaves the default leaky_relu gain here (std sqrt(2/in)).
      nn.init.kaiming_normal_(block[0].weight, mode="fan_in")
      nn.init.zeros_(block[4].weight)

  def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
    """Position-wise, so `mask` is accepted and not needed."""
    del mask
    x = self.input_norm(x)
    for block, alpha in zip(self.blocks, self.alphas, strict=True):
      x = x + alpha * block(x)
    return self.final_norm(x)
