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
from pathlib import Path

from egpt_align import models
from tools.lib import bridge, torch_checkpoints


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
    choices=list(models.ADAPTERS),
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
    ckpt = torch_checkpoints.load_checkpoint(args.checkpoint, args.trust_pickle)
    name, params, cfg = torch_checkpoints.convert(
      ckpt, args.adapter, args.num_heads
    )
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from e
  paths = output_paths(args.out)
  paths["params"].parent.mkdir(parents=True, exist_ok=True)
  tmp = paths["params"].with_name(paths["params"].name + ".tmp")
  bridge.save_params_npz(tmp, params)
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
