"""Tests for egpt_align.losses against a straightforward numpy version."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egpt_align import losses
from tests import oracles

B, S, D = 3, 6, 16


def _np_terms(pred, target, valid):
  """(mse, cos) over the (b, t) pairs in `valid`, with explicit loops."""
  sq, cos, n = 0.0, 0.0, 0
  for b, t_pred, t_tgt in valid:
    diff = pred[b, t_pred] - target[b, t_tgt]
    sq += float(np.sum(diff * diff))
    cos += oracles.cosine(pred[b, t_pred], target[b, t_tgt])
    n += 1
  if n == 0:
    return 0.0, 0.0
  return sq / (n * pred.shape[-1]), cos / n


def np_reference_loss(pred, target, mask, predicts_next, objective, w, cw):
  pred = pred.astype(np.float64)
  target = target.astype(np.float64)
  b_, s_ = mask.shape
  same = [(b, t, t) for b in range(b_) for t in range(s_) if mask[b, t]]
  mse, cos = _np_terms(pred, target, same)
  align = mse + cw * (1 - cos)
  if not predicts_next:
    return align, {"mse": mse, "cos_sim": cos}
  # The reference masks the next-state term with mask[:, 1:] only.
  ref_pairs = [
    (b, t, t + 1) for b in range(b_) for t in range(s_ - 1) if mask[b, t + 1]
  ]
  pairs = [
    (b, t, t + 1)
    for b in range(b_)
    for t in range(s_ - 1)
    if mask[b, t] and mask[b, t + 1]
  ]
  next_cos = _np_terms(pred, target, pairs)[1]
  if objective == "reference":
    next_mse = _np_terms(pred, target, ref_pairs)[0]
    loss = (1 - w) * align + w * next_mse
  else:
    next_mse = _np_terms(pred, target, pairs)[0]
    loss = next_mse + cw * (1 - next_cos)
  aux = {"mse": mse, "cos_sim": cos, "next_mse": next_mse}
  aux["next_cos_sim"] = next_cos
  return loss, aux


def _data(seed=0):
  rng = np.random.default_rng(seed)
  target = rng.normal(size=(B, S, D)).astype(np.float32)
  pred = (target + 0.7 * rng.normal(size=(B, S, D))).astype(np.float32)
  lengths = np.array([6, 3, 1])
  mask = np.arange(S)[None] < lengths[:, None]
  return pred, target, mask


@pytest.mark.parametrize(
  "predicts_next,objective",
  [(False, "reference"), (True, "reference"), (True, "next")],
)
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.3, 0.8)])
def test_matches_numpy(predicts_next, objective, weights):
  pred, target, mask = _data()
  w, cw = weights
  loss, aux = losses.adapter_loss(
    pred,
    target,
    mask,
    predicts_next=predicts_next,
    objective=objective,
    prediction_weight=w,
    cos_weight=cw,
  )
  ref, ref_aux = np_reference_loss(
    pred, target, mask, predicts_next, objective, w, cw
  )
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  for k, v in ref_aux.items():
    np.testing.assert_allclose(float(aux[k]), v, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    float(aux["cos_loss"]), 1 - ref_aux["cos_sim"], rtol=1e-6
  )
  assert loss.dtype == jnp.float32


@pytest.mark.parametrize(
  "predicts_next,objective",
  [(False, "reference"), (True, "reference"), (True, "next")],
)
def test_token_ce_and_combine_on_floats(predicts_next, objective):
  """The token CE enters with its weight; combine() of the terms as floats
  (how evaluation finalizes whole-split sums) gives the step's loss."""
  pred, target, mask = _data()
  kwargs = dict(
    predicts_next=predicts_next,
    objective=objective,
    prediction_weight=0.3,
    cos_weight=0.8,
  )
  loss, aux = losses.adapter_loss(
    pred,
    target,
    mask,
    token_ce=jnp.float32(2.0),
    token_ce_weight=0.25,
    **kwargs,
  )
  ref, _ = np_reference_loss(
    pred, target, mask, predicts_next, objective, 0.3, 0.8
  )
  np.testing.assert_allclose(float(loss), ref + 0.5, rtol=1e-5)
  assert float(aux["token_ce"]) == 2.0
  terms = {k: float(v) for k, v in aux.items()}
  got = losses.combine(terms, token_ce_weight=0.25, **kwargs)
  np.testing.assert_allclose(got, float(loss), rtol=1e-6)
  unweighted = losses.combine(terms, **kwargs)
  np.testing.assert_allclose(unweighted, ref, rtol=1e-5)


def test_padding_values_do_not_matter():
  pred, target, mask = _data(1)
  garbage = np.where(mask[..., None], pred, 1e3)
  for kw in (
    dict(predicts_next=False),
    dict(predicts_next=True),
    dict(predicts_next=True, objective="next"),
  ):
    a = losses.adapter_loss(pred, target, mask, **kw)[0]
    b = losses.adapter_loss(garbage, target, mask, **kw)[0]
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_reference_next_mask_semantics_noted():
  # A hole in the mask: the reference's mask[:, 1:] still counts pred[t] at an
  # invalid t; the 'next' objective requires both t and t+1 valid.
  pred, target, _ = _data(2)
  mask = np.ones((B, S), bool)
  mask[0, 2] = False
  for obj in ("reference", "next"):
    loss, aux = losses.adapter_loss(
      pred, target, mask, predicts_next=True, objective=obj
    )
    ref, ref_aux = np_reference_loss(pred, target, mask, True, obj, 0.5, 0.5)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    np.testing.assert_allclose(
      float(aux["next_mse"]), ref_aux["next_mse"], rtol=1e-5
    )


def test_no_mask_equals_all_valid_and_single_position():
  pred, target, _ = _data(3)
  a = losses.adapter_loss(pred, target, None, predicts_next=True)[0]
  b = losses.adapter_loss(
    pred, target, np.ones((B, S), bool), predicts_next=True
  )[0]
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
  # S == 1: no next pair; the reference's pred_loss is 0 there too.
  loss, aux = losses.adapter_loss(
    pred[:, :1], target[:, :1], None, predicts_next=True
  )
  assert float(aux["next_mse"]) == 0.0
  np.testing.assert_allclose(
    float(loss),
    0.5 * (float(aux["mse"]) + 0.5 * float(aux["cos_loss"])),
    rtol=1e-6,
  )


def test_jit_grad_and_empty_mask_finite():
  pred, target, mask = _data(4)
  mask[1] = False  # An all-padding row (pipeline remainder batches).
  f = jax.jit(
    lambda p: losses.adapter_loss(p, target, mask, predicts_next=True)[0]
  )
  g = jax.grad(f)(jnp.asarray(pred))
  assert np.all(np.isfinite(np.asarray(g)))
  assert not np.any(np.asarray(g)[1])  # No gradient into padding.
  empty = np.zeros((B, S), bool)
  loss, _ = losses.adapter_loss(pred, target, empty, predicts_next=True)
  assert np.isfinite(float(loss))


def test_errors():
  pred, target, mask = _data()
  with pytest.raises(ValueError, match="'next'.*predicts_next=False"):
    losses.adapter_loss(
      pred, target, mask, predicts_next=False, objective="next"
    )
  with pytest.raises(ValueError, match="unknown"):
    losses.adapter_loss(pred, target, mask, predicts_next=True, objective="foo")
  with pytest.raises(ValueError, match="mask"):
    losses.adapter_loss(pred, target, mask[:, :3], predicts_next=False)
  with pytest.raises(ValueError, match="pred and target"):
    losses.adapter_loss(pred, target[:, :3], None, predicts_next=False)


@pytest.mark.parametrize(
  "predicts_next,objective",
  [(False, "reference"), (True, "reference"), (True, "next")],
)
def test_fused_gradient_equals_autodiff(predicts_next, objective, monkeypatch):
  # The written-out VJP of _masked_terms against jax differentiating the
  # plain formulas, for pred and target, with padding, an exact zero vector
  # and a zero target row in the batch.
  pred, target, mask = _data(7)
  pred[0, 2] = 0.0
  target[1, 0] = 0.0
  pred[2, 4:] = 0.0  # Padding rows of a model at init.

  def loss(p, t):
    return losses.adapter_loss(
      p,
      t,
      mask,
      predicts_next=predicts_next,
      objective=objective,
      prediction_weight=0.3,
      cos_weight=0.8,
    )[0]

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  fused = grad(jnp.asarray(pred), jnp.asarray(target))
  monkeypatch.setattr(losses, "_masked_terms", losses._masked_terms_autodiff)
  plain = jax.jit(jax.grad(loss, argnums=(0, 1)))(
    jnp.asarray(pred), jnp.asarray(target)
  )
  for a, b in zip(fused, plain, strict=True):
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6
    )
  # And both against central differences of the float64 numpy loss.
  rng = np.random.default_rng(0)
  for _ in range(5):
    b, t, k = rng.integers(0, B), rng.integers(0, S), rng.integers(0, D)
    if pred[b, t].any() and target[b, t].any():
      h = 1e-4
      hi, lo = pred.astype(np.float64), pred.astype(np.float64)
      hi[b, t, k] += h
      lo[b, t, k] -= h
      args = (target, mask, predicts_next, objective, 0.3, 0.8)
      fd = (
        np_reference_loss(hi, *args)[0] - np_reference_loss(lo, *args)[0]
      ) / (2 * h)
      assert float(fused[0][b, t, k]) == pytest.approx(fd, abs=1e-4)
