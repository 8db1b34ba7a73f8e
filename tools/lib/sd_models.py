"""What the live SD loop drives: target, drafter, adapters, side workers.

`Target` and `Drafter` wrap a backend with its KV cache, the tokens it was
fed and its states h[t]; rolling back after a verification crops the HF
cache (eager runtime) or only moves the next position of the static decoder
(fast runtime: the prefill's HF cache is copied into preallocated buffers,
tools/lib/static_kv.py). `Models` holds everything a method may need and
builds the static decoders and adapter steps once per size.

Prefill overlap: the drafter's prefill work runs on a long-lived
`SideWorker` (one thread per drafter device, kept by `Models`), on its own
GPU when it has one, else on a second CUDA stream of the same GPU (on CPU:
one after the other unless 'thread'). Afterwards, untimed, each side is run
alone (`alone_times`), so the saving is measured: overlap = target alone +
drafter alone - concurrent wall.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from egpt_align.models import ADAPTERS, get_spec
from tools.lib import static_kv
from tools.lib.backends import Backend, cache_length, crop_cache
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

  def __post_init__(self):
    if self.kind not in ADAPTERS:
      raise ValueError(
        f"adapter {self.name!r}: unknown kind {self.kind!r}; expected one of "
        f"{tuple(ADAPTERS)}"
      )


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
    with self.timer.span(name, self.device, units=ids.shape[1]):
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
      self.next_token = greedy_token(logits[0, -1:], self.vocab)
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
# Overlap of the target prefill with drafter work.


class SideWorker:
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


def overlapped(
  target_fn: Callable[[], Any],
  drafter_fn: Callable[[], Any] | None,
  target_device: torch.device,
  draft_device: torch.device | None,
  mode: str,
  workers: dict,
):
  """Runs target_fn and drafter_fn concurrently; returns outputs + timings.

  The drafter side runs on the drafter device's `SideWorker` (a long-lived
  thread with its own stream, on its own GPU when it lives on another
  device); each side's time runs from the common start to its own stream
  sync, the wall time to the later one. The saving (`overlap_ms`) is
  measured against each side run alone (`alone_times`). Sequentially (CPU,
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
    workers[key] = SideWorker(ddev)
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


def alone_times(
  models: Models,
  target_inputs: dict,
  drafter_fn: Callable,
  max_states: int,
  timer: Timer,
  t_lm=None,
  d_lm=None,
) -> dict:
  """Times the two prefill sides alone, after the measured run (untimed).

  The saving of running them concurrently is then measured, not assumed:
  overlap = target_alone + drafter_alone - concurrent wall. It is negative
  when contention makes the concurrent region slower than running the two
  one after the other.
  """
  scratch = Timer(timer.cuda_devices)
  target = Target(models.target, scratch, max_states, t_lm)
  drafter = Drafter(
    models.drafter, scratch, max_states, target.b.vocab_size, d_lm
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
