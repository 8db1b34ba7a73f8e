"""Live adapters for the SD runtime: from exports, at random, or identity.

`load_adapter(label, value, ...)` builds one `sd_models.Adapter` from
'random[:KIND]', 'identity' (L4 with alpha 0) or a file written by
tools/export_to_torch.py (or a reference checkpoint); `parse_adapters` reads
the command line's `--adapter LABEL=VALUE` items.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from egpt_align.models import ADAPTERS
from tools.lib import torch_checkpoints
from tools.lib import twins as ta
from tools.lib.sd_models import Adapter

# 'identity': this kind with alpha = 0 returns its input exactly
# (h + 0 * (out - h)); with a drafter equal to the target every prefill draft
# is accepted.
IDENTITY_KIND = "l4"


def _made(name: str, value: str, seed: int, hidden_dim: int):
  """(kind, module, config) of 'identity' or 'random[:KIND]'."""
  cfg = {"hidden_dim": hidden_dim}
  if value == "identity":
    if name != IDENTITY_KIND:
      raise ValueError(
        f"--adapter {name}=identity: only {IDENTITY_KIND} can be an exact "
        "identity"
      )
    kind, cfg["alpha_init"] = name, 0.0
  else:
    kind = value.split(":", 1)[1] if ":" in value else name
    if kind not in ADAPTERS:
      raise ValueError(
        f"--adapter {name}={value}: cannot tell the adapter kind; name it "
        f"one of {tuple(ADAPTERS)} or write {name}=random:KIND"
      )
    torch.manual_seed(seed)
  return kind, ta.build_torch_adapter(kind, **cfg), cfg


def _twin(name: str, value: str, seed: int, trust_pickle: bool, hidden_dim):
  """(kind, module, config) of the adapter `value` names."""
  if value == "identity" or value.split(":", 1)[0] == "random":
    return _made(name, value, seed, hidden_dim)
  try:
    expect = name if name in ADAPTERS else None
    return torch_checkpoints.load_adapter_file(
      value, expect, trust_pickle=trust_pickle
    )
  except (ValueError, KeyError) as e:
    raise ValueError(f"--adapter {name}={value}: {e}") from e


def load_adapter(
  name: str,
  value: str,
  *,
  hidden_dim: int,
  device: torch.device,
  dtype: torch.dtype,
  seed: int = 0,
  trust_pickle: bool = False,
) -> tuple[Adapter, dict]:
  """Builds adapter `name` from 'random[:KIND]', 'identity' or a file.

  Files: PATH.pt / PATH.safetensors (+ PATH.config.json) written by
  tools/export_to_torch.py, or a reference checkpoint; the kind comes from
  the file (a reference L5_EAGLE file is read as `name` when that is b1).
  Returns the adapter and its provenance (source, kind, config, params).
  """
  kind, module, cfg = _twin(name, value, seed, trust_pickle, hidden_dim)
  if cfg["hidden_dim"] != hidden_dim:
    raise ValueError(
      f"--adapter {name}={value}: hidden_dim {cfg['hidden_dim']} != the "
      f"models' {hidden_dim}"
    )
  module = module.to(device=device, dtype=dtype).eval()
  info: dict[str, Any] = {
    "source": value,
    "config": cfg,
    "kind": kind,
    "params": sum(p.numel() for p in module.parameters()),
  }
  return Adapter(name, kind, module, device, dtype), info


def parse_adapters(items: Sequence[str]) -> dict[str, str]:
  """['l4=FILE', 'b1=random'] -> {'l4': 'FILE', 'b1': 'random'}."""
  out = {}
  for item in items:
    name, sep, value = item.partition("=")
    if not sep or not name or not value:
      raise ValueError(f"--adapter {item!r}: expected NAME=FILE or NAME=random")
    if name in out:
      raise ValueError(f"--adapter {name!r} given twice")
    out[name] = value
  return out
