"""What the live SD loop drives: target, drafter, adapters.

`Target` and `Drafter` wrap a backend with its KV cache, the tokens it was
fed and its states h[t]; rolling back after a verification crops the HF
cache (eager runtime) or only moves the next position of the static decoder
(fast runtime: the prefill's HF cache is copied into preallocated buffers,
tools/lib/static_kv.py). `Models` holds everything a method may need and
builds the static decoders and adapter steps once per size.

`Models.for_sample` gives the wrappers of one method run on one sample, on
one timer (`SampleModels`): it runs the target's prefill with the
drafter's prefill work overlapped (tools/lib/sd_overlap.py) and, after the
run, each side alone, so the saving is measured, not assumed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch

from egpt_align.models import ADAPTERS, AdapterSpec
from tools.lib import adapter_steps, static_kv
from tools.lib.backends import Backend, cache_length, crop_cache
from tools.lib.sd_overlap import overlapped
from tools.lib.sd_timing import Timer


class SDError(ValueError):
  """A sample cannot be run (e.g. a token outside the drafter's vocab)."""


@dataclasses.dataclass
class Adapter:
  """A torch adapter twin plus what the engine needs to drive it."""

  name: str  # label used in method names
  kind: str  # registry name: l1 .. l5f, b1
  module: torch.nn.Module
  device: torch.device
  dtype: torch.dtype
  spec: AdapterSpec = dataclasses.field(init=False)  # the kind's registry entry

  def __post_init__(self):
    if self.kind not in ADAPTERS:
      raise ValueError(
        f"adapter {self.name!r}: unknown kind {self.kind!r}; expected one of "
        f"{tuple(ADAPTERS)}"
      )
    self.spec = ADAPTERS[self.kind]


# ----------------------------------------------------------------------------
# Model wrappers.


def greedy_token(
  logits: torch.Tensor, vocab: int | None = None
) -> torch.Tensor:
  """Argmax over the first `vocab` ids (the ids both models share)."""
  if vocab is not None and logits.shape[-1] > vocab:
    logits = logits[..., :vocab]
  return logits.argmax(-1)


def _prefill_into(lm, cache, extra: int):
  """Copies a prefill cache into a static decoder; None if it cannot hold it.

  `extra`: positions the decode loop may still add. A prompt longer than
  the decoder was sized for is decoded on the eager path (correct, slow).
  """
  if lm is None:
    return None
  length = cache_length(cache)
  if length + extra > lm.max_len:
    return None
  lm.load_prefix(cache, length)
  return lm


class Target:
  """The target: prompt cache, generated tokens, true states h[0..n-1].

  With a static decoder `lm` (fast runtime) the prefill's HF cache is copied
  into its buffers and every later forward is `lm.step`; rolling back is
  setting `length`. Without one, the HF cache is cropped.
  """

  def __init__(self, backend: Backend, timer: Timer, max_states: int, lm=None):
    self.b = backend
    self.timer = timer
    self.device = torch.device(backend.device)
    self.span = timer.on(self.device)  # spans on its device
    self.cache = None
    self.base = 0
    self.length = 0  # positions in the cache
    self.states = None  # [max_states, D]: true target states h[t]
    self.max_states = max_states
    self.static = lm
    self.lm = None

  def prefill(self, inputs: dict) -> torch.Tensor:
    """Runs the prompt; returns token 0 (device tensor [1])."""
    with self.span("target_prefill"):
      h, logits, cache = self.b.forward(inputs, logits_to_keep=1)
      y0 = greedy_token(logits[0, -1:])
      self.lm = _prefill_into(self.static, cache, self.max_states + 1)
    self.cache = None if self.lm is not None else cache
    self.base = self.length = cache_length(cache)
    self.states = h.new_empty((self.max_states, h.shape[-1]))
    self.states[0] = h[0, -1]
    # Generated tokens on the device too (the drafter is fed from here).
    self.tokens_dev = y0.new_empty(self.max_states)
    self.tokens_dev[:1] = y0
    return y0

  def forward(self, ids: torch.Tensor, name: str):
    """Feeds ids [1, T]; returns (hidden [T, D], argmax [T])."""
    with self.span(name, units=ids.shape[1]):
      if self.lm is not None:
        h, g = self.lm.step(ids, self.length)
      else:
        h, logits, self.cache = self.b.forward(
          input_ids=ids, past_key_values=self.cache
        )
        h, g = h[0], greedy_token(logits[0])
    self.length += ids.shape[1]
    return h, g

  def crop(self, num_fed_tokens: int) -> None:
    """Keeps the prompt plus the first `num_fed_tokens` generated tokens."""
    self.length = self.base + num_fed_tokens
    if self.lm is None:
      self.cache = crop_cache(self.cache, self.length)


class Drafter:
  """The drafter LM: its own cache, the tokens it was fed, its states h_d."""

  def __init__(
    self,
    backend: Backend,
    timer: Timer,
    max_states: int,
    target_vocab: int,
    lm=None,
  ):
    self.b = backend
    self.timer = timer
    self.device = torch.device(backend.device)
    self.span = timer.on(self.device)  # spans on its device
    self.max_states = max_states
    self.vocab = min(int(backend.vocab_size), int(target_vocab))
    self.cache = None
    self.base = 0
    self.static = lm  # a static decoder (fast runtime) or None
    self.lm = None
    # Fed token ids: a host list, plus device tensors (drafts made on the
    # GPU) not yet read back; they are read once, after verification.
    self.fed_host: list[int] = []
    self.fed_dev: list[torch.Tensor] = []
    self.num_fed = 0
    self.states = None  # [max_states, D]; states[t] valid for t <= num_fed
    self.next_token = None  # [1] greedy token after the last fed one
    self.prefix = ""  # span-name prefix ('prefill_' inside the prefill)

  def prefill(self, inputs: dict) -> None:
    with self.span("draft_prefill"):
      h, logits, cache = self.b.forward(inputs, logits_to_keep=1)
      self.next_token = greedy_token(logits[0, -1:], self.vocab)
      self.lm = _prefill_into(self.static, cache, self.max_states + 1)
    self.cache = None if self.lm is not None else cache
    self.base = cache_length(cache)
    self.states = h.new_empty((self.max_states, h.shape[-1]))
    self.states[0] = h[0, -1]
    self.fed_host, self.fed_dev, self.num_fed = [], [], 0

  def prefill_drafts(
    self, inputs: dict, adapter: Adapter, lm_head: torch.Tensor, k: int
  ):
    """Prefill + k greedy steps; adapter + LM head -> drafts 1..k.

    The drafter side of prefill hiding. Returns (drafts [k] or None, e0 [1]
    or None): e_t = argmax(W a(h_d)[t]) predicts target token t. e_0 is not
    verified: the target's own prefill yields token 0, so the k drafts are
    e_1..e_k, made from h_d[0..k].
    """
    self.prefill(inputs)
    if k < 1:
      return None, None
    nxt = self.next_token
    self.prefix = "prefill_"
    try:
      for _ in range(k):  # the drafter's own tokens 0..k-1 give h_d[1..k]
        nxt = self.feed(nxt)
    finally:
      self.prefix = ""
    hs = self.states[: k + 1].to(adapter.device, adapter.dtype)[None]
    name = f"prefill_adapter:{adapter.name}"
    with self.timer.span(name, adapter.device, units=k + 1):
      y = adapter.module(hs)
      e = greedy_token(y[0].to(lm_head.dtype) @ lm_head.T)
    return e[1:], e[:1]

  def feed(self, ids: torch.Tensor, host: list[int] | None = None):
    """Feeds ids [T] (`host`: their values if known); returns next [1]."""
    ids = ids.to(self.device).reshape(1, -1)
    steps = ids.shape[1]
    name = self.prefix + ("draft_decode" if steps == 1 else "draft_catchup")
    with self.span(name, units=steps):
      if self.lm is not None:
        h, g = self.lm.step(ids, self.base + self.num_fed)
        nxt = g[-1:]
      else:
        h, logits, self.cache = self.b.forward(
          input_ids=ids, past_key_values=self.cache, logits_to_keep=1
        )
        h = h[0]
        nxt = greedy_token(logits[0, -1:], self.vocab)
      self.states[self.num_fed + 1 : self.num_fed + 1 + steps] = h
      self.next_token = nxt
    if host is not None and not self.fed_dev:
      self.fed_host.extend(host)
    else:
      self.fed_dev.append(ids[0])
    self.num_fed += steps
    return nxt

  def resolve(self, drafts: Sequence[int]) -> None:
    """Names the device-fed tokens: this round's drafts, in order.

    The proposers feed the drafter only their own drafts on the device; the
    verification has read those back already, so no second host sync.
    """
    count = len(self.fed_dev)
    if count <= len(drafts):
      self.fed_host.extend(drafts[:count])
      self.fed_dev = []

  def fed_ids(self) -> list[int]:
    if self.fed_dev:
      self.fed_host.extend(torch.cat(self.fed_dev).tolist())
      self.fed_dev = []
    return self.fed_host

  def sync_to(self, accepted: Sequence[int]) -> None:
    """Rolls back to the longest fed prefix that agrees with `accepted`.

    At least the last accepted token is left unfed, so the next `feed` call
    yields fresh logits for the next position.
    """
    fed = self.fed_ids()
    keep = 0
    limit = min(len(fed), len(accepted) - 1)
    while keep < limit and fed[keep] == accepted[keep]:
      keep += 1
    if keep < len(fed):
      if self.lm is None:
        self.cache = crop_cache(self.cache, self.base + keep)
      del fed[keep:]
      self.num_fed = keep
      self.next_token = None

  def catch_up(
    self,
    accepted: Sequence[int],
    upto: int,
    on_device: torch.Tensor | None = None,
  ) -> torch.Tensor | None:
    """Feeds accepted[num_fed:upto] so states[0..upto] exist; returns next.

    `on_device`: the accepted tokens as a device tensor, copied from there
    (a tensor built from the host list would synchronise the stream).
    """
    if upto > len(accepted):
      raise AssertionError("catch_up beyond the accepted tokens")
    if upto <= self.num_fed:
      return None
    ids = list(accepted[self.num_fed : upto])
    if max(ids) >= self.b.vocab_size:
      raise SDError(
        f"target token {max(ids)} is outside the drafter's vocabulary "
        f"(size {self.b.vocab_size}); the models must share a tokenizer"
      )
    if on_device is None:
      src = torch.tensor(ids, device=self.device)
    else:
      src = on_device[self.num_fed : upto].to(self.device, non_blocking=True)
    return self.feed(src, host=ids)


# ----------------------------------------------------------------------------
# Everything a method may need.


@dataclasses.dataclass
class Models:
  """Everything a method may need; adapters keyed by their label."""

  target: Backend
  drafter: Backend | None = None
  adapters: dict[str, Adapter] = dataclasses.field(default_factory=dict)
  # One long-lived drafter thread (+ stream) per device (`SideWorker`).
  side_workers: dict = dataclasses.field(default_factory=dict)
  # Fast runtime: compile each layer of the static decoders (CUDA only).
  compile_layers: bool = True
  _heads: dict = dataclasses.field(default_factory=dict)
  _static: dict = dataclasses.field(default_factory=dict)
  # What the fast runtime runs for each model: 'static' or why it fell back.
  fast_notes: dict = dataclasses.field(default_factory=dict)

  def head_on(self, device) -> torch.Tensor:
    """The target's LM head [V, D] on `device` (one cached copy per device)."""
    key = str(torch.device(device))
    if key not in self._heads:
      w = self.target.lm_head_weight().detach()
      self._heads[key] = w.to(torch.device(device))
    return self._heads[key]

  def static_lm(self, role: str, needed: int, vocab: int | None, lengths):
    """The static decoder of 'target' or 'drafter' (None: eager fallback).

    Built once, for `needed` positions with graphs for input `lengths`, and
    rebuilt only when a longer prompt needs more positions.
    """
    backend = self.target if role == "target" else self.drafter
    key = (role, vocab)
    lm = self._static.get(key)
    if lm is not None and lm.max_len >= needed:
      return lm
    if self.fast_notes.get(role, "static").startswith("eager fallback"):
      return None  # unsupported: known already
    self._static.pop(key, None)  # free the old buffers and graphs first
    if not callable(getattr(backend, "static_decoder", None)):
      self.fast_notes[role] = (
        "eager fallback: the backend has no static_decoder"
      )
      return None
    try:
      lm = backend.static_decoder(
        static_kv.static_length(needed),
        vocab=vocab,
        lengths=lengths,
        compile_layers=self.compile_layers,
      )
    except static_kv.Unsupported as e:
      self.fast_notes[role] = f"eager fallback: {e}"
      return None
    self.fast_notes[role] = f"static ({lm.mode})"
    self._static[key] = lm
    return lm

  def for_sample(
    self,
    target_inputs: dict,
    draft_inputs: dict | None,
    max_states: int,
    lengths: range | None = None,
    prefill_adapter: Adapter | None = None,
    prefill_k: int = 0,
  ) -> SampleModels:
    """The wrappers of one method run on one sample (`SampleModels`).

    The target, and the drafter if `draft_inputs` are given, each keeping
    `max_states` states; with `lengths` (the fast runtime) on static
    decoders sized for their prompts, with graphs for those input lengths.
    With a `prefill_adapter` the drafter drafts `prefill_k` tokens while
    the target prefills (prefill hiding).
    """
    lms = [None, None]
    if lengths is not None:
      need = target_inputs["input_ids"].shape[1] + max_states + 1
      lms[0] = self.static_lm("target", need, None, lengths)
      if draft_inputs is not None:
        need = draft_inputs["input_ids"].shape[1] + max_states + 1
        vocab = min(self.drafter.vocab_size, self.target.vocab_size)
        lms[1] = self.static_lm("drafter", need, vocab, lengths)
    return SampleModels(
      self,
      target_inputs,
      draft_inputs,
      max_states,
      tuple(lms),
      prefill_adapter,
      prefill_k,
    )

  def static_adapter(self, adapter: Adapter, needed: int, lengths):
    """The static step of a decode adapter (built once per size)."""
    key = ("adapter", adapter.name)
    sa = self._static.get(key)
    if sa is not None and sa.max_len >= needed:
      return sa
    self._static.pop(key, None)
    if not callable(getattr(adapter.module, "static_step", None)):
      self.fast_notes[f"adapter:{adapter.name}"] = (
        "eager fallback: the module has no static_step"
      )
      return None
    cap = getattr(adapter.module, "max_seq_len", needed)
    sa = adapter_steps.StaticAdapter(
      adapter.module,
      self.head_on(adapter.device),
      len(adapter.spec.inputs),
      min(static_kv.static_length(needed), cap),
      device=adapter.device,
      dtype=adapter.dtype,
      lengths=lengths,
      # B1 reads only its own outputs while drafting (chains of 1..γ-1).
      self_fed=adapter.spec.inputs == ("target",),
      chains=range(1, max(lengths, default=1) - 1),
      compile_step=self.compile_layers,
    )
    self._static[key] = sa
    self.fast_notes[f"adapter:{adapter.name}"] = f"static ({sa.mode})"
    return sa


# ----------------------------------------------------------------------------
# One method run on one sample.


@dataclasses.dataclass
class SampleModels:
  """The wrappers of one method run on one sample (`Models.for_sample`).

  `prefill_overlapped` runs the target's prefill with the drafter's
  prefill work overlapped (tools/lib/sd_overlap.py); after the run,
  untimed, `measure_overlap` runs each side alone on fresh wrappers, so
  the saving is measured, not assumed.
  """

  models: Models
  target_inputs: dict
  draft_inputs: dict | None  # None: the method does not run the drafter LM
  max_states: int
  lms: tuple = (None, None)  # static decoders (target, drafter) or None
  prefill_adapter: Adapter | None = None  # prefill hiding's adapter
  prefill_k: int = 0  # the drafts it makes
  # One timer for the run; it watches the devices of its wrappers.
  timer: Timer = dataclasses.field(default_factory=Timer)
  target: Target = dataclasses.field(init=False)
  drafter: Drafter | None = dataclasses.field(init=False)

  def __post_init__(self):
    self.target, self.drafter = self._wrappers(self.timer)

  def _wrappers(self, timer: Timer) -> tuple[Target, Drafter | None]:
    """Fresh target and drafter wrappers (none: no drafter) on `timer`."""
    m, n = self.models, self.max_states
    target = Target(m.target, timer, n, self.lms[0])
    if self.draft_inputs is None:
      return target, None
    vocab = m.target.vocab_size
    return target, Drafter(m.drafter, timer, n, vocab, self.lms[1])

  def _drafter_side(self, drafter: Drafter):
    """The drafter's prefill work: its prompt, then with a prefill adapter
    (drafts, e0) of `Drafter.prefill_drafts`."""
    adapter = self.prefill_adapter
    if adapter is None:
      drafter.prefill(self.draft_inputs)
      return None
    head = self.models.head_on(adapter.device)
    return drafter.prefill_drafts(
      self.draft_inputs, adapter, head, self.prefill_k
    )

  def prefill_overlapped(self, mode: str):
    """The target's prefill, the drafter's prefill work overlapped.

    `mode`: `SDConfig.overlap`. Returns (token 0 as an int, the drafter
    side's output, the overlap record of `overlapped` or None).
    """
    drafter = self.drafter
    y0, out, overlap = overlapped(
      lambda: self.target.prefill(self.target_inputs),
      None if drafter is None else lambda: self._drafter_side(drafter),
      self.target.device,
      None if drafter is None else drafter.device,
      mode,
      self.models.side_workers,
    )
    y0 = int(y0.item())
    if drafter is not None:
      self.timer.sync()
    return y0, out, overlap

  def measure_overlap(self, overlap: dict | None) -> None:
    """Completes a concurrent prefill's `overlap` record (untimed).

    Runs each prefill side alone, after the measured run, on fresh wrappers
    and a scratch timer: overlap_ms = target alone + drafter alone -
    concurrent wall. It is negative when contention makes the concurrent
    region slower than running the two one after the other.
    """
    if overlap is None or not overlap["concurrent"]:
      return  # none, or sequential: each side was measured alone
    target, drafter = self._wrappers(Timer())
    for key, fn in (
      ("target_alone_ms", lambda: target.prefill(self.target_inputs)),
      ("drafter_alone_ms", lambda: self._drafter_side(drafter)),
    ):
      target.timer.sync()
      t0 = time.perf_counter()
      fn()
      target.timer.sync()
      overlap[key] = (time.perf_counter() - t0) * 1e3
    overlap["overlap_ms"] = (
      overlap["target_alone_ms"]
      + overlap["drafter_alone_ms"]
      - overlap["wall_ms"]
    )
