"""The adapter family and its registry: create_adapter(name, **overrides).

Names: l1 l2 l3 l4 l5 b1 l5f. Defaults are those of the reference's
`create_adapter(level, hidden_dim=4096)` (REFERENCE_NOTES §2).
"""

import dataclasses
from typing import Any

import flax.linen as nn

from egpt_align.models.attention import (
  AttentionAdapter,
  EagleAdapter,
  FusedEagleAdapter,
  MultiHeadSelfAttention,
  TransformerLayer,
)
from egpt_align.models.bottleneck import (
  BottleneckAdapter,
  BottleneckBlock,
  MultiLayerBottleneckAdapter,
  WideBlock,
  WideBottleneckAdapter,
  count_params,
  resolve_dtype,
)


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """What the trainer, evaluator and torch bridge need to know per adapter."""

  name: str  # Registry key, e.g. 'l5f'.
  module: type[nn.Module]
  ref_type: str | None  # Reference checkpoint `adapter_type`; None for L1.
  ref_level: int  # Reference --adapter_level (L5F = 6, B1 = 5).
  inputs: tuple[str, ...]  # Batch fields fed positionally to the module.
  predicts_next: bool  # output[t] also/only predicts target[t+1].
  causal: bool


ADAPTERS: dict[str, AdapterSpec] = {
  s.name: s
  for s in (
    AdapterSpec("l1", BottleneckAdapter, None, 1, ("source",), False, False),
    AdapterSpec(
      "l2",
      MultiLayerBottleneckAdapter,
      "L2_MultiLayerBottleneck",
      2,
      ("source",),
      False,
      False,
    ),
    AdapterSpec(
      "l3",
      WideBottleneckAdapter,
      "L3_WideBottleneck",
      3,
      ("source",),
      False,
      False,
    ),
    AdapterSpec(
      "l4", AttentionAdapter, "L4_Attention", 4, ("source",), False, False
    ),
    AdapterSpec("l5", EagleAdapter, "L5_EAGLE", 5, ("source",), True, True),
    # B1 is L5 trained target -> target (the reference's --vlm_only).
    AdapterSpec("b1", EagleAdapter, "L5_EAGLE", 5, ("target",), True, True),
    AdapterSpec(
      "l5f",
      FusedEagleAdapter,
      "L5F_FusedEAGLE",
      6,
      ("source", "target"),
      True,
      True,
    ),
  )
}


def get_spec(name: str) -> AdapterSpec:
  """The AdapterSpec for a registry name; ValueError naming the choices."""
  if not isinstance(name, str) or name.lower() not in ADAPTERS:
    raise ValueError(
      f"unknown adapter name {name!r}; expected one of {list(ADAPTERS)}"
    )
  return ADAPTERS[name.lower()]


def adapter_fields(name: str) -> tuple[str, ...]:
  """The override-able fields of an adapter's module."""
  module = get_spec(name).module
  return tuple(
    f.name
    for f in dataclasses.fields(module)
    if f.init and f.name not in ("parent", "name")
  )


def create_adapter(name: str, **overrides: Any) -> nn.Module:
  """Builds adapter `name` with the reference defaults plus overrides.

  Overrides whose value is None are skipped (the adapter default applies), so
  a shared config may leave keys that one adapter does not use as None. Any
  other key the adapter does not have is a ValueError naming it.
  """
  spec = get_spec(name)
  fields = adapter_fields(spec.name)
  kwargs = {k: v for k, v in overrides.items() if v is not None}
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(
      f"adapter {spec.name!r} ({spec.module.__name__}) has no field(s) "
      f"{unknown}; valid fields: {list(fields)}"
    )
  if "dtype" in kwargs:
    resolve_dtype(kwargs["dtype"])  # Fail early on a bad dtype string.
  return spec.module(**kwargs)


def adapter_inputs(name: str, batch: dict) -> tuple:
  """The positional module inputs for adapter `name` taken from a batch."""
  spec = get_spec(name)
  missing = [k for k in spec.inputs if k not in batch]
  if missing:
    raise ValueError(
      f"adapter {spec.name!r} needs batch field(s) {missing}; the batch has "
      f"{sorted(batch)}"
    )
  return tuple(batch[k] for k in spec.inputs)


__all__ = [
  "ADAPTERS",
  "AdapterSpec",
  "AttentionAdapter",
  "BottleneckAdapter",
  "BottleneckBlock",
  "EagleAdapter",
  "FusedEagleAdapter",
  "MultiHeadSelfAttention",
  "MultiLayerBottleneckAdapter",
  "TransformerLayer",
  "WideBlock",
  "WideBottleneckAdapter",
  "adapter_fields",
  "adapter_inputs",
  "count_params",
  "create_adapter",
  "get_spec",
]
