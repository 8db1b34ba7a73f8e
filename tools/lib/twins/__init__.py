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
kwargs, the `config` its checkpoints hold. `resolve_config(name, state_dict,
cfg)` is the one place an adapter's config is settled against its
parameters (export, import and the live runtime: `load_twin`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch
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


# Every registry name's Twin, and derived views of it.
BY_NAME = {name: _twin_of(spec) for name, spec in models.ADAPTERS.items()}
TWIN_CLASSES = {name: t.module for name, t in BY_NAME.items()}
CONFIG_FIELDS = {name: t.fields for name, t in BY_NAME.items()}


def twin(name: str) -> Twin:
  """The Twin of a registry name (any case); ValueError naming the choices."""
  found = BY_NAME.get(name.lower()) if isinstance(name, str) else None
  if found is None:
    raise ValueError(
      f"unknown adapter name {name!r}; expected one of {list(BY_NAME)}"
    )
  return found


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


# ----------------------------------------------------------------------------
# The config of a state dict.


def count_stack(indices: set[int], what: str) -> int:
  """The depth of a stack whose `indices` must be 0..n-1."""
  n = len(indices)
  if sorted(indices) != list(range(n)):
    raise ValueError(f"{what} indices {sorted(indices)} are not 0..{n - 1}.")
  return n


def torch_depth(name: str, state_dict: Mapping) -> int:
  """Number of layers/blocks in a torch state dict."""
  prefix = twin(name).naming.stack
  pat = re.compile(rf"^{prefix}\.(\d+)\.")
  idx = {int(m.group(1)) for k in state_dict if (m := pat.match(k))}
  return count_stack(idx, f"state dict {prefix}.*")


def infer_config(name: str, state_dict: Mapping, num_heads=None) -> dict:
  """Our model config fields read off a torch state dict's shapes."""
  t = twin(name)

  def dim(key, axis):
    if key not in state_dict:
      raise ValueError(f"state dict for {t.name!r} lacks {key!r}.")
    return int(state_dict[key].shape[axis])

  depth = torch_depth(name, state_dict)
  cfg: dict[str, Any] = {f: dim(*at) for f, at in t.naming.dims.items()}
  cfg[t.naming.depth] = depth
  if "num_heads" in t.fields:  # Not in any shape: given or the default.
    heads = t.defaults["num_heads"] if num_heads is None else num_heads
    cfg["num_heads"] = int(heads)
    if cfg["hidden_dim"] % cfg["num_heads"]:
      raise ValueError(
        f"num_heads={cfg['num_heads']} does not divide hidden_dim="
        f"{cfg['hidden_dim']}."
      )
  return cfg


def _merged_config(name: str, state_dict: Mapping, model_cfg) -> dict:
  """A model config merged with the dims read off `state_dict`; a config
  value that disagrees with the shapes is an error naming the field."""
  name = check_name(name)
  model_cfg = check_fields(name, dict(model_cfg or {}))
  inferred = infer_config(name, state_dict, model_cfg.get("num_heads"))
  for key, value in model_cfg.items():
    if key in inferred and inferred[key] != value:
      raise ValueError(
        f"config field {key}={value!r} disagrees with the parameters, "
        f"whose shapes give {key}={inferred[key]!r} (adapter {name!r})."
      )
  return {**inferred, **model_cfg}


def resolve_config(name: str, state_dict: Mapping, model_cfg=None) -> dict:
  """Merges a model config with the dims read off `state_dict`; checks both.

  Structural fields (hidden_dim, depth, ffn_dim, ...) come from the shapes;
  a config value that disagrees with them is an error naming the field.
  """
  cfg = _merged_config(name, state_dict, model_cfg)
  check_state_dict(name, state_dict, **cfg)
  return cfg


def state_shapes(state_dict: Mapping) -> dict[str, tuple[int, ...]]:
  """State-dict key -> shape."""
  return {k: tuple(v.shape) for k, v in state_dict.items()}


def expected_shapes(name: str, **cfg) -> dict[str, tuple[int, ...]]:
  """State-dict key -> shape of the twin for `cfg`, built on the meta device."""
  with torch.device("meta"):
    model = build_torch_adapter(name, **cfg)
  return state_shapes(model.state_dict())


def _check_shapes(name, cfg, state_dict: Mapping, expected: Mapping) -> None:
  have = state_shapes(state_dict)
  models.check_param_shapes(
    f"state dict does not fit adapter {name!r} with config {cfg}",
    have,
    dict(expected),
  )


def check_state_dict(name: str, state_dict: Mapping, **cfg) -> None:
  """Raises a ValueError naming every key whose presence or shape is wrong."""
  _check_shapes(name, cfg, state_dict, expected_shapes(name, **cfg))


def load_torch_adapter(
  name: str, state_dict: Mapping, **cfg
) -> torch.nn.Module:
  """Builds the twin for `cfg` and loads `state_dict` into it, once every
  key and shape is checked (one error naming all that differ)."""
  model = build_torch_adapter(name, **cfg)
  _check_shapes(name, cfg, state_dict, state_shapes(model.state_dict()))
  model.load_state_dict(state_dict, strict=True)
  return model


def load_twin(
  name: str, state_dict: Mapping, model_cfg=None
) -> tuple[torch.nn.Module, dict]:
  """(twin, resolved config) for a state dict and the config beside it."""
  cfg = _merged_config(name, state_dict, model_cfg)
  return load_torch_adapter(name, state_dict, **cfg), cfg


def num_params(module: nn.Module) -> int:
  """Trainable parameter count (works on the meta device)."""
  return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = [
  "BY_NAME",
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
  "check_state_dict",
  "count_stack",
  "expected_shapes",
  "infer_config",
  "load_torch_adapter",
  "load_twin",
  "mismatch",
  "num_params",
  "reference_config",
  "resolve_config",
  "state_shapes",
  "torch_depth",
  "truncate_cache",
  "twin",
]
