"""Hidden-state metrics: cosine, Accept@tau, leading runs, exact masked sums.

All functions are vectorised and jit-friendly and compute in float32.
`hidden_state_sums` returns plain sums and counts, so evaluation over many
batches is exact: add the dicts, then divide (see `finalize_sums`).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

THRESHOLDS = (0.80, 0.85, 0.90, 0.95)
_NORM_EPS = 1e-12  # torch.nn.functional.normalize default.


def threshold_key(tau: float) -> str:
  """Key suffix for a threshold: 0.9 -> '90', 0.925 -> '92.5' (as reference)."""
  pct = round(float(tau) * 100.0, 6)
  return f"{int(pct)}" if pct == int(pct) else f"{pct:g}"


def _threshold_keys(thresholds: Sequence[float]) -> list[str]:
  keys = [threshold_key(t) for t in thresholds]
  if len(set(keys)) != len(keys):
    raise ValueError(f"thresholds {tuple(thresholds)} give duplicate keys")
  return keys


def _mask_or_ones(mask_BS, shape_BS) -> jax.Array:
  if mask_BS is None:
    return jnp.ones(shape_BS, bool)
  mask_BS = jnp.asarray(mask_BS)
  if mask_BS.shape != tuple(shape_BS):
    raise ValueError(
      f"mask must have shape {tuple(shape_BS)}, got {tuple(mask_BS.shape)}"
    )
  return mask_BS.astype(bool)


def normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / max(||x||, 1e-12), as torch.nn.functional.normalize."""
  x = jnp.asarray(x, jnp.float32)
  # sqrt(max(s, eps^2)) == max(sqrt(s), eps) in value, but its gradient at an
  # exact zero vector is finite (sqrt's is not), so masked padding positions
  # cannot turn the gradient into NaN (0 * NaN).
  sum_sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(sum_sq, _NORM_EPS * _NORM_EPS))


def cosine(a_BSD: jax.Array, b_BSD: jax.Array) -> jax.Array:
  """Cosine over the last axis with F.normalize semantics; float32 [B, S]."""
  return jnp.sum(normalize(a_BSD) * normalize(b_BSD), axis=-1)


def masked_mean(x_BS: jax.Array, mask_BS: jax.Array | None = None) -> jax.Array:
  """Mean of x over valid positions (0 when none is valid)."""
  x_BS = jnp.asarray(x_BS, jnp.float32)
  m = _mask_or_ones(mask_BS, x_BS.shape).astype(jnp.float32)
  return jnp.sum(x_BS * m) / jnp.maximum(jnp.sum(m), 1.0)


def accept_counts(
  cos_BS: jax.Array,
  mask_BS: jax.Array | None = None,
  thresholds: Sequence[float] = THRESHOLDS,
) -> dict[str, jax.Array]:
  """{'n_valid', 'accept_80', ...}: #valid and #(valid and cos > tau)."""
  cos_BS = jnp.asarray(cos_BS, jnp.float32)
  m = _mask_or_ones(mask_BS, cos_BS.shape)
  out = {"n_valid": jnp.sum(m, dtype=jnp.int32)}
  for key, tau in zip(_threshold_keys(thresholds), thresholds, strict=True):
    out[f"accept_{key}"] = jnp.sum(m & (cos_BS > tau), dtype=jnp.int32)
  return out


def leading_run(
  match_BS: jax.Array, mask_BS: jax.Array | None = None
) -> jax.Array:
  """Length of each row's leading run of valid matches (cumprod), int32 [B].

  An invalid position ends the run, so the run never exceeds the row's valid
  length (the reference clamps to the sample length).
  """
  match_BS = jnp.asarray(match_BS).astype(bool)
  ok = match_BS & _mask_or_ones(mask_BS, match_BS.shape)
  return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1)


def shift_pairs(pred_BSD, target_BSD, mask_BS, shift: int):
  """(pred[:, :S-k], target[:, k:], mask[:, :S-k] & mask[:, k:]) for shift k."""
  if shift < 0:
    raise ValueError(f"shift must be >= 0, got {shift}")
  if shift == 0:
    return pred_BSD, target_BSD, mask_BS
  s = pred_BSD.shape[1]
  keep = max(s - shift, 0)
  return (
    pred_BSD[:, :keep],
    target_BSD[:, shift:],
    mask_BS[:, :keep] & mask_BS[:, shift:],
  )


def hidden_state_sums(
  pred_BSD: jax.Array,
  target_BSD: jax.Array,
  mask_BS: jax.Array | None = None,
  *,
  shift: int = 0,
  thresholds: Sequence[float] = THRESHOLDS,
) -> dict[str, jax.Array]:
  """Summable hidden-state statistics of one batch.

  shift=0 compares pred[t] with target[t]; shift=1 is the next-position
  reading pred[t] vs target[t+1], valid where both t and t+1 are valid.

  Returns:
    n_valid: number of valid (pairs of) positions; int32.
    n_samples: rows with at least one valid position; int32.
    cos_sum, cos_sq_sum: sums of the cosine and its square over valid ones.
    mse_sum: sum over valid positions of mean_d (pred - target)^2, so the
      reference MSE is mse_sum / n_valid.
    accept_{80,...}: #(valid and cos > tau); int32.
    run_{80,...}_sum, run_{80,...}_sq_sum: sums over rows of the leading run
      of cos > tau (and of its square); int32.
  """
  pred_BSD = jnp.asarray(pred_BSD, jnp.float32)
  target_BSD = jnp.asarray(target_BSD, jnp.float32)
  if pred_BSD.shape != target_BSD.shape or pred_BSD.ndim != 3:
    raise ValueError(
      f"pred and target must both be [B, S, D]; got {pred_BSD.shape} and "
      f"{target_BSD.shape}"
    )
  mask_BS = _mask_or_ones(mask_BS, pred_BSD.shape[:2])
  pred_BSD, target_BSD, mask_BS = shift_pairs(
    pred_BSD, target_BSD, mask_BS, shift
  )
  m = mask_BS.astype(jnp.float32)
  cos_BS = cosine(pred_BSD, target_BSD)
  mse_BS = jnp.mean(jnp.square(pred_BSD - target_BSD), axis=-1)
  out = {
    "n_valid": jnp.sum(mask_BS, dtype=jnp.int32),
    "n_samples": jnp.sum(jnp.any(mask_BS, axis=-1), dtype=jnp.int32),
    "cos_sum": jnp.sum(cos_BS * m),
    "cos_sq_sum": jnp.sum(jnp.square(cos_BS) * m),
    "mse_sum": jnp.sum(mse_BS * m),
  }
  counts = accept_counts(cos_BS, mask_BS, thresholds)
  for key, tau in zip(_threshold_keys(thresholds), thresholds, strict=True):
    out[f"accept_{key}"] = counts[f"accept_{key}"]
    run_B = leading_run(cos_BS > tau, mask_BS)
    out[f"run_{key}_sum"] = jnp.sum(run_B, dtype=jnp.int32)
    out[f"run_{key}_sq_sum"] = jnp.sum(run_B * run_B, dtype=jnp.int32)
  return out


def finalize_sums(sums: dict) -> dict[str, float]:
  """Turns (accumulated) hidden_state_sums into means, rates and stds."""
  s = {k: float(v) for k, v in sums.items()}
  n = max(s["n_valid"], 1.0)
  rows = max(s["n_samples"], 1.0)
  cos = s["cos_sum"] / n
  out = {
    "cos_sim": cos,
    "cos_std": max(s["cos_sq_sum"] / n - cos * cos, 0.0) ** 0.5,
    "mse": s["mse_sum"] / n,
  }
  for k, v in s.items():
    if k.startswith("accept_"):
      out[k] = v / n
    elif k.startswith("run_") and k.endswith("_sum") and "_sq_" not in k:
      key = k[len("run_") : -len("_sum")]
      mean = v / rows
      sq = s[f"run_{key}_sq_sum"] / rows
      out[f"consecutive_mean_{key}"] = mean
      out[f"consecutive_std_{key}"] = max(sq - mean * mean, 0.0) ** 0.5
  return out
