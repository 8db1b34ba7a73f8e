"""InputPipeline: shuffled, length-bucketed, sharded, prefetched batches.

Order of one epoch (all of it a pure function of seed, epoch and the
process's position, so iteration resumes exactly from any step):

1. The selected samples are assigned to length buckets (static shapes).
2. They are dealt to the rows ("slots") of the global batch: sorted by
   (bucket, index), the r-th sample goes to slot r % batch_size.
   Each process reads (and caches) only the slots of the batch rows it
   feeds (global_batch_size / process_count adjoining rows).
3. Each epoch, every slot's samples of a bucket are put in an order drawn
   from (seed, epoch, bucket) -- the same draw in every process -- and the
   k-th batch of the bucket takes the k-th sample of every slot. So the
   global batch at every step depends on the data and seed alone, not on
   how many processes (or devices) share it: a run resumes on another
   process count exactly. (Two samples of one slot never share a batch.)
4. The sequence of buckets over the epoch's steps is a permutation seeded by
   (seed, epoch) alone, so every process pads step k to the same length.

With drop_remainder=False the last batch of each bucket is filled with
padding rows (index -1, mask all False), so every sample is seen exactly
once. Steps 1 and 2 are in buckets.py; with cache='device', batches are
gathered on device by device_cache.py.
"""

import concurrent.futures
import os
import queue
import threading
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from tqdm import tqdm

from egpt_align.data import buckets
from egpt_align.data.buckets import default_bucket_lengths
from egpt_align.data.device_cache import DeviceCache
from egpt_align.data.reader import HiddenStateDataset

CACHE_MODES = ("auto", "device", "host", "none")


def _host_memory_bytes() -> int:
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return 0


def _device_memory_bytes(device) -> int:
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 -- backends without stats
    stats = None
  if not stats:
    return 0
  limit = stats.get("bytes_limit", 0)
  return max(0, limit - stats.get("bytes_in_use", 0))


def _checked_indices(
  dataset: HiddenStateDataset,
  indices: Sequence[int] | None,
  *,
  global_batch_size: int,
  gather_batches: int,
  cache: str,
  process_index: int,
  process_count: int,
) -> np.ndarray:
  """The indices as a 1-D int64 array, once the arguments are checked."""
  if gather_batches < 1:
    raise ValueError(f"gather_batches must be >= 1, got {gather_batches}")
  if indices is None:
    indices = np.arange(dataset.num_samples)
  indices = np.asarray(indices, np.int64)
  if indices.ndim != 1:
    raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
  if indices.size and (
    indices.min() < 0 or indices.max() >= dataset.num_samples
  ):
    raise IndexError(
      f"{dataset.path}: indices must be in [0, {dataset.num_samples})"
    )
  if not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index {process_index} not in [0, {process_count})"
    )
  if global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size {global_batch_size} is not divisible by "
      f"process_count {process_count}"
    )
  if cache not in CACHE_MODES:
    raise ValueError(f"cache={cache!r}; expected one of {CACHE_MODES}")
  return indices


class InputPipeline:
  """Batches of a HiddenStateDataset for training and evaluation.

  Attributes:
    steps_per_epoch: number of batches per epoch (the same for every epoch).
    bucket_lengths: the static sequence lengths batches are padded to.
    cache: the resolved cache mode ('device', 'host' or 'none').
  """

  def __init__(
    self,
    dataset: HiddenStateDataset,
    indices: Sequence[int] | None = None,
    *,
    global_batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    bucket_lengths: Sequence[int] | None = None,
    sharding: jax.sharding.Sharding | None = None,
    cache: str = "auto",
    prefetch: int = 2,
    fields: Sequence[str] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int | None = None,
    device_budget_bytes: int | None = None,
    host_budget_bytes: int | None = None,
    progress: bool = True,
    gather_batches: int = 4,
  ):
    self.dataset = dataset
    indices = _checked_indices(
      dataset,
      indices,
      global_batch_size=global_batch_size,
      gather_batches=gather_batches,
      cache=cache,
      process_index=process_index,
      process_count=process_count,
    )
    self.gather_batches = int(gather_batches)
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = self.global_batch_size // process_count
    self.seed = int(seed)
    self.shuffle = shuffle
    self.drop_remainder = drop_remainder
    self.sharding = sharding
    self.prefetch = max(1, int(prefetch))
    if num_workers is None:  # assembly threads: half the cores, at most 8
      num_workers = min(8, (os.cpu_count() or 2) // 2)
    self.num_workers = max(1, int(num_workers))
    self.process_index = process_index
    self.process_count = process_count
    self.progress = progress
    self.fields = tuple(fields or dataset.fields)
    for f in self.fields:
      dataset.field_spec(f)  # raises naming the field if absent
    lengths, bucket = self._assign_buckets(indices, bucket_lengths)
    self.row_offset = self._first_row()
    self._deal(indices, lengths, bucket)
    # None = reuse host batch buffers except on CPU (tests may force True).
    self.recycle_buffers: bool | None = None
    self._set_up_cache(cache, device_budget_bytes, host_budget_bytes)

  # ------------------------------------------------------------------ plan

  def _assign_buckets(
    self, indices: np.ndarray, bucket_lengths: Sequence[int] | None
  ) -> tuple[np.ndarray, np.ndarray]:
    """Sets bucket_lengths; (length, bucket) of each of the indices."""
    lengths = self.dataset.lengths[indices]
    if bucket_lengths is None:
      bucket_lengths = default_bucket_lengths(lengths)
    self.bucket_lengths = tuple(sorted(int(b) for b in set(bucket_lengths)))
    if lengths.size and lengths.max() > self.bucket_lengths[-1]:
      j = int(np.argmax(lengths))
      raise ValueError(
        f"{self.dataset.path}: sample {indices[j]} has length {lengths[j]}, "
        f"longer than the largest bucket {self.bucket_lengths[-1]}"
      )
    return lengths, np.searchsorted(self.bucket_lengths, lengths, side="left")

  def _first_row(self) -> int:
    """The first global batch row this process feeds (its rows adjoin)."""
    base = self.process_index * self.local_batch_size
    if self.sharding is None:
      return base
    index_map = self.sharding.addressable_devices_indices_map(
      (self.global_batch_size,)
    )
    rows = set()
    for idx in index_map.values():
      rows.update(range(*idx[0].indices(self.global_batch_size)))
    first = min(rows)
    if rows != set(range(first, first + self.local_batch_size)):
      raise ValueError(
        f"the batch sharding gives process {self.process_index} batch rows "
        f"{sorted(rows)}; it must feed {self.local_batch_size} adjoining rows"
      )
    return first

  def _deal(self, indices, lengths, bucket) -> None:
    """Sets this process's share of the samples and the epoch's length."""
    deal = buckets.deal(
      indices,
      lengths,
      bucket,
      num_buckets=len(self.bucket_lengths),
      global_batch_size=self.global_batch_size,
      row_offset=self.row_offset,
      local_batch_size=self.local_batch_size,
      drop_remainder=self.drop_remainder,
    )
    self.share = deal.share  # sorted by (bucket, index)
    self.share_lengths = deal.share_lengths
    self._bucket_steps = deal.bucket_steps
    self._slot_members = deal.slot_members
    self.steps_per_epoch = int(self._bucket_steps.sum())

  def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    """[(bucket length, share positions [local_batch] or -1)] of an epoch.

    Row r of every batch of a bucket comes from slot r's samples, in an
    order drawn from (seed, epoch, bucket) for all slots at once, so the
    global batch at each step is the same for any process count.
    """
    nb = len(self.bucket_lengths)
    schedule = np.repeat(np.arange(nb), self._bucket_steps)
    if self.shuffle:
      schedule = np.random.default_rng([self.seed, epoch, 1]).permutation(
        schedule
      )
    rows = slice(self.row_offset, self.row_offset + self.local_batch_size)
    chunks = []
    for b in range(nb):
      members = self._slot_members[b]
      if self.shuffle:
        keys = np.random.default_rng([self.seed, epoch, 2, b]).random(
          (self.global_batch_size, members.shape[1])
        )[rows]
        keys[members < 0] = 2.0  # past a slot's end: stays last
        members = np.take_along_axis(members, np.argsort(keys, axis=1), 1)
      chunks.append(members[:, : self._bucket_steps[b]].T)
    taken = np.zeros(nb, np.int64)
    out = []
    for b in schedule:
      out.append((self.bucket_lengths[b], chunks[b][taken[b]]))
      taken[b] += 1
    return out

  # ---------------------------------------------------------------- caches

  def _set_up_cache(self, cache, device_budget, host_budget) -> None:
    """Resolves the cache mode and fills that cache."""
    self._row_start = np.zeros(self.share.size, np.int64)
    self.num_positions = int(self.share_lengths.sum())
    self.cache = self._resolve_cache(cache, device_budget, host_budget)
    self._host_cache = None
    self._device_cache = None
    if host_budget is None:
      host_budget = int(0.5 * _host_memory_bytes())
    # Background read-ahead of whole files in streaming mode (see batches).
    self.readahead = (
      self.cache == "none"
      and self.dataset.file_bytes(self.fields) <= host_budget
    )
    if self.cache in ("host", "device"):
      self._build_host_cache()
    if self.cache == "device":
      self._build_device_cache()
      self._host_cache = None  # the device copy is all that is needed

  def _bytes_per_position(self) -> int:
    total = 0
    for f in self.fields:
      trailing, dtype = self.dataset.field_spec(f)
      total += int(np.prod(trailing, dtype=np.int64)) * dtype.itemsize
    return total

  def _output_devices(self) -> list:
    if self.sharding is None:
      return [jax.local_devices()[0]]
    return sorted(self.sharding.addressable_devices, key=lambda d: d.id)

  def _resolve_cache(self, cache, device_budget, host_budget) -> str:
    need = (self.num_positions + 1) * self._bytes_per_position()
    self.cache_bytes = need
    if cache != "auto":
      return cache
    devices = self._output_devices()
    if device_budget is None:
      if devices[0].platform == "cpu":
        device_budget = 0  # host memory anyway; numpy gathers are as good
      else:
        device_budget = int(0.5 * min(_device_memory_bytes(d) for d in devices))
    if need <= device_budget:
      return "device"
    if host_budget is None:
      host_budget = int(0.5 * _host_memory_bytes())
    return "host" if need <= host_budget else "none"

  def _build_host_cache(self) -> None:
    """Copies this process's share into flat arrays (+ one zero row)."""
    ds = self.dataset
    self._row_start[1:] = np.cumsum(self.share_lengths[:-1])
    cache = {}
    for f in self.fields:
      trailing, _ = ds.field_spec(f)
      cache[f] = np.zeros(
        (self.num_positions + 1,) + trailing, ds.disk_dtype(f)
      )
    # Read in dataset order so memory-mapped shards stream sequentially.
    it = tqdm(
      np.argsort(self.share, kind="stable"),
      desc=f"cache {self.cache}",
      unit="sample",
      disable=not self.progress,
      mininterval=2.0,
    )
    starts = self._row_start.tolist()
    lens = self.share_lengths.tolist()
    share = self.share.tolist()
    for j in it:
      a, n = starts[j], lens[j]
      for f in self.fields:
        cache[f][a : a + n] = ds._slice(share[j], f, raw=True)
    # Kept as the on-disk bits: np.take on uint16 is a fast memcpy gather.
    self._host_cache = cache

  def _build_device_cache(self) -> None:
    fields = {f: self._as_memory(f, v) for f, v in self._host_cache.items()}
    self._device_cache = DeviceCache(
      fields,
      self.share,
      self.share_lengths,
      self._row_start,
      devices=self._output_devices(),
      sharding=self.sharding,
      global_batch_size=self.global_batch_size,
      rows=range(self.row_offset, self.row_offset + self.local_batch_size),
    )

  def _as_memory(self, field: str, x: np.ndarray) -> np.ndarray:
    return x.view(self.dataset.field_spec(field)[1])

  # --------------------------------------------------------------- batches

  def _host_batch(
    self, seq_len: int, pos: np.ndarray, buffers: dict | None = None
  ) -> dict:
    """A process-local numpy batch from share positions (-1 = padding)."""
    valid = pos >= 0
    # Indexed by the valid positions only: a share can be empty (a small
    # validation split over several processes).
    lengths = np.zeros(len(pos), np.int32)
    lengths[valid] = self.share_lengths[pos[valid]]
    index = np.full(len(pos), -1, np.int32)
    index[valid] = self.share[pos[valid]]
    mask = np.arange(seq_len)[None, :] < lengths[:, None]
    batch = {"mask": mask, "lengths": lengths, "index": index}
    out = None
    if buffers is not None:
      out = {}
      for f in self.fields:
        trailing, _ = self.dataset.field_spec(f)
        shape = (len(pos), seq_len) + trailing
        out[f] = buffers[f][: int(np.prod(shape))].reshape(shape)
    if self.cache == "device":
      raise ValueError("cache='device' batches are assembled on device")
    if self.cache == "none":
      got = self.dataset.read_batch(index, seq_len, fields=self.fields, out=out)
      for f in self.fields:
        batch[f] = got[f]
    else:
      rows = self._rows(seq_len, pos, lengths)
      for f in self.fields:
        # mode='clip': with the default 'raise', numpy buffers `out` (an
        # extra allocation and copy); rows are in range by construction.
        x = np.take(
          self._host_cache[f],
          rows,
          axis=0,
          out=None if out is None else out[f],
          mode="clip",
        )
        batch[f] = self._as_memory(f, x)
    return batch

  def _new_buffers(self) -> dict:
    """Flat host buffers big enough for a local batch at the longest bucket."""
    out = {}
    for f in self.fields:
      trailing, _ = self.dataset.field_spec(f)
      size = (
        self.local_batch_size
        * self.bucket_lengths[-1]
        * int(np.prod(trailing, dtype=np.int64))
      )
      out[f] = np.empty(size, self.dataset.disk_dtype(f))
    return out

  def _rows(self, seq_len, pos, lengths) -> np.ndarray:
    start = np.zeros(len(pos), np.int64)
    start[pos >= 0] = self._row_start[pos[pos >= 0]]
    t = np.arange(seq_len)[None, :]
    rows = start[:, None] + t
    # Padding positions read the extra all-zero row at the end.
    return np.where(t < lengths[:, None], rows, self.num_positions).astype(
      np.int32
    )

  def numpy_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    """Process-local numpy batches (no device placement, no prefetch)."""
    if self.cache == "device":
      raise ValueError("numpy_batches needs cache 'host' or 'none'")
    for seq_len, pos in self.plan(epoch)[start_step:]:
      yield self._host_batch(seq_len, pos)

  def _to_device(self, batch: dict) -> dict:
    return {k: self._put(v) for k, v in batch.items()}

  def _put(self, x: np.ndarray) -> jax.Array:
    if self.sharding is None:
      target = jax.sharding.SingleDeviceSharding(self._output_devices()[0])
    else:
      target = self.sharding
    # A direct upload of the padded batch. (Staging through page-locked host
    # memory did not pay, and uploading only the valid rows and padding on
    # device was measured 2x slower on an H100 host: the per-sample packing
    # in Python costs more than the ~9% of bytes it saves; see
    # docs/PERFORMANCE.md.)
    global_shape = (self.global_batch_size,) + x.shape[1:]
    if self.sharding is None:
      return jax.device_put(x, target)
    return jax.make_array_from_process_local_data(target, x, global_shape)

  def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    """Device batches of an epoch from start_step, prefetched in a thread."""
    plan = self.plan(epoch)[start_step:]
    if self.cache == "device":
      # Dispatch is asynchronous and the gather shares the device's stream
      # with the train step, so a prefetch thread would only add overhead.
      if plan:
        yield from self._device_cache.batches(plan, self.gather_batches)
      return
    if self.cache == "none" and self.readahead:
      # Warm the page cache with large sequential reads in the background
      # (when the files fit comfortably in RAM); the random sample reads
      # then mostly hit memory.
      threading.Thread(
        target=self.dataset.readahead, args=(self.fields,), daemon=True
      ).start()
    yield from self._prefetched(plan)

  def _prefetched(self, plan) -> Iterator[dict]:
    """The plan's batches, assembled and uploaded ahead by worker threads."""
    q: queue.Queue = queue.Queue(maxsize=self.prefetch)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          return True
        except queue.Full:
          pass
      return False

    workers = self.num_workers
    lookahead = workers + self.prefetch
    work = self._batch_worker(lookahead)

    def produce():
      try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
          pending = []
          it = iter(plan)
          while not stop.is_set():
            while len(pending) < lookahead:
              step = next(it, None)
              if step is None:
                break
              pending.append(pool.submit(work, *step))
            if not pending:
              break
            if not put(pending.pop(0).result()):
              break
          for fut in pending:
            fut.cancel()
        put(done)
      except BaseException as e:  # noqa: BLE001 -- re-raised by the consumer
        put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
      while True:
        item = q.get()
        if item is done:
          return
        if isinstance(item, BaseException):
          raise item
        yield item
    finally:
      stop.set()
      thread.join(timeout=10)

  def _batch_worker(self, lookahead: int):
    """work(seq_len, pos) -> device batch, for `lookahead` batches at once."""
    # Host buffers are recycled once their transfer has finished: a fresh
    # 30-60 MB allocation per batch costs page faults and munmap TLB
    # shootdowns that stall every assembling thread. On CPU, device_put may
    # alias the numpy memory, so buffers are never reused there.
    on_cpu = self._output_devices()[0].platform == "cpu"
    recycle = (
      not on_cpu if self.recycle_buffers is None else self.recycle_buffers
    )
    free: queue.SimpleQueue = queue.SimpleQueue()
    if recycle:
      for _ in range(lookahead + 1):
        free.put(self._new_buffers())

    def work(seq_len, pos):
      # Assembly and transfer both run in the worker, so several batches
      # are copied and uploaded concurrently.
      buffers = free.get() if recycle else None
      batch = self._host_batch(seq_len, pos, buffers)
      if buffers is not None and on_cpu:
        batch = {k: np.array(v) for k, v in batch.items()}  # no aliasing
      device_batch = self._to_device(batch)
      if buffers is not None:
        jax.block_until_ready(device_batch)
        free.put(buffers)
      return device_batch

    return work
