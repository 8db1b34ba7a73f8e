"""Converts adapters between egpt_align params and torch state dicts.

`flax_to_state_dict` / `state_dict_to_flax` read one table per twin (its
`naming`, tools/lib/twins/naming.py), so both directions are the same
correspondence; the config of a state dict is settled by the twins
(`resolve_config`, handed on here). `export` writes the
reference's checkpoint dict (`model_state_dict` under the reference's key
names, `adapter_type`, a plain-dict `config`) plus .safetensors and
NAME.config.json; reading them back is tools/lib/torch_checkpoints.py.
The command lines are tools/export_to_torch.py and tools/import_from_torch.py.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from egpt_align import models
from tools.lib import twins as ta
from tools.lib.twins import (
  check_state_dict,
  load_torch_adapter,
  resolve_config,
  torch_depth,
)
from tools.lib.twins.naming import Entry

# The state-dict side (config, shapes, loading) is the twins'; bridge hands
# it on beside the mapping.
__all__ = [
  "FORMAT",
  "FORMAT_VERSION",
  "REFERENCE_L1_CLASS",
  "REFERENCE_L1_MODULE",
  "check_state_dict",
  "export",
  "export_paths",
  "flatten_params",
  "flax_depth",
  "flax_to_state_dict",
  "load_params_npz",
  "load_torch_adapter",
  "model_config_of",
  "param_table",
  "reference_l1_config_object",
  "resolve_config",
  "save_params_npz",
  "state_dict_to_flax",
  "torch_depth",
  "unflatten_params",
]

# ----------------------------------------------------------------------------
# Flax <-> torch state-dict mapping.


def param_table(name: str, depth: int) -> list[Entry]:
  """(flax path, torch key, transpose) for every parameter, in torch order."""
  return ta.twin(name).naming.params(depth)


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
  prefix = ta.twin(name).naming.stack
  pat = re.compile(rf"^{prefix}_(\d+)$")
  idx = {int(m.group(1)) for k in _unwrap(params) if (m := pat.match(str(k)))}
  return ta.count_stack(idx, f"Flax params {prefix}_*")


def _to_numpy(x) -> np.ndarray:
  """A float32 numpy copy (never a view of a torch tensor's storage)."""
  if isinstance(x, torch.Tensor):
    return x.detach().to("cpu", torch.float32).numpy().copy()
  return np.array(x, dtype=np.float32, copy=True)


def flax_to_state_dict(name: str, params: Mapping) -> dict[str, torch.Tensor]:
  """Flax params (tree or {'params': tree}) -> torch state dict (float32)."""
  name = ta.check_name(name)
  params = _unwrap(params)
  flat = flatten_params(params)
  table = param_table(name, flax_depth(name, params))
  models.check_param_shapes(
    f"Flax params do not fit adapter {name!r}",
    {k: np.shape(v) for k, v in flat.items()},
    {"/".join(fp): None for fp, _, _ in table},
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
  name = ta.check_name(name)
  table = param_table(name, torch_depth(name, state_dict))
  models.check_param_shapes(
    f"state dict keys do not fit adapter {name!r}",
    ta.state_shapes(state_dict),
    {tkey: None for _, tkey, _ in table},
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


# ----------------------------------------------------------------------------
# Writing torch checkpoints.

FORMAT = "egpt_align.torch_adapter"
FORMAT_VERSION = 1


def export_paths(out: str | os.PathLike) -> dict[str, Path]:
  """PATH.pt / PATH.safetensors / PATH.config.json for --out PATH[.pt]."""
  out = Path(out)
  if out.suffix in (".pt", ".safetensors"):
    out = out.with_suffix("")
  return {
    "pt": out.with_name(out.name + ".pt"),
    "safetensors": out.with_name(out.name + ".safetensors"),
    "config": out.with_name(out.name + ".config.json"),
  }


def _plain(value: Any) -> Any:
  # Only types torch.load(weights_only=True) and JSON both accept.
  if value is None or isinstance(value, bool | int | float | str):
    return value
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_plain(v) for v in value]
  if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
    return value.item()
  return str(value)


def model_config_of(config: Any) -> dict[str, Any]:
  """The `model.*` fields of a run config (ConfigDict or dict), or flat."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  config = dict(config or {})
  if "model" in config and isinstance(config["model"], Mapping):
    config = dict(config["model"])
  return _plain(config)


def export(
  params: Mapping,
  name: str,
  model_config: Mapping[str, Any] | None,
  out: str | os.PathLike,
  *,
  fmt: str = "both",
  epoch: int = 0,
  step: int | None = None,
  metrics: Mapping[str, float] | None = None,
  reference_l1_config: bool = False,
) -> list[Path]:
  """Writes the torch export of `params`; returns the files written.

  `reference_l1_config` (L1 only): store `config` as the reference's pickled
  HiddenAdapterConfig instead of a plain dict, so the reference's own
  loader (which reads `config.num_layers` etc. as attributes) accepts it;
  loading it then needs `torch.load(..., weights_only=False)`, as the
  reference's own L1 files do.
  """
  twin = ta.twin(name)
  name = twin.name
  if reference_l1_config and twin.naming.config_class is None:
    raise ValueError(
      f"--reference_l1_config applies to l1 exports only, not {name!r}"
    )
  if fmt not in ("pt", "safetensors", "both"):
    raise ValueError(f"--format must be pt, safetensors or both, not {fmt!r}.")
  model_config = dict(model_config or {})
  cfg_name = model_config.pop("name", None)
  if cfg_name is not None and ta.check_name(cfg_name) != name:
    raise ValueError(
      f"adapter {name!r} disagrees with the config's model.name {cfg_name!r}."
    )
  state_dict = flax_to_state_dict(name, params)
  cfg = resolve_config(name, state_dict, model_config)
  extra = {k: v for k, v in _plain(model_config).items() if v is not None}
  info = {
    "adapter_type": twin.spec.ref_type,
    "config": ta.reference_config(name, **cfg),
    "epoch": int(epoch),
    "egpt_align_adapter": name,
    "egpt_align_config": {"name": name, **extra, **cfg},
    "vlm_only": twin.vlm_only,
    "step": step,
    "metrics": _plain(dict(metrics)) if metrics else None,
  }
  paths = export_paths(out)
  paths["pt"].parent.mkdir(parents=True, exist_ok=True)
  written = []
  if fmt in ("pt", "both"):
    _write_pt(paths["pt"], state_dict, info, reference_l1_config)
    written.append(paths["pt"])
  if fmt in ("safetensors", "both"):
    _write_safetensors(paths, state_dict, info)
    written += [paths["safetensors"], paths["config"]]
  return written


def _write_pt(path: Path, state_dict, info: dict, pickled_config: bool):
  """PATH.pt: the reference's checkpoint dict plus our fields."""
  ckpt = {
    "model_state_dict": state_dict,
    "adapter_type": info["adapter_type"],
    "config": (
      reference_l1_config_object(info["config"])
      if pickled_config
      else info["config"]
    ),
    "epoch": info["epoch"],
    "egpt_align_adapter": info["egpt_align_adapter"],
    "egpt_align_config": info["egpt_align_config"],
    "vlm_only": info["vlm_only"],
  }
  if info["step"] is not None:
    ckpt["egpt_align_step"] = int(info["step"])
  if info["metrics"]:
    ckpt["metrics"] = info["metrics"]
  with _reference_module_importable():
    _atomic(path, lambda f: torch.save(ckpt, f))


def _write_safetensors(paths: dict[str, Path], state_dict, info: dict):
  """PATH.safetensors (name and type in its header) + PATH.config.json."""
  from safetensors.torch import save_file

  meta = {
    "format": "pt",
    "egpt_align_adapter": info["egpt_align_adapter"],
    "adapter_type": info["adapter_type"],
  }
  tmp = paths["safetensors"].with_name(paths["safetensors"].name + ".tmp")
  save_file(dict(state_dict), str(tmp), metadata=meta)
  os.replace(tmp, paths["safetensors"])
  sidecar = {
    "format": FORMAT,
    "version": FORMAT_VERSION,
    "adapter": info["egpt_align_adapter"],
    "adapter_type": info["adapter_type"],
    "vlm_only": info["vlm_only"],
    "config": info["config"],
    "model": info["egpt_align_config"],
    "epoch": info["epoch"],
    "step": info["step"],
    "metrics": info["metrics"],
  }
  text = json.dumps(sidecar, indent=2) + "\n"
  _atomic(paths["config"], lambda f: f.write(text.encode()))


# Where the reference's L1 config class lives: its trainer imports it from
# here, so its L1 checkpoints pickle it under this name (REFERENCE_NOTES
# §5.4).
REFERENCE_L1_MODULE = "feasible.feature_alignment.hidden_adapter"
REFERENCE_L1_CLASS = "HiddenAdapterConfig"


class _ReferenceL1Config(ta.HiddenAdapterConfig):
  """ta.HiddenAdapterConfig, pickled as the reference's class."""


_ReferenceL1Config.__module__ = REFERENCE_L1_MODULE
_ReferenceL1Config.__qualname__ = REFERENCE_L1_CLASS
_ReferenceL1Config.__name__ = REFERENCE_L1_CLASS


def reference_l1_config_object(config: Mapping[str, Any]):
  """The L1 `config` as an instance pickled under the reference's name."""
  return _ReferenceL1Config(**config)


@contextlib.contextmanager
def _reference_module_importable():
  """Makes REFERENCE_L1_MODULE resolve while torch.save pickles.

  pickle writes a class as (module, name) and checks that importing them
  gives the class back. Where the reference's package is not installed (the
  usual case), stand-in modules hold our class for the duration of the save.
  """
  if REFERENCE_L1_MODULE in sys.modules:
    module = sys.modules[REFERENCE_L1_MODULE]
    if getattr(module, REFERENCE_L1_CLASS, None) is _ReferenceL1Config:
      yield
      return
  parts = REFERENCE_L1_MODULE.split(".")
  names = [".".join(parts[: i + 1]) for i in range(len(parts))]
  saved = {n: sys.modules.get(n) for n in names}
  try:
    for n in names:
      sys.modules[n] = types.ModuleType(n)
    setattr(
      sys.modules[REFERENCE_L1_MODULE], REFERENCE_L1_CLASS, _ReferenceL1Config
    )
    yield
  finally:
    for n, module in saved.items():
      if module is None:
        sys.modules.pop(n, None)
      else:
        sys.modules[n] = module


def _atomic(path: Path, write) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)
