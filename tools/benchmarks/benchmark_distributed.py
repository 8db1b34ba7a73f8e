r"""One process with two GPUs against two processes with one GPU each.

Runs the trainer's CLI (`python -m egpt_align.train`) on one dataset three
ways: one process over 2 devices; two processes (jax.distributed on
localhost, one device each) agreeing on a stop every 10 steps (the
default); and the same agreeing every step (the cost of the per-step
all-gather of the stop flag). Every sample has the same length, so every
step holds batch x length tokens and ms/step follows from the run's logged
tokens/s (median over the log windows after the first epoch, whose first
window holds the compile). The runs must agree: the same train loss in
every log window and the same validation loss every epoch. Prints a table
and writes OUT/results.json (the per-run logs next to it).

  # 2 GPUs (L4 at hidden 4096, batch 64, sequence 50; a few minutes; the
  # dataset is 3.4 GB):
  python -m tools.benchmarks.benchmark_distributed \
    --out runs/bench_distributed --data_dir /tmp/bench_distributed_data
  # CPU smoke test (fake CPU devices, a tiny L1):
  python -m tools.benchmarks.benchmark_distributed --small \
    --out /tmp/bench_distributed
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

from egpt_align.data.format import write_json_atomic
from tools.lib.environment import environment

REPO = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
BASE_CONFIG = os.path.join(REPO, "egpt_align", "configs", "base.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(name, workdir, overrides, *, processes, small, timeout):
  """Trains as `processes` processes over 2 devices; returns wall seconds."""
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  port = _free_port()
  procs, logs = [], []
  t0 = time.perf_counter()
  for i in range(processes):
    env = dict(os.environ)  # keeps NCCL_NVLS_ENABLE=0 and the like
    if small:
      env["JAX_PLATFORMS"] = "cpu"
      env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={2 // processes}"
      )
    elif processes > 1:
      env["JAX_LOCAL_DEVICE_IDS"] = str(i)  # this process's GPU
    else:
      env.setdefault("CUDA_VISIBLE_DEVICES", "0,1")
    cmd = [
      sys.executable,
      "-m",
      "egpt_align.train",
      "--config",
      BASE_CONFIG,
      "--workdir",
      workdir,
      *overrides,
    ]
    if processes > 1:
      cmd += [
        "--config.multihost=True",
        f"--config.distributed.coordinator_address=localhost:{port}",
        f"--config.distributed.num_processes={processes}",
        f"--config.distributed.process_id={i}",
      ]
    log = f"{workdir}.{i}.log"
    logs.append(log)
    with open(log, "w") as out:
      procs.append(
        subprocess.Popen(
          cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
      )
  for i, p in enumerate(procs):
    try:
      rc = p.wait(timeout=max(timeout - (time.perf_counter() - t0), 1))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise SystemExit(
        f"{name}: still running after {timeout} s; see {logs}"
      ) from None
    if rc != 0:
      with open(logs[i]) as f:
        tail = f.read()[-3000:]
      raise SystemExit(f"{name}: process {i} exited {rc}:\n{tail}")
  return time.perf_counter() - t0


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _summary(workdir, *, tokens_per_step, steps_per_epoch):
  """ms/step (median, after epoch 1), train losses, val losses."""
  records = _records(workdir)
  train = [r for r in records if "train/tokens_per_sec" in r]
  timed = [r for r in train if r["step"] > steps_per_epoch]
  ms = [1e3 * tokens_per_step / r["train/tokens_per_sec"] for r in timed]
  return {
    "ms_per_step": statistics.median(ms) if ms else None,
    "ms_per_step_windows": ms,
    "train_loss": {r["step"]: r["train/loss"] for r in train},
    "val_loss": {
      r["epoch"]: r["eval/loss"] for r in records if "eval/loss" in r
    },
  }


def _max_rel_diff(a: dict, b: dict) -> float:
  if sorted(a) != sorted(b):
    return float("inf")
  x = np.array([a[k] for k in sorted(a)])
  y = np.array([b[k] for k in sorted(b)])
  return float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-12)))


def _versions() -> dict:
  out = environment(("jax", "jaxlib", "flax", "optax", "orbax.checkpoint"))
  try:
    smi = subprocess.run(
      ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
      capture_output=True,
      text=True,
      timeout=30,
    )
    out["gpus"] = smi.stdout.strip().splitlines()
  except (OSError, subprocess.SubprocessError):
    out["gpus"] = []
  return out


def _dataset(data_dir, out, train_samples, seq, hidden) -> str:
  """The dataset of the runs (DATA_DIR, else OUT/data), written once."""
  # Every sample `seq` long; 2 % held out for validation (not timed).
  num_samples = int(np.ceil(train_samples / 0.98)) + 1
  data_dir = os.path.abspath(data_dir or os.path.join(out, "data"))
  if not os.path.exists(os.path.join(data_dir, "header.json")):
    # The JAX benchmarks' dataset writer (tools/benchmarks/datasets.py).
    from tools.benchmarks import datasets

    datasets.write_dataset(
      data_dir,
      np.full(num_samples, seq, np.int32),
      hidden,
      np.random.default_rng(0),
      samples_per_shard=1024,
    )
  return data_dir


def _overrides(level, data_dir, seq, batch, epochs, log_every) -> list[str]:
  """The trainer flags every run shares."""
  return [
    f"--config.model.name={level}",
    f"--config.data.train={data_dir}",
    "--config.data.val_fraction=0.02",
    f"--config.data.buckets=({seq},)",
    f"--config.batch_size={batch}",
    f"--config.num_epochs={epochs}",
    f"--config.log_every_steps={log_every}",
    "--config.eval_at_start=False",
    "--config.early_stopping_patience=0",
    "--config.checkpoint.enabled=False",
    "--config.progress_bar=False",
  ]


def _compare(results) -> None:
  """Each run's largest relative loss difference from the first run's."""
  base = results[0]
  for r in results:
    r["train_loss_max_rel_diff"] = _max_rel_diff(
      r["train_loss"], base["train_loss"]
    )
    r["val_loss_max_rel_diff"] = _max_rel_diff(r["val_loss"], base["val_loss"])
    r["equal"] = (
      r["train_loss_max_rel_diff"] < 1e-3 and r["val_loss_max_rel_diff"] < 1e-3
    )


def _print_table(results) -> None:
  base = results[0]
  print("| run | ms/step | vs 1 process | train loss Δ | val loss Δ | equal |")
  print("|---|---|---|---|---|---|")
  for r in results:
    ratio = r["ms_per_step"] / base["ms_per_step"]
    print(
      f"| {r['run']} | {r['ms_per_step']:.3f} | {ratio:.3f}x | "
      f"{r['train_loss_max_rel_diff']:.1e} | "
      f"{r['val_loss_max_rel_diff']:.1e} | {r['equal']} |"
    )


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--out", required=True, help="results and run directories")
  p.add_argument(
    "--data_dir", default=None, help="dataset (written once; OUT/data)"
  )
  p.add_argument("--small", action="store_true", help="CPU smoke test")
  p.add_argument("--level", default=None, help="adapter (default l4; l1)")
  p.add_argument("--hidden", type=int, default=None, help="default 4096; 64")
  p.add_argument("--batch", type=int, default=None, help="default 64; 16")
  p.add_argument("--seq", type=int, default=None, help="default 50; 16")
  p.add_argument("--steps_per_epoch", type=int, default=None, help="64; 8")
  p.add_argument("--epochs", type=int, default=None, help="default 4; 2")
  p.add_argument("--log_every", type=int, default=None, help="default 8; 4")
  p.add_argument("--timeout", type=int, default=900, help="seconds per run")
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="extra trainer config override for every run, e.g. "
    "--set dropout_rng_impl=threefry2x32",
  )
  return p


def main(argv=None):
  args = build_parser().parse_args(argv)
  small = args.small

  def pick(value, gpu, cpu):
    return value if value is not None else (cpu if small else gpu)

  level = pick(args.level, "l4", "l1")
  hidden = pick(args.hidden, 4096, 64)
  batch = pick(args.batch, 64, 16)
  seq = pick(args.seq, 50, 16)
  spe = pick(args.steps_per_epoch, 64, 8)
  epochs = pick(args.epochs, 4, 2)
  log_every = pick(args.log_every, 8, 4)
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)

  data_dir = _dataset(args.data_dir, out, spe * batch, seq, hidden)
  overrides = _overrides(level, data_dir, seq, batch, epochs, log_every)
  overrides += [f"--config.{kv}" for kv in args.set]
  runs = [
    ("1 process x 2 devices", 1, []),
    ("2 processes x 1 device, stop check every 10 steps", 2, []),
    (
      "2 processes x 1 device, stop check every step",
      2,
      ["--config.distributed.stop_check_every_steps=1"],
    ),
  ]
  results = []
  for i, (name, processes, extra) in enumerate(runs):
    workdir = os.path.join(out, f"run{i}")
    print(f"[{name}] ...", flush=True)
    wall = _run(
      name,
      workdir,
      overrides + extra,
      processes=processes,
      small=small,
      timeout=args.timeout,
    )
    summary = _summary(
      workdir, tokens_per_step=batch * seq, steps_per_epoch=spe
    )
    results.append(
      {"run": name, "processes": processes, "wall_s": wall, **summary}
    )
  _compare(results)
  report = {
    "level": level,
    "hidden": hidden,
    "batch": batch,
    "seq": seq,
    "steps_per_epoch": spe,
    "epochs": epochs,
    "log_every_steps": log_every,
    "platform": "cpu" if small else "gpu",
    "versions": _versions(),
    "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    "runs": results,
  }
  write_json_atomic(os.path.join(out, "results.json"), report)
  print(
    f"\n{level} hidden {hidden}, batch {batch} x {seq}, {epochs} epochs of "
    f"{spe} steps; ms/step = median after epoch 1"
  )
  _print_table(results)
  print(f"wrote {os.path.join(out, 'results.json')}")
  if not all(r["equal"] for r in results):
    raise SystemExit("the runs disagree: see the loss differences above")


if __name__ == "__main__":
  main()
