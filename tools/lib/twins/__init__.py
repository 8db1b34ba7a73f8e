"""PyTorch twins of the egpt_align adapters: the torch side of the registry.

`TWINS` names the twin of every Flax module in the registry
(`egpt_align.models.ADAPTERS`); each twin class carries its table, a
`naming.Naming` (its parameter names on both sides, where a state dict shows
its dims, its reference `config`). Everything the torch side knows of a
registry name is its AdapterSpec plus these two (`twin(name)`), so adding an
adapter kind is its registry entry, its Flax module, its twin (with one line
here) and tests.

`build_torch_adapter(name, **cfg)` builds a twin from our (Flax) model config
fields; `reference_config(name, **cfg)` gives the reference's constructor
kwargs, the `config` its checkpoints hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from egpt_align import models
from tools.lib.twins.attention import (
  AttentionAdapter,
  EAGLEStyleAdapter,
  FusedEAGLEAdapter,
  KVCache,
  TransformerLayer,
  truncate_cache,
)
from tools.lib.twins.bottleneck import (
  BottleneckAdapter,
  HiddenAdapterConfig,
  HiddenStateAdapter,
  MultiLayerBottleneckAdapter,
  WideBottleneckAdapter,
)
from tools.lib.twins.naming import Naming

# The twin of each Flax module class (L5 and B1 share one).
TWINS: dict[type, type[nn.Module]] = {
  models.BottleneckAdapter: HiddenStateAdapter,
  models.MultiLayerBottleneckAdapter: MultiLayerBottleneckAdapter,
  models.WideBottleneckAdapter: WideBottleneckAdapter,
  models.AttentionAdapter: AttentionAdapter,
  models.EagleAdapter: EAGLEStyleAdapter,
  models.FusedEagleAdapter: FusedEAGLEAdapter,
}

# Flax-only fields (compute dtype etc.) that do not change the torch module.
IGNORED_FIELDS = frozenset({"name", "dtype", "param_dtype"})

# Our config fields the reference names otherwise, and back.
REFERENCE_NAMES = {"alpha_init": "alpha"}
OUR_NAMES = {ref: ours for ours, ref in REFERENCE_NAMES.items()}


@dataclasses.dataclass(frozen=True)
class Twin:
  """One registry adapter on the torch side."""

  spec: models.AdapterSpec
  module: type[nn.Module]  # the twin class
  fields: tuple[str, ...]  # our config fields it takes (no Flax-only ones)
  defaults: Mapping[str, Any]  # their Flax defaults (the reference's)

  @property
  def name(self) -> str:
    return self.spec.name

  @property
  def naming(self) -> Naming:
    return self.module.naming

  @property
  def vlm_only(self) -> bool:
    """Reads the target's states only: the reference's --vlm_only (B1)."""
    return self.spec.inputs == ("target",)


def _twin_of(spec: models.AdapterSpec) -> Twin:
  flax = {f.name: f.default for f in dataclasses.fields(spec.module) if f.init}
  fields = tuple(
    f for f in models.adapter_fields(spec.name) if f not in IGNORED_FIELDS
  )
  return Twin(spec, TWINS[spec.module], fields, {f: flax[f] for f in fields})


_BY_NAME = {name: _twin_of(spec) for name, spec in models.ADAPTERS.items()}

# Derived views: registry name -> twin class / config fields.
TWIN_CLASSES = {name: t.module for name, t in _BY_NAME.items()}
CONFIG_FIELDS = {name: t.fields for name, t in _BY_NAME.items()}


def twin(name: str) -> Twin:
  """The Twin of a registry name; ValueError naming the choices."""
  return _BY_NAME[models.get_spec(name).name]


def check_name(name: str) -> str:
  """The registry name (lower-cased) or a ValueError naming the choices."""
  return twin(name).name


def check_fields(name: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`cfg` less Flax-only fields and Nones; an unknown field is an error."""
  fields = twin(name).fields
  # None means "the adapter default" (as in egpt_align's run configs).
  cfg = {
    k: v for k, v in cfg.items() if k not in IGNORED_FIELDS and v is not None
  }
  unknown = sorted(set(cfg) - set(fields))
  if unknown:
    raise ValueError(
      f"Unknown config field(s) {unknown} for adapter {name!r}; expected "
      f"some of {fields}."
    )
  return cfg


def _constructor_kwargs(name: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Every field of the twin's constructor, under the reference's names."""
  t = twin(name)
  ours = {**t.defaults, **check_fields(t.name, cfg)}
  return {REFERENCE_NAMES.get(k, k): v for k, v in ours.items()}


def reference_config(name: str, **cfg) -> dict[str, Any]:
  """The reference constructor kwargs (plain dict) for our model config."""
  naming = twin(name).naming
  kwargs = _constructor_kwargs(name, cfg)
  return {**{k: kwargs[k] for k in naming.reference}, **naming.fixed}


def build_torch_adapter(name: str, **cfg) -> nn.Module:
  """The torch twin of adapter `name` from our (Flax) model config fields."""
  alpha = _constructor_kwargs(name, cfg)["alpha"]
  # The reference keeps L4-L5F's alpha out of `config`; every twin takes it.
  return twin(name).module(**{**reference_config(name, **cfg), "alpha": alpha})


def num_params(module: nn.Module) -> int:
  """Trainable parameter count (works on the meta device)."""
  return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = [
  "CONFIG_FIELDS",
  "IGNORED_FIELDS",
  "OUR_NAMES",
  "REFERENCE_NAMES",
  "TWINS",
  "TWIN_CLASSES",
  "AttentionAdapter",
  "BottleneckAdapter",
  "EAGLEStyleAdapter",
  "FusedEAGLEAdapter",
  "HiddenAdapterConfig",
  "HiddenStateAdapter",
  "KVCache",
  "MultiLayerBottleneckAdapter",
  "Naming",
  "TransformerLayer",
  "Twin",
  "WideBottleneckAdapter",
  "build_torch_adapter",
  "check_fields",
  "check_name",
  "num_params",
  "reference_config",
  "truncate_cache",
  "twin",
]
