r"""Imports a PyTorch adapter checkpoint into egpt_align params.

Reads a reference checkpoint (`.pt` from the reference's `save_checkpoint`,
any of L1 L2 L3 L4 L5/B1 L5F) or one of our exports (`.pt`, or `.safetensors`
with its NAME.config.json), and writes OUT.npz (float32 arrays keyed by
'/'-joined Flax paths) plus OUT.config.json (`{"model": {"name": ..., ...}}`,
usable as `create_adapter` overrides and by `export_to_torch.py --params`).

Reference L1 files pickle a `HiddenAdapterConfig` dataclass, which a safe
`torch.load(weights_only=True)` refuses; pass --trust_pickle to read it through
a small shim (the reference package need not be importable).  The reference
saves B1 as 'L5_EAGLE', like L5: pass --adapter b1 for a B1 checkpoint.

Example:
  python tools/import_from_torch.py best_model.pt --out imported/l4
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # Run as a script: make `tools` importable.
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tools import torch_adapters as ta  # noqa: E402

# Reference adapter_type -> our name.  'L5_EAGLE' is L5 or B1 (see --adapter).
FROM_REF_TYPE = {
  "L1_Bottleneck": "l1",
  "L2_MultiLayerBottleneck": "l2",
  "L3_WideBottleneck": "l3",
  "L4_Attention": "l4",
  "L5_EAGLE": "l5",
  "L5F_FusedEAGLE": "l5f",
}


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
    name = ta.check_name(ckpt["egpt_align_adapter"])
  else:
    ref_type = ckpt.get("adapter_type")
    if ref_type is None:  # The reference writes no type for L1.
      name = "l1"
    elif ref_type in FROM_REF_TYPE:
      name = FROM_REF_TYPE[ref_type]
    elif ref_type == UNKNOWN and adapter is not None:
      return ta.check_name(adapter)
    elif ref_type == UNKNOWN:
      raise ValueError(
        "this .safetensors file names no adapter (no metadata, no "
        "NAME.config.json beside it): pass --adapter."
      )
    else:
      raise ValueError(
        f"unknown adapter_type {ref_type!r}; expected one of "
        f"{sorted(FROM_REF_TYPE)} (or none, for L1). The reference would "
        "silently load it as L1; we refuse."
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
  adapter = ta.check_name(adapter)
  if ta.REF_TYPES[adapter] != ta.REF_TYPES[name]:
    raise ValueError(
      f"--adapter {adapter} does not fit this checkpoint, which holds "
      f"{name} ({ta.REF_TYPES[name]})."
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
  cfg = ta.resolve_config(name, state_dict, cfg)
  params = ta.state_dict_to_flax(name, state_dict)
  return name, params, cfg


def output_paths(out) -> dict[str, Path]:
  """OUT.npz and OUT.config.json for --out OUT[.npz]."""
  out = Path(out)
  if out.suffix == ".npz":
    out = out.with_suffix("")
  return {
    "params": out.with_name(out.name + ".npz"),
    "config": out.with_name(out.name + ".config.json"),
  }


def parse_args(argv=None) -> argparse.Namespace:
  """Command-line flags."""
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("checkpoint", help=".pt or .safetensors file")
  parser.add_argument(
    "--out", required=True, help="output stem: writes OUT.npz, OUT.config.json"
  )
  parser.add_argument(
    "--adapter",
    choices=ta.ADAPTER_NAMES,
    help="adapter name; needed for B1 (the reference saves it as L5_EAGLE)",
  )
  parser.add_argument(
    "--num_heads", type=int, help="if the checkpoint does not record it"
  )
  parser.add_argument(
    "--trust_pickle",
    action="store_true",
    help="allow pickled objects: reference L1's HiddenAdapterConfig is "
    "read by the weights-only unpickler through a shim; any other pickled "
    "global falls back to a full unpickle (only for files you trust)",
  )
  return parser.parse_args(argv)


def main(argv=None) -> dict[str, Path]:
  """CLI entry point."""
  args = parse_args(argv)
  try:
    ckpt = load_checkpoint(args.checkpoint, args.trust_pickle)
    name, params, cfg = convert(ckpt, args.adapter, args.num_heads)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from e
  paths = output_paths(args.out)
  paths["params"].parent.mkdir(parents=True, exist_ok=True)
  tmp = paths["params"].with_name(paths["params"].name + ".tmp")
  ta.save_params_npz(tmp, params)
  os.replace(tmp, paths["params"])
  info = {
    "model": {"name": name, **cfg},
    "source": {
      "path": str(args.checkpoint),
      "adapter_type": ckpt.get("adapter_type"),
      "epoch": ckpt.get("epoch"),
      "metrics": ckpt.get("metrics"),
    },
  }
  with open(paths["config"], "w") as f:
    json.dump(info, f, indent=2, default=str)
    f.write("\n")
  for path in paths.values():
    print(f"wrote {path}")
  return paths


if __name__ == "__main__":
  from egpt_align import cli

  cli.run(main)
