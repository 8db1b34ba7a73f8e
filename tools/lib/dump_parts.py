"""A dump split over processes: which samples each part takes, where it
writes, how the launcher starts the parts and how they join.

`tools/dump_hidden_states.py --num_shards N --shard I` dumps part I of N:
a contiguous run of whole batches of the samples file (`part_samples`), so
every batch holds the samples a single process would put in it, into its
own resumable dataset `OUT/parts/part-I-of-N` (`part_dir`). `--processes
N` starts the N parts as child processes, each pinned to one GPU with
CUDA_VISIBLE_DEVICES (`launch`; on a CPU they share it), waits for them
and joins the parts, in order, into OUT (`join`,
egpt_align.data.writer.join_datasets): OUT then reads sample for sample
as a single-process dump. A part skips the samples OUT already holds, so
a rerun after a join retries only what failed, appended after the rest as
a single-process rerun appends them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence

from egpt_align.data import format as fmt
from egpt_align.data.writer import join_datasets

PARTS_DIR = "parts"
SUMMARY_FILE = "summary.json"
FAILURES_FILE = "failures.jsonl"
# The flags that say which part a process is; the launcher sets them.
PART_FLAGS = ("--num_shards", "--shard", "--processes")


def part_dir(out: str, shard: int, num_shards: int) -> str:
  """The dataset directory of part `shard` of `num_shards`."""
  return os.path.join(out, PARTS_DIR, f"part-{shard}-of-{num_shards}")


def part_samples(
  samples: Sequence[dict], num_shards: int, shard: int, batch_size: int
) -> list[dict]:
  """Part `shard` of `num_shards` of `samples`: a contiguous run of whole
  batches of `batch_size` (the parts' batches, one after another, are the
  single process's), as even as whole batches allow."""
  if not 0 <= shard < num_shards:
    raise ValueError(
      f"--shard {shard}: expected 0 <= shard < --num_shards {num_shards}"
    )
  batches = -(-len(samples) // batch_size)
  lo = shard * batches // num_shards
  hi = (shard + 1) * batches // num_shards
  return list(samples[lo * batch_size : hi * batch_size])


def dataset_ids(path: str) -> set[str]:
  """The sample ids (`meta['id']`) of the dataset at `path` (none if it has
  no header yet)."""
  if not os.path.isfile(os.path.join(path, fmt.HEADER_FILE)):
    return set()
  ids = set()
  for shard in fmt.read_header(path)["shards"]:
    with open(os.path.join(path, shard["name"], fmt.META_FILE)) as f:
      for line in f:
        sample_id = json.loads(line).get("id")
        if sample_id is not None:
          ids.add(str(sample_id))
  return ids


def child_argv(argv: Sequence[str], num_shards: int, shard: int) -> list:
  """`argv` of the launcher without its part flags, plus this part's."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
      continue
    name = arg.split("=", 1)[0]
    if name in PART_FLAGS:
      skip = "=" not in arg
      continue
    out.append(arg)
  return out + ["--num_shards", str(num_shards), "--shard", str(shard)]


def visible_gpus(count: int) -> list[str]:
  """The GPUs a child may be pinned to: CUDA_VISIBLE_DEVICES's entries when
  it is set, else 0..count-1."""
  env = os.environ.get("CUDA_VISIBLE_DEVICES")
  if env is not None:
    return [g.strip() for g in env.split(",") if g.strip()]
  return [str(i) for i in range(count)]


def launch(argv: Sequence[str], out: str, num: int, gpus) -> list[int]:
  """Runs the `num` parts as `python -m tools.dump_hidden_states` children,
  part I pinned to gpus[I] (None: no GPUs, the children share the CPU),
  each logging to OUT/parts/part-I-of-N.log; returns their exit statuses.
  A signal to the launcher is passed on to the children, which keep what
  they finished."""
  os.makedirs(os.path.join(out, PARTS_DIR), exist_ok=True)
  root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
  procs, logs = [], []
  for i in range(num):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
      p for p in (root, env.get("PYTHONPATH")) if p
    )
    if gpus is not None:
      env["CUDA_VISIBLE_DEVICES"] = gpus[i]
    log = open(part_dir(out, i, num) + ".log", "w")  # noqa: SIM115
    logs.append(log)
    cmd = [sys.executable, "-m", "tools.dump_hidden_states"]
    cmd += child_argv(argv, num, i)
    procs.append(
      subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    )
  try:
    return [p.wait() for p in procs]
  except KeyboardInterrupt:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    for p in procs:
      p.wait()
    raise
  finally:
    for log in logs:
      log.close()


def log_tail(out: str, shard: int, num: int, lines: int = 5) -> str:
  """The last lines of a part's log."""
  path = part_dir(out, shard, num) + ".log"
  if not os.path.isfile(path):
    return f"({path} missing)"
  with open(path) as f:
    return "".join(f.readlines()[-lines:]).rstrip()


def join(out: str, num: int) -> dict:
  """Joins parts 0..num-1 of OUT into OUT (see the module), appends their
  failures to OUT/failures.jsonl, then removes OUT/parts; returns the
  parts' summaries summed. Every part must have finished (its
  summary.json says it was not interrupted): else ValueError naming it."""
  parts = [part_dir(out, i, num) for i in range(num)]
  summaries = []
  for path in parts:
    sfile = os.path.join(path, SUMMARY_FILE)
    if not os.path.isfile(sfile):
      raise ValueError(f"{sfile}: missing; part {path} has not finished")
    with open(sfile) as f:
      summary = json.load(f)
    if summary.get("interrupted"):
      raise ValueError(f"{sfile}: part {path} was interrupted; rerun it")
    summaries.append(summary)
  headers = [p for p in parts if os.path.isfile(os.path.join(p, "header.json"))]
  if headers:
    with open(os.path.join(headers[0], fmt.HEADER_FILE)) as f:
      provenance = json.load(f)["provenance"]
    join_datasets(out, headers, provenance)
  for path in parts:
    failures = os.path.join(path, FAILURES_FILE)
    if os.path.isfile(failures):
      with (
        open(failures) as src,
        open(os.path.join(out, FAILURES_FILE), "a") as dst,
      ):
        dst.write(src.read())
  shutil.rmtree(os.path.join(out, PARTS_DIR))
  total = {"parts": num}
  for key in ("samples_written", "samples_failed", "positions_written"):
    total[key] = sum(s.get(key, 0) for s in summaries)
  total["seconds"] = max(s.get("seconds", 0) for s in summaries)
  return total
