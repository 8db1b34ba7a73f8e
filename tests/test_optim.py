"""Optimizer: schedules against closed forms, AdamW vs torch's update rule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from egpt_align import models, optim
from egpt_align.configs import base


def _optim_config(**updates):
  config = base.get_config().optim
  for key, value in updates.items():
    config[key] = value
  return config


def test_epoch_schedule_is_torch_cosine_annealing_per_epoch():
  lr0, eta, spe, epochs = 1e-3, 1e-6, 5, 7
  schedule = optim.create_schedule(
    _optim_config(), steps_per_epoch=spe, num_epochs=epochs
  )
  for step in range(spe * epochs):
    k = step // spe  # torch steps the scheduler after each epoch
    want = eta + (lr0 - eta) * (1 + math.cos(math.pi * k / epochs)) / 2
    assert float(schedule(step)) == pytest.approx(want, rel=1e-6)
  # Epoch 1 runs at the peak, the last epoch just above eta_min.
  assert float(schedule(0)) == pytest.approx(lr0)
  assert float(schedule(spe * epochs - 1)) > eta


def test_step_schedule_warmup_then_cosine():
  lr0, eta, total, warm = 2e-3, 1e-5, 100, 10
  schedule = optim.create_schedule(
    _optim_config(
      learning_rate=lr0,
      end_learning_rate=eta,
      schedule_unit="step",
      warmup_steps=warm,
    ),
    steps_per_epoch=20,
    num_epochs=5,
  )
  for step in range(total + 5):
    if step < warm:
      want = lr0 * step / warm
    else:
      frac = min((step - warm) / (total - warm), 1.0)
      want = eta + (lr0 - eta) * (1 + math.cos(math.pi * frac)) / 2
    assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-12)


def test_schedule_errors_are_clear():
  with pytest.raises(ValueError, match="schedule_unit"):
    optim.create_schedule(
      _optim_config(schedule_unit="epochs"), steps_per_epoch=2, num_epochs=2
    )
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.create_schedule(
      _optim_config(warmup_steps=3), steps_per_epoch=2, num_epochs=2
    )
  with pytest.raises(ValueError, match="decay_mask"):
    optim.create_optimizer(
      _optim_config(decay_mask="norms"), steps_per_epoch=2, num_epochs=2
    )


def _l5_params():
  model = models.create_adapter(
    "l5", hidden_dim=16, num_heads=2, ffn_dim=32, max_seq_len=8
  )
  x = jnp.zeros((1, 4, 16))
  return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def test_decay_mask_matrices_skips_norms_biases_alphas_pos_embed():
  params = _l5_params()
  mask = optim.decay_mask(params, "matrices")
  flat = {
    "/".join(str(k.key) for k in path): v
    for path, v in jax.tree_util.tree_leaves_with_path(mask)
  }
  decayed = {k for k, v in flat.items() if v}
  assert decayed == {k for k in flat if k.endswith("kernel")}
  assert not flat["pos_embed"] and not flat["alpha"]
  assert not flat["input_norm/scale"] and not flat["output_proj/bias"]
  assert all(jax.tree.leaves(optim.decay_mask(params, "all")))


def _torch_adamw(params, grads_seq, *, lr, wd, b1, b2, eps, clip, decay):
  """torch.optim.AdamW + clip_grad_norm_ written out in numpy."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  for t, grads in enumerate(grads_seq, start=1):
    norm = math.sqrt(
      sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values())
    )
    scale = min(1.0, clip / norm) if clip else 1.0
    for k in p:
      g = grads[k] * scale
      if decay[k]:
        p[k] = p[k] * (1 - lr[t - 1] * wd)
      m[k] = b1 * m[k] + (1 - b1) * g
      v2[k] = b2 * v2[k] + (1 - b2) * g * g
      m_hat = m[k] / (1 - b1**t)
      v_hat = v2[k] / (1 - b2**t)
      p[k] = p[k] - lr[t - 1] * m_hat / (np.sqrt(v_hat) + eps)
  return p


@pytest.mark.parametrize("mask", ["all", "matrices"])
def test_adamw_matches_torch_update_rule(mask):
  rng = np.random.default_rng(0)
  params = {
    "kernel": rng.normal(size=(4, 3)).astype(np.float32),
    "bias": rng.normal(size=(3,)).astype(np.float32),
    "alpha": np.float32(0.1),
  }
  grads_seq = [
    {
      k: (3.0 * rng.normal(size=np.shape(v))).astype(np.float32)
      for k, v in params.items()
    }
    for _ in range(4)
  ]
  config = _optim_config(decay_mask=mask, weight_decay=0.1)
  tx, schedule = optim.create_optimizer(config, steps_per_epoch=2, num_epochs=2)
  state = tx.init(params)
  p = jax.tree.map(jnp.asarray, params)
  for grads in grads_seq:
    updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, p)
    p = optax.apply_updates(p, updates)
  lrs = [float(schedule(i)) for i in range(len(grads_seq))]
  assert lrs[0] > lrs[2]  # the second epoch runs at the annealed rate
  decay = {k: mask == "all" or k == "kernel" for k in params}
  want = _torch_adamw(
    params,
    grads_seq,
    lr=lrs,
    wd=0.1,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    clip=1.0,
    decay=decay,
  )
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-5, atol=1e-7)


def test_bf16_first_moment_is_stored_in_bf16_and_tracks_float32():
  rng = np.random.default_rng(1)
  params = {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)}
  grads = [
    {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)}
    for _ in range(5)
  ]
  out = {}
  for mu_dtype in ("float32", "bfloat16"):
    tx, _ = optim.create_optimizer(
      _optim_config(mu_dtype=mu_dtype), steps_per_epoch=5, num_epochs=1
    )
    state = tx.init(params)
    p = params
    for g in grads:
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
    mus = [
      x for x in jax.tree.leaves(state) if getattr(x, "shape", ()) == (8, 16)
    ]
    out[mu_dtype] = (p["kernel"], {x.dtype for x in mus})
  assert out["float32"][1] == {jnp.dtype(jnp.float32)}
  # mu in bf16, nu (second moment) still float32.
  assert out["bfloat16"][1] == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
  assert out["bfloat16"][0].dtype == jnp.float32
  diff = np.abs(np.asarray(out["bfloat16"][0] - out["float32"][0]))
  assert 0 < diff.max() < 1e-4  # rounding of mu, at lr 1e-3 scale
  with pytest.raises(ValueError, match="mu_dtype"):
    optim.create_optimizer(
      _optim_config(mu_dtype="float16"), steps_per_epoch=5, num_epochs=1
    )
