r"""The study of a pair, in stages that resume from their outputs.

  python -m tools.study --out DIR (--scenes PRESET|PAIR_DIR |
      --target SPEC --draft SPEC --samples TRAIN.jsonl,VAL.jsonl,TEST.jsonl
      --max_new_tokens N) [--stages A] [--redo STAGE,...]
      [--unpack PARTS] [--pack PARTS] [budget flags]

The pair: `--scenes PRESET` makes the scenes pair in DIR/pair
(tools/scenes/, `tiny` on a CPU, `gpu` on one GPU), `--scenes PAIR_DIR`
reuses one made by `python -m tools.scenes.make_pair`; or any two models as
backend specs (`video_llava:PATH`, `causal_lm:PATH`, `module:factory:ARG`,
docs/PLUGINS.md) with a samples file per split. Later runs on DIR may
leave the pair flags out: study.json remembers them.

Stages (in order; each records itself in DIR/study.json when done and is
skipped on the next run, so a run cut off by a time limit resumes):
  pair      make or check the pair
  dump      teacher-forced hidden states of each split
            (tools/dump_hidden_states.py)
  lm_head   the target's LM head (tools/extract_lm_head.py)
  train     l1 l2 l3 l4 l5 b1 l5f with experiments/*.py, the same epochs
            and batch for all, at the target's hidden size (L1-L4's
            widths scaled to the seed's parameter ratios, --prefill_widths);
            then l5_next b1_next l5f_next: the same recipes with the loss
            objective 'next' (the fix of the reference's dual objective);
            then b1_ttt l5f_ttt: experiments/*_ttt.py (objective next,
            trained several steps deep on their own predictions)
  evaluate  each on the test split with the LM head (baselines, 95% CIs;
            acceptance at depth at --gamma for the decode adapters) and
            the target's own next-token entropy there
  export    each to torch (in this process)
  bench1    every live method on the test samples, drafter on the
            target's GPU (tools/benchmark_sd.py; the decode adapters are
            the objective-next ones, as chains and as draft trees), one
            run per runtime; first, the headline methods (B1's chain and
            tree) alone on each runtime: up to --headline_samples samples
            of the fast one and --eager_samples of the eager one, so their
            CIs rest on every test scene (time budgets: --help of
            --headline_budget_s and --bench_time_budget_s)
  bench2    the same with the drafter on a second GPU (--draft_device2)
  results   DIR/report/RESULTS.md, results/results.json and plots (with
            --costs_7b, the decode methods projected for a 7B pair)
Groups: A = pair..bench1 + results (one GPU); B = bench1, bench2, results
(two GPUs); all = every stage. --redo STAGE removes the stage's outputs
(every adapter's, whatever --adapters names) and runs it again from the
start.

--pack PARTS writes the small outputs (study.json, LM head, exports,
eval and benchmark JSON, the report, and a pair made in DIR/pair) as a tar
cut into parts of at most --part_mib MiB; --unpack PARTS restores them
into --out first. Datasets and training runs stay behind.

Exit status: 0 every asked stage done; 2 a bad input or a failed stage
(one `error:` line); 3 stages left for lack of time (--time_limit_s; they
are named, and the same command resumes there); 130 interrupted (what
finished is kept; the same command resumes).

On a CPU (a few minutes):
  python -m tools.study --out /tmp/study --scenes tiny --train_scenes 16 \
    --val_scenes 4 --test_scenes 4 --epochs 2 --bench_samples 4 \
    --eager_samples 4 --bench_max_new_tokens 16 --dtype float32
On one GPU (the defaults are sized for the gpu preset on one H100; a
single call of at most ~10 minutes resumes where the previous one stopped):
  python -m tools.study --out DIR --scenes gpu --stages A --pack PARTS
The 7B projection: run tools/benchmark_sd.py on the 7B-shaped random pair
(the command is in RESULTS.md when the projection is absent), then
  python -m tools.study --out DIR --stages results --costs_7b RESULTS_JSON
"""

from __future__ import annotations

import os

# JAX allocates GPU memory on demand: the benchmark subprocesses share it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import json
import sys
import time

from egpt_align import cli as egpt_cli
from tools.lib.environment import environment
from tools.lib.sd_methods import add_method_flags
from tools.study import layout, live, pair, stages, state
from tools.study.pair import StudyError

EXIT_OK, EXIT_USAGE, EXIT_TIME_LEFT, EXIT_INTERRUPTED = 0, 2, 3, 130


def stage_pair(study) -> dict:
  return study.pair.prepare(study)


def stage_results(study) -> dict:
  from tools.study import projection, report

  kept = study.p(layout.COSTS_7B_FILE)
  if study.args.costs_7b:  # kept in DIR: later runs and the pack have it
    bench = projection.load_costs(study.args.costs_7b)
    with open(kept, "w") as f:
      json.dump({k: v for k, v in bench.items() if k != "per_sample"}, f)
  paths = report.write(
    study.out,
    study.p("report"),
    study.pair,
    costs_7b=kept if os.path.isfile(kept) else None,
  )
  return {"files": [os.path.relpath(p, study.out) for p in paths]}


RUNNERS = {
  "pair": stage_pair,
  "dump": stages.stage_dump,
  "lm_head": stages.stage_lm_head,
  "train": stages.stage_train,
  "evaluate": stages.stage_evaluate,
  "export": stages.stage_export,
  "bench1": lambda s: live.stage_bench(s, "bench1"),
  "bench2": lambda s: live.stage_bench(s, "bench2"),
  "results": stage_results,
}


def parse_stages(value: str) -> list[str]:
  out = []
  for item in value.split(","):
    item = item.strip()
    if not item:
      continue
    for n in layout.GROUPS.get(item, (item,)):
      if n not in layout.STAGES:
        raise StudyError(
          f"--stages: unknown stage {n!r}; expected stages "
          f"{list(layout.STAGES)} or groups {list(layout.GROUPS)}"
        )
      if n not in out:
        out.append(n)
  return sorted(out, key=layout.STAGES.index)


def make_pair_object(args, out: str):
  """The pair from the flags, else from DIR/study.json's pair record."""
  specs = (args.target, args.draft, args.samples)
  if args.scenes and any(specs):
    raise StudyError("--scenes and --target/--draft/--samples: pass one")
  if any(specs) and not all(specs):
    raise StudyError("--target, --draft and --samples go together")
  record = {}
  path = os.path.join(out, layout.STUDY_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      record = json.load(f).get("pair") or {}
  if args.scenes or (not any(specs) and record.get("kind") == "scenes"):
    from tools.scenes.study_pair import ScenesPair

    return ScenesPair(args.scenes or record["source"], out, args)
  if all(specs) or record.get("kind") == "specs":
    return pair.SpecPair(
      args.target or record["target"],
      args.draft or record["draft"],
      args.samples or record["samples"],
      args.max_new_tokens or record.get("max_new_tokens"),
    )
  raise StudyError(
    f"no pair: pass --scenes PRESET|PAIR_DIR or --target/--draft/--samples "
    f"(or --out a study directory that has one; {path} has none)"
  )


def versions() -> dict:
  """The software the study ran with (one record, tools.lib.environment)."""
  return environment(("jax", "flax", "optax", "torch", "transformers", "numpy"))


def _sample_flags(b) -> None:
  """How many test samples each live run measures, and for how long."""
  b.add_argument(
    "--bench_samples",
    type=int,
    default=400,
    help="the fast runtime's all-methods run's samples",
  )
  b.add_argument(
    "--eager_samples",
    type=int,
    default=100,
    help="the eager runtime's samples, in its headline run and in its "
    "all-methods run (samples run one of each scene in turn, so a run cut "
    "short by its time budget still spans as many scenes as samples)",
  )
  b.add_argument(
    "--headline_samples",
    type=int,
    default=400,
    help="before the all-methods runs, the headline methods (B1's chain and "
    "tree) and the baseline run alone on each runtime, so their CIs rest on "
    "every test scene: on this many samples of the fast runtime (the eager "
    "one: --eager_samples; 0 = no headline runs)",
  )
  # 160 s: in the study's stage on one H100 (docs/PERFORMANCE.md §10) the
  # fast headline run measured its 400 samples within it, the eager one 80
  # (the gpu pair's eager runtime decodes 22-28x slower).
  b.add_argument(
    "--headline_budget_s",
    type=float,
    default=160.0,
    help="per headline run: start no new sample after this (0 = none); "
    "with --time_limit_s, also at most what is left divided by the headline "
    "runs still to come, itself included",
  )
  b.add_argument(
    "--bench_time_budget_s",
    type=float,
    default=200.0,
    help="per all-methods run: start no new sample after this (0 = none); "
    "with --time_limit_s, at most what is left, and an all-methods run "
    "after the first runtime's is left out (RESULTS.md says so) when less "
    f"than {live.MIN_LATER_RUN_S} s is left for it",
  )


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m tools.study",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--out", required=True, help="study directory")
  g = p.add_argument_group("the pair")
  g.add_argument("--scenes", default=None, help="scenes preset or pair dir")
  g.add_argument("--target", default=None, metavar="SPEC")
  g.add_argument("--draft", default=None, metavar="SPEC")
  g.add_argument("--samples", default=None, metavar="TRAIN,VAL,TEST")
  g.add_argument(
    "--max_new_tokens", type=int, default=None, help="with --target"
  )
  g.add_argument("--seed", type=int, default=2, help="pair, adapters, CIs")
  g.add_argument(
    "--set",
    action="append",
    default=None,
    metavar="FIELD=VALUE",
    help="change one field of the scenes preset (make_pair --set)",
  )
  p.add_argument("--stages", default="A", help="comma list of stages/groups")
  p.add_argument(
    "--redo",
    default="",
    help="stages to rerun from scratch (all of a stage's outputs: every "
    "adapter's, not only --adapters')",
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
  b.add_argument("--train_scenes", type=int, default=800, help="scenes x4")
  b.add_argument("--val_scenes", type=int, default=50, help="scenes x4")
  b.add_argument("--test_scenes", type=int, default=101, help="scenes x4")
  b.add_argument(
    "--dump_max_new_tokens", type=int, default=None, help="default: pair's"
  )
  b.add_argument("--dump_batch_size", type=int, default=64)
  # 40: on the gpu scenes pair (3,200 training samples) the adapters were
  # still improving at 10 epochs (best epoch = the last; B1's next-state
  # validation loss 0.54 at 10 epochs, 0.26 at 40).
  b.add_argument("--epochs", type=int, default=40, help="every adapter")
  b.add_argument("--batch_size", type=int, default=64, help="every adapter")
  b.add_argument("--bootstrap", type=int, default=1000, help="CI resamples")
  b.add_argument(
    "--adapters",
    default=None,
    metavar="A,B,...",
    help="train, evaluate and export only these study adapters (default: "
    f"all of {', '.join(layout.ADAPTERS)}); the live stages run the "
    "methods whose adapters are all among them. A later run with more "
    "adapters adds them to the finished stages",
  )
  b.add_argument(
    "--prefill_widths",
    default="seed",
    choices=("seed", "recipe"),
    help="L1-L4 widths: seed = scaled so their parameter counts stand in "
    "the seed's ratios at hidden 4096 (tools/study/widths.py); recipe = "
    "experiments/*.py's",
  )
  _sample_flags(b)
  b.add_argument(
    "--bench_max_new_tokens", type=int, default=None, help="default: pair's"
  )
  b.add_argument("--gamma", type=int, default=5, help="drafts per iteration")
  add_method_flags(b)  # the method kinds' options (the tree flags)
  b.add_argument(
    "--costs_7b",
    default=None,
    metavar="RESULTS_JSON",
    help="results.json of tools/benchmark_sd.py on the 7B-shaped random "
    "pair (same gamma and tree flags): RESULTS.md projects each decode "
    "method's decode-phase speedup from its live tau and those costs",
  )
  b.add_argument("--warmup", type=int, default=2, help="benchmark warm-up")
  b.add_argument(
    "--time_limit_s",
    type=float,
    default=0.0,
    help="wall budget of this invocation: a benchmark stage starts only "
    f"with {live.MIN_BENCH_S} s left and stops sampling in time; stages "
    "left give exit status 3 (0 = no limit)",
  )
  r = p.add_argument_group("runtime")
  r.add_argument("--device", default=None, help="torch device (cuda if any)")
  r.add_argument("--dtype", default=None, help="torch dtype (tools' default)")
  r.add_argument(
    "--runtimes",
    default="fast,eager",
    help="benchmark runtimes, in run order (the verdicts read the first)",
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
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser().parse_args(argv)
  args.argv = argv  # recorded in study.json's runs
  try:
    return run(args)
  except StudyError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE


def _open(args):
  """The study directory with its pair (after --unpack, before stages)."""
  if args.unpack:
    n = state.unpack(args.unpack, args.out)
    print(f"unpacked {n} files into {args.out}")
  the_pair = make_pair_object(args, args.out)
  study = state.Study(args.out, args, the_pair)
  study.state["pair"] = the_pair.record()
  study.state.setdefault("runs", []).append(
    {"started": layout.now(), "argv": args.argv, "versions": versions()}
  )
  study.save()
  return study


def run(args) -> int:
  t_start = time.perf_counter()
  try:
    layout.parse_adapters(args.adapters)
  except ValueError as e:
    raise StudyError(str(e)) from e
  live.check_flags(args)
  stage_list = parse_stages(args.stages)
  redo = parse_stages(args.redo) if args.redo else []
  study = _open(args)
  try:
    return _run_stages(study, stage_list, redo, t_start)
  except study.pair.errors as e:
    raise StudyError(str(e)) from e


def _run_stages(study, stage_list, redo, t_start) -> int:
  args = study.args
  study.deadline = t_start + args.time_limit_s if args.time_limit_s else None
  timings, left, current = {}, [], None
  # What this run did, kept beside its argv (study.json's `runs`).
  record = study.state["runs"][-1]
  record["outcome"], record["ran"] = "ran", []
  try:
    for stage in redo:
      print(f"{stage}: --redo, removing its outputs")
      study.forget(stage)
    if "pair" not in stage_list and set(stage_list) - {"results"}:
      study.pair.check()  # A clear error before any stage runs.
    if set(stage_list) & {"dump", "train", "bench1"}:
      study.pair.warn_if_slow(args)
    for stage in stage_list:
      if study.done(stage) and stage != "results":
        study.check(stage)
        missing = study.missing(stage)
        if not missing:
          print(f"== {stage}: done earlier, kept")
          continue
        print(f"== {stage}: done earlier without {', '.join(missing)}")
      if stage in layout.BENCH_DIRS and study.deadline is not None:
        remaining = study.deadline - time.perf_counter()
        if remaining < live.MIN_BENCH_S:
          left.append(stage)
          continue
      current = stage
      print(f"== {stage}", flush=True)
      if stage == "results":
        # The stage renders this record: the file it writes is its output.
        record["ran"].append(stage)
        study.save()
      t0 = time.perf_counter()
      info = RUNNERS[stage](study)
      timings[stage] = time.perf_counter() - t0
      if stage != "results":
        record["ran"].append(stage)
      study.record(stage, timings[stage], **info)
      current = None
      print(f"-- {stage}: {timings[stage]:.1f} s")
      print(report_table(study, stage), flush=True)
  except KeyboardInterrupt:
    record["outcome"] = f"interrupted during {current}"
    return _interrupted(study, current)
  except Exception as e:
    preemption = sys.modules.get("egpt_align.preemption")
    if preemption and isinstance(e, preemption.TrainingInterrupted):
      record["outcome"] = f"interrupted during {current}"
      return _interrupted(study, current)
    record["outcome"] = (
      f"failed in stage {current}" if current else "failed before a stage ran"
    )
    # The library raises these for a bad input, with a message that names
    # it (egpt_align/cli.py): one line, not a traceback.
    if isinstance(e, egpt_cli.USER_ERRORS):
      if egpt_cli.traceback_wanted():
        raise
      where = f"stage {current}" if current else "before any stage"
      raise StudyError(f"{where}: {egpt_cli.one_line(e)}") from e
    raise
  finally:
    if left:
      record["left_for_time"] = list(left)
    study.save()
    # Also after a failed stage: what finished comes back with the parts.
    if args.pack:
      extra = study.pair.pack_patterns()
      state.pack(study, args.pack, args.part_mib, args.pack_dtype, extra)
    if timings:
      print(
        "stage times (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
      )
  if left:
    print(
      f"stages left for lack of time (--time_limit_s {args.time_limit_s:.0f},"
      f" each needs {live.MIN_BENCH_S} s): {', '.join(left)}; run the same "
      "command again to resume",
      file=sys.stderr,
    )
    return EXIT_TIME_LEFT
  return EXIT_OK


def _interrupted(study, stage) -> int:
  finished = [s for s in layout.STAGES if study.done(s)]
  print(
    f"interrupted during stage {stage or '-'}; finished: "
    f"{', '.join(finished) or 'none'}; run the same command again to resume",
    file=sys.stderr,
  )
  return EXIT_INTERRUPTED


def report_table(study, stage: str) -> str:
  """A short table of what the stage produced."""
  from tools.study import report

  return report.stage_table(study, stage)
