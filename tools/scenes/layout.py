"""What a scenes study runs and where it keeps it (reproduce and results)."""

import datetime

from egpt_align.models import ADAPTERS as _REGISTRY

STUDY_FILE = "study.json"
ADAPTERS = tuple(_REGISTRY)  # l1 l2 l3 l4 l5 b1 l5f
PREFILL_ADAPTERS = tuple(n for n, s in _REGISTRY.items() if s.role == "prefill")
DECODE_ADAPTERS = tuple(n for n, s in _REGISTRY.items() if s.role == "decode")
# Every live method of the study, in table order.
METHODS = (
  ("baseline", "draft_tokens")
  + tuple(f"prefill_hiding:{a}" for a in PREFILL_ADAPTERS)
  + tuple(f"decode:{a}" for a in DECODE_ADAPTERS)
  + ("two_phase:l4+l5f", "two_phase:l4+b1")
)
# Benchmark stage -> its folder under DIR/bench (one GPU, two GPUs).
BENCH_DIRS = {"bench1": "gpus1", "bench2": "gpus2"}


def now() -> str:
  """The current UTC time as the study writes it."""
  return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
