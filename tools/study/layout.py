"""What a study runs and where it keeps it: adapters, methods, stages."""

import datetime

from egpt_align.models import ADAPTERS as _REGISTRY

STUDY_FILE = "study.json"
# The seed's seven adapters, each with its experiments/*.py recipe (the
# reference's objective) ...
SEED_ADAPTERS = tuple(_REGISTRY)  # l1 l2 l3 l4 l5 b1 l5f
# ... and the next-state ones again with objective 'next', the fix of the
# reference's dual objective (REFERENCE_NOTES D8): l5_next b1_next l5f_next.
NEXT_SUFFIX = "_next"
NEXT_ADAPTERS = tuple(
  f"{n}{NEXT_SUFFIX}" for n, s in _REGISTRY.items() if s.predicts_next
)
ADAPTERS = SEED_ADAPTERS + NEXT_ADAPTERS


def kind(name: str) -> str:
  """The registry adapter a study adapter is ('b1_next' -> 'b1')."""
  return name.removesuffix(NEXT_SUFFIX)


PREFILL_ADAPTERS = tuple(n for n, s in _REGISTRY.items() if s.role == "prefill")
# The decode adapters of every live method: the objective-next ones (the
# reference-objective rows stay in the seed's offline table).
LIVE_DECODE_ADAPTERS = NEXT_ADAPTERS
DECODE_ADAPTERS = tuple(
  n for n in ADAPTERS if _REGISTRY[kind(n)].role == "decode"
)
# Every live method of the study, in table order.
METHODS = (
  ("baseline", "draft_tokens")
  + tuple(f"prefill_hiding:{a}" for a in PREFILL_ADAPTERS)
  + tuple(f"decode:{a}" for a in LIVE_DECODE_ADAPTERS)
  + ("two_phase:l4+l5f_next", "two_phase:l4+b1_next")
)
# The adapters the live methods load (exported and handed to the benchmark).
LIVE_ADAPTERS = PREFILL_ADAPTERS + LIVE_DECODE_ADAPTERS
# Benchmark stage -> its folder under DIR/bench (one GPU, two GPUs).
BENCH_DIRS = {"bench1": "gpus1", "bench2": "gpus2"}
SETTING_NAMES = {"gpus1": "one GPU", "gpus2": "two GPUs"}
CPU_SETTING_NAMES = {"gpus1": "CPU", "gpus2": "CPU, drafter as a second device"}


def setting_name(sub: str, device: str | None) -> str:
  """How the report names a live setting ('one GPU'; 'CPU' on a CPU)."""
  if device and "cpu" in device.lower():
    return CPU_SETTING_NAMES[sub]
  return SETTING_NAMES[sub]


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


def objective(name: str) -> str | None:
  """The loss objective a study adapter trains with (None: its recipe's)."""
  return "next" if name.endswith(NEXT_SUFFIX) else None


def title(name: str) -> str:
  """How tables name a study adapter ('b1_next' -> 'B1 (objective next)')."""
  if name.endswith(NEXT_SUFFIX):
    return f"{kind(name).upper()} (objective next)"
  return name.upper()


def short(name: str) -> str:
  """A plot label ('b1_next' -> 'B1 next')."""
  return title(name).replace(" (objective next)", " next")


def now() -> str:
  """The current UTC time as the study writes it."""
  return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
