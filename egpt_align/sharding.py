"""Data parallelism over a one-axis device mesh.

This is pmap-style data parallelism done the current way: `jax.jit` with
explicit shardings over a mesh with one axis, 'data'. Parameters and the
optimizer state are replicated, every batch array is split on its leading
(batch) axis, and XLA inserts the gradient all-reduce. No `jax.pmap`.

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


def initialize_multihost() -> None:
  """jax.distributed.initialize() (cluster settings from the environment)."""
  jax.distributed.initialize()
  logging.info(
    "multi-host: process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
