"""Draft proposers of the live SD loop: one per way of drafting.

A proposer makes the drafts of one decode-loop iteration (`propose(tokens,
k) -> drafts [k]`) and updates its state after the target verified them
(`after_verify(tokens, n, k, j, drafts)`: n tokens before, k drafts, j
accepted). `create(ctx)` builds one from a `DraftContext`; the method table
(tools/lib/sd_methods.py) names which proposer a method uses.

Decode adapters predict the NEXT state (`predicts_next` in the registry):
the adapter output at step position p is read as the target state h[p+1],
i.e. it drafts token p+1. B1 is fed the target's true states h[0..n-1] and
then its own predictions; L5 is fed the drafter's states h_d[p], with the
drafter stepping in lockstep on the accepted and drafted tokens; L5F gets
both (its target stream takes its own predictions beyond the accepted
prefix). `FixedProposer` serves the K drafts of prefill hiding
(`Drafter.prefill_drafts`, made while the target prefills);
`PrefillWindow` sizes K ('auto') from live timings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tools.lib import adapter_steps
from tools.lib.sd_models import (
  Adapter,
  Drafter,
  Models,
  Target,
  greedy_token,
)
from tools.lib.sd_timing import Timer


@dataclasses.dataclass
class DraftContext:
  """What a proposer may use for one method run on one sample."""

  models: Models
  adapters: tuple[Adapter, ...]  # the method's adapters, in slot order
  target: Target
  drafter: Drafter | None
  timer: Timer
  gamma: int  # drafts per decode iteration
  max_new_tokens: int
  fast: bool  # the fast runtime: static adapter steps
  lengths: range  # input lengths the static steps capture
  config: Any = None  # the run's SDConfig (tree methods read their knobs)


class TokenProposer:
  """draft_tokens: the drafter's own greedy continuation."""

  def __init__(self, drafter: Drafter, target: Target):
    self.d = drafter
    self.tokens_dev = target.tokens_dev

  @classmethod
  def create(cls, ctx: DraftContext) -> TokenProposer:
    """The proposer of one run (the drafter LM itself)."""
    return cls(ctx.drafter, ctx.target)

  def propose(self, tokens: list[int], k: int) -> torch.Tensor:
    d = self.d
    d.sync_to(tokens)
    nxt = d.catch_up(tokens, len(tokens), self.tokens_dev)
    if nxt is None:  # everything fed already: reuse the last prediction
      nxt = d.next_token
    drafts = [nxt]
    for _ in range(k - 1):
      drafts.append(d.feed(drafts[-1]))
    return torch.cat(drafts)

  def after_verify(self, tokens, n, k, j, drafts) -> None:
    self.d.resolve(drafts)
    self.d.sync_to(tokens)


class AdapterProposer:
  """decode:ADAPTER: KV-cached next-state prediction through the LM head.

  Adapter step position p reads inputs for state index p and predicts the
  target state h[p+1], hence token p+1.
  """

  def __init__(
    self,
    adapter: Adapter,
    target: Target,
    drafter: Drafter | None,
    lm_head: torch.Tensor,
    timer: Timer,
    max_len: int,
    static: adapter_steps.StaticAdapter | None = None,
  ):
    self.a = adapter
    self.t = target
    self.d = drafter
    self.w = lm_head
    self.timer = timer
    self.inputs = adapter.spec.inputs
    if "source" in self.inputs and drafter is None:
      raise ValueError(f"adapter {adapter.name!r} needs a drafter (--draft)")
    # Fast runtime: static buffers, rolled back by `fed` alone.
    self.static = static
    self.cache = None
    if static is None:
      self.cache = adapter.module.init_cache(
        1, max_len, adapter.device, adapter.dtype
      )
    self.fed = 0  # leading adapter positions fed with true inputs
    self.fed_total = 0

  @classmethod
  def create(cls, ctx: DraftContext) -> AdapterProposer:
    """The proposer of one run: the method's last (decode) adapter."""
    ad = ctx.adapters[-1]
    max_len = ctx.max_new_tokens + ctx.gamma + 1
    static = None
    if ctx.fast:
      static = ctx.models.static_adapter(ad, max_len, ctx.lengths)
    return cls(
      ad,
      ctx.target,
      ctx.drafter if "source" in ad.spec.inputs else None,
      ctx.models.head_on(ad.device),
      ctx.timer,
      max_len=max_len,
      static=static,
    )

  def _src(self, p: int) -> torch.Tensor:
    return self.d.states[p].to(self.a.device, self.a.dtype).reshape(1, 1, -1)

  def _step(self, p0: int, srcs, tgts) -> torch.Tensor:
    """Decodes positions p0.. with the given [1, T, D] inputs; last output."""
    args = []
    if "source" in self.inputs:
      args.append(srcs)
    if "target" in self.inputs:
      args.append(tgts)
    steps = args[0].shape[1]
    with self.timer.span(f"adapter:{self.a.name}", self.a.device, units=steps):
      if self.static is not None:
        return self.static.step(args, p0)
      y, self.cache = self.a.module.decode_step(
        *args, cache=self.cache, position=p0
      )
      y = y[:, -1:]
      tok = greedy_token((y[0, 0].to(self.w.dtype) @ self.w.T)[None])
    return y, tok

  def propose(self, tokens: list[int], k: int) -> torch.Tensor:
    n = len(tokens)
    a = self.a
    # Catch up: positions fed..n-1 get true inputs (target states from the
    # prefill / verify forwards, drafter states of accepted tokens).
    p0 = self.fed
    srcs = tgts = None
    if "source" in self.inputs:
      self.d.sync_to(tokens)
      self.d.catch_up(tokens, n - 1, self.t.tokens_dev)
      srcs = self.d.states[p0:n].to(a.device, a.dtype)[None]
    if "target" in self.inputs:
      tgts = self.t.states[p0:n].to(a.device, a.dtype)[None]
    self.fed_total = n - 1 + k
    if k > 1 and self.static is not None and self.static.self_fed:
      # B1 on the fast runtime: the catch-up and its k - 1 steps, each fed
      # the one before's output, in one call (one graph on CUDA).
      with self.timer.span(f"adapter:{a.name}", a.device, units=n - p0 + k - 1):
        drafts = self.static.draft([tgts], p0, k - 1)
      return drafts.to(self.t.device)
    y, tok = self._step(p0, srcs, tgts)
    drafts = [tok]
    for i in range(1, k):
      p = n - 1 + i
      src = None
      if "source" in self.inputs:
        # The drafter's state at index p is its state after feeding token
        # p-1: the last accepted token for i = 1, else draft i-2.
        if self.d.num_fed != p - 1:
          raise AssertionError("drafter out of lockstep")
        if i == 1:
          last = self.t.tokens_dev[n - 1 : n].to(self.d.device)
          self.d.feed(last, host=[tokens[-1]])
        else:
          self.d.feed(drafts[i - 2])
        src = self._src(p)
      y, tok = self._step(p, src, y.to(a.dtype))
      drafts.append(tok)
    return torch.cat(drafts).to(self.t.device)

  def after_verify(self, tokens, n, k, j, drafts) -> None:
    # Positions >= n were fed predicted target states (B1/L5F): never true.
    # For L5 the source at position p is true iff p <= n + j.
    # Position n + j is always re-fed so its output (the next draft) is
    # computed afresh.
    if "target" in self.inputs:
      keep = n
    else:
      keep = min(self.fed_total, n + j)
    if self.static is None:
      self.cache = self.a.module.truncate(self.cache, keep)
    self.fed = keep
    if self.d is not None:
      self.d.resolve(drafts)
      self.d.sync_to(tokens)


class FixedProposer:
  """Serves precomputed drafts once (prefill hiding), then nothing."""

  def __init__(self, drafts: torch.Tensor | None):
    self.drafts = drafts

  def take(self, k: int) -> torch.Tensor | None:
    d, self.drafts = self.drafts, None
    return None if d is None else d[:k]


# ----------------------------------------------------------------------------
# Prefill hiding: the drafts made while the target prefills.


# Most drafts the 'auto' prefill window asks for.
AUTO_K_MAX = 32


class PrefillWindow:
  """Running means that size the prefill-hiding draft window ('auto').

  K = (target prefill - drafter prefill - adapter call) / drafter ms per
  token: the drafts that fit while the target prefills (the reference's
  "free tokens", measured live instead of assumed).
  """

  def __init__(self):
    self.sums: dict[str, list[float]] = {}

  def _add(self, key: str, ms: float, n: float) -> None:
    acc = self.sums.setdefault(key, [0.0, 0.0])
    acc[0] += ms
    acc[1] += n

  def _mean(self, key: str) -> float | None:
    acc = self.sums.get(key)
    return acc[0] / acc[1] if acc and acc[1] else None

  def update(self, result) -> None:
    """Adds one run's prefill-side spans (`result`: a SampleResult)."""
    for name, v in result.phases.items():
      if name == "target_prefill":
        self._add("target", v["ms"], v["calls"])
      elif name == "draft_prefill":
        self._add("drafter", v["ms"], v["calls"])
      elif name in ("draft_decode", "prefill_draft_decode"):
        self._add("token", v["ms"], v["units"])
      elif name.startswith("prefill_adapter:"):
        self._add("adapter", v["ms"], v["calls"])

  def drafts(self, default: int) -> int:
    """The current window, or `default` before anything was measured."""
    target, drafter = self._mean("target"), self._mean("drafter")
    token = self._mean("token")
    if target is None or drafter is None or not token:
      return default
    free = target - drafter - (self._mean("adapter") or 0.0)
    return int(min(max(free // token, 1), AUTO_K_MAX))
