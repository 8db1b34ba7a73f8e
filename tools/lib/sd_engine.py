"""Lossless greedy speculative decoding, batch size 1: the decode loop.

`run_method(method, models, target_inputs, draft_inputs, cfg)` runs one
method (a row of the table in tools/lib/sd_methods.py) on one sample: the
run's wrappers (`Models.for_sample`, tools/lib/sd_models.py) run the
target's prefill with the drafter's prefill work overlapped where the
method runs the drafter (its prompt; with prefill hiding also K drafts),
then one decode loop shared by all chain methods, fed by the
method's proposer (tools/lib/sd_proposers.py), timed in named spans
(tools/lib/sd_timing.py); last, untimed, each prefill side alone, so the
overlap's saving is measured. Draft-tree methods run their own loop
(tools/lib/tree_decode.py; the method table names it).

Indexing convention (docs/DESIGN.md): h[t] is the state whose LM-head argmax
is generated token t; h[0] is the last prompt position, h[t] (t >= 1) is the
state at the input position of token t-1. Drafts are always checked against
the target's greedy token for the same index, so a correct drafter with an
identity adapter reaches 100% acceptance (the tests prove it).

Verification is greedy exact match: the longest prefix of the drafts equal to
the target's argmax is accepted, plus the target's own next token (the
correction, or the bonus after a full accept). Generation stops at the first
EOS anywhere in the new tokens (included) and never exceeds max_new_tokens
(drafts are truncated to the remaining budget). After each verification the
target's and drafter's KV caches are cropped to the accepted prefix and the
adapter's cache is truncated to the positions whose inputs were true.

Runtimes (`SDConfig.runtime`): 'eager' runs every forward through the
backend with HF KV caches, cropped on rollback. 'fast' runs the prefill the
same way, copies its cache into preallocated buffers and then decodes with
the backend's static decoder (tools/lib/static_kv.py: CUDA-graph steps, one
per input length 1..gamma+1, of compiled layers), and decode adapters with
their static step + LM head + argmax in one graph; a rollback only moves the
next position. Models without a static decoder fall back to eager
(`Models.fast_notes` says which). Inside the loop the only host sync is the
read of the verified tokens.

Per sample: prefill (up to the first token on the host), decode, and total
wall time with device synchronisation at both ends.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tools.lib.backends import Backend
from tools.lib.sd_methods import check_method, method_options, needs_drafter
from tools.lib.sd_models import Models, Target
from tools.lib.sd_proposers import DraftContext, FixedProposer

RUNTIMES = ("eager", "fast")


@dataclasses.dataclass
class SampleResult:
  """One method on one sample."""

  tokens: list[int]
  prefill_ms: float
  decode_ms: float
  total_ms: float
  drafted: int = 0  # draft tokens sent to verification (all iterations)
  accepted: int = 0  # draft tokens accepted (kept in the output)
  iterations: int = 0  # target forwards in the decode loop (verify or plain)
  verify_iterations: int = 0  # of which verified >= 1 draft
  # (phase, drafted, accepted) per verification ('prefill' or 'decode').
  per_iteration: list[tuple[str, int, int]] = dataclasses.field(
    default_factory=list
  )
  phases: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  overlap: dict[str, float] | None = None  # measured prefill overlap (ms)
  first_draft_match: bool | None = None  # prefill drafter's token 0 == y0

  def count(self, phase: str, drafted: int, kept: int) -> None:
    """Counts one target forward of the loop that verified `drafted`."""
    self.iterations += 1
    if drafted:
      self.drafted += drafted
      self.accepted += kept
      self.verify_iterations += 1
      self.per_iteration.append((phase, drafted, kept))

  def to_json(self) -> dict:
    """A JSON-able dict."""
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SDConfig:
  """Knobs shared by all methods."""

  gamma: int = 5  # drafts per decode iteration
  max_new_tokens: int = 64
  prefill_gamma: int | None = None  # drafts made while the target prefills
  # Prefill overlap: 'auto' = a thread on a 2nd GPU or CUDA stream (on CPU
  # sequential), 'thread' = a thread on any device, 'sequential' = none.
  overlap: str = "auto"
  # A concurrent prefill's saving: each side run again alone after the
  # run (untimed); off, the record keeps only the concurrent times.
  measure_overlap: bool = True
  eos_token_ids: tuple[int, ...] | None = None  # None: the target's
  # 'eager': HF forwards with HF KV caches; 'fast': static KV buffers and
  # captured steps (tools/lib/static_kv.py) where a model supports them.
  runtime: str = "eager"
  # The method kinds' own settings by name (their flags: `options` in
  # tools/lib/sd_methods.py; the draft trees' tree_depth, tree_topk,
  # tree_nodes): every one, defaults filled in and checked, read-only.
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.gamma < 1:
      raise ValueError(f"gamma must be >= 1, got {self.gamma}")
    if self.max_new_tokens < 1:
      raise ValueError(
        f"max_new_tokens must be >= 1, got {self.max_new_tokens}"
      )
    if self.prefill_gamma is not None and self.prefill_gamma < 1:
      raise ValueError(f"prefill_gamma must be >= 1, got {self.prefill_gamma}")
    if self.overlap not in ("auto", "thread", "sequential"):
      raise ValueError(
        f"overlap must be auto, thread or sequential, not {self.overlap!r}"
      )
    if self.runtime not in RUNTIMES:
      raise ValueError(
        f"runtime must be one of {RUNTIMES}, not {self.runtime!r}"
      )
    object.__setattr__(self, "options", method_options(self.options))

  @property
  def k_prefill(self) -> int:
    """Drafts made while the target prefills."""
    return self.gamma if self.prefill_gamma is None else self.prefill_gamma


# ----------------------------------------------------------------------------
# The decode loop shared by all methods.


def _decode_loop(
  target: Target,
  y0: int,
  cfg: SDConfig,
  eos: set[int],
  result: SampleResult,
  first: FixedProposer | None,
  proposer,
) -> list[int]:
  """Greedy SD from token 0 until EOS or max_new_tokens."""
  tokens = [y0]
  m = cfg.max_new_tokens
  done = y0 in eos or m == 1
  # The last accepted token, kept on the device (no host-to-device copy).
  last = torch.tensor([[y0]], device=target.device)
  while not done:
    n = len(tokens)
    budget = m - n - 1  # drafts that can still be followed by a target token
    drafts, phase = None, "decode"
    if first is not None and first.drafts is not None:
      drafts, phase = first.take(budget), "prefill"
      if drafts is not None and drafts.numel() == 0:
        drafts = None
    elif proposer is not None and budget > 0:
      drafts = proposer.propose(tokens, min(cfg.gamma, budget))
    k = 0 if drafts is None else int(drafts.numel())
    if k:  # drafts may live on the drafter's GPU
      ids = torch.cat([last, drafts.view(1, -1).to(target.device)], dim=1)
    else:
      ids = last
    h, g = target.forward(
      ids, f"target_verify[{k + 1}]" if k else "target_decode"
    )
    host = (torch.cat([ids[0, 1:], g]) if k else g).tolist()  # one sync
    d_host, g_host = host[:k], host[k:]
    j = 0
    while j < k and d_host[j] == g_host[j]:
      j += 1
    new = d_host[:j] + [g_host[j]]
    last = g[j : j + 1].view(1, 1)
    for i, t in enumerate(new):
      if t in eos:
        new = new[: i + 1]
        done = True
        break
    if len(new) > m - n:
      raise AssertionError("budget overrun")  # k <= m - n - 1 prevents it
    # States at the fed positions 0..j are the true h[n..n+j].
    target.states[n : n + len(new)] = h[: len(new)]
    # Accepted drafts equal the target's own tokens: new == g[:len(new)].
    target.tokens_dev[n : n + len(new)] = g[: len(new)]
    tokens.extend(new)
    result.count(phase, k, min(j, len(new)))
    if len(tokens) >= m:
      done = True
    if done:
      break
    if j < k:  # after a full accept the cache already ends at n + k
      target.crop(n + j)
    if phase == "decode" and proposer is not None and k:
      proposer.after_verify(tokens, n, k, j, d_host)
  return tokens


# ----------------------------------------------------------------------------
# One method on one sample.


def run_method(
  method: str,
  models: Models,
  target_inputs: dict,
  draft_inputs: dict | None,
  cfg: SDConfig,
) -> SampleResult:
  """Runs one method on one sample and times it."""
  parsed = check_method(method, models)
  kind = parsed.spec
  adapters = tuple(models.adapters[a] for a in parsed.adapters)
  with_drafter = needs_drafter(parsed, models.adapters)
  if with_drafter and draft_inputs is None:
    raise ValueError(f"method {method!r} needs the drafter's prompt inputs")
  eos = set(
    models.target.eos_token_ids
    if cfg.eos_token_ids is None
    else cfg.eos_token_ids
  )
  m = cfg.max_new_tokens
  extra = kind.extra_positions(cfg) if kind.extra_positions else 0
  max_states = m + max(cfg.gamma, cfg.k_prefill, extra) + 4
  fast = cfg.runtime == "fast"
  lengths = range(1, cfg.gamma + 2)
  run = models.for_sample(
    target_inputs,
    draft_inputs if with_drafter else None,
    max_states,
    lengths if fast else None,
    # Prefill hiding: the drafter drafts with the first adapter meanwhile.
    prefill_adapter=adapters[0] if "prefill" in kind.phases else None,
    prefill_k=min(cfg.k_prefill, m - 2),
  )
  target, drafter, timer = run.target, run.drafter, run.timer
  result = SampleResult([], 0.0, 0.0, 0.0)

  with torch.inference_mode():
    timer.sync()
    t0 = time.perf_counter()
    y0, pre_out, overlap = run.prefill_overlapped(cfg.overlap)
    t1 = time.perf_counter()
    first = None
    if pre_out is not None:  # prefill hiding's (drafts, e0)
      drafts, e0 = pre_out
      if drafts is not None:
        first = FixedProposer(drafts.to(target.device))
        result.first_draft_match = int(e0.item()) == y0
    proposer = None
    if kind.proposer is not None:
      ctx = DraftContext(
        models,
        adapters,
        target,
        drafter,
        timer,
        cfg.gamma,
        m,
        fast,
        lengths,
        cfg,
      )
      proposer = kind.proposer(ctx)
    loop = kind.loop or _decode_loop
    tokens = loop(target, y0, cfg, eos, result, first, proposer)
    timer.sync()
    t2 = time.perf_counter()
    if cfg.measure_overlap:  # untimed: each prefill side alone
      run.measure_overlap(overlap)

  result.tokens = tokens
  result.prefill_ms = (t1 - t0) * 1e3
  result.decode_ms = (t2 - t1) * 1e3
  result.total_ms = (t2 - t0) * 1e3
  result.phases = timer.collect()
  result.overlap = overlap
  return result


@torch.inference_mode()
def token_margins(
  backend: Backend, inputs: dict, tokens: Sequence[int]
) -> list[float]:
  """Top-1 minus top-2 logit of the target at each generated position.

  Teacher-forced (one prompt forward + one forward over the tokens), used
  only to tell near-tie argmax flips from real mismatches.
  """
  if not tokens:
    return []
  _, l0, cache = backend.forward(inputs, logits_to_keep=1)
  logits = [l0[0, -1:]]
  if len(tokens) > 1:
    ids = torch.tensor([list(tokens[:-1])], device=backend.device)
    _, l1, _ = backend.forward(input_ids=ids, past_key_values=cache)
    logits.append(l1[0])
  top2 = torch.cat(logits).float().topk(2, dim=-1).values
  return (top2[:, 0] - top2[:, 1]).tolist()


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
  """Index of the first differing token (or length difference), else None."""
  for i, (x, y) in enumerate(zip(a, b, strict=False)):
    if x != y:
      return i
  if len(a) != len(b):
    return min(len(a), len(b))
  return None
