"""Reading adapter checkpoints: our exports and the reference's, safely.

`load_checkpoint` reads a .pt (pickled configs only with `trust_pickle`) or
a .safetensors file with its NAME.config.json; `adapter_name` tells which
registry adapter it holds, `model_config` our config fields. On top of them,
`load_adapter_file` gives the live runtime a torch twin and `convert` gives
tools/import_from_torch.py Flax params; both settle the config with the
twins' one resolver (`twins.resolve_config`).
"""

from __future__ import annotations

import json
import pickle
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from egpt_align import models
from tools.lib import bridge
from tools.lib import twins as ta

UNKNOWN = "<unknown: bare .safetensors>"


class RefHiddenAdapterConfig:
  """Stand-in for the reference's pickled L1 `HiddenAdapterConfig`."""

  def __init__(self, **fields):
    self.__dict__.update(dataclass_defaults())
    self.__dict__.update(fields)

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) == 2:  # (dict, slotstate)
      state = {**(state[0] or {}), **(state[1] or {})}
    self.__dict__.update(dataclass_defaults())
    self.__dict__.update(state)

  def to_dict(self) -> dict[str, Any]:
    """The config fields as a plain dict."""
    return dict(self.__dict__)


def dataclass_defaults() -> dict[str, Any]:
  """The reference `HiddenAdapterConfig` defaults."""
  import dataclasses

  return dataclasses.asdict(ta.HiddenAdapterConfig())


def _is_config_global(full_name: str) -> bool:
  return full_name.rsplit(".", 1)[-1] == "HiddenAdapterConfig"


class _ShimUnpickler(pickle.Unpickler):
  def find_class(self, module, name):
    if name == "HiddenAdapterConfig":
      return RefHiddenAdapterConfig
    return super().find_class(module, name)


_SHIM_PICKLE = types.SimpleNamespace(
  Unpickler=_ShimUnpickler, load=pickle.load, __name__="shim_pickle"
)


def load_torch_checkpoint(path, trust_pickle: bool = False) -> dict:
  """Loads a .pt dict safely; pickled configs only with `trust_pickle`."""
  path = str(path)
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    if not trust_pickle:
      first = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise ValueError(
        f"{path}: holds pickled Python objects that a safe "
        f"torch.load(weights_only=True) refuses ({first}). Reference L1 "
        "checkpoints store their HiddenAdapterConfig dataclass this way. If "
        "you trust this file, rerun with --trust_pickle (trust_pickle=True)."
      ) from None
  names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
  config_names = [n for n in names if _is_config_global(n)]
  if len(config_names) == len(names):
    # Only the config class: stay in the weights-only unpickler, with the
    # shim allowed under the reference's class path.
    allowed = [(RefHiddenAdapterConfig, n) for n in config_names]
    with torch.serialization.safe_globals(allowed):
      return torch.load(path, map_location="cpu", weights_only=True)
  others = sorted(set(names) - set(config_names))
  warnings.warn(
    f"{path}: unpickling arbitrary globals {others} because of --trust_pickle.",
    stacklevel=2,
  )
  return torch.load(
    path, map_location="cpu", weights_only=False, pickle_module=_SHIM_PICKLE
  )


def load_safetensors_checkpoint(path) -> dict:
  """Loads our .safetensors export plus its NAME.config.json sidecar."""
  from safetensors import safe_open
  from safetensors.torch import load_file

  path = Path(path)
  state_dict = load_file(str(path))
  with safe_open(str(path), framework="pt") as f:
    meta = f.metadata() or {}
  sidecar = path.with_name(path.name[: -len(".safetensors")] + ".config.json")
  # Without a type the reference convention would mean L1; here it means
  # "unknown", so the name must come from the header, the sidecar or --adapter.
  ckpt: dict[str, Any] = {
    "model_state_dict": state_dict,
    "adapter_type": meta.get("adapter_type", UNKNOWN),
    "egpt_align_adapter": meta.get("egpt_align_adapter"),
  }
  if sidecar.exists():
    try:
      with open(sidecar) as f:
        info = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{sidecar}: not valid JSON ({e}).") from None
    fields = {
      "egpt_align_adapter": info.get("adapter"),
      "egpt_align_config": info.get("model"),
      "adapter_type": info.get("adapter_type"),
      "config": info.get("config"),
      "vlm_only": info.get("vlm_only"),
      "epoch": info.get("epoch"),
      "metrics": info.get("metrics"),
    }
    ckpt.update({k: v for k, v in fields.items() if v is not None})
  return ckpt


def load_checkpoint(path, trust_pickle: bool = False) -> dict:
  """A checkpoint dict from a .pt or .safetensors file."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such file.")
  if path.suffix == ".safetensors":
    return load_safetensors_checkpoint(path)
  ckpt = load_torch_checkpoint(path, trust_pickle)
  if not isinstance(ckpt, Mapping) or "model_state_dict" not in ckpt:
    keys = sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
    raise ValueError(
      f"{path}: expected a checkpoint dict with 'model_state_dict' (the "
      f"reference's save_checkpoint format); found {keys}."
    )
  return ckpt


# Reference `adapter_type` -> registry names (None, as the reference's L1
# files have it, is L1).
NAMES_OF_TYPE = {
  ref_type: models.from_ref_type(ref_type)
  for ref_type in (None, *(s.ref_type for s in models.ADAPTERS.values()))
}


def _twin(name: Any, what: str) -> ta.Twin:
  if not isinstance(name, str) or name.lower() not in ta.BY_NAME:
    raise ValueError(
      f"{what} {name!r} is not an adapter name; expected one of "
      f"{list(ta.BY_NAME)}"
    )
  return ta.BY_NAME[name.lower()]


def adapter_name(ckpt: Mapping, adapter: str | None = None) -> str:
  """Our adapter name for a checkpoint dict (`adapter` overrides L5/B1)."""
  recorded = ckpt.get("egpt_align_adapter")
  ref_type = ckpt.get("adapter_type")
  if recorded:
    held = _twin(recorded, "the checkpoint's egpt_align_adapter")
  elif ref_type != UNKNOWN:
    held = _of_type(ref_type, ckpt.get("vlm_only"), warn=adapter is None)
  elif adapter is not None:
    return _twin(adapter, "--adapter").name
  else:
    raise ValueError(
      "this .safetensors file names no adapter (no metadata, no "
      "NAME.config.json beside it): pass --adapter."
    )
  if adapter is None:
    return held.name
  asked = _twin(adapter, "--adapter")
  if asked.spec.ref_type != held.spec.ref_type:
    raise ValueError(
      f"--adapter {asked.name} does not fit this checkpoint, which holds "
      f"{held.name} ({held.spec.ref_type})."
    )
  return asked.name


def _of_type(ref_type: str | None, vlm_only, warn: bool) -> ta.Twin:
  """The adapter of a reference `adapter_type` (None: L1).

  'L5_EAGLE' is L5 or B1 (L5 trained with the reference's --vlm_only): the
  file's `vlm_only` tells; without it the registry's first name is taken.
  """
  if ref_type not in NAMES_OF_TYPE:
    known = sorted(t for t in NAMES_OF_TYPE if t is not None)
    raise ValueError(
      f"unknown adapter_type {ref_type!r}; expected one of {known} (or "
      "none, for L1). The reference would silently load it as L1; we refuse."
    )
  twins = [ta.BY_NAME[n] for n in NAMES_OF_TYPE[ref_type]]
  held = ([t for t in twins if t.vlm_only == bool(vlm_only)] or twins)[0]
  if warn and len(twins) > 1 and not vlm_only:
    others = " or ".join(f"--adapter {t.name}" for t in twins if t is not held)
    warnings.warn(
      f"adapter_type {ref_type!r} is used for "
      f"{', '.join(t.name for t in twins)} (the file does not say which); "
      f"importing as {held.name}. Pass {others} otherwise.",
      stacklevel=3,
    )
  return held


def _config_dict(config: Any) -> dict[str, Any]:
  if config is None:
    return {}
  if isinstance(config, Mapping):
    return dict(config)
  if hasattr(config, "to_dict"):
    return config.to_dict()
  if hasattr(config, "__dict__"):
    return dict(vars(config))
  raise ValueError(f"checkpoint 'config' of type {type(config)} is unusable.")


def model_config(name: str, ckpt: Mapping) -> dict[str, Any]:
  """Our model fields from a checkpoint's `egpt_align_config` or `config`."""
  twin = ta.BY_NAME[name]
  ours = ckpt.get("egpt_align_config")
  if ours:
    fields = set(twin.fields) | ta.IGNORED_FIELDS
    return {k: v for k, v in dict(ours).items() if k in fields and k != "name"}
  ref = _config_dict(ckpt.get("config"))
  for option, value in twin.naming.fixed.items():
    if option in ref and bool(ref[option]) != value:
      raise ValueError(
        f"checkpoint config has {option}={ref[option]!r}; egpt_align "
        f"supports only the reference default {option}={value!r}."
      )
  ours = {ta.OUR_NAMES.get(k, k): v for k, v in ref.items()}
  return {k: v for k, v in ours.items() if k in twin.fields}


def load_adapter_file(
  path, expect: str | None = None, *, trust_pickle: bool = False
) -> tuple[str, torch.nn.Module, dict]:
  """(kind, torch twin, model config) of an exported or reference file.

  `expect`: the kind the caller asks for; a file holding another is an
  error (a reference L5_EAGLE file, L5 or B1, is read as `expect`).
  """
  ckpt = load_checkpoint(path, trust_pickle=trust_pickle)
  kind = adapter_name(ckpt, None if ckpt.get("egpt_align_adapter") else expect)
  if expect is not None and kind != expect:
    raise ValueError(
      f"the checkpoint holds a {kind} adapter, not the {expect} asked for"
    )
  cfg = model_config(kind, ckpt)
  return (kind, *ta.load_twin(kind, dict(ckpt["model_state_dict"]), cfg))


def convert(ckpt: Mapping, adapter: str | None = None, num_heads=None):
  """(name, flax params, model config) from a checkpoint dict."""
  name = adapter_name(ckpt, adapter)
  state_dict = dict(ckpt["model_state_dict"])
  cfg = model_config(name, ckpt)
  if num_heads is not None:
    if "num_heads" in cfg and cfg["num_heads"] != num_heads:
      raise ValueError(
        f"--num_heads {num_heads} disagrees with the checkpoint's "
        f"num_heads={cfg['num_heads']}."
      )
    cfg["num_heads"] = num_heads
  twin = ta.BY_NAME[name]
  if "num_heads" in twin.fields and "num_heads" not in cfg:
    warnings.warn(
      "checkpoint does not record num_heads; assuming "
      f"{twin.defaults['num_heads']} (the reference default). Pass "
      "--num_heads otherwise.",
      stacklevel=2,
    )
  cfg = ta.resolve_config(name, state_dict, cfg)
  params = bridge.state_dict_to_flax(name, state_dict)
  return name, params, cfg
