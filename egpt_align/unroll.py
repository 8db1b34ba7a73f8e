"""Multi-step ("training-time test") unrolling of the decode adapters.

A decode adapter (L5, B1, L5F) drafts a chain: from the last true state at
position t it predicts h[t+1]; that prediction is then fed back as its input
at position t+1, and so on (tools/lib/sd_engine.py `_AdapterProposer`). The
unroll computes, for every position at once, what live drafting computes:

  step 1 is the teacher-forced forward: input h[p] at position p, output
    y_1[p] predicts h[p+1] (draft 1 of the chain starting at t = p);
  step j >= 2 feeds position p the step-(j-1) output for position p-1,
    y_{j-1}[p-1] (a prediction of h[p]), in the fed-back stream (`target`
    for B1 and L5F); its output y_j[p] is draft j of the chain starting at
    t = p - j + 1 and predicts h[p+1].

Attention is `models.attention.unroll_mask`: step j's query at p sees the
true states at positions <= t and, at positions t+1 .. p, the inputs fed
back at steps 2 .. j for the same chain, exactly the positions and contents
the runtime's KV cache holds when it drafts token j from t. Every step uses
the absolute positions 0..S-1 (pos_embed row p at position p), as the cache
does. The drafter stream of L5F (and L5's only input) stays the drafter's
true states at every step: while the drafts are right, the drafter fed the
drafts has exactly those states.

Gradients (`stop_gradient`): True (the default) detaches each fed-back
input, so a step's loss trains the adapter given its inputs, with gradients
through that step's own computation (including the earlier steps' keys and
values it attends to) but not back into the earlier steps that made them.
This is what HASS's released trainer (HArmonizedSS/HASS train/main_hass.py)
does: its fed-back states are detached and each step's loss is
back-propagated on its own. EAGLE-3's released trainer
(SafeAILab/EAGLE eagle/traineagle3/cnets.py) feeds its states back without
detaching; neither publishes an ablation of this choice that we found.
False back-propagates through the whole chain (more memory).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from egpt_align import models

FED_BACK = "target"  # the input stream the adapter's predictions replace


def feeds_back(spec) -> bool:
  """Whether drafting feeds the adapter its own predictions (B1, L5F).

  L5 reads only the drafter's states: while the drafts are right those are
  the true states, so every unrolled step would equal step 1.
  """
  return spec.role == "decode" and FED_BACK in spec.inputs


def chain_masks(mask_BS: jax.Array, steps: int) -> list[jax.Array]:
  """[B, S] bool per step: step j's position p has a whole live chain.

  chain_j[p] = mask[p - j + 1] & ... & mask[p] (False where p < j - 1).
  The `next` pair of step j at p (the draft vs target[p+1]) is valid where
  chain_j[p] & chain_j[p+1], i.e. where also p+1 is valid;
  `metrics.shift_pairs(..., 1)` and the `next` loss form exactly that.
  """
  mask_BS = jnp.asarray(mask_BS, bool)
  out = [mask_BS]
  for _ in range(1, steps):
    prev = out[-1]
    shifted = jnp.concatenate(
      [jnp.zeros_like(prev[:, :1]), prev[:, :-1]], axis=1
    )
    out.append(shifted & mask_BS)
  return out


def fed_back_input(true_BSD: jax.Array, pred_BSD: jax.Array) -> jax.Array:
  """Next step's fed-back stream: position p <- pred[p-1] (p >= 1).

  Position 0 keeps the true state (no chain reaches it; it is masked out).
  The result has the true stream's dtype, as the runtime feeds the adapter
  its outputs in its own dtype.
  """
  pred = pred_BSD.astype(true_BSD.dtype)
  return jnp.concatenate([true_BSD[:, :1], pred[:, :-1]], axis=1)


def forward(
  model,
  spec,
  params,
  batch: dict,
  steps: int,
  *,
  stop_gradient: bool = True,
  deterministic: bool = True,
  rng: jax.Array | None = None,
) -> list[jax.Array]:
  """The float32 predictions [y_1, ..., y_steps], each [B, S, D].

  A python loop over the small static `steps` inside the caller's jit;
  step j's dropout key is fold_in(rng, j).
  """
  if not feeds_back(spec):
    raise ValueError(
      f"adapter {spec.name!r} is not fed its own predictions while drafting "
      f"(inputs {spec.inputs}); only b1 and l5f unroll"
    )
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  inputs = list(models.adapter_inputs(spec.name, batch))
  fed = spec.inputs.index(FED_BACK)
  true_fed = inputs[fed]
  prefix = None
  preds = []
  for j in range(1, steps + 1):
    rngs = None if deterministic else {"dropout": jax.random.fold_in(rng, j)}
    y, own = model.apply(
      {"params": params},
      *inputs,
      step=j,
      prefix=prefix,
      mask=batch["mask"],
      deterministic=deterministic,
      rngs=rngs,
      method="unrolled_step",
    )
    y = y.astype(jnp.float32)
    preds.append(y)
    if j == steps:
      break
    prefix = (
      own
      if prefix is None
      else jax.tree.map(
        lambda a, b: jnp.concatenate([a, b], axis=1), prefix, own
      )
    )
    back = jax.lax.stop_gradient(y) if stop_gradient else y
    inputs[fed] = fed_back_input(true_fed, back)
  return preds


def settings(loss_config, spec) -> tuple[int, tuple[float, ...], bool]:
  """(steps, weights, stop_gradient) of a `config.loss` block, checked.

  Weights default to 1/k each (equal, on the one-step loss's scale).
  """
  k = loss_config.unroll_steps
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"config.loss.unroll_steps must be an int >= 1, got {k!r}")
  weights = loss_config.unroll_weights
  if weights is None:
    weights = (1.0,) if k == 1 else (1.0 / k,) * k
  weights = tuple(float(w) for w in weights)
  if len(weights) != k or min(weights) < 0 or sum(weights) <= 0:
    raise ValueError(
      f"config.loss.unroll_weights must be {k} non-negative numbers (one per "
      f"unrolled step) with a positive sum, got {loss_config.unroll_weights}"
    )
  if k > 1 and not feeds_back(spec):
    raise ValueError(
      f"config.loss.unroll_steps={k} needs an adapter that drafting feeds "
      f"its own predictions (b1, l5f); {spec.name!r} reads only "
      f"{'/'.join(spec.inputs)} states, so every step would repeat step 1"
    )
  if k > 1 and loss_config.objective != "next":
    raise ValueError(
      f"config.loss.unroll_steps={k} needs config.loss.objective='next' "
      f"(each step predicts the next target state), got "
      f"{loss_config.objective!r}"
    )
  return k, weights, bool(loss_config.unroll_stop_gradient)
