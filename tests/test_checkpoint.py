"""Checkpoints: newest + best kept, typed restore, load_params, npz files."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from egpt_align import checkpoint, sharding
from egpt_align.train_state import TrainState

TX = optax.adamw(1e-3)


def _init(rng):
  params = {
    "layers_0": {"kernel": jax.random.normal(rng, (4, 3))},
    "alpha": jnp.asarray(0.1),
  }
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=TX.init(params)
  )


def _state(seed, step):
  state = _init(jax.random.key(seed))
  return jax.device_get(state.replace(step=jnp.asarray(step, jnp.int32)))


def _save_run(workdir, plan):
  """Saves (step, val_loss) pairs; returns the host states saved."""
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  saved = {}
  for step, loss in plan:
    saved[step] = _state(step, step)
    meta = {"epoch": step, "config": {"model": {"name": "l1"}}}
    ckpt.save(step, saved[step], meta, val_loss=loss)
  return ckpt, saved


def test_keeps_newest_and_best(tmp_path):
  ckpt, _ = _save_run(
    str(tmp_path), [(10, 1.0), (20, 0.5), (25, None), (30, 0.7)]
  )
  # 25 (no metric) went when 30 became newest; 10 and 30 are not best.
  assert ckpt.all_steps() == [20, 30]
  assert ckpt.best_step() == 20 and ckpt.latest_step() == 30
  ckpt.save(35, _state(0, 35), {"epoch": 3})  # a mid-epoch interrupt save
  assert ckpt.all_steps() == [20, 35] and ckpt.best_step() == 20
  assert not ckpt.save(35, _state(0, 35), {})  # an existing step: no-op
  ckpt.close()


def test_restore_into_abstract_state_keeps_types_and_sharding(tmp_path):
  ckpt, saved = _save_run(str(tmp_path), [(7, 0.3)])
  mesh = sharding.make_mesh()
  rep = sharding.replicated(mesh)
  abstract = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
    jax.eval_shape(_init, jax.random.key(0)),
  )
  state, meta = ckpt.restore(7, abstract)
  assert isinstance(state, TrainState)
  assert type(state.opt_state[0]) is type(saved[7].opt_state[0])
  assert state.opt_state[0].mu["alpha"].sharding == rep
  assert meta == {"epoch": 7, "config": {"model": {"name": "l1"}}}
  for got, want in zip(
    jax.tree.leaves(state), jax.tree.leaves(saved[7]), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  ckpt.close()


def test_load_params_best_latest_and_step(tmp_path):
  workdir = str(tmp_path)
  ckpt, saved = _save_run(workdir, [(1, 0.9), (2, 0.4), (3, 0.6)])
  ckpt.close()
  for which, step in (("best", 2), ("latest", 3), (3, 3)):
    params, config = checkpoint.load_params(workdir, which)
    assert config.model.name == "l1"
    for got, want in zip(
      jax.tree.leaves(params), jax.tree.leaves(saved[step].params), strict=True
    ):
      assert isinstance(got, np.ndarray)
      np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="kept steps are"):
    checkpoint.load_params(workdir, 1)
  with pytest.raises(ValueError, match="which must be"):
    checkpoint.load_params(workdir, "newest")
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    checkpoint.load_params(str(tmp_path / "empty"))


def test_load_params_best_needs_a_validated_checkpoint(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(4, _state(0, 4), {"epoch": 0, "config": {"model": {}}})
  ckpt.close()
  with pytest.raises(FileNotFoundError, match="which='latest'"):
    checkpoint.load_params(str(tmp_path), "best")
  params, _ = checkpoint.load_params(str(tmp_path), "latest")
  np.testing.assert_array_equal(params["alpha"], np.float32(0.1))


def test_params_npz_round_trip(tmp_path):
  params = {
    "layers_0": {
      "attn": {"in_proj": {"kernel": np.arange(6.0).reshape(2, 3)}},
      "alpha_param": np.float32(0.25),
    },
    "final_norm": {"scale": np.ones(3, np.float32)},
  }
  flat = checkpoint.flatten_params(params)
  assert set(flat) == {
    "layers_0/attn/in_proj/kernel",
    "layers_0/alpha_param",
    "final_norm/scale",
  }
  path = checkpoint.save_params_npz(str(tmp_path / "p.npz"), params)
  back = checkpoint.load_params_npz(path)
  assert jax.tree.structure(back) == jax.tree.structure(
    jax.tree.map(np.asarray, params)
  )
  for got, want in zip(
    jax.tree.leaves(back), jax.tree.leaves(params), strict=True
  ):
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.asarray(want).dtype
  assert back["layers_0"]["alpha_param"].shape == ()
  with pytest.raises(ValueError, match="contains '/'"):
    checkpoint.flatten_params({"a/b": np.zeros(1)})
  with pytest.raises(FileNotFoundError):
    checkpoint.load_params_npz(str(tmp_path / "missing.npz"))
