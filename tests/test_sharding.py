"""Mesh helpers: one 'data' axis, batch split, params replicated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egpt_align import sharding


def test_mesh_over_all_or_some_devices():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data",) and mesh.devices.size == 8
  assert sharding.make_mesh(2).devices.size == 2
  sub = sharding.make_mesh(devices=jax.devices()[3:4])
  assert list(sub.devices.flat) == [jax.devices()[3]]
  with pytest.raises(ValueError, match="devices are visible"):
    sharding.make_mesh(9)


def test_batch_size_must_divide_the_device_count():
  mesh = sharding.make_mesh()
  sharding.check_batch_size(64, mesh)
  with pytest.raises(
    ValueError, match="batch_size=60.*multiple of the device count .8 devices"
  ):
    sharding.check_batch_size(60, mesh)
  sharding.check_batch_size(3, sharding.make_mesh(1))


def test_batch_split_on_data_params_replicated():
  mesh = sharding.make_mesh()
  batch = jax.device_put(
    np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
    sharding.batch_sharding(mesh),
  )
  w = jax.device_put(np.ones((3,), np.float32), sharding.replicated(mesh))
  shards = batch.addressable_shards
  assert len(shards) == 8 and all(s.data.shape == (2, 3) for s in shards)
  assert all(s.data.shape == (3,) for s in w.addressable_shards)

  # A reduction over the sharded batch (what a loss does) comes back
  # replicated and equal to the unsharded value: the all-reduce is implicit.
  @jax.jit
  def loss_and_grad(w, x):
    return jax.value_and_grad(lambda w: jnp.mean((x @ w) ** 2))(w)

  step = jax.jit(
    loss_and_grad,
    in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )
  loss, grad = step(w, batch)
  x = np.arange(16 * 3, dtype=np.float64).reshape(16, 3)
  want_loss = np.mean((x @ np.ones(3)) ** 2)
  want_grad = 2 * x.T @ (x @ np.ones(3)) / 16
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-6)
  assert grad.sharding.is_fully_replicated
