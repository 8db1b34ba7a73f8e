"""The steps the train-step benchmark times (`benchmark_train`).

The trainer's own jitted step built as the trainer builds it
(`build_jax_step`), the ablated steps that show where its time goes
(`ablated_step`), and the alternative implementations `--compare` times
against it (`Variant`, `COMPARE`, `variant_train_step`): each a setting of
the trainer's step or this benchmark's own step function, never a patch of
a library module.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from egpt_align import (
  losses,
  metrics,
  models,
  optim,
  sharding,
  train_state,
)


def _architectures() -> tuple[str, ...]:
  """The first registry name of each module class (B1 is L5 on other data)."""
  first = {}
  for name, spec in models.ADAPTERS.items():
    first.setdefault(spec.module, name)
  return tuple(first.values())


# Every architecture once.
LEVELS = _architectures()


def make_batch(name, batch, seq, hidden, rng):
  """A full-length random batch (all positions valid) on the host."""
  src = rng.standard_normal((batch, seq, hidden), np.float32)
  tgt = rng.standard_normal((batch, seq, hidden), np.float32)
  return {
    "source": src,
    "target": tgt,
    "mask": np.ones((batch, seq), bool),
  }


@dataclasses.dataclass(frozen=True)
class Variant:
  """How a timed step differs from the trainer's (--compare); all off = it.

  The dropout PRNG, the bf16 kernel copies and the AdamW first-moment dtype
  are settings of the trainer's own step; a materialized prediction or the
  autodiff loss are this benchmark's own step (`variant_train_step`).
  """

  dropout_rng: str = "auto"  # config.dropout_rng_impl
  kernel_copies: bool = True  # bf16 copies in the state (else cast in step)
  mu_dtype: str | None = None  # config.optim.mu_dtype
  materialized_pred: bool = False  # an optimization barrier on the output
  autodiff_loss: bool = False  # the loss as plain jnp, differentiated by XLA

  @property
  def own_step(self) -> bool:
    return self.materialized_pred or self.autodiff_loss


# Alternative implementations timed by --compare (each an older path or an
# opt-in setting, timed against the trainer's default).
COMPARE = {
  "materialized_pred": Variant(materialized_pred=True),
  "autodiff_loss": Variant(autodiff_loss=True),
  "threefry_dropout": Variant(dropout_rng="threefry2x32"),
  "cast_kernels_in_step": Variant(kernel_copies=False),
  # Opt-in rather than an older path: config.optim.mu_dtype=bfloat16.
  "bf16_mu": Variant(mu_dtype="bfloat16"),
}
DEFAULT = Variant()


def autodiff_loss(pred_BSD, target_BSD, mask_BS, *, predicts_next):
  """The reference loss (default weights) in plain jnp, for XLA to
  differentiate: what `losses.adapter_loss`'s written-out gradient replaced."""

  def terms(p, t, mask):
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    sq = jnp.sum(jnp.square(p - t), axis=-1)
    mse = jnp.sum(sq * m) / (n * p.shape[-1])
    return mse, jnp.sum(metrics.cosine(p, t) * m) / n

  mse, cos = terms(pred_BSD, target_BSD, mask_BS)
  align = mse + 0.5 * (1.0 - cos)
  if not predicts_next:
    return align
  next_mse, _ = terms(pred_BSD[:, :-1], target_BSD[:, 1:], mask_BS[:, 1:])
  return 0.5 * align + 0.5 * next_mse


def variant_train_step(state, batch, rng, *, model, spec, tx, variant):
  """The trainer's step (one card) with the forward or the loss swapped."""
  rng = jax.random.fold_in(rng, state.step)
  target = batch["target"].astype(jnp.float32)

  def loss_fn(weights):
    pred = train_state.forward(
      model, spec, weights, batch, deterministic=False, rng=rng
    )
    if variant.materialized_pred:
      pred = jax.lax.optimization_barrier(pred)
    if variant.autodiff_loss:
      return autodiff_loss(
        pred, target, batch["mask"], predicts_next=spec.predicts_next
      )
    loss, _ = losses.adapter_loss(
      pred, target, batch["mask"], predicts_next=spec.predicts_next
    )
    return loss

  copies = state.compute_params
  weights = train_state.forward_params(state.params, copies)
  loss, grads = jax.value_and_grad(loss_fn)(weights)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if copies is not None:
    dtype = jax.tree.leaves(copies)[0].dtype
    copies = train_state.compute_params(params, dtype)
  new = state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    compute_params=copies,
  )
  return new, {"loss": loss}


def state_layout(state, mesh, *, shard_update, min_size, gather_at_end):
  """The trainer's layout; `gather_at_end` keeps the bf16 copies replicated
  (gathered when the step writes them instead of at its start)."""
  layout = train_state.state_shardings(
    state, mesh, shard_update=shard_update, min_size=min_size
  )
  if not gather_at_end:
    return layout
  rep = sharding.replicated(mesh)
  return layout.replace(
    compute_params=jax.tree.map(lambda _: rep, layout.compute_params)
  )


def ablated_step(state, batch, rng, *, model, spec, tx, ablation):
  """The trainer's step with parts left out (`build_jax_step`'s ablations:
  'fwd', 'grad', 'nodrop', 'opt')."""

  def loss_fn(params, batch, rng):
    pred = train_state.forward(
      model,
      spec,
      params,
      batch,
      deterministic=ablation == "nodrop",
      rng=rng,
    )
    return losses.adapter_loss(
      pred,
      batch["target"].astype(jnp.float32),
      batch["mask"],
      predicts_next=spec.predicts_next,
    )

  rng = jax.random.fold_in(rng, state.step)
  params = state.params
  opt_state = state.opt_state
  if ablation == "fwd":
    loss, _ = loss_fn(params, batch, rng)
  elif ablation == "grad":
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch, rng
    )
    loss = loss + 0 * sum(jnp.sum(g) for g in jax.tree.leaves(grads))
  else:
    if ablation == "opt":
      loss = jnp.zeros(())
      grads = jax.tree.map(lambda p: p * 1e-3, params)
    else:  # nodrop
      (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch, rng
      )
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new, {"loss": loss}


def build_jax_step(
  name,
  hidden,
  dtype,
  mesh,
  batch_example,
  ablation="full",
  shard_update=True,
  gather_at_end=False,
  variant=DEFAULT,
  unroll_steps=None,
):
  """Initial state and the jitted train step, as the trainer builds them.

  `unroll_steps` (an int) trains with the loss objective 'next' and that
  many unrolled steps (config.loss.unroll_steps); None keeps the base
  config's loss (the reference objective, one step).

  'full' is the trainer's own `train_state.train_step` (or, for a `variant`
  that swaps the forward or the loss, `variant_train_step`). The ablations
  see where the time goes: 'nodrop' (dropout off), 'grad' (forward +
  backward, no optimizer), 'fwd' (loss only), 'opt' (clip + AdamW on fixed
  gradients). The state is laid out as the trainer lays it out
  (`train_state.state_shardings`; `shard_update` is
  config.shard_weight_update).
  """
  from egpt_align.configs import base

  config = base.get_config()
  if variant.mu_dtype:
    config.optim.mu_dtype = variant.mu_dtype
  if unroll_steps is not None:
    config.loss.objective = "next"
    config.loss.unroll_steps = unroll_steps
  model = models.create_adapter(name, hidden_dim=hidden, dtype=dtype)
  spec = models.get_spec(name)
  tx, schedule = optim.create_optimizer(
    config.optim, steps_per_epoch=1000, num_epochs=config.num_epochs
  )
  inputs = models.adapter_inputs(name, batch_example)
  example = tuple(jnp.zeros(x.shape, jnp.float32) for x in inputs)
  state = jax.jit(
    lambda k: train_state.init_state(
      k, model=model, tx=tx, example_inputs=example
    )
  )(jax.random.PRNGKey(0))
  if variant.kernel_copies:  # As the trainer does for bf16 compute.
    state = train_state.with_compute_params(state, dtype)
  layout = state_layout(
    state,
    mesh,
    shard_update=shard_update,
    min_size=config.shard_min_size,
    gather_at_end=gather_at_end,
  )
  if ablation != "full":
    step_fn = functools.partial(
      ablated_step, model=model, spec=spec, tx=tx, ablation=ablation
    )
  elif variant.own_step:
    step_fn = functools.partial(
      variant_train_step, model=model, spec=spec, tx=tx, variant=variant
    )
  else:
    step_fn = functools.partial(
      train_state.train_step,
      lm_weight=None,
      model=model,
      spec=spec,
      tx=tx,
      schedule=schedule,
      loss_config=config.loss,
      grad_shardings=layout.params if shard_update else None,
    )
  rep = sharding.replicated(mesh)
  bsh = sharding.batch_sharding(mesh)
  state = jax.device_put(state, layout)
  step = jax.jit(
    step_fn,
    in_shardings=(layout, bsh, rep),
    out_shardings=(layout, rep),
    donate_argnums=(0,),
  )
  return model, state, step
