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
(`tools.lib.bridge.save_params_npz`); `import_from_torch.py` writes one,
with its config beside it as NAME.config.json (picked up automatically).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path

from egpt_align import models
from tools.lib import bridge


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
    choices=list(models.ADAPTERS),
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
    model_cfg = bridge.model_config_of(config)
    step, epoch, run_metrics = _run_info(checkpoint, args.workdir, args.which)
    if args.epoch is None:
      args.epoch = epoch
    if args.metrics is None and run_metrics:
      args.metrics = json.dumps(run_metrics)
  else:
    params = bridge.load_params_npz(args.params)
    config_arg = args.config
    sibling = Path(str(Path(args.params).with_suffix("")) + ".config.json")
    if config_arg is None and sibling.exists():
      config_arg = str(sibling)
    model_cfg = (
      bridge.model_config_of(_load_json_arg(config_arg, "--config"))
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
  written = bridge.export(
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
