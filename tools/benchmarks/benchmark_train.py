r"""Train-step benchmark: our jitted JAX step against the torch twins.

Times, in one process on one card, for each adapter level:
  * ours: the trainer's jitted train step (forward + backward + clip + AdamW),
    bf16 compute with float32 params, donated state;
  * torch, the reference recipe: fp32 eager, torch.optim.AdamW, clip 1.0;
  * torch, the best a careful user gets: bf16 autocast + torch.compile +
    fused AdamW.
All at the reference's shapes (batch 64, sequence 50, hidden 4096) unless told
otherwise. It reports ms/step (median of timing windows), tokens/s, achieved
TFLOP/s of the matmuls, the fraction of the measured bf16 matmul ceiling, and
compile time separately. `--scaling` adds data-parallel runs over 1, 2, 4 ...
devices with the global batch fixed and scaled. The steps are built in
tools/benchmarks/train_steps.py and timed in train_timing.py; this command
parses, runs them and prints the tables.

  # GPU, full size (about 5 minutes on an H100):
  python -m tools.benchmarks.benchmark_train --out runs/bench_train
  # Multi-step training (config.loss.unroll_steps, objective next), a row
  # per k = 1..4 for B1 (one H100, under 9 minutes):
  python -m tools.benchmarks.benchmark_train --levels= --torch= \
    --unroll b1 --out runs/bench_unroll
  # CPU smoke test:
  python -m tools.benchmarks.benchmark_train --small --out /tmp/bench_train
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tools.benchmarks.train_steps import COMPARE, LEVELS  # noqa: E402
from tools.benchmarks.train_timing import (  # noqa: E402
  bench_jax,
  bench_torch,
  bench_unroll,
  measure_ceiling,
  profile_step,
  versions,
)

# --scaling_update's weight-update layouts -> (shard_update, gather_at_end).
UPDATE_LAYOUTS = {
  "sharded": (True, False),
  "sharded_gather_end": (True, True),
  "replicated": (False, False),
}


def _names(flag: str) -> list[str]:
  return [x for x in flag.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--levels", default=",".join(LEVELS))
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seq", type=int, default=50)
  p.add_argument("--hidden", type=int, default=4096)
  p.add_argument("--dtype", default="bfloat16", help="JAX compute dtype")
  p.add_argument("--steps", type=int, default=20, help="steps per window")
  p.add_argument("--windows", type=int, default=5)
  p.add_argument(
    "--torch",
    default="fp32,compile",
    help="torch variants to run: fp32, compile (empty: none)",
  )
  p.add_argument(
    "--torch_levels",
    default="",
    help="levels to run the torch variants on (default: all --levels)",
  )
  p.add_argument(
    "--scaling",
    default="",
    help="levels for the multi-device scaling table (e.g. l4,l5f)",
  )
  p.add_argument(
    "--scaling_update",
    default="sharded,replicated",
    help="weight-update layouts for the scaling table: sharded (the "
    "trainer's default, config.shard_weight_update; bf16 kernel copies "
    "gathered at the step's start), sharded_gather_end (copies kept "
    "replicated, gathered when written) and/or replicated",
  )
  p.add_argument(
    "--ablate",
    default="",
    help="levels to time ablated steps for (fwd, grad, nodrop, opt)",
  )
  p.add_argument(
    "--profile", default="", help="levels to trace and list kernels for"
  )
  p.add_argument(
    "--variants",
    default="",
    help="the --compare implementations to time (default: all)",
  )
  p.add_argument(
    "--compare",
    default="",
    help="levels to also time with alternative implementations: "
    + ", ".join(COMPARE),
  )
  p.add_argument(
    "--unroll",
    default="",
    help="levels (b1, l5f) to time with the loss objective 'next' and "
    "config.loss.unroll_steps = each of --unroll_steps",
  )
  p.add_argument(
    "--unroll_steps", default="1,2,3,4", help="the k of the --unroll rows"
  )
  p.add_argument("--ceiling_n", type=int, default=8192)
  p.add_argument(
    "--prng",
    default=None,
    help="jax_default_prng_impl for dropout (threefry2x32, rbg, unsafe_rbg)",
  )
  p.add_argument("--small", action="store_true", help="CPU smoke test sizes")
  p.add_argument("--out", default=None, help="directory for results.json")
  return p


def _one_card_rows(args, dtype, ceiling, variants) -> list[dict]:
  """The one-card rows: every level (and its torch twins), the ablations,
  the --compare implementations."""
  rows = []

  def one_card(name, variant="full", *, with_ceiling=True):
    r = bench_jax(
      name,
      args.batch,
      args.seq,
      args.hidden,
      dtype,
      jax.devices()[:1],
      args.steps,
      args.windows,
      variant,
    )
    if with_ceiling:
      r["ceiling_frac"] = r["tflops"] / ceiling
    rows.append(r)
    print(json.dumps(r), flush=True)

  for name in _names(args.levels):
    one_card(name)
    for mode in _names(args.torch):
      if args.torch_levels and name not in args.torch_levels.split(","):
        continue
      try:
        t = bench_torch(
          name, args.batch, args.seq, args.hidden, mode, args.steps, 3
        )
      except Exception as e:  # report, keep going
        t = {"impl": f"torch {mode}", "level": name, "error": repr(e)}
      rows.append(t)
      print(json.dumps(t), flush=True)
  for name in _names(args.ablate):
    for variant in ("fwd", "grad", "nodrop", "opt"):
      one_card(name, variant, with_ceiling=False)  # partial steps
  for name in _names(args.compare):
    for variant in variants:
      one_card(name, variant)
  return rows


def _scaling_rows(args, dtype, update_modes) -> list[dict]:
  """The --scaling table's rows: 1, 2, 4, 8 devices, the global batch fixed
  and scaled, each weight-update layout."""
  scaling = []
  n_dev = jax.device_count()
  for name in _names(args.scaling):
    counts = [n for n in (1, 2, 4, 8) if n <= n_dev]
    for n in counts:
      for label, b in (("fixed", args.batch), ("scaled", args.batch * n)):
        if label == "scaled" and n == 1:
          continue
        for mode in update_modes if n > 1 else update_modes[:1]:
          r = bench_jax(
            name,
            b,
            args.seq,
            args.hidden,
            dtype,
            jax.devices()[:n],
            args.steps,
            args.windows,
            shard_update=UPDATE_LAYOUTS[mode][0],
            gather_at_end=UPDATE_LAYOUTS[mode][1],
          )
          r["batch_mode"] = label
          r["update"] = mode if n > 1 else "-"
          scaling.append(r)
          print(json.dumps(r), flush=True)
  return scaling


def _print_rows(rows) -> None:
  print()
  print("| level | impl | ms/step | tokens/s | TFLOP/s | of ceiling |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['level']} | {r['impl']} | error: {r['error'][:60]} |||")
      continue
    tf = f"{r['tflops']:.0f}" if "tflops" in r else "-"
    frac = f"{r['ceiling_frac']:.0%}" if "ceiling_frac" in r else "-"
    print(
      f"| {r['level']} | {r['impl']} | {r['ms']:.2f} | "
      f"{r['tokens_per_s']:,.0f} | {tf} | {frac} |"
    )


def _print_unroll(unroll_rows) -> None:
  print()
  print("| level | k | ms/step | x k=1 | at most k x k=1 |")
  print("|---|---|---|---|---|")
  for r in unroll_rows:
    if "error" in r:
      print(f"| {r['level']} | {r['unroll_steps']} | error ||| ")
      continue
    ratio = r.get("vs_k1")
    print(
      f"| {r['level']} | {r['unroll_steps']} | {r['ms']:.2f} | "
      + ("-" if ratio is None else f"{ratio:.2f}")
      + " | "
      + ("-" if ratio is None else str(ratio <= r["unroll_steps"]))
      + " |"
    )


def _print_scaling(scaling) -> None:
  print()
  print(
    "| level | devices | weight update | batch | ms/step | tokens/s | "
    "speedup vs 1 | collectives (AR/RS/AG) |"
  )
  print("|---|---|---|---|---|---|---|---|")
  base = {r["level"]: r for r in scaling if r["devices"] == 1}
  for r in scaling:
    sp = r["tokens_per_s"] / base[r["level"]]["tokens_per_s"]
    c = r["collectives"]
    print(
      f"| {r['level']} | {r['devices']} | {r['update']} | {r['batch']} | "
      f"{r['ms']:.2f} | {r['tokens_per_s']:,.0f} | {sp:.2f}x | "
      f"{c['all-reduce']}/{c['reduce-scatter']}/{c['all-gather']} |"
    )


def main(argv=None):
  p = build_parser()
  args = p.parse_args(argv)
  if args.small:
    args.batch, args.seq, args.hidden = 8, 16, 64
    args.steps, args.windows, args.ceiling_n = 2, 2, 256
  variants = _names(args.variants) or list(COMPARE)
  unknown = set(variants) - set(COMPARE)
  if unknown:
    p.error(f"--variants: unknown {sorted(unknown)}; known: {list(COMPARE)}")
  update_modes = _names(args.scaling_update)
  unknown = set(update_modes) - set(UPDATE_LAYOUTS)
  if unknown:
    p.error(
      f"--scaling_update: unknown {sorted(unknown)}; known: "
      f"{list(UPDATE_LAYOUTS)}"
    )
  if args.prng:
    jax.config.update("jax_default_prng_impl", args.prng)
  dtype = jnp.dtype(args.dtype)
  info = versions()
  info["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  print(f"# {info}", flush=True)
  ceiling = measure_ceiling(args.ceiling_n)
  info["bf16_matmul_ceiling_tflops"] = ceiling
  print(f"# bf16 {args.ceiling_n}^3 matmul ceiling: {ceiling:.0f} TFLOP/s")
  rows = _one_card_rows(args, dtype, ceiling, variants)
  unroll_rows = []
  for name in _names(args.unroll):
    unroll_rows += bench_unroll(
      name,
      [int(k) for k in args.unroll_steps.split(",") if k],
      args.batch,
      args.seq,
      args.hidden,
      dtype,
      args.steps,
      args.windows,
    )
  rows += unroll_rows
  for name in _names(args.profile):
    profile_step(
      name, args.batch, args.seq, args.hidden, dtype, args.steps, args.out
    )
  scaling = _scaling_rows(args, dtype, update_modes)
  _print_rows(rows)
  if unroll_rows:
    _print_unroll(unroll_rows)
  if scaling:
    _print_scaling(scaling)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmark_train.json"), "w") as f:
      json.dump({"info": info, "rows": rows, "scaling": scaling}, f, indent=1)
  return 0


if __name__ == "__main__":
  from egpt_align import cli

  sys.exit(cli.run(main))
