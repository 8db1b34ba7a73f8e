"""Tests for egpt_align.lm_head against independent numpy computations."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egpt_align import lm_head

B, S, D, V = 3, 7, 32, 50


def _data(seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(V, D)).astype(np.float32)
  pred = rng.normal(size=(B, S, D)).astype(np.float32)
  # Targets correlated with pred so some tokens match and some do not.
  target = (pred + 0.8 * rng.normal(size=(B, S, D))).astype(np.float32)
  lengths = np.array([7, 4, 1])
  mask = np.arange(S)[None] < lengths[:, None]
  return w, pred, target, mask


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_save_load_roundtrip(tmp_path):
  w = np.random.default_rng(0).normal(size=(V, D)).astype(np.float16)
  npy, js = lm_head.save_lm_head(tmp_path / "head", w, model_id="tiny")
  assert npy.endswith("head.npy") and js.endswith("head.json")
  for p in ("head", "head.npy", "head.json"):
    head = lm_head.load_lm_head(tmp_path / p)
    np.testing.assert_array_equal(head.weight, w)
    assert head.weight.dtype == np.float16
    assert head.info["vocab_size"] == V and head.info["hidden_dim"] == D
    assert head.info["model_id"] == "tiny"
    assert head.vocab_size == V and head.hidden_dim == D
  head = lm_head.load_lm_head(
    lm_head.save_lm_head(tmp_path / "h32", w, model_id="x", dtype="float32")[0]
  )
  assert head.weight.dtype == np.float32 and head.info["dtype"] == "float32"


def test_load_errors_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothere.npy"):
    lm_head.load_lm_head(tmp_path / "nothere")
  w = np.zeros((V, D), np.float32)
  lm_head.save_lm_head(tmp_path / "h", w, model_id="m")
  info = json.loads((tmp_path / "h.json").read_text())

  def write(**changes):
    (tmp_path / "h.json").write_text(json.dumps({**info, **changes}))

  write(vocab_size=V + 1)
  with pytest.raises(ValueError, match=r"shape .* does not match"):
    lm_head.load_lm_head(tmp_path / "h")
  write(format="other")
  with pytest.raises(ValueError, match="'format'"):
    lm_head.load_lm_head(tmp_path / "h")
  write(dtype="float16")
  with pytest.raises(ValueError, match="dtype"):
    lm_head.load_lm_head(tmp_path / "h")
  write(states_post_norm=False)
  with pytest.raises(ValueError, match="states_post_norm"):
    lm_head.load_lm_head(tmp_path / "h")
  (tmp_path / "h.json").unlink()
  with pytest.raises(FileNotFoundError, match="sidecar"):
    lm_head.load_lm_head(tmp_path / "h")
  with pytest.raises(ValueError, match=r"\[V, D\]"):
    lm_head.save_lm_head(tmp_path / "bad", np.zeros(3), model_id="m")


def test_logits_matches_numpy():
  w, pred, _, _ = _data()
  out = lm_head.logits(pred, w)
  assert out.shape == (B, S, V) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, pred @ w.T, rtol=1e-5, atol=1e-4)
  # bf16 compute stays close (float32 accumulation).
  out16 = lm_head.logits(pred, w, dtype=jnp.bfloat16)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, pred @ w.T, atol=0.5)
  with pytest.raises(ValueError, match="hidden dim"):
    lm_head.logits(pred[..., :-1], w)


def test_topk_agreement_matches_numpy():
  w, pred, target, mask = _data()
  got = lm_head.topk_agreement(pred, target, w, mask, ks=(1, 5, 10))
  tgt_tok = np.argmax(target @ w.T, -1)
  order = np.argsort(-(pred @ w.T), -1)
  for k in (1, 5, 10):
    in_topk = (order[..., :k] == tgt_tok[..., None]).any(-1)
    assert int(got[f"top{k}"]) == int((in_topk & mask).sum()), k
  assert int(got["count"]) == int(mask.sum())
  # Partial agreement, so the test can tell right from wrong.
  assert 0 < int(got["top1"]) < int(got["count"])
  assert int(got["top1"]) <= int(got["top5"]) <= int(got["top10"])
  # Explicit target tokens give the same counts, and target may be None.
  got2 = lm_head.topk_agreement(pred, None, w, mask, target_tokens_BS=tgt_tok)
  for key in got:
    assert int(got2[key]) == int(got[key])
  # Self-agreement is total.
  self_ = lm_head.topk_agreement(pred, pred, w, mask, ks=(1,))
  assert int(self_["top1"]) == int(mask.sum())


def test_topk_agreement_sums_over_batches():
  w, pred, target, mask = _data(1)
  full = lm_head.topk_agreement(pred, target, w, mask)
  parts = [
    lm_head.topk_agreement(
      pred[i : i + 1], target[i : i + 1], w, mask[i : i + 1]
    )
    for i in range(B)
  ]
  for key in full:
    assert int(full[key]) == sum(int(p[key]) for p in parts)


def test_token_rank_matches_numpy():
  w, pred, target, _ = _data(2)
  lg = pred @ w.T
  tok = np.argmax(target @ w.T, -1)
  rank = lm_head.token_rank(jnp.asarray(lg), tok)
  expected = (lg > np.take_along_axis(lg, tok[..., None], -1)).sum(-1)
  np.testing.assert_array_equal(rank, expected)


@pytest.mark.parametrize("soft", [True, False])
def test_token_ce_loss_matches_numpy(soft):
  w, pred, target, mask = _data(3)
  got = lm_head.token_ce_loss(pred, target, w, mask, soft=soft)
  logp = _np_log_softmax((pred @ w.T).astype(np.float64))
  tl = (target @ w.T).astype(np.float64)
  if soft:
    p = np.exp(_np_log_softmax(tl))
    ce = -(p * logp).sum(-1)
  else:
    ce = -np.take_along_axis(logp, tl.argmax(-1)[..., None], -1)[..., 0]
  expected = ce[mask].mean()
  np.testing.assert_allclose(float(got), expected, rtol=1e-4)


def test_token_ce_loss_gradient_and_mask():
  w, pred, target, mask = _data(4)

  def loss(p):
    return lm_head.token_ce_loss(p, target, w, mask)

  g = np.asarray(jax.grad(loss)(jnp.asarray(pred)))
  # d(mean soft CE)/d pred = (softmax(pred W^T) - softmax(target W^T)) W / n.
  q = np.exp(_np_log_softmax((pred @ w.T).astype(np.float64)))
  p = np.exp(_np_log_softmax((target @ w.T).astype(np.float64)))
  expected = ((q - p) @ w) * mask[..., None] / mask.sum()
  np.testing.assert_allclose(g, expected, atol=1e-5)
  # Masked positions do not change the loss.
  pred2 = np.where(mask[..., None], pred, 1e3).astype(np.float32)
  np.testing.assert_allclose(float(loss(pred2)), float(loss(pred)), rtol=1e-6)
  # No valid position: 0, not NaN.
  zero = lm_head.token_ce_loss(pred, target, w, np.zeros_like(mask))
  assert float(zero) == 0.0
  # Minimised (for soft targets) at pred == target: CE equals the entropy.
  at_target = float(lm_head.token_ce_loss(target, target, w, mask))
  assert at_target < float(loss(pred))
