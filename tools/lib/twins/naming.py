"""A twin's table: how its parameters and config are named on both sides.

Every twin class carries a `Naming`: which Flax path is which torch
state-dict key (Dense kernels `[in, out]` are torch `weight.T`, the attention
`in_proj` kernel `[D, 3D]` is `in_proj_weight.T` with columns q | k | v,
LayerNorm `scale` is `weight`, alphas are 0-d), where a state dict shows its
depth and dims, and which fields the reference's checkpoint `config` holds.
Both directions of the mapping (tools/lib/bridge.py) read the same table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

# One parameter: (Flax path, torch key, transpose?).
Entry = tuple[tuple[str, ...], str, bool]


def ln(fpath: tuple[str, ...], tkey: str) -> list[Entry]:
  """A LayerNorm: Flax scale/bias are torch weight/bias."""
  return [
    (fpath + ("scale",), tkey + ".weight", False),
    (fpath + ("bias",), tkey + ".bias", False),
  ]


def dense(fpath: tuple[str, ...], tkey: str, bias: bool = True) -> list[Entry]:
  """A Linear: the Flax kernel [in, out] is the torch weight transposed."""
  out = [(fpath + ("kernel",), tkey + ".weight", True)]
  if bias:
    out.append((fpath + ("bias",), tkey + ".bias", False))
  return out


def scalar(fpath: tuple[str, ...], tkey: str) -> list[Entry]:
  """A parameter kept as it is (alphas, positional tables)."""
  return [(fpath, tkey, False)]


@dataclasses.dataclass(frozen=True)
class Naming:
  """One twin's parameter names, shape-read dims and reference config."""

  # Every parameter for a depth (the stack's length), in state-dict order.
  params: Callable[[int], list[Entry]]
  # The repeated stack: Flax `{stack}_{i}`, torch `{stack}.{i}`; `depth` is
  # the config field counting it (num_layers or num_blocks).
  stack: str
  depth: str
  # Config fields read off the state dict: field -> (key, axis).
  dims: Mapping[str, tuple[str, int]]
  # The reference checkpoint's `config` (the twin's constructor kwargs, in
  # the reference's order; `alpha` is our `alpha_init`), then `fixed`.
  reference: tuple[str, ...]
  # Reference options egpt_align supports with one value only.
  fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # The class the reference pickles its `config` as, if it does (L1's
  # HiddenAdapterConfig); others store a plain dict.
  config_class: type | None = None
