"""Data parallelism over a one-axis device mesh.

This is pmap-style data parallelism done the current way: `jax.jit` with
explicit shardings over a mesh with one axis, 'data'. Every batch array is
split on its leading (batch) axis. No `jax.pmap`.

Two layouts for the training state (`config.shard_weight_update`):
  * replicated: every device holds the float32 params and the AdamW moments,
    XLA all-reduces the gradients and every device runs the whole update;
  * weight-update sharding (ZeRO stage 1; Xu et al. 2020, "Automatic
    Cross-Replica Sharding of Weight Update in Data-Parallel Training"): the
    float32 params and the moments of every large leaf are split over
    'data', so the gradients are reduce-scattered, each device updates its
    1/n share (AdamW's bandwidth-bound pass shrinks n-fold) and the
    compute-dtype kernel copies are all-gathered. Same arithmetic, a
    different order of the float sums; n-fold less optimizer memory.

Multi-host: `initialize_multihost()` calls `jax.distributed.initialize()`;
each process then feeds its own slice of the global batch, which the input
pipeline assembles with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(
  num_devices: int | None = None,
  *,
  devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
  """A one-axis ('data',) mesh over `devices` (default: all, or the first n).

  The axis type is Auto: the jitted step carries explicit in/out shardings
  and the compiler propagates the rest, which behaves the same on the jax
  versions we support (0.10 here, 0.11 on the GPU machine).
  """
  if devices is None:
    devices = jax.devices()
    if num_devices is not None:
      if not 1 <= num_devices <= len(devices):
        raise ValueError(
          f"num_devices={num_devices} but {len(devices)} devices are visible"
        )
      devices = devices[:num_devices]
  devices = list(devices)
  return jax.make_mesh(
    (len(devices),),
    (DATA_AXIS,),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=devices,
  )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Every device holds the whole array (params, optimizer state)."""
  return NamedSharding(mesh, P())


def weight_update_sharding(
  shape: Sequence[int], mesh: jax.sharding.Mesh, *, min_size: int
) -> NamedSharding:
  """How weight-update sharding lays out one params / optimizer-state leaf.

  Split over 'data' on the first axis whose size the device count divides
  (the leading axis keeps each device's share contiguous, so the
  reduce-scatter and all-gather need no transposes); replicated when the
  leaf has fewer than `min_size` elements (a collective per tiny bias costs
  more latency than its update saves) or no axis divides.
  """
  n = mesh.shape[DATA_AXIS]
  size = 1
  for dim in shape:
    size *= int(dim)
  if n > 1 and size >= min_size:
    for axis, dim in enumerate(shape):
      if dim % n == 0:
        spec = [None] * len(shape)
        spec[axis] = DATA_AXIS
        return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Split the leading (batch) axis over 'data'; the rest is replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh) -> None:
  """Raises a clear error unless the global batch splits evenly."""
  n = mesh.devices.size
  if global_batch_size < 1 or global_batch_size % n:
    raise ValueError(
      f"config.batch_size={global_batch_size} is the global batch and must "
      f"be a positive multiple of the device count ({n} devices on the "
      f"'{DATA_AXIS}' axis); try --config.batch_size="
      f"{max(n, (global_batch_size // n) * n)}"
    )
  if global_batch_size % jax.process_count():
    raise ValueError(
      f"config.batch_size={global_batch_size} must divide by the process "
      f"count ({jax.process_count()})"
    )


def initialize_multihost(
  *,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  heartbeat_timeout_s: int = 100,
) -> None:
  """jax.distributed.initialize(); a no-op when run as one process.

  Unset arguments come from JAX's usual sources: JAX_COORDINATOR_ADDRESS and
  the cluster's environment (SLURM, Open MPI, Kubernetes, ...). A process
  whose heartbeats stop for `heartbeat_timeout_s` seconds is declared dead
  and the coordination service then ends every other process with an error,
  so a crashed peer never leaves the rest waiting in a collective.
  """
  if num_processes == 1:
    return
  if (num_processes is None) != (process_id is None):
    raise ValueError(
      "config.distributed.num_processes and config.distributed.process_id "
      "go together: set both (or neither, to take them from the cluster's "
      "environment)"
    )
  try:
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      heartbeat_timeout_seconds=heartbeat_timeout_s,
    )
  except ValueError as e:  # JAX found no cluster settings
    raise ValueError(
      f"config.multihost: {e}; pass --config.distributed.coordinator_address"
      "=HOST:PORT, --config.distributed.num_processes=N and "
      "--config.distributed.process_id=I (or set JAX_COORDINATOR_ADDRESS and "
      "launch under SLURM / mpirun)"
    ) from None
  logging.info(
    "multi-host: process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
