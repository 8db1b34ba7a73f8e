"""The adapter family and its registry: create_adapter(name, **overrides).

Names: l1 l2 l3 l4 l5 b1 l5f. Defaults are those of the reference's
`create_adapter(level, hidden_dim=4096)` (REFERENCE_NOTES §2).
"""

import dataclasses
from collections.abc import Mapping
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
  """What the trainer, evaluator and torch side need to know per adapter."""

  name: str  # Registry key, e.g. 'l5f'.
  module: type[nn.Module]
  # The reference checkpoint's `adapter_type`. The reference writes none for
  # L1 and its loader falls back to 'L1_Bottleneck'; we write that string.
  ref_type: str
  ref_level: int  # Reference --adapter_level (L5F = 6, B1 = 5).
  inputs: tuple[str, ...]  # Batch fields fed positionally to the module.
  predicts_next: bool  # output[t] also/only predicts target[t+1].
  causal: bool
  # Where it drafts in speculative decoding: 'prefill' (maps the drafter's
  # states while the target prefills: L1-L4) or 'decode' (drafts from its own
  # KV cache after the target's prefill: L5, B1, L5F).
  role: str

  def from_config(self, model_config: Mapping[str, Any]) -> nn.Module:
    """The module from a `config.model` block (its set keys but `name`)."""
    overrides = {k: v for k, v in dict(model_config).items() if k != "name"}
    return create_adapter(self.name, **overrides)


def _spec(name, module, ref_type, ref_level, inputs, predicts_next, role):
  return AdapterSpec(
    name=name,
    module=module,
    ref_type=ref_type,
    ref_level=ref_level,
    inputs=inputs,
    predicts_next=predicts_next,
    causal=predicts_next,
    role=role,
  )


ADAPTERS: dict[str, AdapterSpec] = {
  s.name: s
  for s in (
    _spec(
      "l1", BottleneckAdapter, "L1_Bottleneck", 1, ("source",), False, "prefill"
    ),
    _spec(
      "l2",
      MultiLayerBottleneckAdapter,
      "L2_MultiLayerBottleneck",
      2,
      ("source",),
      False,
      "prefill",
    ),
    _spec(
      "l3",
      WideBottleneckAdapter,
      "L3_WideBottleneck",
      3,
      ("source",),
      False,
      "prefill",
    ),
    _spec(
      "l4", AttentionAdapter, "L4_Attention", 4, ("source",), False, "prefill"
    ),
    _spec("l5", EagleAdapter, "L5_EAGLE", 5, ("source",), True, "decode"),
    # B1 is L5 trained target -> target (the reference's --vlm_only).
    _spec("b1", EagleAdapter, "L5_EAGLE", 5, ("target",), True, "decode"),
    _spec(
      "l5f",
      FusedEagleAdapter,
      "L5F_FusedEAGLE",
      6,
      ("source", "target"),
      True,
      "decode",
    ),
  )
}


def from_ref_type(ref_type: str | None) -> tuple[str, ...]:
  """Registry names whose reference `adapter_type` is `ref_type`.

  None (the reference's L1 files carry no type) means L1; 'L5_EAGLE' is both
  L5 and B1 (the reference's --vlm_only is not recorded in the file).
  """
  ref_type = "L1_Bottleneck" if ref_type is None else ref_type
  return tuple(s.name for s in ADAPTERS.values() if s.ref_type == ref_type)


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


class ParamsMismatch(ValueError):
  """A parameter tree that does not fit the adapter it is loaded into."""


def check_param_shapes(
  what: str,
  have: Mapping[str, tuple[int, ...]],
  want: Mapping[str, tuple[int, ...] | None],
) -> None:
  """Raises ParamsMismatch naming every missing, unexpected or misshapen key.

  `have` and `want` map parameter names to shapes (None in `want`: any
  shape). The one check behind evaluation, export and the SD benchmark.
  """
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  shapes = [
    f"{k}: {tuple(have[k])} != {tuple(want[k])}"
    for k in sorted(set(want) & set(have))
    if want[k] is not None and tuple(have[k]) != tuple(want[k])
  ]
  parts = [
    f"{label} {items[:20]}"
    + (f" (+{len(items) - 20})" if len(items) > 20 else "")
    for label, items in (
      ("missing", missing),
      ("unexpected", unexpected),
      ("wrong shapes", shapes),
    )
    if items
  ]
  if parts:
    raise ParamsMismatch(f"{what}: {'; '.join(parts)}")


def param_shapes(params: Mapping) -> dict[str, tuple[int, ...]]:
  """{'layers_0/attn/in_proj/kernel': shape} of a (nested) params tree."""
  flat = {}

  def visit(prefix: str, node: Any) -> None:
    if isinstance(node, Mapping):
      for key, value in node.items():
        visit(f"{prefix}/{key}" if prefix else str(key), value)
    else:
      flat[prefix] = tuple(getattr(node, "shape", ()))

  visit("", params)
  return flat


__all__ = [
  "ADAPTERS",
  "AdapterSpec",
  "ParamsMismatch",
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
  "check_param_shapes",
  "count_params",
  "create_adapter",
  "from_ref_type",
  "get_spec",
  "param_shapes",
]
