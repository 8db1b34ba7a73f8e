r"""The study on the scenes pair, in stages that resume from their outputs.

  python -m tools.scenes.reproduce --out DIR [--pair PAIR] [--stages A]
      [--unpack DIR] [--pack DIR] [--redo STAGE,...] [budget flags]

Stages (in order; each records itself in DIR/study.json when done and is
skipped on the next run, so a run cut off by a time limit resumes):
  pair      make the pair in DIR/pair (tools.scenes.make_pair; skipped with
            --pair, an existing pair directory)
  dump      write train/val/test scenes (tools.scenes.samples) and dump their
            teacher-forced hidden states (tools/dump_hidden_states.py)
  lm_head   the target's LM head (tools/extract_lm_head.py)
  train     train l1 l2 l3 l4 l5 b1 l5f with experiments/*.py, the same
            epochs and batch for all, at the pair's hidden size; then
            l5_next b1_next l5f_next: the same recipes with the loss
            objective 'next' (the fix of the reference's dual objective)
  evaluate  each on the test split with the LM head (egpt_align.evaluate:
            baselines, 95% CIs, `next` primary for l5/b1/l5f) and the
            target's own next-token entropy and top-1 probability there
  export    each to torch (tools/export_to_torch.py)
  bench1    live benchmark of every method on the test scenes, drafter on the
            target's GPU (tools/benchmark_sd.py)
  bench2    the same with the drafter on a second GPU (--draft_device2)
  results   RESULTS.md + plots + results.json (tools.scenes.results) in
            DIR/report (RESULTS.md, results/results.json, results/*.png)
Groups: A = pair..bench1 + results (one GPU); B = bench1, bench2, results
(two GPUs, from the unpacked outputs of A: pass --redo bench1 to measure the
one-GPU case on the same machine); all = every stage.

--pack DIR writes the small outputs (study.json, LM head, exports (float16
weights unless --pack_dtype float32), eval and benchmark JSON/reports,
results, and the pair when it lives in DIR/pair) as a tar stream cut into
parts <= --part_mib MiB (DIR/study.tar.partNN);
--unpack DIR restores them into --out before the stages run. Datasets and
training runs stay behind (they are large and no later stage needs them).

On the device (the machine forgets everything between calls; a call's
files back are few and small), with the pair carried in PAIR:
  one GPU:  timeout -s INT 580 python -m tools.scenes.reproduce --out /tmp/s \
              --pair PAIR --stages A --pack $OUT
  two GPUs: timeout -s INT 580 python -m tools.scenes.reproduce --out /tmp/s \
              --pair PAIR --unpack PARTS --stages B --redo bench1 --pack $OUT
  here:     python -m tools.scenes.reproduce --out DIR --pair PAIR \
              --unpack PARTS --stages results
            python -m tools.scenes.results --study DIR --pair PAIR --out docs
(SIGINT from `timeout` still packs what finished; a benchmark stage that
--time_limit_s leaves no room for is skipped with a message, and the next
call with the same flags resumes there.)

JAX runs in this process (train, evaluate, export) with preallocation off, so
the torch stages (subprocesses) share the GPU. The budget flags' defaults are
sized for the pair's gpu preset on one H100: with the pair given, stage A
took two calls (dump..export 488 s, then bench1 228 s) before the three
*_next adapters were added (about 40 s of training each); the CPU test runs
the tiny preset with a few samples.
"""

from __future__ import annotations

import os

# JAX allocates GPU memory on demand: the benchmark subprocesses share it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import glob
import importlib.util
import io
import json
import platform
import subprocess
import sys
import tarfile
import time

import numpy as np

from tools.scenes import layout
from tools.scenes.layout import (  # noqa: F401 (re-exported for callers)
  ADAPTERS,
  BENCH_DIRS,
  DECODE_ADAPTERS,
  METHODS,
  PREFILL_ADAPTERS,
  STUDY_FILE,
  now,
)

STAGES = (
  "pair",
  "dump",
  "lm_head",
  "train",
  "evaluate",
  "export",
  "bench1",
  "bench2",
  "results",
)
GROUPS = {
  "A": STAGES[:7] + ("results",),
  "B": ("bench1", "bench2", "results"),
  "all": STAGES,
}
SPLITS = ("train", "val", "test")
MIN_BENCH_S = 90  # a benchmark stage starts only with this much time left
# The settings each stage's outputs depend on: a finished stage run with
# other values is refused (use another --out or --redo it).
STAGE_SETTINGS = {
  "pair": ("preset", "seed", "set"),
  "dump": ("train_scenes", "val_scenes", "test_scenes", "dump_max_new_tokens"),
  "train": ("epochs", "batch_size"),
  "evaluate": ("bootstrap",),
  "bench1": ("bench_scenes", "gamma", "bench_max_new_tokens", "runtimes"),
  "bench2": ("bench_scenes", "gamma", "bench_max_new_tokens", "runtimes"),
}


class StudyError(Exception):
  """A bad input or a failed stage: one line, exit status 2."""


# --------------------------------------------------------------------------
# State.


class Study:
  """DIR/study.json: settings, the pair, and what each stage produced."""

  def __init__(self, out: str, args: argparse.Namespace):
    self.out = os.path.abspath(out)
    self.args = args
    self.path = os.path.join(self.out, STUDY_FILE)
    self.state = {"stages": {}, "created": now()}
    if os.path.isfile(self.path):
      with open(self.path) as f:
        self.state = json.load(f)

  def p(self, *parts) -> str:
    return os.path.join(self.out, *parts)

  def done(self, stage: str) -> bool:
    return bool(self.state["stages"].get(stage, {}).get("done"))

  def settings(self, stage: str) -> dict:
    return {k: getattr(self.args, k) for k in STAGE_SETTINGS.get(stage, ())}

  def check(self, stage: str) -> None:
    """Refuses a finished stage whose settings differ from this run's."""
    rec = self.state["stages"].get(stage, {})
    if not rec.get("done"):
      return
    for k, v in self.settings(stage).items():
      old = rec.get("settings", {}).get(k)
      if old != v:
        raise StudyError(
          f"{self.path}: stage {stage} was run with --{k} {old!r}, this run "
          f"has {v!r}; use another --out or --redo {stage}"
        )

  def record(self, stage: str, seconds: float, **info) -> None:
    self.state["stages"][stage] = {
      "done": True,
      "seconds": round(seconds, 1),
      "finished": now(),
      "settings": self.settings(stage),
      **info,
    }
    self.save()

  def forget(self, stage: str) -> None:
    self.state["stages"].pop(stage, None)
    self.save()

  def save(self) -> None:
    os.makedirs(self.out, exist_ok=True)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.state, f, indent=1)
    os.replace(tmp, self.path)

  # The pair.

  @property
  def pair(self) -> str:
    """The pair directory: --pair, else DIR/pair."""
    if self.args.pair:
      return os.path.abspath(self.args.pair)
    return self.p("pair")

  def pair_info(self) -> dict:
    path = os.path.join(self.pair, "pair.json")
    if not os.path.isfile(path):
      raise StudyError(
        f"{path}: missing; run the pair stage or pass --pair PAIR (a "
        "directory written by python -m tools.scenes.make_pair)"
      )
    with open(path) as f:
      info = json.load(f)
    if not info.get("complete"):
      raise StudyError(f"{path}: an unfinished pair (complete is false)")
    return info

  def preset(self) -> dict:
    return self.pair_info()["fingerprint"]["preset"]

  def target_spec(self) -> str:
    return f"video_llava:{os.path.join(self.pair, 'target')}"

  def draft_spec(self) -> str:
    return f"tools.scenes.drafter:make_backend:{self.pair}"


def _run(cmd: list[str], what: str, ok=(0,)) -> int:
  """Runs a tool as a subprocess (output streamed); StudyError on failure."""
  print("+ " + " ".join(cmd), flush=True)
  rc = subprocess.run(cmd, check=False).returncode
  if rc not in ok:
    raise StudyError(f"{what} failed (exit status {rc}): {' '.join(cmd)}")
  return rc


def _torch_device_args(args) -> list[str]:
  return ["--device", args.device] if args.device else []


# --------------------------------------------------------------------------
# Stages.


def stage_pair(study: Study) -> dict:
  if study.args.pair:
    info = study.pair_info()
    return {
      "pair": study.pair,
      "made_here": False,
      "preset": info["fingerprint"]["preset"]["name"],
    }
  cmd = [
    sys.executable,
    "-m",
    "tools.scenes.make_pair",
    "--out",
    study.pair,
    "--preset",
    study.args.preset,
    "--seed",
    str(study.args.seed),
  ] + _torch_device_args(study.args)
  for a in study.args.set or ():
    cmd += ["--set", a]
  _run(cmd, "make_pair")
  info = study.pair_info()
  return {
    "pair": "pair",
    "made_here": True,
    "preset": study.args.preset,
    "pair_results": info.get("results"),
  }


def split_scenes(args) -> dict[str, int]:
  return {
    "train": args.train_scenes,
    "val": args.val_scenes,
    "test": args.test_scenes,
  }


def ensure_samples(study: Study, split: str) -> str:
  """DIR/samples/SPLIT/samples.jsonl, written once (deterministic)."""
  from tools.scenes import samples as samples_lib

  out = study.p("samples", split)
  path = os.path.join(out, "samples.jsonl")
  marker = os.path.join(out, "scenes.json")
  num = split_scenes(study.args)[split]
  if os.path.isfile(marker):
    with open(marker) as f:
      if json.load(f).get("num") == num and os.path.isfile(path):
        return path
  samples_lib.write_samples(out, split, num)
  with open(marker, "w") as f:
    json.dump({"split": split, "num": num}, f)
  return path


def stage_dump(study: Study) -> dict:
  args = study.args
  preset = study.preset()
  max_new = args.dump_max_new_tokens or preset["max_new_tokens"]
  info = {"max_new_tokens": max_new, "splits": {}}
  for split in SPLITS:
    samples = ensure_samples(study, split)
    out = study.p("data", split)
    cmd = [
      sys.executable,
      "-m",
      "tools.dump_hidden_states",
      "--target",
      study.target_spec(),
      "--draft",
      study.draft_spec(),
      "--samples",
      samples,
      "--out",
      out,
      "--max_new_tokens",
      str(max_new),
      "--batch_size",
      str(args.dump_batch_size),
    ] + _torch_device_args(args)
    if args.dtype:
      cmd += ["--dtype", args.dtype]
    # Exit status 1: some samples failed; nothing is skipped silently.
    _run(
      cmd,
      f"dump of the {split} split (failed samples, if any, are listed in "
      f"{os.path.join(out, 'failures.jsonl')}; rerun to retry them)",
    )
    with open(os.path.join(out, "header.json")) as f:
      header = json.load(f)
    info["splits"][split] = {
      "scenes": split_scenes(args)[split],
      "samples": header.get("num_samples"),
      "source_dim": header.get("source_dim"),
      "target_dim": header.get("target_dim"),
    }
  return info


def stage_lm_head(study: Study) -> dict:
  cmd = [
    sys.executable,
    "-m",
    "tools.extract_lm_head",
    "--model",
    os.path.join(study.pair, "target"),
    "--out",
    study.p("lm_head"),
  ]
  _run(cmd, "extract_lm_head")
  with open(study.p("lm_head.json")) as f:
    return {"lm_head": json.load(f)}


def experiment_config(name: str):
  """experiments/NAME.py's get_config() (the file the trainer CLI loads)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
  path = os.path.join(root, "experiments", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"experiment_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def train_config(study: Study, name: str):
  """The experiment's recipe with the study's data, epochs and batch (and,
  for the *_next adapters, the loss objective 'next')."""
  args = study.args
  config = experiment_config(layout.kind(name))
  if objective := layout.objective(name):
    config.loss.objective = objective
  config.data.train = study.p("data", "train")
  config.data.val = study.p("data", "val")
  config.lm_head = study.p("lm_head")
  config.num_epochs = args.epochs
  config.batch_size = args.batch_size
  config.model.hidden_dim = int(study.preset()["hidden"])
  config.seed = args.seed
  config.progress_bar = not args.no_progress
  return config


def stage_train(study: Study) -> dict:
  from egpt_align import train

  done = study.state["stages"].get("train_partial", {})
  for name in ADAPTERS:
    if name in done:
      print(f"train {name}: done earlier, kept")
      continue
    t0 = time.perf_counter()
    out = train.train_and_evaluate(
      train_config(study, name), study.p("runs", name)
    )
    best = out.get("best") or {}
    done[name] = {
      "seconds": round(time.perf_counter() - t0, 1),
      "epochs_run": out["epochs_run"],
      "best_epoch": out["best_epoch"],
      "best_val_loss": out["best_val_loss"],
      "steps": out["step"],
      "val_cos_best": best.get("cos_sim"),
      "val_accept_90_best": best.get("accept_90"),
    }
    study.state["stages"]["train_partial"] = done
    study.save()
    print(
      f"train {name}: {out['epochs_run']} epochs, best val loss "
      f"{out['best_val_loss']} (epoch {out['best_epoch']}) in "
      f"{done[name]['seconds']} s"
    )
  study.state["stages"].pop("train_partial", None)
  import jax

  dev = jax.devices()[0]
  return {
    "adapters": done,
    "device": f"{len(jax.devices())} x {getattr(dev, 'device_kind', dev)}",
  }


def ratio_ci(num, den, *, resamples: int, seed: int, level=0.95):
  """Percentile CI of sum(num) / sum(den), resampling samples."""
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  if resamples <= 0 or num.size == 0:
    return None
  rng = np.random.default_rng(seed)
  draws = rng.integers(0, num.size, size=(resamples, num.size))
  with np.errstate(invalid="ignore", divide="ignore"):
    vals = num[draws].sum(1) / den[draws].sum(1)
  vals = vals[np.isfinite(vals)]
  if not vals.size:
    return None
  q = 100 * (1 - level) / 2
  return [float(np.percentile(vals, q)), float(np.percentile(vals, 100 - q))]


def accept_cis(result, *, resamples: int, seed: int) -> dict:
  """95% CIs of Accept@every threshold, per prediction and reading.

  egpt_align.evaluate gives CIs for Accept@0.90 only; the per-position
  cosines it returns (flattened valid positions, sample-major) are split
  back into samples here and resampled the same way (by sample).
  """
  from egpt_align import metrics

  lengths = np.asarray(result.arrays["lengths"], np.int64)
  out = {}
  for key, flat in result.arrays.items():
    if not key.endswith("/cos"):
      continue
    pname, reading, _ = key.split("/")
    n = np.maximum(lengths - (reading == "next"), 0)
    parts = np.split(np.asarray(flat, np.float64), np.cumsum(n)[:-1])
    cis = {}
    for t in metrics.THRESHOLDS:
      hits = np.array([(p > t).sum() for p in parts], np.float64)
      cis[f"accept_{round(t * 100)}"] = ratio_ci(
        hits, n, resamples=resamples, seed=seed
      )
    out.setdefault(pname, {})[reading] = cis
  return out


def target_predictability(study: Study) -> dict:
  """The target's mean next-token entropy and top-1 probability on the
  test answers (its own states through its LM head, every position)."""
  from egpt_align import lm_head as lm_head_lib
  from egpt_align.data import open_dataset

  head = lm_head_lib.load_lm_head(study.p("lm_head"))
  w = np.asarray(head.weight, np.float32)
  ds = open_dataset(study.p("data", "test"))
  ent, top1, n = 0.0, 0.0, 0
  idx = np.arange(ds.num_samples)
  for lo in range(0, len(idx), 64):
    chunk = idx[lo : lo + 64]
    s_max = int(np.asarray(ds.lengths)[chunk].max())
    b = ds.read_batch(chunk, s_max, fields=["target"])
    h = np.asarray(b["target"], np.float32)[np.asarray(b["mask"], bool)]
    logits = h @ w.T
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    ent += float(-(p * np.log(np.maximum(p, 1e-30))).sum())
    top1 += float(p.max(-1).sum())
    n += h.shape[0]
  return {
    "positions": n,
    "mean_entropy_nats": ent / max(n, 1),
    "mean_top1_prob": top1 / max(n, 1),
  }


def stage_evaluate(study: Study) -> dict:
  from egpt_align import evaluate as ev
  from egpt_align import report

  info = {"adapters": {}}
  for name in ADAPTERS:
    out = study.p("eval", name)
    result = ev.evaluate(
      study.p("data", "test"),
      workdir=study.p("runs", name),
      lm_head=study.p("lm_head"),
      settings=ev.EvalSettings(
        bootstrap=study.args.bootstrap,
        progress=not study.args.no_progress,
      ),
    )
    report.write_outputs(result, out)
    extra = {
      "accept_ci": accept_cis(
        result, resamples=study.args.bootstrap, seed=study.args.seed
      )
    }
    with open(os.path.join(out, "accept_ci.json"), "w") as f:
      json.dump(extra, f, indent=1)
    m = result.metrics
    prim = m["primary_reading"]
    a = m["results"]["adapter"][prim]
    info["adapters"][name] = {
      "primary_reading": prim,
      "token_top1": a.get("token_top1"),
      "accept_90": a.get("accept_90"),
    }
  info["target"] = target_predictability(study)
  return info


def stage_export(study: Study) -> dict:
  import torch

  os.makedirs(study.p("exports"), exist_ok=True)
  files, params = {}, {}
  for name in ADAPTERS:
    path = study.p("exports", f"{name}.pt")
    _run(
      [
        sys.executable,
        "-m",
        "tools.export_to_torch",
        "--workdir",
        study.p("runs", name),
        "--out",
        path,
        "--format",
        "pt",
      ],
      f"export {name}",
    )
    files[name] = os.path.relpath(path, study.out)
    state = torch.load(path, map_location="cpu", weights_only=True)
    params[name] = int(
      sum(v.numel() for v in state["model_state_dict"].values())
    )
  return {"files": files, "params": params}


def bench_command(study: Study, stage: str) -> list[str]:
  args = study.args
  preset = study.preset()
  n = args.bench_scenes * 4
  max_new = args.bench_max_new_tokens or preset["max_new_tokens"]
  draft_device = args.draft_device1 if stage == "bench1" else args.draft_device2
  cmd = [
    sys.executable,
    "-m",
    "tools.benchmark_sd",
    "--target",
    study.target_spec(),
    "--draft",
    study.draft_spec(),
    "--samples",
    ensure_samples(study, "test"),
    "--methods",
    ",".join(METHODS),
    "--gamma",
    str(args.gamma),
    "--max_new_tokens",
    str(max_new),
    "--warmup",
    str(args.warmup),
    "--num_samples",
    str(n),
    "--out",
    study.p("bench", BENCH_DIRS[stage]),
    "--seed",
    str(args.seed),
  ]
  for name in ADAPTERS:
    cmd += ["--adapter", f"{name}={study.p('exports', name + '.pt')}"]
  cmd += _torch_device_args(args)
  if draft_device:
    cmd += ["--draft_device", draft_device]
  if args.dtype:
    cmd += ["--dtype", args.dtype]
  if args.runtimes:
    cmd += ["--runtimes", args.runtimes]
  if args.no_compile:
    cmd += ["--no_compile"]
  if args.bench_time_budget_s:
    cmd += ["--time_budget_s", str(args.bench_time_budget_s)]
  if args.no_progress:
    cmd += ["--no_progress"]
  return cmd


def stage_bench(study: Study, stage: str) -> dict:
  args = study.args
  if args.test_scenes * 4 < args.bench_scenes * 4 + args.warmup:
    raise StudyError(
      f"--bench_scenes {args.bench_scenes} x 4 questions + --warmup "
      f"{args.warmup} exceed the {args.test_scenes * 4} test samples "
      "(--test_scenes x 4)"
    )
  if stage == "bench2" and not args.draft_device2:
    import torch

    if torch.cuda.device_count() < 2:
      raise StudyError(
        f"stage bench2 needs 2 GPUs (this machine has "
        f"{torch.cuda.device_count()}) or an explicit --draft_device2"
      )
    args.draft_device2 = "cuda:1"
  if stage == "bench1" and not args.draft_device1:
    args.draft_device1 = args.device or ("cuda:0" if _has_cuda() else "cpu")
  for name in ADAPTERS:
    if not os.path.isfile(study.p("exports", f"{name}.pt")):
      raise StudyError(
        f"{study.p('exports', name + '.pt')}: missing; run the export stage "
        "(or --unpack the outputs of stage A)"
      )
  # Exit status 1: a method differs from greedy other than by a near-tie
  # flip. The run is kept and RESULTS.md reports it.
  rc = _run(bench_command(study, stage), f"benchmark ({stage})", ok=(0, 1))
  out = study.p("bench", BENCH_DIRS[stage])
  with open(os.path.join(out, "results.json")) as f:
    res = json.load(f)
  return {
    "dir": os.path.relpath(out, study.out),
    "lossless": rc == 0,
    "draft_device": res["config"].get("draft_device"),
    "device": res["environment"].get("device"),
    "num_measured": res.get("num_measured"),
    "mismatches": len(res.get("mismatches", [])),
  }


def _has_cuda() -> bool:
  try:
    import torch

    return torch.cuda.is_available()
  except ImportError:
    return False


def stage_results(study: Study) -> dict:
  from tools.scenes import results

  paths = results.write(study.out, study.p("report"), study.pair)
  return {"files": [os.path.relpath(p, study.out) for p in paths]}


RUNNERS = {
  "pair": stage_pair,
  "dump": stage_dump,
  "lm_head": stage_lm_head,
  "train": stage_train,
  "evaluate": stage_evaluate,
  "export": stage_export,
  "bench1": lambda s: stage_bench(s, "bench1"),
  "bench2": lambda s: stage_bench(s, "bench2"),
  "results": stage_results,
}


# --------------------------------------------------------------------------
# Pack and unpack.

PACK_PREFIX = "study.tar.part"


def pack_files(study: Study) -> list[str]:
  """The small outputs (relative to DIR) that later stages and docs need."""
  pats = [
    STUDY_FILE,
    "lm_head.npy",
    "lm_head.json",
    "exports/*",
    "eval/*/*.json",
    "eval/*/*.md",
    "bench/*/results.json",
    "bench/*/report.md",
    "report/*",
    "report/*/*",
    "data/*/header.json",
    "runs/*/*.json",  # config, history (not the checkpoints)
    "runs/*/*.jsonl",
  ]
  if not study.args.pair:
    pats.append("pair/**")
  files = set()
  for pat in pats:
    for path in glob.glob(study.p(pat), recursive=True):
      if os.path.isfile(path):
        files.add(os.path.relpath(path, study.out))
  return sorted(files)


def _is_export(rel: str) -> bool:
  return rel.startswith("exports" + os.sep) and rel.endswith(".pt")


def _half_export(path: str) -> bytes:
  """An exported adapter with its float weights stored as float16.

  The benchmark casts adapters to its --adapter_dtype (float16 on GPU by
  default) when it loads them, so on a GPU nothing changes; the file halves.
  """
  import torch

  ckpt = torch.load(path, map_location="cpu", weights_only=True)
  ckpt["model_state_dict"] = {
    k: v.half() if v.is_floating_point() else v
    for k, v in ckpt["model_state_dict"].items()
  }
  ckpt["egpt_align_packed_dtype"] = "float16"
  buf = io.BytesIO()
  torch.save(ckpt, buf)
  return buf.getvalue()


def pack(study: Study, dest: str, part_mib: float) -> list[str]:
  """Writes DEST/study.tar.partNN (each <= part_mib MiB)."""
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for rel in pack_files(study):
      if study.args.pack_dtype == "float16" and _is_export(rel):
        blob = _half_export(study.p(rel))
        info = tarfile.TarInfo(rel)
        info.size = len(blob)
        info.mtime = int(os.path.getmtime(study.p(rel)))
        tar.addfile(info, io.BytesIO(blob))
      else:
        tar.add(study.p(rel), arcname=rel)
  data = buf.getvalue()
  size = int(part_mib * 2**20)
  os.makedirs(dest, exist_ok=True)
  for old in glob.glob(os.path.join(dest, PACK_PREFIX + "*")):
    os.remove(old)
  paths = []
  for i, lo in enumerate(range(0, len(data), size)):
    path = os.path.join(dest, f"{PACK_PREFIX}{i:02d}")
    with open(path, "wb") as f:
      f.write(data[lo : lo + size])
    paths.append(path)
  print(
    f"packed {len(pack_files(study))} files, {len(data) / 2**20:.1f} MiB, "
    f"into {len(paths)} part(s) in {dest}"
  )
  return paths


def unpack(src: str, out: str) -> int:
  """Extracts SRC/study.tar.part* into OUT; returns the number of files."""
  parts = sorted(glob.glob(os.path.join(src, PACK_PREFIX + "*")))
  if not parts:
    raise StudyError(f"--unpack {src}: no {PACK_PREFIX}NN files there")
  data = b"".join(open(p, "rb").read() for p in parts)  # noqa: SIM115
  os.makedirs(out, exist_ok=True)
  try:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
      members = tar.getmembers()
      tar.extractall(out, filter="data")
  except tarfile.TarError as e:
    raise StudyError(
      f"--unpack {src}: the parts do not form a tar ({e}); are parts missing?"
    ) from e
  return len(members)


# --------------------------------------------------------------------------
# The command.


def parse_stages(value: str) -> list[str]:
  out = []
  for item in value.split(","):
    item = item.strip()
    if not item:
      continue
    names = GROUPS.get(item, (item,))
    for n in names:
      if n not in STAGES:
        raise StudyError(
          f"--stages: unknown stage {n!r}; expected stages {list(STAGES)} "
          f"or groups {list(GROUPS)}"
        )
      if n not in out:
        out.append(n)
  return sorted(out, key=STAGES.index)


def versions() -> dict:
  out = {"python": platform.python_version()}
  for mod in ("jax", "flax", "optax", "torch", "transformers", "numpy"):
    try:
      out[mod] = __import__(mod).__version__
    except ImportError:
      out[mod] = None
  try:
    out["git_commit"] = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"],
      capture_output=True,
      text=True,
      check=False,
    ).stdout.strip()
  except OSError:
    out["git_commit"] = None
  return out


def stage_table(study: Study, stage: str) -> str:
  """A short table of what the stage produced."""
  rec = study.state["stages"].get(stage, {})
  if stage == "train":
    lines = [f"{'adapter':8s} {'epochs':>6s} {'best val loss':>14s} {'s':>7s}"]
    for n, r in rec.get("adapters", {}).items():
      lines.append(
        f"{n:8s} {r['epochs_run']:6d} {_f(r['best_val_loss'], 4):>14s} "
        f"{r['seconds']:7.1f}"
      )
    return "\n".join(lines)
  if stage == "evaluate":
    lines = [f"{'adapter':8s} {'reading':>7s} {'top-1':>7s} {'Acc@.90':>8s}"]
    for n, r in rec.get("adapters", {}).items():
      lines.append(
        f"{n:8s} {r['primary_reading']:>7s} {_f(r['token_top1']):>7s} "
        f"{_f(r['accept_90']):>8s}"
      )
    t = rec.get("target", {})
    lines.append(
      f"target on the test answers: entropy "
      f"{_f(t.get('mean_entropy_nats'))} nats, top-1 p "
      f"{_f(t.get('mean_top1_prob'))}"
    )
    return "\n".join(lines)
  if stage == "dump":
    return "\n".join(
      f"{s:6s} {v['scenes']:5d} scenes {v['samples']:6d} samples"
      for s, v in rec.get("splits", {}).items()
    )
  if stage in BENCH_DIRS:
    from tools.scenes import results

    return results.bench_table(study.p(rec.get("dir", "")))
  return ", ".join(
    f"{k}={v}"
    for k, v in rec.items()
    if k not in ("settings", "done") and not isinstance(v, dict)
  )


def _f(x, nd=3) -> str:
  return "-" if x is None else f"{x:.{nd}f}"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m tools.scenes.reproduce",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--out", required=True, help="study directory")
  p.add_argument("--pair", default=None, help="use this pair directory")
  p.add_argument("--preset", default="gpu", help="pair preset (pair stage)")
  # make_pair.DEFAULT_SEED, not imported here (it would load torch).
  p.add_argument(
    "--seed", type=int, default=2, help="pair, adapters, CIs (default 2)"
  )
  p.add_argument(
    "--set",
    action="append",
    default=None,
    metavar="FIELD=VALUE",
    help="change one field of the preset (pair stage; make_pair --set)",
  )
  p.add_argument(
    "--stages", default="A", help=f"comma list of {STAGES} or {list(GROUPS)}"
  )
  p.add_argument(
    "--redo", default="", help="stages to rerun even if done (comma list)"
  )
  p.add_argument("--unpack", default=None, help="restore packed parts first")
  p.add_argument("--pack", default=None, help="write packed parts here")
  p.add_argument("--part_mib", type=float, default=15.0, help="part size")
  p.add_argument(
    "--pack_dtype",
    default="float16",
    choices=("float16", "float32"),
    help="exported adapters' weights in the pack (float16 halves them)",
  )
  b = p.add_argument_group("budget")
  b.add_argument("--train_scenes", type=int, default=800, help="x4 samples")
  b.add_argument("--val_scenes", type=int, default=50, help="x4 samples")
  b.add_argument("--test_scenes", type=int, default=100, help="x4 samples")
  b.add_argument(
    "--dump_max_new_tokens", type=int, default=None, help="default: preset"
  )
  b.add_argument("--dump_batch_size", type=int, default=64)
  b.add_argument("--epochs", type=int, default=10, help="every adapter")
  b.add_argument("--batch_size", type=int, default=64, help="every adapter")
  b.add_argument("--bootstrap", type=int, default=1000, help="CI resamples")
  b.add_argument(
    "--bench_scenes", type=int, default=8, help="test scenes benchmarked (x4)"
  )
  b.add_argument(
    "--bench_max_new_tokens", type=int, default=None, help="default: preset"
  )
  b.add_argument("--gamma", type=int, default=5, help="drafts per iteration")
  b.add_argument("--warmup", type=int, default=2, help="benchmark warm-up")
  b.add_argument(
    "--time_limit_s",
    type=float,
    default=540.0,
    help="wall budget of this invocation: a benchmark stage starts only "
    f"with {MIN_BENCH_S} s left and stops sampling in time (0 = none)",
  )
  b.add_argument(
    "--bench_time_budget_s",
    type=float,
    default=200.0,
    help="per benchmark run: start no new sample after this (0 = none)",
  )
  r = p.add_argument_group("runtime")
  r.add_argument("--device", default=None, help="torch device (cuda if any)")
  r.add_argument("--dtype", default=None, help="torch dtype (tools' default)")
  r.add_argument(
    "--runtimes",
    default="fast,eager",
    help="benchmark_sd --runtimes ('' = the benchmark's own default)",
  )
  r.add_argument("--no_compile", action="store_true", help="benchmark_sd")
  r.add_argument(
    "--draft_device1", default=None, help="bench1 drafter (default: --device)"
  )
  r.add_argument(
    "--draft_device2", default=None, help="bench2 drafter (default: cuda:1)"
  )
  r.add_argument("--no_progress", action="store_true")
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return run(args)
  except StudyError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def run(args) -> int:
  t_start = time.perf_counter()
  stages = parse_stages(args.stages)
  redo = parse_stages(args.redo) if args.redo else []
  if args.pair and not os.path.isdir(args.pair):
    raise StudyError(f"--pair {args.pair}: not a directory")
  if args.unpack:
    n = unpack(args.unpack, args.out)
    print(f"unpacked {n} files into {args.out}")
  study = Study(args.out, args)
  study.state.setdefault("runs", []).append(
    {"started": now(), "argv": sys.argv[1:], "versions": versions()}
  )
  study.save()
  for stage in redo:
    if study.done(stage):
      print(f"{stage}: --redo, forgetting the earlier run")
      study.forget(stage)
  if "pair" not in stages and set(stages) - {"results"}:
    study.pair_info()  # A clear error before any stage runs.
  timings = {}
  try:
    for stage in stages:
      if study.done(stage) and stage != "results":
        study.check(stage)
        print(f"== {stage}: done earlier, kept")
        continue
      if stage in BENCH_DIRS and args.time_limit_s:
        left = args.time_limit_s - (time.perf_counter() - t_start)
        if left < MIN_BENCH_S:
          print(
            f"== {stage}: not started, {left:.0f} s left of --time_limit_s "
            f"{args.time_limit_s:.0f} (needs {MIN_BENCH_S} s); rerun to "
            "resume"
          )
          continue
        # Leave time for the results and the pack after the last sample.
        budget = left - MIN_BENCH_S / 2
        if args.bench_time_budget_s:
          budget = min(budget, args.bench_time_budget_s)
        study.args.bench_time_budget_s = budget
      print(f"== {stage}", flush=True)
      t0 = time.perf_counter()
      info = RUNNERS[stage](study)
      timings[stage] = time.perf_counter() - t0
      study.record(stage, timings[stage], **info)
      print(f"-- {stage}: {timings[stage]:.1f} s")
      table = stage_table(study, stage)
      if table:
        print(table, flush=True)
  finally:
    # Also after a failed stage: what finished comes back with the parts.
    if args.pack:
      pack(study, args.pack, args.part_mib)
    print(
      "stage times (s): "
      + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
