"""The SD methods as a table: one entry per method kind.

A method is written `KIND` or `KIND:A[+B]` (`decode:b1`, `two_phase:l4+b1`):
the adapters fill the kind's slots, one SD role each ('prefill': L1-L4,
'decode': L5, B1, L5F; the registry's `role`). An entry says where the kind
drafts (its phases: 'prefill' = drafts made while the target prefills, by
the drafter and the first adapter; 'decode' = drafts in every decode-loop
iteration, by its proposer), whether it runs the drafter LM, and its flags.
Adding a method is one entry here plus its proposer
(tools/lib/sd_proposers.py or a module of its own).

A kind's own settings are its `options` (`Option`: the flag --NAME, a type,
a default, help), checked together by its `check_options`. Only this module
knows how they are stored: `add_method_flags` adds every kind's flags to a
command line, `method_options` gives all of them, defaults filled in and
checked (SDConfig.options), `option_flags` their command-line form, and
`recorded_options` reads them back from a results.json config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from egpt_align.models import ADAPTERS
from tools.lib import tree as draft_tree
from tools.lib import tree_decode
from tools.lib.sd_models import Adapter, Models
from tools.lib.sd_proposers import AdapterProposer, TokenProposer


@dataclasses.dataclass(frozen=True)
class Option:
  """One setting of a method kind: the flag --NAME, in SDConfig.options."""

  name: str
  type: Callable[[str], Any]  # parses the flag's value
  default: Any
  help: str  # --help names the kinds that declare it before this

  @property
  def flag(self) -> str:
    return f"--{self.name}"


# The draft trees' options (tree:A, two_phase_tree:P+A).
TREE_OPTIONS = (
  Option("tree_depth", int, 6, "draft depth"),
  Option(
    "tree_topk",
    int,
    10,
    "children per expanded node, nodes expanded per depth",
  ),
  Option("tree_nodes", int, 60, "tokens per verification, the root included"),
)


@dataclasses.dataclass(frozen=True)
class MethodKind:
  """One kind of SD method (see the module docstring)."""

  name: str
  doc: str  # one line for --help
  slots: tuple[str, ...] = ()  # the SD role of each adapter it takes
  phases: tuple[str, ...] = ()  # where it drafts: 'prefill', 'decode'
  # Builds the decode-phase proposer from a DraftContext.
  proposer: Callable[[Any], Any] | None = None
  # Runs the drafter LM (else only where an adapter of its reads the drafter).
  uses_drafter: bool = False
  profiled: bool = False  # traced by --profile
  # Where its drafting cost per token goes in the costs block's
  # `draft_ms_per_token` (read by egpt_align.speedup): 'drafter', or
  # 'adapter' (keyed by its decode adapter's label); None: not there.
  cost_key: str | None = None
  # Its decode loop (None: sd_engine's chain loop), and the cache positions
  # one iteration may use beyond the accepted tokens, from the SDConfig
  # (None: gamma / prefill_gamma).
  loop: Callable[..., list[int]] | None = None
  extra_positions: Callable[[Any], int] | None = None
  # Its own settings, and their check: called with their values in this
  # order, it raises a one-line ValueError naming the flag at fault.
  options: tuple[Option, ...] = ()
  check_options: Callable[..., None] | None = None


METHODS: dict[str, MethodKind] = {
  m.name: m
  for m in (
    MethodKind(
      "baseline", "target greedy decoding with its KV cache", profiled=True
    ),
    MethodKind(
      "draft_tokens",
      "the drafter's own greedy tokens, verified",
      phases=("decode",),
      proposer=TokenProposer.create,
      uses_drafter=True,
      cost_key="drafter",
    ),
    MethodKind(
      "prefill_hiding",
      "drafter prefill + K drafts (adapter A) while the target prefills; "
      "verified once, then plain decoding",
      slots=("prefill",),
      phases=("prefill",),
      uses_drafter=True,
    ),
    MethodKind(
      "decode",
      "gamma adapter drafts per iteration with the adapter's KV cache",
      slots=("decode",),
      phases=("decode",),
      proposer=AdapterProposer.create,
      profiled=True,
      cost_key="adapter",
    ),
    MethodKind(
      "two_phase",
      "prefill_hiding:A, then decode:B",
      slots=("prefill", "decode"),
      phases=("prefill", "decode"),
      proposer=AdapterProposer.create,
      uses_drafter=True,
    ),
    MethodKind(
      "tree",
      "an EAGLE-2 draft tree per iteration (--tree_depth, --tree_topk, "
      "--tree_nodes), verified in one target forward with a tree mask",
      slots=("decode",),
      phases=("decode",),
      proposer=tree_decode.TreeProposer.create,
      loop=tree_decode.decode_loop,
      extra_positions=tree_decode.extra_positions,
      options=TREE_OPTIONS,
      check_options=draft_tree.check_config,
    ),
    MethodKind(
      "two_phase_tree",
      "prefill_hiding:A, then tree:B",
      slots=("prefill", "decode"),
      phases=("prefill", "decode"),
      proposer=tree_decode.TreeProposer.create,
      uses_drafter=True,
      loop=tree_decode.decode_loop,
      extra_positions=tree_decode.extra_positions,
      options=TREE_OPTIONS,
      check_options=draft_tree.check_config,
    ),
  )
}


class Method(NamedTuple):
  """A parsed method: its kind's name and its adapters' labels."""

  kind: str
  adapters: tuple[str, ...]

  @property
  def spec(self) -> MethodKind:
    return METHODS[self.kind]


def _form(kind: MethodKind) -> str:
  if not kind.slots:
    return kind.name
  if len(kind.slots) == 1:
    return f"{kind.name}:ADAPTER"
  return f"{kind.name}:" + "+".join(f"{r.upper()}_ADAPTER" for r in kind.slots)


def method_forms() -> str:
  """'baseline, draft_tokens, prefill_hiding:ADAPTER, ...' for messages."""
  return ", ".join(_form(k) for k in METHODS.values())


def method_help() -> str:
  """One line per method kind: its form, its slots' roles and what it does."""
  lines = []
  for k in METHODS.values():
    roles = ", ".join(f"{r}: {'/'.join(role_names(r))}" for r in k.slots)
    lines.append(f"  {_form(k):36s} {k.doc}" + (f" ({roles})" if roles else ""))
  return "\n".join(lines)


def parse_method(method: str) -> Method:
  """'decode:b1' -> ('decode', ('b1',)); 'two_phase:l4+b1' -> (.., (l4, b1))."""
  name, _, arg = method.partition(":")
  if name not in METHODS:
    raise ValueError(
      f"unknown method {method!r}; expected one of {method_forms()}"
    )
  kind = METHODS[name]
  if not kind.slots:
    if arg:
      raise ValueError(f"method {method!r}: {name} takes no adapter")
    return Method(name, ())
  parts = tuple(arg.split("+")) if arg else ()
  if len(parts) != len(kind.slots) or not all(parts):
    raise ValueError(f"method {method!r}: expected {_form(kind)}")
  return Method(name, parts)


def role_names(role: str) -> tuple[str, ...]:
  """Registry names of one SD role: 'prefill' (L1-L4) or 'decode' (L5...)."""
  return tuple(n for n, s in ADAPTERS.items() if s.role == role)


def needs_drafter(method: Method, adapters: Mapping[str, Adapter]) -> bool:
  """Whether `method` runs the drafter LM (adapters keyed by label)."""
  if method.spec.uses_drafter:
    return True
  return any("source" in adapters[a].spec.inputs for a in method.adapters)


def check_method(method: str, models: Models) -> Method:
  """Raises a clear ValueError if `models` cannot run `method`; parses it."""
  parsed = parse_method(method)
  for name, role in zip(parsed.adapters, parsed.spec.slots, strict=True):
    if name not in models.adapters:
      raise ValueError(
        f"method {method!r}: no adapter named {name!r} (have "
        f"{sorted(models.adapters)}; pass --adapter {name}=FILE)"
      )
    adapter = models.adapters[name]
    if adapter.spec.role != role:
      raise ValueError(
        f"method {method!r}: adapter {name!r} is a {adapter.kind}; this "
        f"slot needs one of {role_names(role)}"
      )
  if models.drafter is None and needs_drafter(parsed, models.adapters):
    raise ValueError(f"method {method!r} needs a drafter model (--draft)")
  return parsed


# ----------------------------------------------------------------------------
# The kinds' options (module docstring).


class OptionValues(Mapping[str, Any]):
  """Method options by name: read-only, hashable (SDConfig is frozen)."""

  def __init__(self, values: Mapping[str, Any]):
    self._values = dict(values)

  def __getitem__(self, name: str) -> Any:
    return self._values[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._values)

  def __len__(self) -> int:
    return len(self._values)

  def __hash__(self) -> int:
    return hash(tuple(self._values.items()))

  def __repr__(self) -> str:
    return f"OptionValues({self._values!r})"


def all_options(kinds: Iterable[str] | None = None) -> tuple[Option, ...]:
  """The options of `kinds` (default: every kind), each once, in table
  order. Two kinds that share one declare the same Option."""
  seen: dict[str, Option] = {}
  specs = METHODS.values() if kinds is None else (METHODS[k] for k in kinds)
  for kind in specs:
    for o in kind.options:
      if seen.setdefault(o.name, o) != o:
        raise ValueError(f"method option {o.flag}: two different declarations")
  return tuple(seen.values())


def add_method_flags(parser) -> None:
  """Adds every kind's option flags to an argparse parser (or group), each
  once; its help names the kinds that take it."""
  for o in all_options():
    kinds = [k.name for k in METHODS.values() if o in k.options]
    parser.add_argument(
      o.flag,
      type=o.type,
      default=o.default,
      help=f"{', '.join(kinds)}: {o.help}",
    )


def method_options(values: Any = None) -> OptionValues:
  """Every kind's options, by name, from a mapping or an argparse namespace
  (what it lacks takes the default), checked by each kind's check_options.
  A one-line ValueError on a bad value or an unknown name."""
  options = all_options()
  values = {} if values is None else values
  if not isinstance(values, Mapping):  # a namespace: its option attributes
    values = {
      o.name: getattr(values, o.name)
      for o in options
      if hasattr(values, o.name)
    }
  unknown = sorted(set(values) - {o.name for o in options})
  if unknown:
    raise ValueError(
      f"unknown method option(s) {unknown}; the method kinds take "
      f"{[o.name for o in options]}"
    )
  out = OptionValues({o.name: values.get(o.name, o.default) for o in options})
  checked = set()
  for kind in METHODS.values():
    key = (kind.check_options, kind.options)
    if kind.check_options is not None and key not in checked:
      checked.add(key)
      kind.check_options(*(out[o.name] for o in kind.options))
  return out


def option_flags(values: Mapping[str, Any]) -> list[str]:
  """The options' command-line form: ['--tree_depth', '6', ...]."""
  flags = {o.name: o.flag for o in all_options()}
  out = []
  for name, value in values.items():
    out += [flags[name], str(value)]
  return out


def recorded_options(config: Mapping[str, Any]) -> dict[str, Any]:
  """The method options a benchmark's results.json `config` records: its
  `options`, or from a run before them, its draft-tree record `tree`:
  {depth, topk, nodes}."""
  if "options" in config:
    return dict(config["options"] or {})
  tree = config.get("tree") or {}
  return {f"tree_{k}": tree[k] for k in ("depth", "topk", "nodes") if k in tree}
