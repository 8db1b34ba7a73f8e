"""Converts adapters between egpt_align params and torch checkpoints.

Writing: `export` turns Flax params into the reference's checkpoint dict
(`model_state_dict` under the reference's key names, `adapter_type`, a
plain-dict `config`) plus .safetensors and NAME.config.json. Reading:
`load_checkpoint` reads a reference checkpoint or one of our exports (safely:
pickled configs only with `trust_pickle`), `adapter_name` tells which adapter
it holds, and `convert` gives Flax params and our model config.

The mapping functions `flax_to_state_dict` / `state_dict_to_flax` are driven by
one table per adapter, so both directions are the same correspondence:
Dense kernels `[in, out]` are torch `weight.T`, the attention `in_proj` kernel
`[D, 3D]` is `in_proj_weight.T` (columns q | k | v), LayerNorm `scale` is
`weight`, alphas are 0-d.
The command lines are tools/export_to_torch.py and tools/import_from_torch.py.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pickle
import re
import sys
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from egpt_align import models
from tools.lib import twins as ta

# ----------------------------------------------------------------------------
# Flax <-> torch state-dict mapping.

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
  name = ta.check_name(name)
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
  name = ta.check_name(name)
  prefix = _depth_prefix(name)
  pat = re.compile(rf"^{prefix}_(\d+)$")
  idx = {int(m.group(1)) for k in _unwrap(params) if (m := pat.match(str(k)))}
  return _count(idx, f"Flax params {prefix}_*")


def torch_depth(name: str, state_dict: Mapping) -> int:
  """Number of layers/blocks in a torch state dict."""
  name = ta.check_name(name)
  prefix = _depth_prefix(name)
  pat = re.compile(rf"^{prefix}\.(\d+)\.")
  idx = {int(m.group(1)) for k in state_dict if (m := pat.match(k))}
  return _count(idx, f"state dict {prefix}.*")


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
    {k: tuple(v.shape) for k, v in state_dict.items()},
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


def infer_config(name: str, state_dict: Mapping, num_heads=None) -> dict:
  """Our model config fields read off a torch state dict's shapes."""
  name = ta.check_name(name)
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
  name = ta.check_name(name)
  model_cfg = ta.check_fields(name, dict(model_cfg or {}))
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
    model = ta.build_torch_adapter(name, **cfg)
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(name: str, state_dict: Mapping, **cfg) -> None:
  """Raises a ValueError naming every key whose presence or shape is wrong."""
  models.check_param_shapes(
    f"state dict does not fit adapter {name!r} with config {cfg}",
    {k: tuple(v.shape) for k, v in state_dict.items()},
    expected_shapes(name, **cfg),
  )


def load_torch_adapter(
  name: str, state_dict: Mapping, **cfg
) -> torch.nn.Module:
  """Builds the twin for `cfg` and loads `state_dict` into it (strict)."""
  check_state_dict(name, state_dict, **cfg)
  model = ta.build_torch_adapter(name, **cfg)
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
  name = models.get_spec(name).name
  if reference_l1_config and name != "l1":
    raise ValueError(
      f"--reference_l1_config applies to l1 exports only, not {name!r}"
    )
  if fmt not in ("pt", "safetensors", "both"):
    raise ValueError(f"--format must be pt, safetensors or both, not {fmt!r}.")
  model_config = dict(model_config or {})
  cfg_name = model_config.pop("name", None)
  if cfg_name is not None and models.get_spec(cfg_name).name != name:
    raise ValueError(
      f"adapter {name!r} disagrees with the config's model.name {cfg_name!r}."
    )
  state_dict = flax_to_state_dict(name, params)
  cfg = resolve_config(name, state_dict, model_config)
  ref_config = ta.reference_config(name, **cfg)
  extra = {k: v for k, v in _plain(model_config).items() if v is not None}
  ours = {"name": name, **extra, **cfg}
  metrics = _plain(dict(metrics)) if metrics else None
  paths = export_paths(out)
  paths["pt"].parent.mkdir(parents=True, exist_ok=True)
  written = []
  if fmt in ("pt", "both"):
    ckpt = {
      "model_state_dict": state_dict,
      "adapter_type": models.get_spec(name).ref_type,
      "config": (
        reference_l1_config_object(ref_config)
        if reference_l1_config
        else ref_config
      ),
      "epoch": int(epoch),
      "egpt_align_adapter": name,
      "egpt_align_config": ours,
      "vlm_only": name == "b1",
    }
    if step is not None:
      ckpt["egpt_align_step"] = int(step)
    if metrics:
      ckpt["metrics"] = metrics
    with _reference_module_importable():
      _atomic(paths["pt"], lambda f: torch.save(ckpt, f))
    written.append(paths["pt"])
  if fmt in ("safetensors", "both"):
    from safetensors.torch import save_file

    meta = {
      "format": "pt",
      "egpt_align_adapter": name,
      "adapter_type": models.get_spec(name).ref_type,
    }
    tmp = paths["safetensors"].with_name(paths["safetensors"].name + ".tmp")
    save_file(dict(state_dict), str(tmp), metadata=meta)
    os.replace(tmp, paths["safetensors"])
    sidecar = {
      "format": FORMAT,
      "version": FORMAT_VERSION,
      "adapter": name,
      "adapter_type": models.get_spec(name).ref_type,
      "vlm_only": name == "b1",
      "config": ref_config,
      "model": ours,
      "epoch": int(epoch),
      "step": step,
      "metrics": metrics,
    }
    text = json.dumps(sidecar, indent=2) + "\n"
    _atomic(paths["config"], lambda f: f.write(text.encode()))
    written += [paths["safetensors"], paths["config"]]
  return written


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


def adapter_name(ckpt: Mapping, adapter: str | None = None) -> str:
  """Our adapter name for a checkpoint dict (`adapter` overrides L5/B1)."""
  if ckpt.get("egpt_align_adapter"):
    name = models.get_spec(ckpt["egpt_align_adapter"]).name
  else:
    ref_type = ckpt.get("adapter_type")
    if ref_type != UNKNOWN and models.from_ref_type(ref_type):
      # None (the reference writes no type for L1) is L1; 'L5_EAGLE' is L5
      # or B1: the registry lists l5 first.
      name = models.from_ref_type(ref_type)[0]
    elif ref_type == UNKNOWN and adapter is not None:
      return models.get_spec(adapter).name
    elif ref_type == UNKNOWN:
      raise ValueError(
        "this .safetensors file names no adapter (no metadata, no "
        "NAME.config.json beside it): pass --adapter."
      )
    else:
      known = sorted({a.ref_type for a in models.ADAPTERS.values()})
      raise ValueError(
        f"unknown adapter_type {ref_type!r}; expected one of {known} (or "
        "none, for L1). The reference would silently load it as L1; we refuse."
      )
    if name == "l5" and ckpt.get("vlm_only"):
      name = "b1"
  if adapter is None:
    if name == "l5" and "egpt_align_adapter" not in ckpt:
      warnings.warn(
        "adapter_type 'L5_EAGLE' is used for both L5 and B1 (L5 trained with "
        "--vlm_only); importing as l5. Pass --adapter b1 for a B1 checkpoint.",
        stacklevel=2,
      )
    return name
  adapter = models.get_spec(adapter).name
  if models.get_spec(adapter).ref_type != models.get_spec(name).ref_type:
    raise ValueError(
      f"--adapter {adapter} does not fit this checkpoint, which holds "
      f"{name} ({models.get_spec(name).ref_type})."
    )
  return adapter


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
  ours = ckpt.get("egpt_align_config")
  if ours:
    fields = set(ta.CONFIG_FIELDS[name]) | ta.IGNORED_FIELDS
    return {k: v for k, v in dict(ours).items() if k in fields and k != "name"}
  ref = _config_dict(ckpt.get("config"))
  for flag in ("use_layer_norm", "use_gelu"):
    if ref.get(flag, True) is not True:
      raise ValueError(
        f"checkpoint config has {flag}={ref[flag]!r}; egpt_align supports "
        "only the reference default True."
      )
  if ref.get("use_token_embed"):
    raise ValueError(
      "checkpoint config has use_token_embed=True; egpt_align does not "
      "support the optional token embedding."
    )
  if "alpha" in ref:
    ref["alpha_init"] = ref.pop("alpha")
  keep = set(ta.CONFIG_FIELDS[name])
  return {k: v for k, v in ref.items() if k in keep}


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
  state = dict(ckpt["model_state_dict"])
  cfg = resolve_config(kind, state, model_config(kind, ckpt))
  return kind, load_torch_adapter(kind, state, **cfg), cfg


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
  if name in ("l4", "l5", "b1", "l5f") and "num_heads" not in cfg:
    warnings.warn(
      "checkpoint does not record num_heads; assuming 8 (the reference "
      "default). Pass --num_heads otherwise.",
      stacklevel=2,
    )
  cfg = resolve_config(name, state_dict, cfg)
  params = state_dict_to_flax(name, state_dict)
  return name, params, cfg
