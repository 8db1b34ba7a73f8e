"""Lossless greedy speculative decoding, batch size 1, as testable functions.

One function per method (see `run_method`):

* `baseline`: the target's own greedy decoding with its KV cache.
* `draft_tokens`: the drafter's own greedy tokens, verified by the target.
* `prefill_hiding:ADAPTER` (L1-L4): while the target prefills, the drafter
  prefills and decodes K tokens; the adapter maps the drafter's states into
  the target's space and the target's LM head turns them into K drafts, which
  the target verifies in one forward; plain target decoding follows.
* `decode:ADAPTER` (L5, B1, L5F): every iteration drafts gamma tokens with
  the adapter's KV-cached incremental decoding, the target verifies them.
* `two_phase:PREFILL+DECODE`: prefill hiding, then decode-adapter drafting.
* `tree:ADAPTER`, `two_phase_tree:PREFILL+DECODE`: the same with an EAGLE-2
  draft tree per iteration, verified in one forward (tools/lib/tree_decode.py).

Indexing convention (docs/DESIGN.md): h[t] is the state whose LM-head argmax
is generated token t; h[0] is the last prompt position, h[t] (t >= 1) is the
state at the input position of token t-1. Drafts are always checked against
the target's greedy token for the same index, so a correct drafter with an
identity adapter reaches 100% acceptance (the tests prove it).

Decode adapters predict the NEXT state (`predicts_next` in the registry): the
adapter output at step position p is read as the target state h[p+1], i.e.
it drafts token p+1. B1 is fed the target's true states h[0..n-1] and then
its own predictions; L5 is fed the drafter's states h_d[p], with the drafter
stepping in lockstep on the accepted and drafted tokens; L5F gets both (its
target stream takes its own predictions beyond the accepted prefix).

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
the backend's static decoder (tools/lib/static_kv.py: CUDA-graph steps, one per
input length 1..gamma+1, of compiled layers), and decode adapters with their
static step + LM head + argmax in one graph; a rollback only moves the next
position. Models without a static decoder fall back to eager
(`Models.fast_notes` says which). Inside the loop the only host sync is the
read of the verified tokens.

Prefill overlap (`SDConfig.overlap`): the drafter's prefill work runs in a
long-lived thread (one per drafter device, kept by `Models`), on its own GPU
when it has one, else on a second CUDA stream of the same GPU (on CPU: one
after the other unless 'thread'). Afterwards,
untimed, each side is run alone, so the saving is measured: overlap =
target alone + drafter alone - concurrent wall.

Timing: every model call is a named span, timed with CUDA events on the
stream it ran on (no extra host syncs inside the loop) or with perf_counter
on CPU. Per sample: prefill (up to the first token on the host), decode, and
total wall time with device synchronisation at both ends. Span names:
target_prefill, target_decode, target_verify[L] (L positions),
draft_prefill, draft_decode (one token), draft_catchup (several accepted
tokens at once), adapter:NAME (decode adapter step, LM head included), and
prefill_draft_decode / prefill_adapter:NAME inside the prefill region.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from egpt_align.models import ADAPTERS, get_spec
from tools.lib import static_kv, tree_decode
from tools.lib.backends import Backend, cache_length, crop_cache

RUNTIMES = ("eager", "fast")


def role_names(role: str) -> tuple[str, ...]:
  """Registry names of one SD role: 'prefill' (L1-L4) or 'decode' (L5...)."""
  return tuple(n for n, s in ADAPTERS.items() if s.role == role)


class SDError(ValueError):
  """A sample cannot be run (e.g. a token outside the drafter's vocab)."""


# ----------------------------------------------------------------------------
# Timing.


class Timer:
  """Named spans: CUDA events on the current stream, or perf_counter on CPU."""

  def __init__(self, devices: Sequence[torch.device]):
    self.cuda_devices = sorted(
      {torch.device(d) for d in devices if torch.device(d).type == "cuda"},
      key=str,
    )
    self._pending: list[tuple[str, int, Any, Any]] = []
    self._lock = threading.Lock()
    self.totals: dict[str, list[float]] = {}  # name -> [ms, units, calls]

  def sync(self) -> None:
    """Waits for every device this timer watches."""
    for d in self.cuda_devices:
      torch.cuda.synchronize(d)

  def _add(self, name: str, ms: float, units: int) -> None:
    t = self.totals.setdefault(name, [0.0, 0, 0])
    t[0] += ms
    t[1] += units
    t[2] += 1

  @contextlib.contextmanager
  def span(self, name: str, device: torch.device, units: int = 1):
    """Times the work enqueued inside the block (units: tokens or steps)."""
    device = torch.device(device)
    if device.type != "cuda":
      t0 = time.perf_counter()
      yield
      with self._lock:
        self._add(name, (time.perf_counter() - t0) * 1e3, units)
      return
    stream = torch.cuda.current_stream(device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record(stream)
    yield
    end.record(stream)
    with self._lock:
      self._pending.append((name, units, start, end))

  def collect(self) -> dict[str, dict[str, float]]:
    """Syncs, resolves the CUDA events and returns {name: ms, units, calls}."""
    self.sync()
    for name, units, start, end in self._pending:
      self._add(name, start.elapsed_time(end), units)
    self._pending.clear()
    return {
      k: {"ms": v[0], "units": int(v[1]), "calls": int(v[2])}
      for k, v in self.totals.items()
    }


# ----------------------------------------------------------------------------
# Results.


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
  eos_token_ids: tuple[int, ...] | None = None  # None: the target's
  # 'eager': HF forwards with HF KV caches; 'fast': static KV buffers and
  # captured steps (tools/lib/static_kv.py) where a model supports them.
  runtime: str = "eager"
  # Draft trees (tree:A, two_phase_tree:P+A; tools/lib/tree_decode.py):
  # depth, children per expanded node, verified tokens (root included).
  tree_depth: int = 6
  tree_topk: int = 10
  tree_nodes: int = 60

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
    tree_decode.tr.check_config(
      self.tree_depth, self.tree_topk, self.tree_nodes
    )

  @property
  def k_prefill(self) -> int:
    return self.gamma if self.prefill_gamma is None else self.prefill_gamma


@dataclasses.dataclass
class Adapter:
  """A torch adapter twin plus what the engine needs to drive it."""

  name: str  # label used in method names
  kind: str  # registry name: l1 .. l5f, b1
  module: torch.nn.Module
  device: torch.device
  dtype: torch.dtype

  def __post_init__(self):
    if self.kind not in ADAPTERS:
      raise ValueError(
        f"adapter {self.name!r}: unknown kind {self.kind!r}; expected one of "
        f"{tuple(ADAPTERS)}"
      )


# ----------------------------------------------------------------------------
# Model wrappers.


def _argmax(logits: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
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


class _Target:
  """The target: prompt cache, generated tokens, true states h[0..n-1].

  With a static decoder `lm` (fast runtime) the prefill's HF cache is copied
  into its buffers and every later forward is `lm.step`; rolling back is
  setting `length`. Without one, the HF cache is cropped.
  """

  def __init__(self, backend: Backend, timer: Timer, max_states: int, lm=None):
    self.b = backend
    self.timer = timer
    self.device = torch.device(backend.device)
    self.cache = None
    self.base = 0
    self.length = 0  # positions in the cache
    self.states = None  # [max_states, D]: true target states h[t]
    self.max_states = max_states
    self.static = lm
    self.lm = None

  def prefill(self, inputs: dict) -> torch.Tensor:
    """Runs the prompt; returns token 0 (device tensor [1])."""
    with self.timer.span("target_prefill", self.device):
      h, logits, cache = self.b.forward(inputs, logits_to_keep=1)
      y0 = _argmax(logits[0, -1:])
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
    with self.timer.span(name, self.device, units=ids.shape[1]):
      if self.lm is not None:
        h, g = self.lm.step(ids, self.length)
      else:
        h, logits, self.cache = self.b.forward(
          input_ids=ids, past_key_values=self.cache
        )
        h, g = h[0], _argmax(logits[0])
    self.length += ids.shape[1]
    return h, g

  def crop(self, num_fed_tokens: int) -> None:
    """Keeps the prompt plus the first `num_fed_tokens` generated tokens."""
    self.length = self.base + num_fed_tokens
    if self.lm is None:
      self.cache = crop_cache(self.cache, self.length)


class _Drafter:
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
    with self.timer.span("draft_prefill", self.device):
      h, logits, cache = self.b.forward(inputs, logits_to_keep=1)
      self.next_token = _argmax(logits[0, -1:], self.vocab)
      self.lm = _prefill_into(self.static, cache, self.max_states + 1)
    self.cache = None if self.lm is not None else cache
    self.base = cache_length(cache)
    self.states = h.new_empty((self.max_states, h.shape[-1]))
    self.states[0] = h[0, -1]
    self.fed_host, self.fed_dev, self.num_fed = [], [], 0

  def feed(self, ids: torch.Tensor, host: list[int] | None = None):
    """Feeds ids [T] (`host`: their values if known); returns next [1]."""
    ids = ids.to(self.device).reshape(1, -1)
    steps = ids.shape[1]
    name = self.prefix + ("draft_decode" if steps == 1 else "draft_catchup")
    with self.timer.span(name, self.device, units=steps):
      if self.lm is not None:
        h, g = self.lm.step(ids, self.base + self.num_fed)
        nxt = g[-1:]
      else:
        h, logits, self.cache = self.b.forward(
          input_ids=ids, past_key_values=self.cache, logits_to_keep=1
        )
        h = h[0]
        nxt = _argmax(logits[0, -1:], self.vocab)
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
# Overlap of the target prefill with drafter work.


class _SideWorker:
  """One long-lived thread (and, on CUDA, one stream) for a drafter device.

  The drafter's prefill work runs here while the main thread runs the
  target's. The thread lives as long as the `Models`: a fresh thread per
  sample pays CUDA's per-thread set-up (library handles, workspaces) on
  every call, which on H100 added 50-300 ms to the drafter's side.
  """

  def __init__(self, device: torch.device):
    self.device = device
    self.stream = (
      torch.cuda.Stream(device=device) if device.type == "cuda" else None
    )
    self._pool = concurrent.futures.ThreadPoolExecutor(
      max_workers=1, thread_name_prefix=f"drafter-{device}"
    )

  def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
    """Runs fn on the worker (its stream, inference mode); returns a future
    of (output, perf_counter when its stream was done)."""

    def work():
      with torch.inference_mode():  # grad mode is per thread
        if self.stream is None:
          out = fn()
        else:
          with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            out = fn()
          self.stream.synchronize()
      return out, time.perf_counter()

    return self._pool.submit(work)


def _overlapped(
  target_fn: Callable[[], Any],
  drafter_fn: Callable[[], Any] | None,
  target_device: torch.device,
  draft_device: torch.device | None,
  mode: str,
  workers: dict,
):
  """Runs target_fn and drafter_fn concurrently; returns outputs + timings.

  The drafter side runs on the drafter device's `_SideWorker` (a long-lived
  thread with its own stream, on its own GPU when it lives on another
  device); each side's time runs from the common start to its own stream
  sync, the wall time to the later one. The saving (`overlap_ms`) is
  measured against each side run alone (`_alone_times`). Sequentially (CPU,
  or mode 'sequential') the two run one after the other, the alone times
  are the measured ones and the overlap is 0.
  """
  if drafter_fn is None:
    return target_fn(), None, None
  cuda = target_device.type == "cuda"
  if mode == "sequential" or (mode == "auto" and not cuda):
    t0 = time.perf_counter()
    a = target_fn()
    t1 = time.perf_counter()
    b = drafter_fn()
    t2 = time.perf_counter()
    info = {
      "target_ms": (t1 - t0) * 1e3,
      "drafter_ms": (t2 - t1) * 1e3,
      "wall_ms": (t2 - t0) * 1e3,
      "target_alone_ms": (t1 - t0) * 1e3,
      "drafter_alone_ms": (t2 - t1) * 1e3,
      "overlap_ms": 0.0,
      "concurrent": False,
    }
    return a, b, info
  ddev = torch.device(draft_device or target_device)
  key = str(ddev)
  if key not in workers:
    workers[key] = _SideWorker(ddev)
  worker = workers[key]
  if cuda:
    for d in {target_device, ddev}:
      torch.cuda.synchronize(d)
  t0 = time.perf_counter()
  future = worker.submit(drafter_fn)
  a = target_fn()
  if cuda:
    torch.cuda.current_stream(target_device).synchronize()
  t_t = time.perf_counter()
  b, t_d = future.result()  # re-raises the drafter's error here
  if worker.stream is not None:
    # Later work on the default stream reads what the side stream wrote.
    torch.cuda.current_stream(ddev).wait_stream(worker.stream)
  info = {
    # Both include any slow-down from contention; the join latency is not
    # part of the region.
    "target_ms": (t_t - t0) * 1e3,
    "drafter_ms": (t_d - t0) * 1e3,
    "wall_ms": (max(t_t, t_d) - t0) * 1e3,
    "concurrent": True,
  }
  return a, b, info


# ----------------------------------------------------------------------------
# Draft proposers (one per decode-phase strategy).


class _TokenProposer:
  """draft_tokens: the drafter's own greedy continuation."""

  def __init__(self, drafter: _Drafter, target: _Target):
    self.d = drafter
    self.tokens_dev = target.tokens_dev

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


class _AdapterProposer:
  """decode:ADAPTER: KV-cached next-state prediction through the LM head.

  Adapter step position p reads inputs for state index p and predicts the
  target state h[p+1], hence token p+1.
  """

  def __init__(
    self,
    adapter: Adapter,
    target: _Target,
    drafter: _Drafter | None,
    lm_head: torch.Tensor,
    timer: Timer,
    max_len: int,
    static: static_kv.StaticAdapter | None = None,
  ):
    self.a = adapter
    self.t = target
    self.d = drafter
    self.w = lm_head
    self.timer = timer
    self.inputs = get_spec(adapter.kind).inputs
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
      tok = _argmax((y[0, 0].to(self.w.dtype) @ self.w.T)[None])
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
    self.fed_total = n - 1 + k
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


class _FixedProposer:
  """Serves precomputed drafts once (prefill hiding), then nothing."""

  def __init__(self, drafts: torch.Tensor | None):
    self.drafts = drafts

  def take(self, k: int) -> torch.Tensor | None:
    d, self.drafts = self.drafts, None
    return None if d is None else d[:k]


# ----------------------------------------------------------------------------
# The decode loop shared by all methods.


def _decode_loop(
  target: _Target,
  y0: int,
  cfg: SDConfig,
  eos: set[int],
  result: SampleResult,
  first: _FixedProposer | None,
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
    result.iterations += 1
    if k:
      kept = min(j, len(new))
      result.drafted += k
      result.accepted += kept
      result.verify_iterations += 1
      result.per_iteration.append((phase, k, kept))
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
# Methods.


@dataclasses.dataclass
class Models:
  """Everything a method may need; adapters keyed by their label."""

  target: Backend
  drafter: Backend | None = None
  adapters: dict[str, Adapter] = dataclasses.field(default_factory=dict)
  # One long-lived drafter thread (+ stream) per device (`_SideWorker`).
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
    sa = static_kv.StaticAdapter(
      adapter.module,
      self.head_on(adapter.device),
      len(get_spec(adapter.kind).inputs),
      min(static_kv.static_length(needed), cap),
      device=adapter.device,
      dtype=adapter.dtype,
      lengths=lengths,
      compile_step=self.compile_layers,
    )
    self._static[key] = sa
    self.fast_notes[f"adapter:{adapter.name}"] = f"static ({sa.mode})"
    return sa


def parse_method(method: str) -> tuple[str, tuple[str, ...]]:
  """'decode:b1' -> ('decode', ('b1',)); 'two_phase:l4+b1' -> (.., (l4, b1))."""
  kind, _, arg = method.partition(":")
  if kind in ("baseline", "draft_tokens"):
    if arg:
      raise ValueError(f"method {method!r}: {kind} takes no adapter")
    return kind, ()
  if kind in ("prefill_hiding", "decode", "tree"):
    if not arg or "+" in arg:
      raise ValueError(f"method {method!r}: expected {kind}:ADAPTER")
    return kind, (arg,)
  if kind in ("two_phase", "two_phase_tree"):
    parts = tuple(arg.split("+"))
    if len(parts) != 2 or not all(parts):
      raise ValueError(
        f"method {method!r}: expected two_phase:PREFILL_ADAPTER+DECODE_ADAPTER"
      )
    return kind, parts
  raise ValueError(
    f"unknown method {method!r}; expected baseline, draft_tokens, "
    "prefill_hiding:A, decode:A, two_phase:A+B, tree:A or two_phase_tree:A+B"
  )


def check_method(method: str, models: Models) -> None:
  """Raises a clear ValueError if `models` cannot run `method`."""
  kind, names = parse_method(method)
  two = ("two_phase", "two_phase_tree")
  needs_drafter = kind in ("draft_tokens", "prefill_hiding", *two)
  for i, name in enumerate(names):
    if name not in models.adapters:
      raise ValueError(
        f"method {method!r}: no adapter named {name!r} (have "
        f"{sorted(models.adapters)}; pass --adapter {name}=FILE)"
      )
    ad = models.adapters[name]
    want = role_names(
      "prefill"
      if kind == "prefill_hiding" or (kind in two and i == 0)
      else "decode"
    )
    if ad.kind not in want:
      raise ValueError(
        f"method {method!r}: adapter {name!r} is a {ad.kind}; this slot "
        f"needs one of {want}"
      )
    spec = get_spec(ad.kind)
    if spec.role == "decode" and "source" in spec.inputs:
      needs_drafter = True
  if needs_drafter and models.drafter is None:
    raise ValueError(f"method {method!r} needs a drafter model (--draft)")


def run_method(
  method: str,
  models: Models,
  target_inputs: dict,
  draft_inputs: dict | None,
  cfg: SDConfig,
) -> SampleResult:
  """Runs one method on one sample and times it."""
  kind, names = parse_method(method)
  check_method(method, models)
  eos = set(
    models.target.eos_token_ids
    if cfg.eos_token_ids is None
    else cfg.eos_token_ids
  )
  tdev = torch.device(models.target.device)
  ddev = None if models.drafter is None else torch.device(models.drafter.device)
  timer = Timer([tdev] + ([ddev] if ddev is not None else []))
  m = cfg.max_new_tokens
  tree = kind in tree_decode.METHOD_KINDS
  extra = tree_decode.extra_positions(cfg) if tree else 0
  slack = max(cfg.gamma, cfg.k_prefill, extra) + 4
  fast = cfg.runtime == "fast"
  lengths = range(1, cfg.gamma + 2)
  t_lm = d_lm = None
  if fast:
    need = target_inputs["input_ids"].shape[1] + m + slack + 1
    t_lm = models.static_lm("target", need, None, lengths)
  target = _Target(models.target, timer, m + slack, t_lm)
  two = ("two_phase", "two_phase_tree")
  uses_drafter = kind in ("draft_tokens", "prefill_hiding", *two) or (
    kind in ("decode", "tree")
    and "source" in get_spec(models.adapters[names[0]].kind).inputs
  )
  drafter = None
  if uses_drafter:
    if draft_inputs is None:
      raise ValueError(f"method {method!r} needs the drafter's prompt inputs")
    dvocab = min(models.drafter.vocab_size, models.target.vocab_size)
    if fast:
      need = draft_inputs["input_ids"].shape[1] + m + slack + 1
      d_lm = models.static_lm("drafter", need, dvocab, lengths)
    drafter = _Drafter(
      models.drafter, timer, m + slack, models.target.vocab_size, d_lm
    )
  result = SampleResult([], 0.0, 0.0, 0.0)

  with torch.inference_mode():
    timer.sync()
    t0 = time.perf_counter()
    # ---- prefill (with drafter work overlapped where the method has any).
    drafter_fn = None
    if drafter is not None:
      if kind in ("prefill_hiding", *two):
        pre = models.adapters[names[0]]
        k_pre = min(cfg.k_prefill, m - 2)

        def drafter_fn(d=drafter, t=timer):
          return _prefill_drafts(
            d, draft_inputs, pre, models.head_on(pre.device), k_pre, t
          )

      else:

        def drafter_fn(d=drafter, t=timer):
          d.prefill(draft_inputs)

    y0_t, pre_out, overlap = _overlapped(
      lambda: target.prefill(target_inputs),
      drafter_fn,
      tdev,
      ddev,
      cfg.overlap,
      models.side_workers,
    )
    y0 = int(y0_t.item())
    if drafter is not None:
      timer.sync()
    t1 = time.perf_counter()
    first = None
    if kind in ("prefill_hiding", *two) and pre_out is not None:
      drafts, e0 = pre_out
      if drafts is not None:
        first = _FixedProposer(drafts.to(tdev))
        result.first_draft_match = int(e0.item()) == y0
    proposer = None
    if kind == "draft_tokens":
      proposer = _TokenProposer(drafter, target)
    elif kind in ("decode", "two_phase"):
      ad = models.adapters[names[-1]]
      max_len = m + cfg.gamma + 1
      proposer = _AdapterProposer(
        ad,
        target,
        drafter if "source" in get_spec(ad.kind).inputs else None,
        models.head_on(ad.device),
        timer,
        max_len=max_len,
        static=models.static_adapter(ad, max_len, lengths) if fast else None,
      )
    if tree:
      proposer = tree_decode.make_proposer(
        models, names[-1], target, drafter, timer, cfg
      )
      loop = tree_decode.decode_loop
    else:
      loop = _decode_loop
    tokens = loop(target, y0, cfg, eos, result, first, proposer)
    timer.sync()
    t2 = time.perf_counter()
    if overlap is not None and overlap["concurrent"]:
      alone = _alone_times(
        models, target_inputs, drafter_fn, m, slack, timer, t_lm, d_lm
      )
      overlap.update(alone)
      overlap["overlap_ms"] = (
        alone["target_alone_ms"]
        + alone["drafter_alone_ms"]
        - overlap["wall_ms"]
      )

  result.tokens = tokens
  result.prefill_ms = (t1 - t0) * 1e3
  result.decode_ms = (t2 - t1) * 1e3
  result.total_ms = (t2 - t0) * 1e3
  result.phases = timer.collect()
  result.overlap = overlap
  return result


def _alone_times(
  models, target_inputs, drafter_fn, m, slack, timer, t_lm, d_lm
) -> dict:
  """Times the two prefill sides alone, after the measured run (untimed).

  The saving of running them concurrently is then measured, not assumed:
  overlap = target_alone + drafter_alone - concurrent wall. It is negative
  when contention makes the concurrent region slower than running the two
  one after the other.
  """
  scratch = Timer(timer.cuda_devices)
  target = _Target(models.target, scratch, m + slack, t_lm)
  drafter = _Drafter(
    models.drafter, scratch, m + slack, target.b.vocab_size, d_lm
  )
  out = {}
  for key, fn in (
    ("target_alone_ms", lambda: target.prefill(target_inputs)),
    ("drafter_alone_ms", lambda: drafter_fn(drafter, scratch)),
  ):
    scratch.sync()
    t0 = time.perf_counter()
    fn()
    scratch.sync()
    out[key] = (time.perf_counter() - t0) * 1e3
  return out


def _prefill_drafts(
  drafter: _Drafter,
  draft_inputs: dict,
  adapter: Adapter,
  lm_head: torch.Tensor,
  k: int,
  timer: Timer,
):
  """Drafter prefill + k greedy steps; adapter + LM head -> drafts 1..k.

  Returns (drafts [k] or None, e0 [1] or None): e_t = argmax(W a(h_d)[t])
  predicts target token t. e_0 is not verified: the target's own prefill
  yields token 0, so the k drafts are e_1..e_k, made from h_d[0..k].
  """
  drafter.prefill(draft_inputs)
  if k < 1:
    return None, None
  nxt = drafter.next_token
  drafter.prefix = "prefill_"
  try:
    for _ in range(k):  # the drafter's own tokens 0..k-1 give h_d[1..k]
      nxt = drafter.feed(nxt)
  finally:
    drafter.prefix = ""
  hs = drafter.states[: k + 1].to(adapter.device, adapter.dtype)[None]
  name = f"prefill_adapter:{adapter.name}"
  with timer.span(name, adapter.device, units=k + 1):
    y = adapter.module(hs)
    e = _argmax(y[0].to(lm_head.dtype) @ lm_head.T)
  return e[1:], e[:1]


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


def baseline(models: Models, target_inputs: dict, cfg: SDConfig):
  """Target greedy decoding with its KV cache."""
  return run_method("baseline", models, target_inputs, None, cfg)


def draft_tokens(models: Models, target_inputs, draft_inputs, cfg: SDConfig):
  """The drafter's own greedy tokens, verified by the target."""
  return run_method("draft_tokens", models, target_inputs, draft_inputs, cfg)


def prefill_hiding(
  models: Models, adapter: str, target_inputs, draft_inputs, cfg: SDConfig
):
  """Drafts made during the target prefill (L1-L4), then plain decoding."""
  method = f"prefill_hiding:{adapter}"
  return run_method(method, models, target_inputs, draft_inputs, cfg)


def decode(
  models: Models, adapter: str, target_inputs, draft_inputs, cfg: SDConfig
):
  """Decode-adapter drafting (L5, B1, L5F) in every iteration."""
  method = f"decode:{adapter}"
  return run_method(method, models, target_inputs, draft_inputs, cfg)


def two_phase(
  models: Models,
  prefill_adapter: str,
  decode_adapter: str,
  target_inputs,
  draft_inputs,
  cfg: SDConfig,
):
  """prefill_hiding with one adapter, then decode with another."""
  method = f"two_phase:{prefill_adapter}+{decode_adapter}"
  return run_method(method, models, target_inputs, draft_inputs, cfg)
