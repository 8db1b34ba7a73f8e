"""What a study runs and where it keeps it: adapters, methods, stages."""

import datetime
import importlib.util
import os

from egpt_align.models import ADAPTERS as _REGISTRY

STUDY_FILE = "study.json"
# The 7B-shaped pair's benchmark results.json (--costs_7b), kept in DIR.
COSTS_7B_FILE = "costs_7b.json"
# The seed's seven adapters, each with its experiments/*.py recipe (the
# reference's objective) ...
SEED_ADAPTERS = tuple(_REGISTRY)  # l1 l2 l3 l4 l5 b1 l5f
# ... and the next-state ones again with objective 'next', the fix of the
# reference's dual objective (REFERENCE_NOTES D8): l5_next b1_next l5f_next.
NEXT_SUFFIX = "_next"
NEXT_ADAPTERS = tuple(
  f"{n}{NEXT_SUFFIX}" for n, s in _REGISTRY.items() if s.predicts_next
)
# ... and B1/L5F trained several steps deep ("training-time test", issue
# 32): experiments/b1_ttt.py and l5f_ttt.py (objective next, k > 1).
TTT_SUFFIX = "_ttt"
TTT_ADAPTERS = ("b1_ttt", "l5f_ttt")
ADAPTERS = SEED_ADAPTERS + NEXT_ADAPTERS + TTT_ADAPTERS


def kind(name: str) -> str:
  """The registry adapter a study adapter is ('b1_next' -> 'b1')."""
  return name.removesuffix(NEXT_SUFFIX).removesuffix(TTT_SUFFIX)


def recipe(name: str) -> str:
  """The experiments/*.py file a study adapter trains with."""
  return name if name.endswith(TTT_SUFFIX) else kind(name)


def experiment_config(name: str):
  """experiments/NAME.py's get_config() (the file the trainer CLI loads)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
  path = os.path.join(root, "experiments", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"experiment_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


PREFILL_ADAPTERS = tuple(n for n, s in _REGISTRY.items() if s.role == "prefill")
# The decode adapters of every live method: the objective-next ones, k = 1
# and k > 1 (the reference-objective rows stay in the seed's offline table).
LIVE_DECODE_ADAPTERS = NEXT_ADAPTERS + TTT_ADAPTERS
DECODE_ADAPTERS = tuple(
  n for n in ADAPTERS if _REGISTRY[kind(n)].role == "decode"
)
# The adapters that also draft trees (EAGLE-2, tools/lib/tree_decode.py):
# B1 and L5F at k = 1 and k > 1 (L5 steps the drafter at every depth).
TREE_ADAPTERS = ("b1_next", "l5f_next") + TTT_ADAPTERS
# Every live method of the study, in table order.
METHODS = (
  ("baseline", "draft_tokens")
  + tuple(f"prefill_hiding:{a}" for a in PREFILL_ADAPTERS)
  + tuple(f"decode:{a}" for a in LIVE_DECODE_ADAPTERS)
  + tuple(f"tree:{a}" for a in TREE_ADAPTERS)
  + ("two_phase:l4+l5f_next", "two_phase:l4+b1_next")
)


# The methods also run alone on every test sample (the stage's headline
# run, `--headline_samples`): B1's chain and tree, the study's fastest.
HEADLINE_METHODS = ("decode:b1_next", "tree:b1_next")


def method_kind(method: str) -> str:
  """A live method's kind ('two_phase:l4+b1_next' -> 'two_phase')."""
  return method.partition(":")[0]


def method_adapters(method: str) -> tuple[str, ...]:
  """The study adapters a live method loads ('two_phase:l4+b1_next')."""
  _, _, rest = method.partition(":")
  return tuple(a for a in rest.split("+") if a)


def methods_of(adapters) -> tuple[str, ...]:
  """The live methods whose adapters are all in `adapters`, table order."""
  have = set(adapters)
  return tuple(m for m in METHODS if set(method_adapters(m)) <= have)


def headline_of(adapters) -> tuple[str, ...]:
  """The headline methods whose adapters are all in `adapters`."""
  return tuple(m for m in methods_of(adapters) if m in HEADLINE_METHODS)


def live_adapters(adapters) -> tuple[str, ...]:
  """The adapters the live methods of `adapters` load (exported and handed
  to the benchmark)."""
  used = {a for m in methods_of(adapters) for a in method_adapters(m)}
  return tuple(a for a in ADAPTERS if a in used)


def parse_adapters(value: str | None) -> tuple[str, ...]:
  """--adapters: a comma list of study adapters (None or '': all), in
  study order; ValueError naming an unknown one."""
  if not value:
    return ADAPTERS
  names = [n.strip() for n in value.split(",") if n.strip()]
  unknown = [n for n in names if n not in ADAPTERS]
  if unknown:
    raise ValueError(
      f"--adapters: unknown adapter(s) {unknown}; expected names of "
      f"{list(ADAPTERS)}"
    )
  return tuple(n for n in ADAPTERS if n in names)


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
  """How tables name a study adapter ('b1_next' -> 'B1 (objective next)',
  'b1_ttt' -> 'B1 (objective next, multi-step)')."""
  if name.endswith(NEXT_SUFFIX):
    return f"{kind(name).upper()} (objective next)"
  if name.endswith(TTT_SUFFIX):
    return f"{kind(name).upper()} (objective next, multi-step)"
  return name.upper()


def short(name: str) -> str:
  """A plot label ('b1_next' -> 'B1 next', 'b1_ttt' -> 'B1 ttt')."""
  if name.endswith(TTT_SUFFIX):
    return f"{kind(name).upper()} ttt"
  return title(name).replace(" (objective next)", " next")


def now() -> str:
  """The current UTC time as the study writes it."""
  return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
