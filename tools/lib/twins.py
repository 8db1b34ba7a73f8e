"""PyTorch twins of the egpt_align adapters and the Flax <-> torch bridge.

The twins have the reference's state-dict key names, shapes, order and
initialisation (REFERENCE_NOTES §2), and compute the reference formulas with
the padding mask used everywhere (L4/L5/L5F as key-padding mask; L5/L5F also
causal), so they match the Flax modules in `egpt_align.models`.

Masks follow egpt_align: `mask` is `[B, S]` bool, True = valid.  Padded query
positions get finite (but meaningless) outputs, never NaN, even for rows that
are entirely padding.

The mapping functions `flax_to_state_dict` / `state_dict_to_flax` are driven by
one table per adapter, so both directions are the same correspondence:
Dense kernels `[in, out]` are torch `weight.T`, the attention `in_proj` kernel
`[D, 3D]` is `in_proj_weight.T` (columns q | k | v), LayerNorm `scale` is
`weight`, alphas are 0-d.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from egpt_align import models

# Flax-only fields (compute dtype etc.) that do not change the torch module.
IGNORED_FIELDS = frozenset({"name", "dtype", "param_dtype"})

# Our (Flax) model config fields each twin understands: the registry's
# module fields less the Flax-only ones.
CONFIG_FIELDS = {
  name: tuple(f for f in models.adapter_fields(name) if f not in IGNORED_FIELDS)
  for name in models.ADAPTERS
}


def check_name(name: str) -> str:
  """The registry name (lower-cased) or a ValueError naming the choices."""
  return models.get_spec(name).name


def _neg(dtype: torch.dtype) -> float:
  # Half of the most negative value: two of them (causal + padding) still sum
  # to a finite number, so fully masked rows give a uniform softmax, not NaN.
  return torch.finfo(dtype).min / 2


# ----------------------------------------------------------------------------
# L1 / L2: bottleneck blocks.


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


class HiddenStateAdapter(nn.Module):
  """L1: `num_layers` bottleneck blocks, then a final LayerNorm."""

  def __init__(self, config: HiddenAdapterConfig | None = None):
    super().__init__()
    self.config = config = config or HiddenAdapterConfig()
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


class WideBottleneckAdapter(nn.Module):
  """L3: x = LN_in(h); x += a_i * Drop(W2(Drop(GELU(LN(W1 x))))); LN."""

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


# ----------------------------------------------------------------------------
# L4 / L5 / L5F: transformer layers.


class TransformerLayer(nn.Module):
  """Pre-LN MHA + FFN layer with the reference's submodule names."""

  def __init__(self, hidden_dim: int, num_heads: int, ffn_dim: int, dropout):
    super().__init__()
    self.attn_norm = nn.LayerNorm(hidden_dim)
    self.attn = nn.MultiheadAttention(
      hidden_dim, num_heads, dropout=dropout, batch_first=True
    )
    self.ffn_norm = nn.LayerNorm(hidden_dim)
    self.ffn = nn.Sequential(
      nn.Linear(hidden_dim, ffn_dim),
      nn.GELU(),
      nn.Dropout(dropout),
      nn.Linear(ffn_dim, hidden_dim),
      nn.Dropout(dropout),
    )

  def forward(self, x, attn_mask=None, key_padding_mask=None):
    h = self.attn_norm(x)
    a, _ = self.attn(
      h,
      h,
      h,
      attn_mask=attn_mask,
      key_padding_mask=key_padding_mask,
      need_weights=False,
    )
    x = x + a
    return x + self.ffn(self.ffn_norm(x))

  def cached(self, x, k_cache, v_cache, start, bias):
    """Eval-only step over new positions [start, start+T) with a KV cache."""
    batch, steps, dim = x.shape
    heads = self.attn.num_heads
    h = self.attn_norm(x)
    qkv = F.linear(h, self.attn.in_proj_weight, self.attn.in_proj_bias)
    q, k, v = (
      t.reshape(batch, steps, heads, dim // heads).transpose(1, 2)
      for t in qkv.chunk(3, dim=-1)
    )
    end = start + steps
    k_cache[:, :, start:end] = k.to(k_cache.dtype)
    v_cache[:, :, start:end] = v.to(v_cache.dtype)
    a = F.scaled_dot_product_attention(
      q,
      k_cache[:, :, :end].to(q.dtype),
      v_cache[:, :, :end].to(q.dtype),
      attn_mask=bias.to(q.dtype),
    )
    a = a.transpose(1, 2).reshape(batch, steps, dim)
    x = x + self.attn.out_proj(a)
    return x + self.ffn(self.ffn_norm(x))

  def cached_at(self, x, k_cache, v_cache, positions, mask):
    """Like `cached` on static buffers: writes K/V at `positions` [T].

    `mask` [T, M] bool says which cache positions each query reads.
    """
    batch, steps, dim = x.shape
    heads = self.attn.num_heads
    h = self.attn_norm(x)
    qkv = F.linear(h, self.attn.in_proj_weight, self.attn.in_proj_bias)
    q, k, v = (
      t.reshape(batch, steps, heads, dim // heads).transpose(1, 2)
      for t in qkv.chunk(3, dim=-1)
    )
    k_cache.index_copy_(2, positions, k.to(k_cache.dtype))
    v_cache.index_copy_(2, positions, v.to(v_cache.dtype))
    a = F.scaled_dot_product_attention(
      q, k_cache.to(q.dtype), v_cache.to(q.dtype), attn_mask=mask
    )
    a = a.transpose(1, 2).reshape(batch, steps, dim)
    x = x + self.attn.out_proj(a)
    return x + self.ffn(self.ffn_norm(x))


def _padding_mask(mask, x: torch.Tensor):
  """Float key-padding mask from a bool [B, S] valid mask (or None)."""
  if mask is None:
    return None
  mask = torch.as_tensor(mask, device=x.device)
  if mask.shape != x.shape[:2]:
    raise ValueError(
      f"mask has shape {tuple(mask.shape)}, expected [B, S] = "
      f"{tuple(x.shape[:2])} (True = valid)."
    )
  valid = mask.bool()
  pad = torch.zeros(valid.shape, dtype=x.dtype, device=x.device)
  return pad.masked_fill(~valid, _neg(x.dtype))


def _causal_mask(seq_len: int, x: torch.Tensor) -> torch.Tensor:
  upper = torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device)
  upper = torch.triu(upper, diagonal=1)
  zeros = torch.zeros(seq_len, seq_len, dtype=x.dtype, device=x.device)
  return zeros.masked_fill(upper, _neg(x.dtype))


class AttentionAdapter(nn.Module):
  """L4: bidirectional transformer layers, out = h + a (proj(LN(x)) - h)."""

  def __init__(
    self,
    hidden_dim: int = 4096,
    num_heads: int = 8,
    ffn_dim: int = 2048,
    num_layers: int = 1,
    dropout: float = 0.1,
    alpha: float = 0.1,
  ):
    super().__init__()
    self.hidden_dim = hidden_dim
    self.num_heads = num_heads
    self.ffn_dim = ffn_dim
    self.num_layers = num_layers
    self.layers = nn.ModuleList(
      [
        TransformerLayer(hidden_dim, num_heads, ffn_dim, dropout)
        for _ in range(num_layers)
      ]
    )
    self.output_proj = nn.Sequential(
      nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim)
    )
    self.alpha = nn.Parameter(torch.tensor(float(alpha)))
    nn.init.eye_(self.output_proj[1].weight)
    nn.init.zeros_(self.output_proj[1].bias)

  def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
    """`mask` [B, S] bool (True = valid) masks padded keys in every layer."""
    pad = _padding_mask(mask, x)
    h = x
    for layer in self.layers:
      h = layer(h, key_padding_mask=pad)
    return x + self.alpha * (self.output_proj(h) - x)


KVCache = dict  # {'k': [L x [B,H,M,hd]], 'v': [...], 'valid': [B,M], 'length'}


def truncate_cache(cache: KVCache, length: int) -> KVCache:
  """Rolls a KV cache back to its first `length` positions (in place)."""
  if not 0 <= length <= cache["length"]:
    raise ValueError(
      f"truncate length {length} outside [0, {cache['length']}] "
      "(the cache's current length)."
    )
  cache["valid"][:, length:] = False
  cache["length"] = int(length)
  return cache


class _CausalAdapter(nn.Module):
  """Shared causal stack and KV-cached decoding of L5 / B1 / L5F."""

  def _build_core(self, hidden_dim, num_heads, ffn_dim, num_layers, dropout):
    self.layers = nn.ModuleList(
      [
        TransformerLayer(hidden_dim, num_heads, ffn_dim, dropout)
        for _ in range(num_layers)
      ]
    )
    self.output_norm = nn.LayerNorm(hidden_dim)
    self.output_proj = nn.Linear(hidden_dim, hidden_dim)

  def _init_core(self):
    nn.init.trunc_normal_(self.pos_embed, std=0.02)
    nn.init.eye_(self.output_proj.weight)
    nn.init.zeros_(self.output_proj.bias)

  def _check_len(self, end: int, what: str):
    if end > self.max_seq_len:
      raise ValueError(
        f"{what} {end} exceeds the positional table (max_seq_len="
        f"{self.max_seq_len})."
      )

  def _stack(self, x, mask):
    seq_len = x.shape[1]
    self._check_len(seq_len, "sequence length")
    x = x + self.pos_embed[:, :seq_len].to(x.dtype)
    causal = _causal_mask(seq_len, x)
    pad = _padding_mask(mask, x)
    for layer in self.layers:
      x = layer(x, attn_mask=causal, key_padding_mask=pad)
    return self.output_proj(self.output_norm(x))

  def init_cache(
    self, batch_size: int, max_len: int, device=None, dtype=None
  ) -> KVCache:
    """An empty KV cache for `max_len` positions (at most max_seq_len)."""
    self._check_len(max_len, "cache max_len")
    device = self.alpha.device if device is None else device
    dtype = self.alpha.dtype if dtype is None else dtype
    shape = (
      batch_size,
      self.num_heads,
      max_len,
      self.hidden_dim // self.num_heads,
    )
    return {
      "k": [
        torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers
      ],
      "v": [
        torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers
      ],
      "valid": torch.zeros(
        batch_size, max_len, dtype=torch.bool, device=device
      ),
      "length": 0,
    }

  def truncate(self, cache: KVCache, length: int) -> KVCache:
    """Rolls `cache` back to `length` positions, e.g. after rejected drafts."""
    return truncate_cache(cache, length)

  def static_cache(self, max_len: int, device=None, dtype=None):
    """Preallocated K and V [layers, 1, heads, max_len, head_dim]."""
    self._check_len(max_len, "cache max_len")
    device = self.alpha.device if device is None else device
    dtype = self.alpha.dtype if dtype is None else dtype
    shape = (
      len(self.layers),
      1,
      self.num_heads,
      max_len,
      self.hidden_dim // self.num_heads,
    )
    return (
      torch.zeros(shape, dtype=dtype, device=device),
      torch.zeros(shape, dtype=dtype, device=device),
    )

  def static_step(self, *inputs, k_cache, v_cache, positions):
    """`decode_step` on `static_cache` buffers at positions [T] (a tensor).

    Batch 1, every position valid. Query p reads the cache positions <= p
    only, so rolling back is decoding from a smaller position: entries past
    it are never read and are overwritten first. No host syncs.
    """
    x = self._stack_input(*inputs)
    keys = torch.arange(k_cache.shape[3], device=x.device)
    mask = (keys[None, :] <= positions[:, None])[None, None]
    h = x + self.pos_embed[0].index_select(0, positions)[None].to(x.dtype)
    for i, layer in enumerate(self.layers):
      h = layer.cached_at(h, k_cache[i], v_cache[i], positions, mask)
    out = self.output_proj(self.output_norm(h))
    res = inputs[-1]
    return res + self.alpha * (out - res)

  def _cached_stack(self, x, cache, position, mask):
    if self.training:
      raise RuntimeError("decode_step is inference-only: call .eval() first.")
    batch, steps, _ = x.shape
    position = cache["length"] if position is None else int(position)
    if not 0 <= position <= cache["length"]:
      raise ValueError(
        f"position {position} must be in [0, cache length {cache['length']}]"
        " (positions are decoded in order; use truncate() to roll back)."
      )
    end = position + steps
    max_len = cache["valid"].shape[1]
    if end > max_len:
      raise ValueError(
        f"decoding positions [{position}, {end}) overflows the cache "
        f"(max_len={max_len})."
      )
    if cache["valid"].shape[0] != batch:
      raise ValueError(
        f"input batch {batch} != cache batch {cache['valid'].shape[0]}."
      )
    valid = cache["valid"]
    valid[:, end:] = False
    if mask is None:
      valid[:, position:end] = True
    else:
      mask = torch.as_tensor(mask, device=valid.device).bool()
      if mask.shape != (batch, steps):
        raise ValueError(
          f"mask has shape {tuple(mask.shape)}, expected {(batch, steps)}."
        )
      valid[:, position:end] = mask
    keys = torch.arange(end, device=x.device)
    queries = torch.arange(position, end, device=x.device)
    allowed = (keys[None, :] <= queries[:, None])[None] & valid[:, None, :end]
    bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
    bias = bias.masked_fill(~allowed, _neg(x.dtype))[:, None]
    h = x + self.pos_embed[:, position:end].to(x.dtype)
    for i, layer in enumerate(self.layers):
      h = layer.cached(h, cache["k"][i], cache["v"][i], position, bias)
    cache["length"] = end
    return self.output_proj(self.output_norm(h)), cache


class EAGLEStyleAdapter(_CausalAdapter):
  """L5 / B1: causal layers over LN(h) + pos; out = h + a (proj - h)."""

  def __init__(
    self,
    hidden_dim: int = 4096,
    num_heads: int = 8,
    ffn_dim: int = 2048,
    num_layers: int = 1,
    dropout: float = 0.1,
    max_seq_len: int = 512,
    use_token_embed: bool = False,
    alpha: float = 0.1,
  ):
    super().__init__()
    if use_token_embed:
      raise ValueError(
        "use_token_embed=True is not supported (the reference never uses it)."
      )
    self.hidden_dim = hidden_dim
    self.num_heads = num_heads
    self.ffn_dim = ffn_dim
    self.num_layers = num_layers
    self.max_seq_len = max_seq_len
    self.use_token_embed = False
    self.input_norm = nn.LayerNorm(hidden_dim)
    self.pos_embed = nn.Parameter(torch.zeros(1, max_seq_len, hidden_dim))
    self._build_core(hidden_dim, num_heads, ffn_dim, num_layers, dropout)
    self.alpha = nn.Parameter(torch.tensor(float(alpha)))
    self._init_core()

  def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
    """Full causal forward; `mask` [B, S] bool, True = valid."""
    out = self._stack(self.input_norm(x), mask)
    return x + self.alpha * (out - x)

  def _stack_input(self, x):
    return self.input_norm(x)

  def decode_step(self, x, cache: KVCache, position=None, mask=None):
    """Decodes x [B, T, D] (usually T = 1) at `position` using `cache`."""
    out, cache = self._cached_stack(self.input_norm(x), cache, position, mask)
    return x + self.alpha * (out - x), cache


class FusedEAGLEAdapter(_CausalAdapter):
  """L5F: gated fusion of [source ; target], causal layers, target residual."""

  def __init__(
    self,
    hidden_dim: int = 4096,
    num_heads: int = 8,
    ffn_dim: int = 2048,
    num_layers: int = 1,
    dropout: float = 0.1,
    max_seq_len: int = 512,
    alpha: float = 0.1,
  ):
    super().__init__()
    self.hidden_dim = hidden_dim
    self.num_heads = num_heads
    self.ffn_dim = ffn_dim
    self.num_layers = num_layers
    self.max_seq_len = max_seq_len
    self.fusion_proj = nn.Linear(2 * hidden_dim, hidden_dim)
    self.fusion_norm = nn.LayerNorm(hidden_dim)
    self.gate = nn.Sequential(
      nn.Linear(2 * hidden_dim, hidden_dim), nn.Sigmoid()
    )
    self.pos_embed = nn.Parameter(torch.zeros(1, max_seq_len, hidden_dim))
    self._build_core(hidden_dim, num_heads, ffn_dim, num_layers, dropout)
    self.alpha = nn.Parameter(torch.tensor(float(alpha)))
    self._init_core()
    nn.init.xavier_uniform_(self.fusion_proj.weight)
    nn.init.zeros_(self.fusion_proj.bias)

  def _fuse(self, e, v):
    if e.shape != v.shape:
      raise ValueError(
        f"source {tuple(e.shape)} and target {tuple(v.shape)} differ in shape."
      )
    c = torch.cat([e, v], dim=-1)
    g = self.gate(c)
    return self.fusion_norm(g * e + (1 - g) * v + self.fusion_proj(c))

  def forward(self, e: torch.Tensor, v: torch.Tensor, mask=None):
    """Full causal forward on (source, target); `mask` True = valid."""
    out = self._stack(self._fuse(e, v), mask)
    return v + self.alpha * (out - v)

  def _stack_input(self, e, v):
    return self._fuse(e, v)

  def decode_step(self, e, v, cache: KVCache, position=None, mask=None):
    """Decodes (e, v) [B, T, D] (usually T = 1) at `position`."""
    out, cache = self._cached_stack(self._fuse(e, v), cache, position, mask)
    return v + self.alpha * (out - v), cache


TWIN_CLASSES = {
  "l1": HiddenStateAdapter,
  "l2": MultiLayerBottleneckAdapter,
  "l3": WideBottleneckAdapter,
  "l4": AttentionAdapter,
  "l5": EAGLEStyleAdapter,
  "b1": EAGLEStyleAdapter,
  "l5f": FusedEAGLEAdapter,
}


def reference_config(name: str, **cfg) -> dict[str, Any]:
  """The reference constructor kwargs (plain dict) for our model config."""
  name = check_name(name)
  cfg = _check_fields(name, cfg)
  d = {"hidden_dim": cfg.get("hidden_dim", 4096)}
  if name == "l1":
    d.update(
      bottleneck_dim=cfg.get("bottleneck_dim", 256),
      num_layers=cfg.get("num_layers", 1),
      dropout=cfg.get("dropout", 0.1),
      alpha=cfg.get("alpha_init", 0.1),
      use_layer_norm=True,
      use_gelu=True,
    )
  elif name in ("l2", "l3"):
    d.update(
      bottleneck_dim=cfg.get("bottleneck_dim", 256 if name == "l2" else 1024),
      num_blocks=cfg.get("num_blocks", 3 if name == "l2" else 2),
      dropout=cfg.get("dropout", 0.1),
      alpha=cfg.get("alpha_init", 0.1),
    )
  else:
    d.update(
      num_heads=cfg.get("num_heads", 8),
      ffn_dim=cfg.get("ffn_dim", 2048),
      num_layers=cfg.get("num_layers", 1),
      dropout=cfg.get("dropout", 0.1),
    )
    if name != "l4":
      d["max_seq_len"] = cfg.get("max_seq_len", 512)
    if name in ("l5", "b1"):
      d["use_token_embed"] = False
  return d


def _check_fields(name: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
  # None means "the adapter default" (as in egpt_align's run configs).
  cfg = {
    k: v for k, v in cfg.items() if k not in IGNORED_FIELDS and v is not None
  }
  unknown = sorted(set(cfg) - set(CONFIG_FIELDS[name]))
  if unknown:
    raise ValueError(
      f"Unknown config field(s) {unknown} for adapter {name!r}; expected "
      f"some of {CONFIG_FIELDS[name]}."
    )
  return cfg


def build_torch_adapter(name: str, **cfg) -> nn.Module:
  """The torch twin of adapter `name` from our (Flax) model config fields."""
  name = check_name(name)
  ref = reference_config(name, **cfg)
  if name == "l1":
    return HiddenStateAdapter(HiddenAdapterConfig(**ref))
  alpha = cfg.get("alpha_init", 0.1)
  if name not in ("l2", "l3"):
    ref["alpha"] = alpha
  return TWIN_CLASSES[name](**ref)


def num_params(module: nn.Module) -> int:
  """Trainable parameter count (works on the meta device)."""
  return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------
# Flax <-> torch mapping.

# One entry: (flax path, torch key, transpose?).
_Entry = tuple[tuple[str, ...], str, bool]


def _ln(fpath: tuple[str, ...], tkey: str) -> list[_Entry]:
  return [
    (fpath + ("scale",), tkey + ".weight", False),
    (fpath + ("bias",), tkey + ".bias", False),
  ]


def _dense(fpath, tkey, bias=True) -> list[_Entry]:
  out = [(fpath + ("kernel",), tkey + ".weight", True)]
  if bias:
    out.append((fpath + ("bias",), tkey + ".bias", False))
  return out


def _transformer_layer(i: int) -> list[_Entry]:
  f, t = (f"layers_{i}",), f"layers.{i}"
  return (
    _ln(f + ("attn_norm",), t + ".attn_norm")
    + [
      (f + ("attn", "in_proj", "kernel"), t + ".attn.in_proj_weight", True),
      (f + ("attn", "in_proj", "bias"), t + ".attn.in_proj_bias", False),
    ]
    + _dense(f + ("attn", "out_proj"), t + ".attn.out_proj")
    + _ln(f + ("ffn_norm",), t + ".ffn_norm")
    + _dense(f + ("ffn_up",), t + ".ffn.0")
    + _dense(f + ("ffn_down",), t + ".ffn.3")
  )


def param_table(name: str, depth: int) -> list[_Entry]:
  """(flax path, torch key, transpose) for every parameter, in torch order."""
  name = check_name(name)
  table: list[_Entry] = []
  if name in ("l1", "l2"):
    f, t = ("layers", "layers") if name == "l1" else ("blocks", "blocks")
    for i in range(depth):
      p, k = (f"{f}_{i}",), f"{t}.{i}"
      table += [(p + ("alpha_param",), k + ".alpha_param", False)]
      table += _dense(p + ("down_proj",), k + ".down_proj", bias=False)
      table += _dense(p + ("up_proj",), k + ".up_proj", bias=False)
      table += _ln(p + ("layer_norm",), k + ".layer_norm")
    table += _ln(("final_norm",), "final_norm")
  elif name == "l3":
    table += _ln(("input_norm",), "input_norm")
    for i in range(depth):
      p, k = (f"blocks_{i}",), f"blocks.{i}"
      table += _dense(p + ("down",), k + ".0", bias=False)
      table += _ln(p + ("norm",), k + ".1")
      table += _dense(p + ("up",), k + ".4", bias=False)
    table += [((f"alphas_{i}",), f"alphas.{i}", False) for i in range(depth)]
    table += _ln(("final_norm",), "final_norm")
  elif name == "l4":
    table += [(("alpha",), "alpha", False)]
    for i in range(depth):
      table += _transformer_layer(i)
    table += _ln(("output_norm",), "output_proj.0")
    table += _dense(("output_proj",), "output_proj.1")
  else:
    table += [
      (("pos_embed",), "pos_embed", False),
      (("alpha",), "alpha", False),
    ]
    if name == "l5f":
      table += _dense(("fusion_proj",), "fusion_proj")
      table += _ln(("fusion_norm",), "fusion_norm")
      table += _dense(("gate",), "gate.0")
    else:
      table += _ln(("input_norm",), "input_norm")
    for i in range(depth):
      table += _transformer_layer(i)
    table += _ln(("output_norm",), "output_norm")
    table += _dense(("output_proj",), "output_proj")
  return table


def _depth_prefix(name: str) -> str:
  return "blocks" if name in ("l2", "l3") else "layers"


def _count(indices: set[int], what: str) -> int:
  n = len(indices)
  if sorted(indices) != list(range(n)):
    raise ValueError(f"{what} indices {sorted(indices)} are not 0..{n - 1}.")
  return n


def flatten_params(params: Mapping) -> dict[str, np.ndarray]:
  """{'a/b/c': array} from a nested params dict (egpt_align's format)."""
  from egpt_align import checkpoint

  return checkpoint.flatten_params(params)


def unflatten_params(flat: Mapping[str, Any]) -> dict:
  """Inverse of `flatten_params`."""
  from egpt_align import checkpoint

  return checkpoint.unflatten_params(flat)


def _unwrap(params: Mapping) -> Mapping:
  # Accept both `variables` ({'params': tree}) and the bare tree.
  if set(params) == {"params"} and isinstance(params["params"], Mapping):
    return params["params"]
  return params


def flax_depth(name: str, params: Mapping) -> int:
  """Number of layers/blocks in a Flax params tree."""
  name = check_name(name)
  prefix = _depth_prefix(name)
  pat = re.compile(rf"^{prefix}_(\d+)$")
  idx = {int(m.group(1)) for k in _unwrap(params) if (m := pat.match(str(k)))}
  return _count(idx, f"Flax params {prefix}_*")


def torch_depth(name: str, state_dict: Mapping) -> int:
  """Number of layers/blocks in a torch state dict."""
  name = check_name(name)
  prefix = _depth_prefix(name)
  pat = re.compile(rf"^{prefix}\.(\d+)\.")
  idx = {int(m.group(1)) for k in state_dict if (m := pat.match(k))}
  return _count(idx, f"state dict {prefix}.*")


def _to_numpy(x) -> np.ndarray:
  """A float32 numpy copy (never a view of a torch tensor's storage)."""
  if isinstance(x, torch.Tensor):
    return x.detach().to("cpu", torch.float32).numpy().copy()
  return np.array(x, dtype=np.float32, copy=True)


def _mismatch(what, missing, unexpected) -> ValueError:
  return ValueError(
    f"{what} do not match the adapter's parameters: missing "
    f"{sorted(missing)[:20]}, unexpected {sorted(unexpected)[:20]}."
  )


def flax_to_state_dict(name: str, params: Mapping) -> dict[str, torch.Tensor]:
  """Flax params (tree or {'params': tree}) -> torch state dict (float32)."""
  name = check_name(name)
  params = _unwrap(params)
  flat = flatten_params(params)
  table = param_table(name, flax_depth(name, params))
  want = {"/".join(fp) for fp, _, _ in table}
  if want != set(flat):
    raise _mismatch(
      f"Flax params for {name!r}", want - set(flat), set(flat) - want
    )
  sd = collections.OrderedDict()
  for fpath, tkey, transpose in table:
    a = _to_numpy(flat["/".join(fpath)])
    if transpose:
      if a.ndim != 2:
        raise ValueError(
          f"Flax param {'/'.join(fpath)} has shape {a.shape}; expected a 2-D "
          "kernel [in, out]."
        )
      a = a.T
    sd[tkey] = torch.from_numpy(np.array(a, order="C"))
  return sd


def state_dict_to_flax(name: str, state_dict: Mapping) -> dict:
  """torch state dict -> nested Flax params dict of float32 numpy arrays."""
  name = check_name(name)
  table = param_table(name, torch_depth(name, state_dict))
  want = {tkey for _, tkey, _ in table}
  if want != set(state_dict):
    raise _mismatch(
      f"state dict keys for {name!r}",
      want - set(state_dict),
      set(state_dict) - want,
    )
  flat = {}
  for fpath, tkey, transpose in table:
    a = _to_numpy(state_dict[tkey])
    if transpose:
      if a.ndim != 2:
        raise ValueError(
          f"state dict {tkey} has shape {a.shape}; expected a 2-D weight."
        )
      a = np.array(a.T, order="C")
    flat["/".join(fpath)] = a
  return unflatten_params(flat)


def infer_config(name: str, state_dict: Mapping, num_heads=None) -> dict:
  """Our model config fields read off a torch state dict's shapes."""
  name = check_name(name)
  sd = state_dict

  def dim(key, axis=0):
    if key not in sd:
      raise ValueError(f"state dict for {name!r} lacks {key!r}.")
    return int(sd[key].shape[axis])

  depth = torch_depth(name, sd)
  cfg: dict[str, Any] = {}
  if name in ("l1", "l2"):
    prefix = "layers" if name == "l1" else "blocks"
    cfg["hidden_dim"] = dim("final_norm.weight")
    cfg["bottleneck_dim"] = dim(f"{prefix}.0.down_proj.weight")
    cfg["num_layers" if name == "l1" else "num_blocks"] = depth
  elif name == "l3":
    cfg["hidden_dim"] = dim("final_norm.weight")
    cfg["bottleneck_dim"] = dim("blocks.0.0.weight")
    cfg["num_blocks"] = depth
  else:
    key = "output_proj.0.weight" if name == "l4" else "output_norm.weight"
    cfg["hidden_dim"] = dim(key)
    cfg["ffn_dim"] = dim("layers.0.ffn.0.weight")
    cfg["num_layers"] = depth
    cfg["num_heads"] = 8 if num_heads is None else int(num_heads)
    if cfg["hidden_dim"] % cfg["num_heads"]:
      raise ValueError(
        f"num_heads={cfg['num_heads']} does not divide hidden_dim="
        f"{cfg['hidden_dim']}."
      )
    if name != "l4":
      cfg["max_seq_len"] = dim("pos_embed", 1)
  return cfg


def resolve_config(name: str, state_dict: Mapping, model_cfg=None) -> dict:
  """Merges a model config with the dims read off `state_dict`; checks both.

  Structural fields (hidden_dim, depth, ffn_dim, ...) come from the shapes;
  a config value that disagrees with them is an error naming the field.
  """
  name = check_name(name)
  model_cfg = _check_fields(name, dict(model_cfg or {}))
  inferred = infer_config(name, state_dict, model_cfg.get("num_heads"))
  for key, value in model_cfg.items():
    if key in inferred and inferred[key] != value:
      raise ValueError(
        f"config field {key}={value!r} disagrees with the parameters, "
        f"whose shapes give {key}={inferred[key]!r} (adapter {name!r})."
      )
  cfg = {**inferred, **model_cfg}
  check_state_dict(name, state_dict, **cfg)
  return cfg


def expected_shapes(name: str, **cfg) -> dict[str, tuple[int, ...]]:
  """State-dict key -> shape of the twin for `cfg`, built on the meta device."""
  with torch.device("meta"):
    model = build_torch_adapter(name, **cfg)
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(name: str, state_dict: Mapping, **cfg) -> None:
  """Raises a ValueError naming every key whose presence or shape is wrong."""
  want = expected_shapes(name, **cfg)
  have = {k: tuple(v.shape) for k, v in state_dict.items()}
  if set(want) != set(have):
    raise _mismatch(
      f"state dict keys for {name!r}",
      set(want) - set(have),
      set(have) - set(want),
    )
  bad = [f"{k}: {have[k]} != {want[k]}" for k in want if have[k] != want[k]]
  if bad:
    raise ValueError(
      f"state dict shapes for {name!r} with config {cfg} differ: {bad[:20]}"
    )


def load_torch_adapter(name: str, state_dict: Mapping, **cfg) -> nn.Module:
  """Builds the twin for `cfg` and loads `state_dict` into it (strict)."""
  check_state_dict(name, state_dict, **cfg)
  model = build_torch_adapter(name, **cfg)
  model.load_state_dict(state_dict, strict=True)
  return model


# ----------------------------------------------------------------------------
# Params files: one .npz with '/'-joined keys.


def save_params_npz(path, params: Mapping) -> None:
  """Writes a params tree (torch or numpy leaves) as egpt_align's .npz."""
  from egpt_align import checkpoint

  def as_numpy(node):
    if isinstance(node, Mapping):
      return {k: as_numpy(v) for k, v in node.items()}
    return _to_numpy(node)

  checkpoint.save_params_npz(os.fspath(path), as_numpy(_unwrap(params)))


def load_params_npz(path) -> dict:
  """Reads an .npz written by `save_params_npz` back into a nested dict."""
  from egpt_align import checkpoint

  params = checkpoint.load_params_npz(os.fspath(path))
  if not params:
    raise ValueError(f"{path}: params file holds no arrays.")
  return params
