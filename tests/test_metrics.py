"""Tests for egpt_align.metrics against explicit numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egpt_align import metrics
from tests import oracles

B, S, D = 4, 9, 12


def _data(seed=0):
  rng = np.random.default_rng(seed)
  # A slowly drifting sequence, so next-position cosines are high too.
  steps = 0.1 * np.cumsum(rng.normal(size=(B, S, D)), axis=1)
  target = (rng.normal(size=(B, 1, D)) + steps).astype(np.float32)
  # Per-row noise levels so the cosines spread over the thresholds.
  noise = np.array([0.05, 0.3, 0.6, 1.5], np.float32)[:, None, None]
  pred = target + noise * rng.normal(size=(B, S, D)).astype(np.float32)
  lengths = np.array([9, 5, 2, 0])
  mask = np.arange(S)[None] < lengths[:, None]
  return pred, target, mask


def test_cosine_and_masked_mean():
  pred, target, mask = _data()
  pred[0, 3] = 0.0  # F.normalize semantics: a zero vector has cosine 0.
  cos = np.asarray(metrics.cosine(pred, target))
  ref = np.array(
    [
      [oracles.cosine(pred[b, t], target[b, t]) for t in range(S)]
      for b in range(B)
    ]
  )
  np.testing.assert_allclose(cos, ref, rtol=1e-5, atol=1e-6)
  assert cos[0, 3] == 0.0
  got = float(metrics.masked_mean(cos, mask))
  np.testing.assert_allclose(got, ref[mask].mean(), rtol=1e-5)
  assert float(metrics.masked_mean(cos, np.zeros_like(mask))) == 0.0
  np.testing.assert_allclose(
    float(metrics.masked_mean(cos)), ref.mean(), rtol=1e-5
  )


def test_accept_counts_strict():
  cos = np.array([[0.5, 0.75, 0.8125, 1.0], [0.75, 0.9, 0.2, 0.99]], np.float32)
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
  out = metrics.accept_counts(cos, mask, thresholds=(0.75, 0.8125, 0.925))
  assert int(out["n_valid"]) == 6
  # Strict >: values equal to the threshold are not accepted.
  assert int(out["accept_75"]) == 3  # 0.8125, 1.0, 0.9
  assert int(out["accept_81.25"]) == 2  # 1.0, 0.9
  assert int(out["accept_92.5"]) == 1  # 1.0 (0.99 is padding)
  default = metrics.accept_counts(cos, mask)
  assert set(default) == {
    "n_valid",
    "accept_80",
    "accept_85",
    "accept_90",
    "accept_95",
  }
  with pytest.raises(ValueError, match="duplicate"):
    metrics.accept_counts(cos, mask, thresholds=(0.9, 0.9))


def test_leading_run():
  match = np.array(
    [
      [1, 1, 0, 1, 1],
      [1, 1, 1, 1, 1],
      [0, 1, 1, 1, 1],
      [1, 1, 1, 1, 1],
    ],
    bool,
  )
  mask = np.array(
    [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool
  )
  np.testing.assert_array_equal(
    np.asarray(metrics.leading_run(match, mask)), [2, 3, 0, 0]
  )
  np.testing.assert_array_equal(
    np.asarray(metrics.leading_run(match)), [2, 5, 0, 5]
  )


def _np_sums(pred, target, mask, shift, thresholds):
  out = {"n_valid": 0, "n_samples": 0, "cos_sum": 0.0, "cos_sq_sum": 0.0}
  out["mse_sum"] = 0.0
  keys = [metrics.threshold_key(t) for t in thresholds]
  for k in keys:
    out[f"accept_{k}"] = 0
    out[f"run_{k}_sum"] = 0
    out[f"run_{k}_sq_sum"] = 0
  for b in range(pred.shape[0]):
    cos_row = []
    for t in range(pred.shape[1] - shift):
      if not (mask[b, t] and mask[b, t + shift]):
        cos_row.append(None)
        continue
      c = oracles.cosine(pred[b, t], target[b, t + shift])
      cos_row.append(c)
      out["n_valid"] += 1
      out["cos_sum"] += c
      out["cos_sq_sum"] += c * c
      out["mse_sum"] += float(np.mean((pred[b, t] - target[b, t + shift]) ** 2))
      for k, tau in zip(keys, thresholds, strict=True):
        out[f"accept_{k}"] += int(c > tau)
    out["n_samples"] += int(any(c is not None for c in cos_row))
    for k, tau in zip(keys, thresholds, strict=True):
      run = 0
      for c in cos_row:
        if c is None or not c > tau:
          break
        run += 1
      out[f"run_{k}_sum"] += run
      out[f"run_{k}_sq_sum"] += run * run
  return out


@pytest.mark.parametrize("shift", [0, 1, 2])
def test_hidden_state_sums_match_loops(shift):
  pred, target, mask = _data(1)
  thresholds = metrics.THRESHOLDS
  got = metrics.hidden_state_sums(pred, target, mask, shift=shift)
  ref = _np_sums(pred, target, mask, shift, thresholds)
  assert set(got) == set(ref)
  for k, v in ref.items():
    if isinstance(v, int):
      assert int(got[k]) == v, k
    else:
      np.testing.assert_allclose(float(got[k]), v, rtol=1e-5, atol=1e-6)
  assert int(got["run_80_sum"]) > 0  # The data exercise the runs.


def test_sums_are_exactly_additive_and_finalize():
  pred, target, mask = _data(2)
  f = jax.jit(lambda p, t, m: metrics.hidden_state_sums(p, t, m, shift=1))
  whole = f(pred, target, mask)
  halves = [
    f(pred[i : i + 2], target[i : i + 2], mask[i : i + 2]) for i in (0, 2)
  ]
  summed = jax.tree.map(lambda a, b: a + b, *halves)
  for k in whole:
    np.testing.assert_allclose(float(summed[k]), float(whole[k]), rtol=1e-6)
  fin = metrics.finalize_sums(summed)
  cos = np.asarray(metrics.cosine(pred[:, :-1], target[:, 1:]))
  valid = mask[:, :-1] & mask[:, 1:]
  np.testing.assert_allclose(fin["cos_sim"], cos[valid].mean(), rtol=1e-5)
  np.testing.assert_allclose(fin["cos_std"], cos[valid].std(), rtol=1e-3)
  np.testing.assert_allclose(fin["accept_90"], (cos[valid] > 0.9).mean())
  runs = np.asarray(metrics.leading_run(cos > 0.9, valid))
  rows = valid.any(-1)
  np.testing.assert_allclose(fin["consecutive_mean_90"], runs[rows].mean())
  np.testing.assert_allclose(
    fin["consecutive_std_90"], runs[rows].std(), atol=1e-6
  )


def test_errors():
  pred, target, mask = _data()
  with pytest.raises(ValueError, match="shift"):
    metrics.hidden_state_sums(pred, target, mask, shift=-1)
  with pytest.raises(ValueError, match="mask"):
    metrics.hidden_state_sums(pred, target, mask[:, :2])
  with pytest.raises(ValueError, match="pred and target"):
    metrics.hidden_state_sums(pred, target[:, :2], None)
  assert metrics.hidden_state_sums(pred, target, None)["n_valid"] == B * S
  assert jnp.issubdtype(metrics.cosine(pred, target).dtype, jnp.floating)


def test_cosine_gradient_is_finite_at_zero_vectors():
  """Padding rows are exact zeros: their masked cosine must not give NaN."""
  import jax

  pred = jnp.zeros((1, 3, 4)).at[0, 0].set(1.0)
  target = jnp.ones((1, 3, 4))
  mask = jnp.array([[True, False, False]])

  def f(p):
    return metrics.masked_mean(metrics.cosine(p, target), mask)

  grad = jax.grad(f)(pred)
  assert np.all(np.isfinite(np.asarray(grad)))
  assert np.all(np.asarray(grad)[0, 1:] == 0.0)
