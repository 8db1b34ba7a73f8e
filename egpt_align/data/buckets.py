"""Length buckets, and the deal of bucketed samples to batch rows.

Steps 1 and 2 of an epoch's order (see egpt_align.data.pipeline): pure
numpy, the same in every process, so each process can compute its own share.
"""

from typing import NamedTuple

import numpy as np


def default_bucket_lengths(
  lengths: np.ndarray, *, multiple: int = 8, max_buckets: int = 8
) -> tuple[int, ...]:
  """A few bucket lengths from length quantiles.

  Quantiles are rounded up to multiples of `multiple`, except that none
  exceeds the longest sample: dumps capped at max_new_tokens pile up at the
  maximum (50), which would otherwise all be padded to 56.
  """
  if len(lengths) == 0:
    return (multiple,)
  q = np.quantile(lengths, np.linspace(0, 1, max_buckets + 1)[1:])
  q = np.ceil(q / multiple).astype(np.int64) * multiple
  q = np.minimum(q, int(np.max(lengths)))
  return tuple(int(x) for x in np.unique(q))


class Deal(NamedTuple):
  """One process's samples, dealt to its rows ("slots") of the global batch.

  Attributes:
    share: the samples' dataset indices, sorted by (bucket, index).
    share_lengths: their lengths (int32).
    bucket_steps: batches of each bucket per epoch.
    slot_members: per bucket, share positions [local slot, k] of each
      slot's k-th sample of the bucket, -1 past the slot's last.
  """

  share: np.ndarray
  share_lengths: np.ndarray
  bucket_steps: np.ndarray
  slot_members: list[np.ndarray]


def deal(
  indices: np.ndarray,
  lengths: np.ndarray,
  bucket: np.ndarray,
  *,
  num_buckets: int,
  global_batch_size: int,
  row_offset: int,
  local_batch_size: int,
  drop_remainder: bool,
) -> Deal:
  """Deals samples (sorted by bucket, index) round-robin over the slots.

  The r-th sample goes to slot r % global_batch_size; the share is that of
  slots row_offset .. row_offset + local_batch_size - 1.
  """
  gb = global_batch_size
  # Dealt on across buckets (each starts at the slot after the previous
  # one's last sample), so processes' shares differ by < one local batch.
  order = np.lexsort((indices, bucket))
  slot = np.arange(order.size) % gb - row_offset
  mine = (slot >= 0) & (slot < local_batch_size)
  counts = np.bincount(bucket, minlength=num_buckets)
  if drop_remainder:
    bucket_steps = counts // gb
  else:
    bucket_steps = -(-counts // gb)
  # Per bucket: share positions [local slot, k] (its k-th sample), -1 past
  # the slot's last.
  share_bucket, share_slot = bucket[order[mine]], slot[mine]
  group = share_bucket * local_batch_size + share_slot
  by_group = np.lexsort((np.arange(group.size), group))
  sorted_group = group[by_group]
  k = np.arange(group.size) - np.searchsorted(sorted_group, sorted_group)
  slot_members = []
  for b in range(num_buckets):
    width = -(-int(counts[b]) // gb)
    members = np.full((local_batch_size, width), -1, np.int64)
    sel = share_bucket[by_group] == b
    members[share_slot[by_group][sel], k[sel]] = by_group[sel]
    slot_members.append(members)
  return Deal(
    share=indices[order[mine]],
    share_lengths=lengths[order[mine]].astype(np.int32),
    bucket_steps=bucket_steps,
    slot_members=slot_members,
  )
