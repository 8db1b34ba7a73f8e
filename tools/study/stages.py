"""The study's stages: each reads the study and returns what to record.

Torch tools run as subprocesses (their own process group, so a Ctrl-C
reaches only the study, which stops the tool and says what finished); JAX
work (train, evaluate, export) runs in this process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np

from tools.study import layout
from tools.study.pair import StudyError


def run_tool(cmd: list[str], what: str, ok=(0,)) -> int:
  """Runs a tool (output streamed); StudyError on a failed exit status.

  The tool gets its own session: a terminal's Ctrl-C goes to the study
  alone, which ends the tool with SIGTERM (the tools save what finished).
  """
  print("+ " + " ".join(cmd), flush=True)
  proc = subprocess.Popen(cmd, start_new_session=True)
  try:
    rc = proc.wait()
  except KeyboardInterrupt:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      proc.kill()
    raise
  if rc not in ok:
    raise StudyError(f"{what} failed (exit status {rc}): {' '.join(cmd)}")
  return rc


def _device_args(args) -> list[str]:
  return ["--device", args.device] if args.device else []


def max_new_tokens(study, flag: str) -> int:
  value = getattr(study.args, flag) or study.pair.max_new_tokens()
  if not value:
    raise StudyError(f"--{flag}: needed (the pair gives no default)")
  return int(value)


def stage_dump(study) -> dict:
  args = study.args
  max_new = max_new_tokens(study, "dump_max_new_tokens")
  info = {"max_new_tokens": max_new, "splits": {}}
  for split in layout.SPLITS:
    samples = study.pair.samples(study, split)
    out = study.p("data", split)
    cmd = [
      sys.executable,
      "-m",
      "tools.dump_hidden_states",
      "--target",
      study.pair.target_spec(),
      "--draft",
      study.pair.draft_spec(),
      "--samples",
      samples,
      "--out",
      out,
      "--max_new_tokens",
      str(max_new),
      "--batch_size",
      str(args.dump_batch_size),
    ] + _device_args(args)
    if args.dtype:
      cmd += ["--dtype", args.dtype]
    # Exit status 1: some samples failed; nothing is skipped silently.
    run_tool(
      cmd,
      f"dump of the {split} split (failed samples, if any, are listed in "
      f"{os.path.join(out, 'failures.jsonl')}; rerun to retry them)",
    )
    with open(os.path.join(out, "header.json")) as f:
      header = json.load(f)
    with open(samples) as f:
      groups = {json.loads(line).get("group") for line in f if line.strip()}
    info["splits"][split] = {
      "groups": None if groups == {None} else len(groups),
      "samples": header.get("num_samples"),
      "source_dim": header.get("source_dim"),
      "target_dim": header.get("target_dim"),
    }
  return info


def hidden_size(study) -> int:
  """The adapters' width: the target's (from the dump's header)."""
  dump = study.state["stages"].get("dump", {})
  dim = (dump.get("splits") or {}).get("train", {}).get("target_dim")
  if not dim:
    raise StudyError(f"{study.path}: no finished dump stage (target_dim)")
  return int(dim)


def stage_lm_head(study) -> dict:
  cmd = [
    sys.executable,
    "-m",
    "tools.extract_lm_head",
    *study.pair.lm_head_args(),
    "--out",
    study.p("lm_head"),
  ]
  run_tool(cmd, "extract_lm_head")
  with open(study.p("lm_head.json")) as f:
    return {"lm_head": json.load(f)}


def train_config(study, name: str, widths: dict | None = None):
  """The experiment's recipe with the study's data, epochs and batch (for
  the *_next adapters, the loss objective 'next'; for L1-L4, the widths of
  `widths['overrides']` when given)."""
  args = study.args
  config = layout.experiment_config(layout.recipe(name))
  if objective := layout.objective(name):
    config.loss.objective = objective
  for field, value in (
    ((widths or {}).get("overrides") or {}).get(name, {}).items()
  ):
    setattr(config.model, field, value)
  config.data.train = study.p("data", "train")
  config.data.val = study.p("data", "val")
  config.lm_head = study.p("lm_head")
  config.num_epochs = args.epochs
  config.batch_size = args.batch_size
  config.model.hidden_dim = hidden_size(study)
  config.seed = args.seed
  config.progress_bar = not args.no_progress
  return config


def prefill_widths(study) -> dict:
  """L1-L4's widths: on the seed's axis (tools/study/widths.py) unless
  --prefill_widths recipe, or when no widths fit (the reason recorded)."""
  from tools.study import widths

  hidden = hidden_size(study)
  if study.args.prefill_widths == "recipe":
    return {"axis": "recipe", "why_not": "--prefill_widths recipe"}
  try:
    return {"axis": "seed", **widths.solve(hidden), "why_not": None}
  except widths.WidthError as e:
    return {"axis": "recipe", "why_not": str(e)}


class _DropTrackedMetricWarning(logging.Filter):
  """Orbax warns when a checkpoint saved on an interrupt has no metrics
  (the best-checkpoint choice skips it, as it should)."""

  def filter(self, record):
    return "Requested tracked_metric" not in record.getMessage()


def stage_train(study) -> dict:
  """Trains the selected adapters not trained yet (a study that gains
  adapters keeps the ones it has)."""
  from egpt_align import train

  logging.getLogger("absl").addFilter(_DropTrackedMetricWarning())
  earlier = study.state["stages"].get("train", {})
  done = dict(earlier.get("adapters", {}))
  done.update(study.state["stages"].get("train_partial", {}))
  widths = earlier.get("prefill_widths") or prefill_widths(study)
  for name in study.adapters:
    if name in done:
      print(f"train {name}: done earlier, kept")
      continue
    t0 = time.perf_counter()
    config = train_config(study, name, widths)
    out = train.train_and_evaluate(config, study.p("runs", name))
    best = out.get("best") or {}
    done[name] = {
      "seconds": round(time.perf_counter() - t0, 1),
      "epochs_run": out["epochs_run"],
      "best_epoch": out["best_epoch"],
      "best_val_loss": out["best_val_loss"],
      "steps": out["step"],
      "val_cos_best": best.get("cos_sim"),
      "val_accept_90_best": best.get("accept_90"),
      "unroll_steps": int(config.loss.unroll_steps),
      "objective": config.loss.objective,
      "device": jax_device(),
    }
    study.state["stages"]["train_partial"] = done
    study.save()
    print(
      f"train {name}: {out['epochs_run']} epochs, best val loss "
      f"{out['best_val_loss']} (epoch {out['best_epoch']}) in "
      f"{done[name]['seconds']} s"
    )
  study.state["stages"].pop("train_partial", None)
  adapters = {n: done[n] for n in layout.ADAPTERS if n in done}
  return {
    "adapters": adapters,
    "prefill_widths": widths,
    "device": devices_text(adapters),
  }


def jax_device() -> str:
  """'1 x NVIDIA H100 80GB HBM3': the devices JAX runs on here."""
  import jax

  dev = jax.devices()[0]
  return f"{len(jax.devices())} x {getattr(dev, 'device_kind', dev)}"


def devices_text(adapters: dict) -> str:
  """Where the adapters trained: one device, or each with its adapters (a
  stage resumed on another machine); '?' for records without one."""
  by: dict[str, list[str]] = {}
  for name, rec in adapters.items():
    by.setdefault(rec.get("device") or "?", []).append(name)
  if len(by) == 1:
    return next(iter(by))
  return ", ".join(f"{d} ({', '.join(names)})" for d, names in by.items())


def ratio_ci(num, den, *, resamples: int, seed: int, groups=None):
  """95% percentile CI of sum(num) / sum(den), resampling samples, or whole
  groups when `groups` labels them (egpt_align.eval_stats.bootstrap_ci, the
  project's one bootstrap)."""
  from egpt_align import eval_stats

  num = np.asarray(num, np.float64)
  if resamples <= 0 or num.size == 0:
    return None
  key = "accept_90"  # any ratio of HEADLINE with a per-sample denominator
  a, b = eval_stats.HEADLINE[key]
  cis, _ = eval_stats.bootstrap_ci(
    {a: num, b: np.asarray(den, np.float64)},
    num_resamples=resamples,
    seed=seed,
    groups=groups,
  )
  return cis.get(key)


def accept_cis(result, *, resamples: int, seed: int) -> dict:
  """95% CIs of Accept@every threshold, per prediction and reading.

  egpt_align.evaluate gives CIs for Accept@0.90 only; the per-position
  cosines it returns (flattened valid positions, sample-major) are split
  back into samples here and resampled the same way (by sample, or by the
  samples' groups when evaluate found them).
  """
  from egpt_align import metrics

  lengths = np.asarray(result.arrays["lengths"], np.int64)
  groups = result.arrays.get("groups")
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
      cis[f"accept_{metrics.threshold_key(t)}"] = ratio_ci(
        hits, n, resamples=resamples, seed=seed, groups=groups
      )
    out.setdefault(pname, {})[reading] = cis
  return out


def target_predictability(study) -> dict:
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


def stage_evaluate(study) -> dict:
  from egpt_align import evaluate as ev
  from egpt_align import report

  earlier = study.state["stages"].get("evaluate", {})
  info = {"adapters": dict(earlier.get("adapters", {}))}
  for name in study.adapters:
    if name in info["adapters"]:
      print(f"evaluate {name}: done earlier, kept")
      continue
    out = study.p("eval", name)
    result = ev.evaluate(
      study.p("data", "test"),
      workdir=study.p("runs", name),
      lm_head=study.p("lm_head"),
      settings=ev.EvalSettings(
        bootstrap=study.args.bootstrap,
        # Acceptance at depth at the live gamma (decode adapters).
        gamma=study.args.gamma,
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
  info["adapters"] = {
    n: info["adapters"][n] for n in layout.ADAPTERS if n in info["adapters"]
  }
  info["target"] = earlier.get("target") or target_predictability(study)
  info["device"] = jax_device()
  return info


def stage_export(study) -> dict:
  """Every adapter to torch, in this process (one import of torch)."""
  import torch

  from egpt_align import checkpoint
  from tools.lib import bridge

  os.makedirs(study.p("exports"), exist_ok=True)
  trained = study.state["stages"].get("train", {}).get("adapters", {})
  earlier = study.state["stages"].get("export", {})
  files = dict(earlier.get("files", {}))
  params = dict(earlier.get("params", {}))
  for name in study.adapters:
    path = study.p("exports", f"{name}.pt")
    if name in files and os.path.isfile(path):
      continue
    tree, config = checkpoint.load_params(study.p("runs", name), "best")
    model_cfg = bridge.model_config_of(config)
    bridge.export(
      tree,
      model_cfg.pop("name"),
      model_cfg,
      path,
      fmt="pt",
      epoch=(trained.get(name) or {}).get("best_epoch") or 0,
    )
    print(f"export {name}: {path}")
    files[name] = os.path.relpath(path, study.out)
    state = torch.load(path, map_location="cpu", weights_only=True)
    params[name] = int(
      sum(v.numel() for v in state["model_state_dict"].values())
    )
  return {"files": files, "params": params}
