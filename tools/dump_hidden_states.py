r"""Dumps paired, token-aligned last-layer hidden states of two models.

For every sample (question + each model's media) the TARGET generates
greedily; then the DRAFTER is run over its own prompt plus the target's
tokens (`--pairing teacher_forced`, the default), so for each generated
position t both stored states predict token t from the same token context
(REFERENCE_NOTES D3 fix). Stored per sample:

  source         [L, Ds]  drafter states h_d[t] (final, post-norm)
  target         [L, Dt]  target states h_t[t]
  target_tokens  [L]      the target's greedy tokens (EOS included)
  draft_tokens   [L]      the drafter's own argmax at each position

`--pairing free_running` reproduces the reference: both models generate on
their own and the states are paired by step index, truncated to the shorter
(draft_tokens are then the drafter's own generated tokens).

Only the last layer's post-norm state at the needed positions is kept;
generation and forward passes are batched over left-padded prompts. The
output is an egpt_align dataset (egpt_align.data.DatasetWriter), resumable:
restart the same command and finished samples are skipped. Failing samples
are reported (stderr and OUT/failures.jsonl) with id and reason.

Exit status: 0 all done; 1 some samples failed (see OUT/failures.jsonl;
rerun to retry them); 130 interrupted (finished samples are kept; rerun to
resume); 2 bad arguments, samples file, model spec or output directory.

Example (Video-LLaVA target, an EventGPT plugin as drafter, on a GPU):

  python tools/dump_hidden_states.py \
    --target video_llava:LanguageBind/Video-LLaVA-7B-hf \
    --draft my_eventgpt_plugin:make_backend:/ckpt/EventGPT-7b \
    --samples samples.jsonl --out data/train --batch_size 16
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence

import torch
import tqdm

from egpt_align.data.format import write_json_atomic
from tools.lib import backends as bk
from tools.lib import dump_parts, generation, media

SAMPLES_HELP = """\
samples file (JSONL), one object per line:
  {"id": "scene1_q0", "question": "What is in the scene?",
   "media": {"target": {"video": "mp4/scene1.mp4"},
             "draft": {"image": "event_image/scene1.png"}}}
'id' (unique str) and 'question' (str) are required. media.target /
media.draft are handed to that model's backend: video_llava reads
{"video": FILE_OR_DIR} or {"frames": [image paths]}; causal_lm reads
nothing; a plugin reads the keys it documents. Relative paths are resolved
against --media_root (default: the samples file's directory).
"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class Dumper:
  """Runs the dump loop: batching, failures, progress and the summary."""

  def __init__(
    self,
    target: bk.Backend,
    draft: bk.Backend,
    writer,
    *,
    pairing: str = "teacher_forced",
    max_new_tokens: int = 50,
    batch_size: int = 8,
    failures_path: str | None = None,
    progress: bool = True,
  ):
    self.target, self.draft, self.writer = target, draft, writer
    self.pairing = pairing
    self.max_new_tokens = int(max_new_tokens)
    self.batch_size = int(batch_size)
    self.failures_path = failures_path
    self.progress = progress
    self.written = 0
    self.positions = 0
    self.failed: list[dict] = []

  def fail(self, sample: dict, stage: str, reason: str) -> None:
    """Reports a failed sample on stderr and in failures.jsonl."""
    rec = {"id": sample["id"], "stage": stage, "reason": reason}
    rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    self.failed.append(rec)
    msg = f"FAILED sample {sample['id']!r} ({stage}): {reason}"
    tqdm.tqdm.write(msg, file=sys.stderr)
    if self.failures_path:
      with open(self.failures_path, "a") as f:
        f.write(json.dumps(rec) + "\n")

  def _prepare(self, sample: dict):
    try:
      t_in = self.target.prompt_inputs(media.role_view(sample, "target"))
    except Exception as e:  # noqa: BLE001 - reported, never dropped
      self.fail(sample, "target inputs", f"{type(e).__name__}: {e}")
      return None
    try:
      d_in = self.draft.prompt_inputs(media.role_view(sample, "draft"))
    except Exception as e:  # noqa: BLE001
      self.fail(sample, "draft inputs", f"{type(e).__name__}: {e}")
      return None
    return sample, t_in, d_in

  def _run(self, items):
    kw = {"pairing": self.pairing, "max_new_tokens": self.max_new_tokens}
    try:
      return generation.run_batch(self.target, self.draft, items, **kw)
    except Exception as e:  # noqa: BLE001
      if len(items) == 1:
        return [(items[0][0], f"{type(e).__name__}: {e}")]
    # Retry one by one so that only the culprit fails.
    out = []
    for item in items:
      try:
        out += generation.run_batch(self.target, self.draft, [item], **kw)
      except Exception as e:  # noqa: BLE001
        out.append((item[0], f"{type(e).__name__}: {e}"))
    return out

  def process(self, batch: Sequence[dict]) -> None:
    """Processes and writes one batch of samples."""
    items = [p for p in map(self._prepare, batch) if p is not None]
    if not items:
      return
    for sample, rec in self._run(items):
      if isinstance(rec, str):
        self.fail(sample, "model", rec)
        continue
      try:
        self.writer.append(
          rec["source"],
          rec["target"],
          target_tokens=rec["target_tokens"],
          draft_tokens=rec["draft_tokens"],
          meta=rec["meta"],
        )
      except ValueError as e:
        self.fail(sample, "write", str(e))
        continue
      self.written += 1
      self.positions += len(rec["target_tokens"])

  def run(self, samples: Sequence[dict], done_elsewhere=()) -> None:
    """Processes every sample not yet in the dataset (nor in
    `done_elsewhere`: ids a joined dataset holds already)."""
    done = set(self.writer.done_ids) | set(done_elsewhere)
    todo = [s for s in samples if s["id"] not in done]
    self.skipped = len(samples) - len(todo)
    bar = tqdm.tqdm(
      total=len(todo), unit="sample", disable=not self.progress, smoothing=0.1
    )
    with bar:
      for k in range(0, len(todo), self.batch_size):
        batch = todo[k : k + self.batch_size]
        self.process(batch)
        bar.update(len(batch))
        bar.set_postfix(failed=len(self.failed), pos=self.positions)


def _positive(x: str) -> int:
  v = int(x)
  if v < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
  return v


def build_parser() -> argparse.ArgumentParser:
  """The command-line interface."""
  p = argparse.ArgumentParser(
    prog="dump_hidden_states.py",
    description=__doc__,
    epilog=SAMPLES_HELP + "\nmodel SPEC: causal_lm:PATH_OR_ID | "
    "video_llava:PATH_OR_ID | module.path:factory[:ARG] (a plugin, see "
    "docs/PLUGINS.md)",
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--target", required=True, metavar="SPEC", help="target model")
  p.add_argument("--draft", required=True, metavar="SPEC", help="drafter model")
  p.add_argument("--samples", required=True, help="samples JSONL (see below)")
  p.add_argument("--out", required=True, help="output dataset directory")
  p.add_argument(
    "--pairing",
    default="teacher_forced",
    choices=("teacher_forced", "free_running"),
    help="teacher_forced (default): drafter fed the target's tokens; "
    "free_running: the reference's step-index pairing",
  )
  p.add_argument(
    "--max_new_tokens",
    type=_positive,
    default=50,
    help="greedy steps of the target (default 50, as the reference)",
  )
  p.add_argument(
    "--batch_size", type=_positive, default=8, help="samples per batch"
  )
  p.add_argument(
    "--dtype",
    default=None,
    choices=sorted(bk.DTYPES),
    help="model compute dtype (default: bfloat16 on GPU, float32 on CPU)",
  )
  p.add_argument(
    "--store_dtype",
    default="bfloat16",
    choices=("bfloat16", "float16", "float32"),
    help="dtype of the stored states (default bfloat16)",
  )
  p.add_argument("--device", default=None, help="default: cuda if available")
  p.add_argument(
    "--samples_per_shard",
    type=_positive,
    default=1024,
    help="samples per dataset shard (a crash loses at most one shard; an "
    "interrupt loses none)",
  )
  p.add_argument("--max_samples", type=int, default=-1, help="-1: all")
  p.add_argument(
    "--media_root", default=None, help="base of relative media paths"
  )
  p.add_argument(
    "--num_frames", type=_positive, default=None, help="video_llava frames (8)"
  )
  p.add_argument("--target_prompt", default=None, help="target template")
  p.add_argument("--draft_prompt", default=None, help="drafter template")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  p.add_argument(
    "--processes",
    type=_positive,
    default=None,
    help="dump with N processes, one per GPU (pinned with "
    "CUDA_VISIBLE_DEVICES; on a CPU they share it): starts the N parts "
    "(--num_shards N --shard I), then joins them into --out, which reads "
    "as a single-process dump (tools/lib/dump_parts.py)",
  )
  p.add_argument(
    "--num_shards",
    type=_positive,
    default=1,
    help="split the samples into N parts of whole batches (not the "
    "dataset's shards); this process dumps part --shard into "
    "OUT/parts/part-I-of-N, resumably",
  )
  p.add_argument(
    "--shard", type=int, default=0, help="which part, 0 <= I < --num_shards"
  )
  p.add_argument(
    "--join",
    action="store_true",
    help="with --num_shards N: join the N finished parts into --out and exit",
  )
  return p


def _options(spec: str, template: str | None, num_frames: int | None) -> dict:
  opts = {}
  if template is not None:
    opts["prompt_template"] = template.replace("\\n", "\n")
  if num_frames is not None and spec.startswith("video_llava:"):
    opts["num_frames"] = num_frames
  return opts


RESUME_KEYS = (
  ("pairing",),
  ("max_new_tokens",),
  ("source", "weights_fingerprint"),
  ("target", "weights_fingerprint"),
  ("source", "model_id"),
  ("source", "prompt_template"),
  ("target", "model_id"),
  ("target", "prompt_template"),
  ("target", "frame_policy"),
)


def weights_fingerprint(backend: bk.Backend) -> str | None:
  """What a model is, not where it was loaded from: a hash of its config
  (without the path it came from) and of each parameter's name, shape,
  dtype, sum and sum of squares (computed where the weights live)."""
  import hashlib

  model = getattr(backend, "model", None)
  if not isinstance(model, torch.nn.Module):
    return None
  h = hashlib.sha256()
  config = getattr(model, "config", None)
  if config is not None and hasattr(config, "to_dict"):
    cfg = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
  with torch.no_grad():
    for name, p in model.state_dict().items():
      x = p.detach().double()
      stats = torch.stack([x.sum(), (x * x).sum()]).cpu().tolist()
      h.update(f"{name}{tuple(p.shape)}{p.dtype}{stats}".encode())
  return h.hexdigest()[:16]


def _same_model(old: dict, new: dict, role: str) -> bool:
  """Both provenances fingerprint ROLE's weights and the prints agree."""
  a = (old.get(role) or {}).get("weights_fingerprint")
  return a is not None and a == (new.get(role) or {}).get("weights_fingerprint")


def check_resume(out: str, provenance: dict) -> None:
  """Refuses to append to a dataset that a different setup produced.

  A model moved to another directory is the same model: when both runs
  fingerprinted its weights, the fingerprints decide, not `model_id`."""
  path = os.path.join(out, "header.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f).get("provenance", {})
  for keys in RESUME_KEYS:
    if keys[-1] == "model_id" and _same_model(old, provenance, keys[0]):
      continue
    a, b = old, provenance
    for k in keys:
      a = a.get(k) if isinstance(a, dict) else None
      b = b.get(k) if isinstance(b, dict) else None
    if a is not None and a != b:
      raise ValueError(
        f"{path}: cannot resume, the dataset was made with "
        f"{'.'.join(keys)}={a!r} but this run has {b!r}; use another --out"
      )


def launch(args, argv: Sequence[str]) -> int:
  """--processes N: runs the N parts as children (one per GPU), then joins
  them into --out (tools/lib/dump_parts.py)."""
  num = args.processes
  device = args.device or ""
  if args.num_shards != 1 or args.join or device.startswith("cuda:"):
    print(
      "error: --processes starts the parts itself: give no --num_shards, "
      "--shard, --join or --device cuda:K with it",
      file=sys.stderr,
    )
    return EXIT_USAGE
  gpus = None
  if not device.startswith("cpu") and torch.cuda.is_available():
    gpus = dump_parts.visible_gpus(torch.cuda.device_count())
    if len(gpus) < num:
      print(
        f"error: --processes {num}: only {len(gpus)} GPU(s) visible "
        f"({gpus}); one process per GPU",
        file=sys.stderr,
      )
      return EXIT_USAGE
  where = "one per GPU " + ",".join(gpus[:num]) if gpus else "on the CPU"
  print(f"dumping with {num} processes, {where}", file=sys.stderr)
  sigs = [signal.SIGTERM] + (
    [signal.SIGHUP] if hasattr(signal, "SIGHUP") else []
  )
  old = {s: signal.signal(s, _raise_interrupt) for s in sigs}
  try:
    codes = dump_parts.launch(argv, args.out, num, gpus and gpus[:num])
  except KeyboardInterrupt:
    codes = [EXIT_INTERRUPTED]
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  for i, code in enumerate(codes):
    if code not in (EXIT_OK, EXIT_FAILED):
      print(
        f"part {i} of {num} exited with status {code}:\n"
        + dump_parts.log_tail(args.out, i, num),
        file=sys.stderr,
      )
  if EXIT_INTERRUPTED in codes:
    print("interrupted: rerun the same command to resume", file=sys.stderr)
    return EXIT_INTERRUPTED
  if any(c not in (EXIT_OK, EXIT_FAILED) for c in codes):
    return EXIT_USAGE
  return join(args, num)


def join(args, num: int | None = None) -> int:
  """Joins the finished parts into --out (--join, or after `launch`)."""
  num = num or args.num_shards
  if num < 2:
    print("error: --join needs --num_shards N >= 2", file=sys.stderr)
    return EXIT_USAGE
  try:
    total = dump_parts.join(args.out, num)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  print("summary: " + json.dumps({"out": args.out, **total}), file=sys.stderr)
  if total["samples_failed"]:
    print(
      f"{total['samples_failed']} sample(s) failed, see "
      f"{os.path.join(args.out, dump_parts.FAILURES_FILE)}; rerun to retry "
      "them",
      file=sys.stderr,
    )
    return EXIT_FAILED
  return EXIT_OK


def _raise_interrupt(signum, frame):
  raise KeyboardInterrupt(f"signal {signum}")


def _load_models(args, device: str, dtype: str):
  """(target, draft) backends as the flags give them."""
  print(f"loading target {args.target} ({device}, {dtype})", file=sys.stderr)
  target = bk.load_backend(
    args.target,
    device=device,
    dtype=dtype,
    **_options(args.target, args.target_prompt, args.num_frames),
  )
  print(f"loading draft {args.draft}", file=sys.stderr)
  draft = bk.load_backend(
    args.draft,
    device=device,
    dtype=dtype,
    **_options(args.draft, args.draft_prompt, args.num_frames),
  )
  return target, draft


def _provenance(args, target, draft) -> dict:
  """The dataset header's provenance (a resume must match it)."""
  return {
    "tool": "tools/dump_hidden_states.py",
    "pairing": args.pairing,
    "max_new_tokens": args.max_new_tokens,
    "samples_file": os.path.abspath(args.samples),
    "source": {
      **draft.provenance(),
      "weights_fingerprint": weights_fingerprint(draft),
    },
    "target": {
      **target.provenance(),
      "weights_fingerprint": weights_fingerprint(target),
    },
    "states": "last layer, post final norm, at the positions predicting "
    "each generated token",
  }


def _run_to_end(dumper, writer, samples, joined) -> bool:
  """Dumps `samples`, SIGTERM / SIGHUP turned into an interrupt for the
  time; whether it was interrupted (finished samples are kept)."""
  sigs = [signal.SIGTERM] + (
    [signal.SIGHUP] if hasattr(signal, "SIGHUP") else []
  )
  old = {s: signal.signal(s, _raise_interrupt) for s in sigs}
  interrupted = False
  try:
    with writer:  # closing flushes every finished sample, also on interrupt
      dumper.run(samples, joined)
  except KeyboardInterrupt:
    interrupted = True
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  return interrupted


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point; returns the process exit status."""
  # Without gradients, and without leaving the caller's grad mode changed.
  with torch.no_grad():
    return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser().parse_args(argv)
  try:
    from egpt_align.data import DatasetWriter
  except ImportError:  # the package may not re-export it
    from egpt_align.data.writer import DatasetWriter

  if args.processes is not None and args.processes > 1:
    return launch(args, argv)
  if args.join:
    return join(args)
  try:
    samples = media.read_samples(args.samples, args.media_root)
    if args.max_samples >= 0:
      samples = samples[: args.max_samples]
    samples = dump_parts.part_samples(
      samples, args.num_shards, args.shard, args.batch_size
    )
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  out, joined = args.out, set()
  if args.num_shards > 1:
    out = dump_parts.part_dir(args.out, args.shard, args.num_shards)
  device = str(bk.torch_device(args.device))
  dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
  try:
    target, draft = _load_models(args, device, dtype)
  except (ValueError, OSError) as e:
    print(f"error: cannot load a model: {e}", file=sys.stderr)
    return EXIT_USAGE
  provenance = _provenance(args, target, draft)
  try:
    check_resume(args.out, provenance)
    if out != args.out:
      check_resume(out, provenance)
      joined = dump_parts.dataset_ids(args.out)
    writer = DatasetWriter(
      out,
      source_dim=draft.hidden_size,
      target_dim=target.hidden_size,
      dtype=args.store_dtype,
      samples_per_shard=args.samples_per_shard,
      provenance=provenance,
      resume=True,
    )
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  dumper = Dumper(
    target,
    draft,
    writer,
    pairing=args.pairing,
    max_new_tokens=args.max_new_tokens,
    batch_size=args.batch_size,
    failures_path=os.path.join(out, dump_parts.FAILURES_FILE),
    progress=not args.no_progress,
  )
  start = time.perf_counter()
  interrupted = _run_to_end(dumper, writer, samples, joined)
  elapsed = time.perf_counter() - start
  summary = {
    "out": out,
    "pairing": args.pairing,
    "samples_written": dumper.written,
    "samples_already_done": getattr(dumper, "skipped", 0),
    "samples_failed": len(dumper.failed),
    "dataset_samples": writer.num_samples,
    "positions_written": dumper.positions,
    "mean_length": dumper.positions / max(dumper.written, 1),
    "seconds": round(elapsed, 3),
    "samples_per_s": dumper.written / max(elapsed, 1e-9),
    "interrupted": interrupted,
  }
  print("summary: " + json.dumps(summary), file=sys.stderr)
  if out != args.out:
    write_json_atomic(os.path.join(out, dump_parts.SUMMARY_FILE), summary)
  if interrupted:
    print(
      "interrupted: finished samples are kept; rerun the same command to "
      "resume",
      file=sys.stderr,
    )
    return EXIT_INTERRUPTED
  if dumper.failed:
    print(
      f"{len(dumper.failed)} sample(s) failed, see "
      f"{os.path.join(out, dump_parts.FAILURES_FILE)}; rerun to retry them",
      file=sys.stderr,
    )
    return EXIT_FAILED
  return EXIT_OK


if __name__ == "__main__":
  from egpt_align import cli

  sys.exit(cli.run(main))
