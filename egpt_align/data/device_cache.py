"""The device cache: a process's share kept on its devices, batches gathered
there (InputPipeline's cache='device')."""

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnums=(3, 4))
def _device_batches_at(
  cache: dict, plan, first, count: int, seq_len: int
) -> tuple:
  """Batches of rows first .. first+count-1 of an on-device plan [steps, B].

  One dispatch for `count` batches (one gather each, written straight into
  its own output buffers): the host cost of a dispatch is shared.
  """
  return tuple(
    _gather_batch(cache, plan[first + i], seq_len) for i in range(count)
  )


def _gather_batch(cache: dict, pos, seq_len: int) -> dict:
  """A batch assembled on device from share positions pos [B] (-1 = pad).

  `cache` holds each field flat ([T + 1, ...], the last row zeros) and the
  per-sample `_start`, `_length`, `_index` arrays of the share.
  """
  valid = pos >= 0
  safe = jnp.where(valid, pos, 0)
  lengths = jnp.where(valid, cache["_length"][safe], 0)
  index = jnp.where(valid, cache["_index"][safe], -1)
  t = jnp.arange(seq_len, dtype=jnp.int32)
  mask = t[None, :] < lengths[:, None]
  out = {"mask": mask, "lengths": lengths, "index": index}
  for k, v in cache.items():
    if k.startswith("_"):
      continue
    zero_row = v.shape[0] - 1
    rows = jnp.where(mask, cache["_start"][safe][:, None] + t, zero_row)
    out[k] = jnp.take(v, rows, axis=0, mode="clip")
  return out


class DeviceCache:
  """A process's share, flat on each of its output devices."""

  def __init__(
    self,
    fields: dict[str, np.ndarray],
    share: np.ndarray,
    share_lengths: np.ndarray,
    row_start: np.ndarray,
    *,
    devices: Sequence[jax.Device],
    sharding: jax.sharding.Sharding | None,
    global_batch_size: int,
    rows: range,
  ):
    """Uploads fields ([T + 1, ...]) and the share's samples to `devices`.

    `rows` are the global batch rows this process feeds.
    """
    arrays = dict(fields)
    # One extra zero entry each, so that padding rows (gathered at position
    # 0) read something even from an empty share.
    arrays["_start"] = np.append(row_start, 0).astype(np.int32)
    arrays["_length"] = np.append(share_lengths, 0).astype(np.int32)
    arrays["_index"] = np.append(share, 0).astype(np.int32)
    self._arrays = {d: jax.device_put(arrays, d) for d in devices}
    self._device = devices[0]
    self._sharding = sharding
    self._global_batch_size = global_batch_size
    self._rows = rows
    self._pieces = None

  def _device_pieces(self) -> list:
    """[(device, local batch rows)] of the output sharding (cached)."""
    if self._pieces is None:
      if self._sharding is None:
        self._pieces = [(self._device, 0, len(self._rows))]
      else:
        gb = self._global_batch_size
        index_map = self._sharding.addressable_devices_indices_map((gb,))
        base = self._rows.start
        pieces = []
        for d, idx in index_map.items():
          sl = idx[0]
          start = (sl.start or 0) - base
          stop = (gb if sl.stop is None else sl.stop) - base
          if start < 0 or stop > len(self._rows):
            raise ValueError(
              "cache='device' needs each process's devices to hold only "
              f"that process's batch rows; device {d} holds rows {sl}"
            )
          pieces.append((d, start, stop))
        self._pieces = pieces
    return self._pieces

  def batches(self, plan, gather_batches: int) -> Iterator[dict]:
    """The plan's batches gathered on device, in order.

    The epoch's positions are uploaded once, grouped by bucket; a batch of
    bucket b is gathered together with the next `gather_batches - 1` batches
    of the same bucket in the plan (one dispatch for all of them), and each
    is yielded at its own place in the plan. At most gather_batches - 1
    gathered batches per bucket wait on the device.
    """
    seq_lens = np.array([s for s, _ in plan])
    order = np.argsort(seq_lens, kind="stable")  # steps grouped by bucket
    row_of = np.empty(len(plan), np.int64)
    row_of[order] = np.arange(len(plan))
    all_pos = np.stack([plan[i][1] for i in order]).astype(np.int32)
    # The rows of each bucket end where the next bucket's begin.
    end_of = {}
    for row, i in enumerate(order):
      end_of[int(seq_lens[i])] = row + 1
    plans = [
      (d, jax.device_put(all_pos[:, start:stop], d))
      for d, start, stop in self._device_pieces()
    ]
    ready: dict[int, dict] = {}
    for step, (seq_len, _) in enumerate(plan):
      if step not in ready:
        row = int(row_of[step])
        count = min(gather_batches, end_of[seq_len] - row)
        parts = [
          _device_batches_at(self._arrays[d], p, np.int32(row), count, seq_len)
          for d, p in plans
        ]
        for i in range(count):
          ready[int(order[row + i])] = self._global_batch(
            [part[i] for part in parts]
          )
      yield ready.pop(step)

  def _global_batch(self, parts: list) -> dict:
    """One batch from the per-device pieces (in `_device_pieces` order)."""
    if self._sharding is None or len(self._sharding.device_set) == 1:
      # One device: its piece already is the batch (assembling a global
      # array would cost ~50 us of host time per field and batch).
      return parts[0]
    return {
      k: jax.make_array_from_single_device_arrays(
        (self._global_batch_size,) + x.shape[1:],
        self._sharding,
        [p[k] for p in parts],
      )
      for k, x in parts[0].items()
    }
