"""The training state and the pure steps that advance and evaluate it.

`TrainState` holds the float32 params, the optimizer state and, with a
reduced-precision compute dtype, bf16 copies of the Dense kernels that the
optimizer step writes (see `compute_params`). `create_train_step` and
`create_eval_step` bind a model, its registry spec and the config into
jitted steps with explicit shardings; `train.py` runs them in its loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from egpt_align import lm_head as lm_head_lib
from egpt_align import losses, metrics, models, sharding, unroll


@flax.struct.dataclass
class TrainState:
  """Everything that changes from step to step (and is checkpointed)."""

  step: jax.Array
  params: Any
  opt_state: Any
  # bf16 copies of the Dense kernels (None at every other leaf), written by
  # the optimizer step; None when compute is float32. Derived from params,
  # so never checkpointed (see `without_compute_params`).
  compute_params: Any = None


def compute_dtype(name: str) -> str:
  """'auto' -> 'bfloat16' on GPU, 'float32' elsewhere; others unchanged."""
  if name == "auto":
    return "bfloat16" if jax.default_backend() == "gpu" else "float32"
  return name


DROPOUT_RNG_IMPLS = ("auto", "threefry2x32", "rbg")


def dropout_key(key: jax.Array, impl: str) -> jax.Array:
  """The base dropout key, derived from `key`, of the configured PRNG.

  'auto' is 'rbg' on GPU (XLA's RngBitGenerator: about 0.1-0.2 ms less per
  L4/L5F step on an H100 than threefry's masks) and threefry2x32 elsewhere.
  """
  if impl not in DROPOUT_RNG_IMPLS:
    raise ValueError(
      f"config.dropout_rng_impl must be one of {DROPOUT_RNG_IMPLS}, got "
      f"{impl!r}"
    )
  if impl == "auto":
    impl = "rbg" if jax.default_backend() == "gpu" else "threefry2x32"
  if impl == "threefry2x32":
    return key
  bits = jax.random.bits(key, (4,), jnp.uint32)  # rbg keys are uint32[4].
  return jax.random.wrap_key_data(bits, impl=impl)


def create_model(model_config: Mapping[str, Any]):
  """The adapter of a `config.model` block, its dtype 'auto' resolved."""
  model_config = dict(model_config)
  if model_config.get("dtype") is not None:
    model_config["dtype"] = compute_dtype(model_config["dtype"])
  return models.get_spec(model_config["name"]).from_config(model_config)


def init_state(
  rng: jax.Array,
  *,
  model,
  tx: optax.GradientTransformation,
  example_inputs: tuple,
) -> TrainState:
  """A fresh TrainState (params float32, optimizer state, step 0)."""
  params = model.init(
    {"params": rng}, *example_inputs, mask=None, deterministic=True
  )["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
  )


def compute_params(params: Any, dtype: Any) -> Any:
  """Every Dense `kernel` of params cast to the compute dtype; None elsewhere.

  Those are exactly the leaves the model itself casts before its matmuls
  (LayerNorm parameters, biases, embeddings and scalars stay float32 and are
  read from params), so the forward and backward are unchanged; the cast
  now happens once, fused into the optimizer update, instead of in a
  separate pass over the float32 kernels every step.
  """

  def cast(path, leaf):
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    return leaf.astype(dtype) if name == "kernel" else None

  return jax.tree_util.tree_map_with_path(cast, params)


def forward_params(params: Any, copies: Any) -> Any:
  """params with the kernels replaced by their compute-dtype copies."""
  if copies is None:
    return params
  return jax.tree.map(
    lambda c, p: p if c is None else c,
    copies,
    params,
    is_leaf=lambda x: x is None,
  )


def _recast(copies: Any, params: Any) -> Any:
  """Fresh copies of params where `copies` has one, in the copies' dtypes."""
  return jax.tree.map(
    lambda c, p: None if c is None else p.astype(c.dtype),
    copies,
    params,
    is_leaf=lambda x: x is None,
  )


def with_compute_params(state: TrainState, dtype: Any) -> TrainState:
  """Adds the bf16 kernel copies for a reduced-precision compute dtype."""
  if jnp.dtype(dtype) == jnp.float32:
    return state.replace(compute_params=None)
  return state.replace(compute_params=compute_params(state.params, dtype))


def state_shardings(
  state: TrainState,
  mesh,
  *,
  shard_update: bool,
  min_size: int,
) -> TrainState:
  """A TrainState of NamedShardings for `state` (arrays or abstract).

  The step counter is replicated; params, optimizer state and the
  compute-dtype kernel copies follow `sharding.weight_update_sharding` when
  `shard_update` (the step all-gathers the copies at its start), else are
  replicated.
  """
  rep = sharding.replicated(mesh)

  def layout(tree):
    if not shard_update:
      return jax.tree.map(lambda _: rep, tree)
    return jax.tree.map(
      lambda x: sharding.weight_update_sharding(
        x.shape, mesh, min_size=min_size
      ),
      tree,
    )

  return state.replace(
    step=rep,
    params=layout(state.params),
    opt_state=layout(state.opt_state),
    compute_params=layout(state.compute_params),
  )


def without_compute_params(state: TrainState) -> TrainState:
  """The checkpointed part of the state."""
  return state.replace(compute_params=None)


def _readings(spec, objective: str) -> tuple[int, ...]:
  """Shifts read in eval: 0 (same position) and 1 for predicts_next."""
  return (0, 1) if spec.predicts_next else (0,)


def _ce_shift(spec, objective: str) -> int:
  """Which reading the token CE uses: next for the 'next' objective."""
  return 1 if (spec.predicts_next and objective == "next") else 0


def forward(model, spec, params, batch, *, deterministic, rng=None):
  """The adapter's float32 prediction for a batch."""
  inputs = models.adapter_inputs(spec.name, batch)
  rngs = None if deterministic else {"dropout": rng}
  pred = model.apply(
    {"params": params},
    *inputs,
    mask=batch["mask"],
    deterministic=deterministic,
    rngs=rngs,
  )
  return pred.astype(jnp.float32)


def _step_loss(pred, target, mask, lm_weight, *, spec, loss_config, ce_dtype):
  """(loss, aux) of one prediction: the token CE (if on) and the loss."""
  # Padding rows of e.g. L1 at init are exact zero vectors: the loss's
  # cosine (metrics.normalize) keeps a finite gradient there.
  ce = None
  if loss_config.token_ce_weight > 0:
    p, t, m = metrics.shift_pairs(
      pred, target, mask, _ce_shift(spec, loss_config.objective)
    )
    ce = lm_head_lib.token_ce_loss(
      p, t, lm_weight, m, soft=loss_config.token_ce_soft, dtype=ce_dtype
    )
  return losses.adapter_loss(
    pred,
    target,
    mask,
    predicts_next=spec.predicts_next,
    token_ce=ce,
    **losses.config_weights(loss_config),
  )


def unrolled_loss(
  model,
  spec,
  params,
  batch,
  lm_weight,
  *,
  loss_config,
  deterministic,
  rng=None,
  ce_dtype=jnp.float32,
):
  """(loss, aux) over `loss_config.unroll_steps` steps (egpt_align/unroll.py).

  Step j's loss is the one-step loss of its prediction over the positions
  whose whole live chain is valid (`unroll.chain_masks`); the total is
  `losses.combine_steps` with `loss_config.unroll_weights`. aux holds step
  1's terms under the usual names and `step{j}_loss` for every step.
  """
  k, weights, stop = unroll.settings(loss_config, spec)
  target = batch["target"].astype(jnp.float32)
  preds = unroll.forward(
    model,
    spec,
    params,
    batch,
    k,
    stop_gradient=stop,
    deterministic=deterministic,
    rng=rng,
  )
  step_losses = []
  aux = {}
  for j, (pred, chain) in enumerate(
    zip(preds, unroll.chain_masks(batch["mask"], k), strict=True), start=1
  ):
    loss_j, aux_j = _step_loss(
      pred,
      target,
      chain,
      lm_weight,
      spec=spec,
      loss_config=loss_config,
      ce_dtype=ce_dtype,
    )
    if j == 1:
      aux.update(aux_j)
    aux[f"step{j}_loss"] = loss_j
    step_losses.append(loss_j)
  loss = losses.combine_steps(step_losses, weights)
  aux["loss"] = loss
  return loss, aux


def training_loss(
  params,
  *,
  batch,
  lm_weight,
  model,
  spec,
  loss_config,
  deterministic: bool,
  rng=None,
  ce_dtype=jnp.float32,
):
  """(loss, aux) of `params` on a batch: what `train_step` differentiates.

  unroll_steps = 1 is the teacher-forced loss of one forward; more steps
  are `unrolled_loss`.
  """
  steps, weights, _ = unroll.settings(loss_config, spec)
  if steps > 1:
    return unrolled_loss(
      model,
      spec,
      params,
      batch,
      lm_weight,
      loss_config=loss_config,
      deterministic=deterministic,
      rng=rng,
      ce_dtype=ce_dtype,
    )
  pred = forward(
    model, spec, params, batch, deterministic=deterministic, rng=rng
  )
  loss, aux = _step_loss(
    pred,
    batch["target"].astype(jnp.float32),
    batch["mask"],
    lm_weight,
    spec=spec,
    loss_config=loss_config,
    ce_dtype=ce_dtype,
  )
  return losses.combine_steps([loss], weights), aux


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  lm_weight: jax.Array | None,
  *,
  model,
  spec,
  tx: optax.GradientTransformation,
  schedule: Callable,
  loss_config: ml_collections.ConfigDict,
  ce_dtype: Any = jnp.float32,
  grad_shardings: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW step on a global batch; pure (model etc. bound by partial).

  `lm_weight` is the frozen target LM head [V, D] for the token CE loss
  (None without it); it is an argument, not a closure, so it is not baked
  into the compiled program as a constant. `grad_shardings` (the params'
  shardings under weight-update sharding) constrains the gradients to the
  optimizer's layout, so XLA reduce-scatters them instead of all-reducing.
  """
  dropout_rng = jax.random.fold_in(rng, state.step)
  mask = batch["mask"]
  loss_fn = functools.partial(
    training_loss,
    batch=batch,
    lm_weight=lm_weight,
    model=model,
    spec=spec,
    loss_config=loss_config,
    deterministic=False,
    rng=dropout_rng,
    ce_dtype=ce_dtype,
  )

  fast = state.compute_params
  # With bf16 compute, differentiate through the bf16 kernel copies; the
  # model would have cast the float32 kernels to the same values before
  # every matmul.
  weights = forward_params(state.params, fast)
  if grad_shardings is not None:
    # Every device runs the whole forward and backward: all-gather the
    # weights it holds a share of, here at the start of the step, where the
    # scheduler can overlap the later layers' gathers with earlier compute.
    mesh = jax.tree.leaves(grad_shardings)[0].mesh
    rep = sharding.replicated(mesh)
    weights = jax.lax.with_sharding_constraint(
      weights, jax.tree.map(lambda _: rep, weights)
    )
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(weights)
  if grad_shardings is not None:
    # Reduced in the gradients' own dtype (bf16 for the kernel copies), as
    # the replicated layout's all-reduce is.
    grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
  if fast is not None:
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  out = {
    "loss": loss,
    "cos": aux["cos_sim"],
    "mse": aux["mse"],
    "grad_norm": optax.global_norm(grads),
    "lr": schedule(state.step),
    "tokens": jnp.sum(mask, dtype=jnp.int32),
  }
  if "next_cos_sim" in aux:
    out["next_cos"] = aux["next_cos_sim"]
  if "token_ce" in aux:
    out["token_ce"] = aux["token_ce"]
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    compute_params=None if fast is None else _recast(fast, params),
  )
  return new_state, out


def eval_step(
  params: Any,
  batch: dict[str, jax.Array],
  lm_weight: jax.Array | None,
  *,
  model,
  spec,
  loss_config: ml_collections.ConfigDict,
) -> dict[str, jax.Array]:
  """Summable validation statistics of one batch (padding rows masked)."""
  mask = batch["mask"]
  target = batch["target"].astype(jnp.float32)
  steps = unroll.settings(loss_config, spec)[0]
  if steps > 1:
    preds = unroll.forward(model, spec, params, batch, steps)
  else:
    preds = [forward(model, spec, params, batch, deterministic=True)]
  chains = unroll.chain_masks(mask, steps)
  ce_shift = _ce_shift(spec, loss_config.objective)
  out = {}
  for j, (pred, chain) in enumerate(zip(preds, chains, strict=True), start=1):
    # Step 1: both readings; a later step (objective next): its next one.
    shifts = _readings(spec, loss_config.objective) if j == 1 else (1,)
    step_prefix = "" if j == 1 else f"step{j}_"
    for shift in shifts:
      prefix = step_prefix + ("next_" if shift else "")
      sums = metrics.hidden_state_sums(
        pred, target, chain, shift=shift, thresholds=metrics.THRESHOLDS
      )
      out.update({prefix + k: v for k, v in sums.items()})
      if lm_weight is None:
        continue
      p, t, m = metrics.shift_pairs(pred, target, chain, shift)
      agree = lm_head_lib.topk_agreement(p, t, lm_weight, m, ks=(1,))
      out[prefix + "token_top1"] = agree["top1"]
      if loss_config.token_ce_weight > 0 and shift == ce_shift:
        ce = lm_head_lib.token_ce_loss(
          p, t, lm_weight, m, soft=loss_config.token_ce_soft
        )
        # The mean times the count is the batch sum: exact aggregation.
        out[step_prefix + "token_ce_sum"] = ce * jnp.sum(m, dtype=jnp.float32)
  return out


def finalize_eval(
  sums: Mapping[str, float], *, spec, loss_config
) -> dict[str, float]:
  """Validation metrics from accumulated sums; the loss is training's.

  `losses.combine` of the whole split's terms, position-weighted (the
  reference averages per-batch losses, which over-weights a short last
  batch, D12).
  """
  steps, weights, _ = unroll.settings(loss_config, spec)
  out = {}
  later = {k for k in sums if k.startswith("step")}
  first = {k: v for k, v in sums.items() if k not in later}
  step_losses = [_finalize_step(first, out, spec=spec, loss_config=loss_config)]
  for j in range(2, steps + 1):
    tag = f"step{j}_"
    own = {k[len(tag) :]: v for k, v in sums.items() if k.startswith(tag)}
    fin = {}
    step_losses.append(
      _finalize_step(own, fin, spec=spec, loss_config=loss_config)
    )
    out.update({tag + k: v for k, v in fin.items() if k.startswith("next_")})
    if "token_ce" in fin:
      out[tag + "token_ce"] = fin["token_ce"]
  if steps > 1:
    out.update({f"step{j}_loss": x for j, x in enumerate(step_losses, 1)})
  out["loss"] = losses.combine_steps(step_losses, weights)
  return out


def _finalize_step(sums, out, *, spec, loss_config) -> float:
  """Fills `out` with one prediction's metrics; returns its loss.

  A later unrolled step has only the `next_` reading (objective next),
  which is all its loss reads.
  """
  terms = {}
  same = {k: v for k, v in sums.items() if not k.startswith("next_")}
  if "n_valid" in same:
    fin = metrics.finalize_sums(same)
    out.update(fin)
    out["n_valid"] = float(same["n_valid"])
    if "token_top1" in same:
      out["token_top1"] = same["token_top1"] / max(same["n_valid"], 1.0)
    terms.update(mse=fin["mse"], cos_sim=fin["cos_sim"])
  nxt = {k[5:]: v for k, v in sums.items() if k.startswith("next_")}
  if nxt:
    fin_next = metrics.finalize_sums(nxt)
    out.update({"next_" + k: v for k, v in fin_next.items()})
    out["next_n_valid"] = float(nxt["n_valid"])
    if "token_top1" in nxt:
      out["next_token_top1"] = nxt["token_top1"] / max(nxt["n_valid"], 1.0)
    terms.update(next_mse=fin_next["mse"], next_cos_sim=fin_next["cos_sim"])
  weights = losses.config_weights(loss_config)
  if "token_ce_sum" in sums:
    key = (
      "next_n_valid" if _ce_shift(spec, loss_config.objective) else "n_valid"
    )
    terms["token_ce"] = out["token_ce"] = sums["token_ce_sum"] / max(
      out[key], 1.0
    )
  else:
    weights["token_ce_weight"] = 0.0
  return losses.combine(terms, predicts_next=spec.predicts_next, **weights)


def load_lm_head(path: str, hidden_dim: int, mesh) -> jax.Array:
  """The frozen LM head weight [V, D], replicated over `mesh`."""
  head = lm_head_lib.load_lm_head(path)
  if head.hidden_dim != hidden_dim:
    raise ValueError(
      f"config.lm_head {path}: hidden dim {head.hidden_dim} does not match "
      f"the data's target dim {hidden_dim}"
    )
  weight = head.weight
  return jax.make_array_from_callback(
    weight.shape, sharding.replicated(mesh), lambda idx: weight[idx]
  )


def abstract(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings`."""
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    tree,
    shardings,
  )


def create_train_step(
  config: ml_collections.ConfigDict,
  *,
  model,
  spec,
  tx: optax.GradientTransformation,
  schedule: Callable,
  shardings: TrainState,
  mesh,
):
  """The jitted `train_step` with its shardings; the state is donated."""
  rep = sharding.replicated(mesh)
  return jax.jit(
    functools.partial(
      train_step,
      model=model,
      spec=spec,
      tx=tx,
      schedule=schedule,
      loss_config=config.loss,
      ce_dtype=jnp.dtype(config.model.dtype),
      grad_shardings=(shardings.params if config.shard_weight_update else None),
    ),
    in_shardings=(shardings, sharding.batch_sharding(mesh), rep, rep),
    out_shardings=(shardings, rep),
    donate_argnums=(0,),
  )


def create_eval_step(
  config: ml_collections.ConfigDict,
  *,
  model,
  spec,
  params_shardings: Any,
  mesh,
):
  """The jitted `eval_step`: params, batch, LM head -> summable stats."""
  rep = sharding.replicated(mesh)
  return jax.jit(
    functools.partial(
      eval_step, model=model, spec=spec, loss_config=config.loss
    ),
    in_shardings=(params_shardings, sharding.batch_sharding(mesh), rep),
    out_shardings=rep,
  )
