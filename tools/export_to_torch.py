r"""Exports trained egpt_align adapter params to PyTorch.

Writes (a) PATH.pt, a checkpoint dict in the reference's format
(`model_state_dict`, `adapter_type`, a plain-dict `config`, `epoch`, `metrics`)
that loads with `torch.load(..., weights_only=True)` (L1 included: its config
is a plain dict here, not the reference's pickled dataclass; the reference's
own loader reads L1's config as attributes, so for it export L1 with
`--reference_l1_config`, which then loads only with weights_only=False, like
the reference's own L1 files), plus our own keys
`egpt_align_adapter`, `egpt_align_config` and `vlm_only`; and (b)
PATH.safetensors + PATH.config.json.

Examples:
  python tools/export_to_torch.py --workdir runs/l5 --which best \
      --out exports/l5.pt
  python tools/export_to_torch.py --params l1.npz --adapter l1 \
      --config '{"hidden_dim": 64, "bottleneck_dim": 16}' --out /tmp/l1.pt

A params file is an .npz of float32 arrays keyed by '/'-joined Flax paths
(`tools.torch_adapters.save_params_npz`); `import_from_torch.py` writes one,
with its config beside it as NAME.config.json (picked up automatically).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # Run as a script: make `tools` importable.
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tools import torch_adapters as ta  # noqa: E402

FORMAT = "egpt_align.torch_adapter"
FORMAT_VERSION = 1


def output_paths(out: str | os.PathLike) -> dict[str, Path]:
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
  name = ta.check_name(name)
  if reference_l1_config and name != "l1":
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
  state_dict = ta.flax_to_state_dict(name, params)
  cfg = ta.resolve_config(name, state_dict, model_config)
  ref_config = ta.reference_config(name, **cfg)
  extra = {k: v for k, v in _plain(model_config).items() if v is not None}
  ours = {"name": name, **extra, **cfg}
  metrics = _plain(dict(metrics)) if metrics else None
  paths = output_paths(out)
  paths["pt"].parent.mkdir(parents=True, exist_ok=True)
  written = []
  if fmt in ("pt", "both"):
    ckpt = {
      "model_state_dict": state_dict,
      "adapter_type": ta.REF_TYPES[name],
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
      "adapter_type": ta.REF_TYPES[name],
    }
    tmp = paths["safetensors"].with_name(paths["safetensors"].name + ".tmp")
    save_file(dict(state_dict), str(tmp), metadata=meta)
    os.replace(tmp, paths["safetensors"])
    sidecar = {
      "format": FORMAT,
      "version": FORMAT_VERSION,
      "adapter": name,
      "adapter_type": ta.REF_TYPES[name],
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


def _run_info(checkpoint, workdir, which):
  """(step, epoch, val metrics) of the chosen checkpoint, from its meta."""
  try:
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
      if which == "best":
        step = ckpt.best_step()
      elif which == "latest":
        step = ckpt.latest_step()
      else:
        step = int(which)
      meta = ckpt.restore_meta(step)
    finally:
      ckpt.close()
  except Exception as e:  # Optional metadata: never fail the export.
    print(f"note: no run metadata for {workdir} ({e}); epoch/metrics unset")
    return (which if isinstance(which, int) else None), 0, None
  metrics = meta.get("last_metrics")
  # Only an epoch-end checkpoint carries the validation metrics of its state.
  if meta.get("epoch_step") != 0 or not isinstance(metrics, Mapping):
    metrics = None
  return step, int(meta.get("epoch") or 0), metrics


def _load_json_arg(value: str, flag: str) -> dict:
  try:
    if value.lstrip().startswith("{"):
      return json.loads(value)
    with open(value) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise SystemExit(
      f"{flag} {value!r}: not a JSON object or file ({e})."
    ) from e


def _which(value: str) -> str | int:
  if value in ("best", "latest"):
    return value
  try:
    return int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"--which must be best, latest or a step number, not {value!r}"
    ) from None


def parse_args(argv=None) -> argparse.Namespace:
  """Command-line flags."""
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training run dir (orbax checkpoints)")
  src.add_argument("--params", help=".npz params file ('/'-joined keys)")
  parser.add_argument(
    "--which",
    type=_which,
    default="best",
    help="with --workdir: best | latest | STEP (default best)",
  )
  parser.add_argument(
    "--adapter",
    choices=ta.ADAPTER_NAMES,
    help="adapter name (default: the config's model.name)",
  )
  parser.add_argument(
    "--config",
    help="with --params: JSON file or inline JSON with the model fields "
    "(flat or under 'model'); default PARAMS.config.json if present",
  )
  parser.add_argument(
    "--out", required=True, help="output PATH.pt (siblings share the stem)"
  )
  parser.add_argument(
    "--format", default="both", choices=("pt", "safetensors", "both")
  )
  parser.add_argument(
    "--reference_l1_config",
    action="store_true",
    help="L1 only: store `config` as the reference's pickled "
    "HiddenAdapterConfig (module feasible.feature_alignment.hidden_adapter) "
    "so the reference's load_any_adapter accepts the file; loading then "
    "needs torch.load(weights_only=False), as the reference's own L1 files "
    "do. Default: a plain dict that loads with weights_only=True.",
  )
  parser.add_argument(
    "--epoch",
    type=int,
    help="stored as epoch (default: the run's completed epochs, else 0)",
  )
  parser.add_argument(
    "--metrics", help="JSON file or inline JSON dict stored as metrics"
  )
  return parser.parse_args(argv)


def main(argv=None) -> list[Path]:
  """CLI entry point."""
  args = parse_args(argv)
  try:
    return run(args)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from e


def run(args: argparse.Namespace) -> list[Path]:
  """Exports according to parsed flags; returns the files written."""
  step = None
  if args.workdir:
    try:
      from egpt_align import checkpoint
    except ImportError as e:
      raise SystemExit(
        f"--workdir needs egpt_align.checkpoint, which failed to import ({e})."
        " Use --params instead."
      ) from e
    params, config = checkpoint.load_params(args.workdir, args.which)
    model_cfg = model_config_of(config)
    step, epoch, run_metrics = _run_info(checkpoint, args.workdir, args.which)
    if args.epoch is None:
      args.epoch = epoch
    if args.metrics is None and run_metrics:
      args.metrics = json.dumps(run_metrics)
  else:
    params = ta.load_params_npz(args.params)
    config_arg = args.config
    sibling = Path(str(Path(args.params).with_suffix("")) + ".config.json")
    if config_arg is None and sibling.exists():
      config_arg = str(sibling)
    model_cfg = (
      model_config_of(_load_json_arg(config_arg, "--config"))
      if config_arg
      else {}
    )
  name = args.adapter or model_cfg.get("name")
  if name is None:
    raise SystemExit(
      "No adapter name: pass --adapter or a config with model.name."
    )
  if args.adapter:
    model_cfg.pop("name", None)
  metrics = _load_json_arg(args.metrics, "--metrics") if args.metrics else None
  written = export(
    params,
    name,
    model_cfg,
    args.out,
    fmt=args.format,
    epoch=args.epoch or 0,
    step=step,
    metrics=metrics,
    reference_l1_config=args.reference_l1_config,
  )
  for path in written:
    print(f"wrote {path}")
  return written


if __name__ == "__main__":
  from egpt_align import cli

  cli.run(main)
