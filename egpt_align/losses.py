"""Adapter training losses (masked, vectorised, float32, jit-friendly).

`objective='reference'` is the reference's `compute_loss`
(REFERENCE_NOTES §5.1):
  align = MSE_m + cos_weight * (1 - cos_m)
  L1-L4:         loss = align
  L5 / B1 / L5F: loss = (1 - w) * align + w * next_mse,
                 next_mse = MSE_m of pred[:, :-1] vs target[:, 1:].
MSE_m = sum over valid positions and dims of (pred - target)^2 divided by
(#valid * D); cos_m = mean per-position cosine over valid positions.

The reference masks next_mse with mask[:, 1:] only. We do the same; for
right-padded (contiguous) masks that equals requiring both t and t+1 valid.
With no valid position a term is 0 here (the reference gives NaN).

`objective='next'` (EAGLE variants only) fixes D8, where one output vector is
pulled toward both target[t] and target[t+1]: the output predicts only the
next target state,
  loss = MSE_m + cos_weight * (1 - cos_m) over pred[t] vs target[t+1],
valid where both t and t+1 are valid.
"""

import jax
import jax.numpy as jnp

from egpt_align import metrics

OBJECTIVES = ("reference", "next")


def _masked_terms_autodiff(pred_BSD, target_BSD, mask_BS):
  """(mse, cos_sim) as plain jnp; `_masked_terms` is its fused twin."""
  m = mask_BS.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  sq_BS = jnp.sum(jnp.square(pred_BSD - target_BSD), axis=-1)
  mse = jnp.sum(sq_BS * m) / (n * pred_BSD.shape[-1])
  cos_sim = jnp.sum(metrics.cosine(pred_BSD, target_BSD) * m) / n
  return mse, cos_sim


def _row_stats(p, t, mask_BS):
  """Per-position sums over D in one pass, and the masked reductions."""
  m = mask_BS.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  sq = jnp.sum(jnp.square(p - t), axis=-1)
  pt = jnp.sum(p * t, axis=-1)
  # Norms as metrics.normalize defines them: sqrt(max(|x|^2, eps^2)).
  eps2 = metrics._NORM_EPS * metrics._NORM_EPS
  pp = jnp.sum(p * p, axis=-1)
  tt = jnp.sum(t * t, axis=-1)
  norm_p = jnp.sqrt(jnp.maximum(pp, eps2))
  norm_t = jnp.sqrt(jnp.maximum(tt, eps2))
  cos = pt / (norm_p * norm_t)
  return m, n, sq, cos, norm_p, norm_t, pp > eps2, tt > eps2


@jax.custom_vjp
def _masked_terms(pred_BSD, target_BSD, mask_BS):
  """(mse, cos_sim) over valid positions, as the reference reduces them.

  Equal to `_masked_terms_autodiff` in value and gradient; the gradient is
  written out (one elementwise pass over pred and target with per-position
  coefficients) instead of differentiating the normalisations, which XLA
  otherwise re-computes in several [B, S, D] passes.
  """
  return _masked_terms_fwd(pred_BSD, target_BSD, mask_BS)[0]


def _masked_terms_fwd(pred_BSD, target_BSD, mask_BS):
  stats = _row_stats(pred_BSD, target_BSD, mask_BS)
  m, n, sq, cos, *_ = stats
  mse = jnp.sum(sq * m) / (n * pred_BSD.shape[-1])
  return (mse, jnp.sum(cos * m) / n), (pred_BSD, target_BSD, mask_BS, stats)


def _masked_terms_bwd(res, g):
  p, t, mask_BS, (m, n, _, cos, norm_p, norm_t, p_on, t_on) = res
  g_mse, g_cos = g
  d = p.shape[-1]
  w_mse = (2.0 * g_mse / (n * d)) * m  # d mse / d p = w_mse * (p - t)
  w_cos = (g_cos / n) * m
  # d cos / d p = t / (|p||t|) - cos * p / |p|^2 (the p/|p|^2 term only
  # where |p| > eps, as sqrt(max(., eps^2)) differentiates), and alike for t.
  a = (w_cos / (norm_p * norm_t))[..., None]
  cp = (w_cos * cos / jnp.square(norm_p) * p_on)[..., None]
  ct = (w_cos * cos / jnp.square(norm_t) * t_on)[..., None]
  diff = w_mse[..., None] * (p - t)
  dp = diff + a * t - cp * p
  dt = -diff + a * p - ct * t
  return dp, dt, None


_masked_terms.defvjp(_masked_terms_fwd, _masked_terms_bwd)


def config_weights(loss_config) -> dict:
  """The objective and weights of a `config.loss` block, as keywords."""
  return {
    "objective": loss_config.objective,
    "prediction_weight": loss_config.prediction_weight,
    "cos_weight": loss_config.cos_weight,
    "token_ce_weight": loss_config.token_ce_weight,
  }


def combine_steps(step_losses, weights):
  """The unrolled loss: sum_j weights[j] * step_losses[j] (unroll.py).

  One step with weight 1 returns its loss unchanged (not multiplied), so
  unroll_steps=1 is today's loss bit for bit.
  """
  if len(step_losses) != len(weights):
    raise ValueError(
      f"{len(step_losses)} step losses but {len(weights)} weights"
    )
  if len(step_losses) == 1 and weights[0] == 1.0:
    return step_losses[0]
  return sum(w * x for w, x in zip(weights, step_losses, strict=True))


def align_loss(mse, cos_sim, cos_weight: float):
  """MSE + cos_weight * (1 - cosine): the same-position alignment term."""
  return mse + cos_weight * (1.0 - cos_sim)


def combine(
  terms,
  *,
  predicts_next: bool,
  objective: str = "reference",
  prediction_weight: float = 0.5,
  cos_weight: float = 0.5,
  token_ce_weight: float = 0.0,
):
  """The loss from its terms; the one definition training and eval share.

  `terms` holds 'mse' and 'cos_sim' (same position), for predicts_next also
  'next_mse' and 'next_cos_sim', and 'token_ce' when token_ce_weight > 0.
  Works on arrays inside the step and on floats of whole-split sums.
  """
  if not predicts_next:
    loss = align_loss(terms["mse"], terms["cos_sim"], cos_weight)
  elif objective == "reference":
    align = align_loss(terms["mse"], terms["cos_sim"], cos_weight)
    w = prediction_weight
    loss = (1.0 - w) * align + w * terms["next_mse"]
  else:
    loss = align_loss(terms["next_mse"], terms["next_cos_sim"], cos_weight)
  if token_ce_weight > 0:
    loss = loss + token_ce_weight * terms["token_ce"]
  return loss


def adapter_loss(
  pred_BSD: jax.Array,
  target_BSD: jax.Array,
  mask_BS: jax.Array | None = None,
  *,
  predicts_next: bool,
  objective: str = "reference",
  prediction_weight: float = 0.5,
  cos_weight: float = 0.5,
  token_ce: jax.Array | None = None,
  token_ce_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Returns (loss, aux) with aux mse, cos_loss, cos_sim [, next_mse, ...].

  `token_ce` (the LM-head cross-entropy, computed by the caller) enters the
  loss with `token_ce_weight`.
  """
  if objective not in OBJECTIVES:
    raise ValueError(
      f"loss objective {objective!r} is unknown; expected one of {OBJECTIVES}"
    )
  if objective == "next" and not predicts_next:
    raise ValueError(
      "loss objective 'next' needs an adapter that predicts the next state "
      "(l5, b1, l5f); this adapter has predicts_next=False"
    )
  pred_BSD = jnp.asarray(pred_BSD, jnp.float32)
  target_BSD = jnp.asarray(target_BSD, jnp.float32)
  if pred_BSD.shape != target_BSD.shape or pred_BSD.ndim != 3:
    raise ValueError(
      f"pred and target must both be [B, S, D]; got {pred_BSD.shape} and "
      f"{target_BSD.shape}"
    )
  if mask_BS is None:
    mask_BS = jnp.ones(pred_BSD.shape[:2], bool)
  mask_BS = jnp.asarray(mask_BS)
  if mask_BS.shape != pred_BSD.shape[:2]:
    raise ValueError(
      f"mask must be [B, S] = {pred_BSD.shape[:2]}, got {mask_BS.shape}"
    )
  mask_BS = mask_BS.astype(bool)

  mse, cos_sim = _masked_terms(pred_BSD, target_BSD, mask_BS)
  aux = {"mse": mse, "cos_loss": 1.0 - cos_sim, "cos_sim": cos_sim}
  if predicts_next:
    pred_prev = pred_BSD[:, :-1]
    target_next = target_BSD[:, 1:]
    pair_mask = mask_BS[:, :-1] & mask_BS[:, 1:]
    if objective == "reference":
      ref_mask = mask_BS[:, 1:]  # The reference's mask for the next-MSE term.
      next_mse, _ = _masked_terms(pred_prev, target_next, ref_mask)
      _, next_cos_sim = _masked_terms(pred_prev, target_next, pair_mask)
      aux["align_loss"] = align_loss(mse, cos_sim, cos_weight)
    else:
      next_mse, next_cos_sim = _masked_terms(pred_prev, target_next, pair_mask)
    aux["next_mse"] = next_mse
    aux["next_cos_sim"] = next_cos_sim
  if token_ce is not None:
    aux["token_ce"] = token_ce
  loss = combine(
    aux,
    predicts_next=predicts_next,
    objective=objective,
    prediction_weight=prediction_weight,
    cos_weight=cos_weight,
    token_ce_weight=token_ce_weight if token_ce is not None else 0.0,
  )
  aux["loss"] = loss
  return loss, aux
