"""The SD methods as a table: one entry per method kind.

A method is written `KIND` or `KIND:A[+B]` (`decode:b1`, `two_phase:l4+b1`):
the adapters fill the kind's slots, one SD role each ('prefill': L1-L4,
'decode': L5, B1, L5F; the registry's `role`). An entry says where the kind
drafts (its phases: 'prefill' = drafts made while the target prefills, by
the drafter and the first adapter; 'decode' = drafts in every decode-loop
iteration, by its proposer), whether it runs the drafter LM, and its flags.
Adding a method is one entry here plus its proposer
(tools/lib/sd_proposers.py or a module of its own).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from egpt_align.models import ADAPTERS, get_spec
from tools.lib import tree_decode
from tools.lib.sd_models import Adapter, Models
from tools.lib.sd_proposers import AdapterProposer, TokenProposer


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
  return any(
    "source" in get_spec(adapters[a].kind).inputs for a in method.adapters
  )


def check_method(method: str, models: Models) -> Method:
  """Raises a clear ValueError if `models` cannot run `method`; parses it."""
  parsed = parse_method(method)
  for name, role in zip(parsed.adapters, parsed.spec.slots, strict=True):
    if name not in models.adapters:
      raise ValueError(
        f"method {method!r}: no adapter named {name!r} (have "
        f"{sorted(models.adapters)}; pass --adapter {name}=FILE)"
      )
    kind = models.adapters[name].kind
    if get_spec(kind).role != role:
      raise ValueError(
        f"method {method!r}: adapter {name!r} is a {kind}; this slot needs "
        f"one of {role_names(role)}"
      )
  if models.drafter is None and needs_drafter(parsed, models.adapters):
    raise ValueError(f"method {method!r} needs a drafter model (--draft)")
  return parsed
