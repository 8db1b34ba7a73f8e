"""PyTorch twins of the egpt_align adapters (the state-dict mapping: bridge).

The twins have the reference's state-dict key names, shapes, order and
initialisation (REFERENCE_NOTES §2), and compute the reference formulas with
the padding mask used everywhere (L4/L5/L5F as key-padding mask; L5/L5F also
causal), so they match the Flax modules in `egpt_align.models`.

Masks follow egpt_align: `mask` is `[B, S]` bool, True = valid.  Padded query
positions get finite (but meaningless) outputs, never NaN, even for rows that
are entirely padding.

"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

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

  def static_step(
    self, *inputs, k_cache, v_cache, positions, slots=None, mask=None
  ):
    """`decode_step` on `static_cache` buffers at positions [T] (a tensor).

    Batch 1, every position valid. Query p reads the cache positions <= p
    only, so rolling back is decoding from a smaller position: entries past
    it are never read and are overwritten first. No host syncs.

    Draft trees: `slots` [T] are the cache entries written (default: the
    positions) and `mask` [T, max_len] bool the entries each query reads
    (default: positions <= its own); `positions` index the positional table.
    """
    x = self._stack_input(*inputs)
    if mask is None:
      keys = torch.arange(k_cache.shape[3], device=x.device)
      mask = keys[None, :] <= positions[:, None]
    slots = positions if slots is None else slots
    h = x + self.pos_embed[0].index_select(0, positions)[None].to(x.dtype)
    for i, layer in enumerate(self.layers):
      h = layer.cached_at(h, k_cache[i], v_cache[i], slots, mask[None, None])
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
  cfg = check_fields(name, cfg)
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


def check_fields(name: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`cfg` less Flax-only fields and Nones; an unknown field is an error."""
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
