"""Torch twins of the attention adapters L4, L5 / B1 and L5F, with tables.

The reference's state-dict key names, shapes, order and initialisation
(REFERENCE_NOTES §2), computing the reference formulas with the padding mask
used everywhere (L4/L5/L5F as key-padding mask; L5/L5F also causal).
L5/B1/L5F also decode with a KV cache (`init_cache` / `decode_step` /
`truncate`, or preallocated `static_cache` / `static_step`).

Masks follow egpt_align: `mask` is `[B, S]` bool, True = valid.  Padded query
positions get finite (but meaningless) outputs, never NaN, even for rows that
are entirely padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tools.lib.twins.naming import Entry, Naming, dense, ln, scalar


def _neg(dtype: torch.dtype) -> float:
  # Half of the most negative value: two of them (causal + padding) still sum
  # to a finite number, so fully masked rows give a uniform softmax, not NaN.
  return torch.finfo(dtype).min / 2


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


def _layer_params(i: int) -> list[Entry]:
  """One TransformerLayer's parameters, Flax `layers_i` / torch `layers.i`."""
  f, t = (f"layers_{i}",), f"layers.{i}"
  return (
    ln(f + ("attn_norm",), t + ".attn_norm")
    + [
      (f + ("attn", "in_proj", "kernel"), t + ".attn.in_proj_weight", True),
      (f + ("attn", "in_proj", "bias"), t + ".attn.in_proj_bias", False),
    ]
    + dense(f + ("attn", "out_proj"), t + ".attn.out_proj")
    + ln(f + ("ffn_norm",), t + ".ffn_norm")
    + dense(f + ("ffn_up",), t + ".ffn.0")
    + dense(f + ("ffn_down",), t + ".ffn.3")
  )


def _layers_params(depth: int) -> list[Entry]:
  return [e for i in range(depth) for e in _layer_params(i)]


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


def _attention_params(depth: int) -> list[Entry]:
  return (
    scalar(("alpha",), "alpha")
    + _layers_params(depth)
    + ln(("output_norm",), "output_proj.0")
    + dense(("output_proj",), "output_proj.1")
  )


class AttentionAdapter(nn.Module):
  """L4: bidirectional transformer layers, out = h + a (proj(LN(x)) - h)."""

  naming = Naming(
    params=_attention_params,
    stack="layers",
    depth="num_layers",
    dims={
      "hidden_dim": ("output_proj.0.weight", 0),
      "ffn_dim": ("layers.0.ffn.0.weight", 0),
    },
    reference=("hidden_dim", "num_heads", "ffn_dim", "num_layers", "dropout"),
  )

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


def _eagle_params(depth: int) -> list[Entry]:
  return (
    scalar(("pos_embed",), "pos_embed")
    + scalar(("alpha",), "alpha")
    + ln(("input_norm",), "input_norm")
    + _layers_params(depth)
    + ln(("output_norm",), "output_norm")
    + dense(("output_proj",), "output_proj")
  )


# The causal twins' config read off a state dict.
_CAUSAL_DIMS = {
  "hidden_dim": ("output_norm.weight", 0),
  "ffn_dim": ("layers.0.ffn.0.weight", 0),
  "max_seq_len": ("pos_embed", 1),
}
_CAUSAL_REFERENCE = (
  "hidden_dim",
  "num_heads",
  "ffn_dim",
  "num_layers",
  "dropout",
  "max_seq_len",
)


class EAGLEStyleAdapter(_CausalAdapter):
  """L5 / B1: causal layers over LN(h) + pos; out = h + a (proj - h)."""

  naming = Naming(
    params=_eagle_params,
    stack="layers",
    depth="num_layers",
    dims=_CAUSAL_DIMS,
    reference=_CAUSAL_REFERENCE,
    fixed={"use_token_embed": False},
  )

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


def _fused_params(depth: int) -> list[Entry]:
  return (
    scalar(("pos_embed",), "pos_embed")
    + scalar(("alpha",), "alpha")
    + dense(("fusion_proj",), "fusion_proj")
    + ln(("fusion_norm",), "fusion_norm")
    + dense(("gate",), "gate.0")
    + _layers_params(depth)
    + ln(("output_norm",), "output_norm")
    + dense(("output_proj",), "output_proj")
  )


class FusedEAGLEAdapter(_CausalAdapter):
  """L5F: gated fusion of [source ; target], causal layers, target residual."""

  naming = Naming(
    params=_fused_params,
    stack="layers",
    depth="num_layers",
    dims=_CAUSAL_DIMS,
    reference=_CAUSAL_REFERENCE,
  )

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
