"""AdamW with a cosine schedule and weight-decay masks (REFERENCE_NOTES §5.2).

The reference runs `torch.optim.AdamW(lr=1e-3, weight_decay=0.01)` with
`CosineAnnealingLR(T_max=num_epochs, eta_min=1e-6)` stepped once per epoch
and `clip_grad_norm_(1.0)` every step. `create_optimizer` reproduces that
with `schedule_unit='epoch'`; `schedule_unit='step'` gives a per-step cosine
with linear warmup instead. optax's adamw decays by `lr * wd * param` like
torch's decoupled AdamW, and its eps sits outside the square root as in torch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

DECAY_MASKS = ("all", "matrices")
# Parameter names that are matrices by shape but are tables, not weights.
_NO_DECAY_NAMES = ("pos_embed",)


def epoch_cosine(
  learning_rate: float,
  end_learning_rate: float,
  *,
  steps_per_epoch: int,
  num_epochs: int,
) -> optax.Schedule:
  """torch CosineAnnealingLR stepped per epoch, as a function of the step.

  Epoch k (0-based) runs at eta + (lr - eta) * (1 + cos(pi * k / T)) / 2
  with T = num_epochs; the epoch of update `count` is count // steps_per_epoch.
  """
  if steps_per_epoch < 1 or num_epochs < 1:
    raise ValueError(
      f"steps_per_epoch ({steps_per_epoch}) and num_epochs ({num_epochs}) "
      "must be >= 1"
    )

  def schedule(count):
    epoch = jnp.minimum(count // steps_per_epoch, num_epochs)
    frac = epoch.astype(jnp.float32) / num_epochs
    cos = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return end_learning_rate + (learning_rate - end_learning_rate) * cos

  return schedule


def step_cosine(
  learning_rate: float,
  end_learning_rate: float,
  *,
  total_steps: int,
  warmup_steps: int = 0,
) -> optax.Schedule:
  """Linear warmup from 0 to lr, then cosine to end_learning_rate."""
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(
      f"warmup_steps ({warmup_steps}) must be in [0, total_steps={total_steps})"
    )
  decay_steps = total_steps - warmup_steps

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warm = learning_rate * count / max(warmup_steps, 1)
    frac = jnp.clip((count - warmup_steps) / decay_steps, 0.0, 1.0)
    cos = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    decay = end_learning_rate + (learning_rate - end_learning_rate) * cos
    return jnp.where(count < warmup_steps, warm, decay)

  return schedule


def create_schedule(
  config: ml_collections.ConfigDict, *, steps_per_epoch: int, num_epochs: int
) -> optax.Schedule:
  """The learning-rate schedule `config` (the `optim` block) asks for."""
  lr, end = config.learning_rate, config.end_learning_rate
  if config.schedule == "constant":
    return optax.constant_schedule(lr)
  if config.schedule != "cosine":
    raise ValueError(
      f"config.optim.schedule must be 'cosine' or 'constant', got "
      f"{config.schedule!r}"
    )
  if config.schedule_unit == "epoch":
    if config.warmup_steps:
      raise ValueError(
        "config.optim.warmup_steps needs config.optim.schedule_unit='step' "
        "(the per-epoch schedule replicates the reference, which has none)"
      )
    return epoch_cosine(
      lr, end, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs
    )
  if config.schedule_unit == "step":
    return step_cosine(
      lr,
      end,
      total_steps=steps_per_epoch * num_epochs,
      warmup_steps=config.warmup_steps,
    )
  raise ValueError(
    f"config.optim.schedule_unit must be 'epoch' or 'step', got "
    f"{config.schedule_unit!r}"
  )


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params, mode: str):
  """Which leaves get weight decay: a bool pytree like `params`.

  'all' decays everything (the reference: no parameter groups). 'matrices'
  decays only weight matrices (ndim >= 2), so LayerNorm scales and biases,
  linear biases, the alpha scalars and `pos_embed` are left alone.
  """
  if mode == "all":
    return jax.tree.map(lambda _: True, params)
  if mode == "matrices":

    def keep(path, leaf):
      names = _path_names(path)
      return leaf.ndim >= 2 and not any(n in _NO_DECAY_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)
  raise ValueError(
    f"config.optim.decay_mask must be one of {DECAY_MASKS}, got {mode!r}"
  )


MU_DTYPES = ("float32", "bfloat16")


def _moment_dtype(name: str):
  if name not in MU_DTYPES:
    raise ValueError(
      f"config.optim.mu_dtype must be one of {MU_DTYPES}, got {name!r}"
    )
  return None if name == "float32" else jnp.dtype(name)


def create_optimizer(
  config: ml_collections.ConfigDict, *, steps_per_epoch: int, num_epochs: int
) -> tuple[optax.GradientTransformation, Callable]:
  """(clip -> AdamW(schedule, mask), schedule) from the `optim` block."""
  schedule = create_schedule(
    config, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs
  )
  mode = config.decay_mask
  if mode not in DECAY_MASKS:
    raise ValueError(
      f"config.optim.decay_mask must be one of {DECAY_MASKS}, got {mode!r}"
    )
  adamw = optax.adamw(
    schedule,
    b1=config.b1,
    b2=config.b2,
    eps=config.eps,
    weight_decay=config.weight_decay,
    mask=None if mode == "all" else (lambda p: decay_mask(p, mode)),
    mu_dtype=_moment_dtype(config.get("mu_dtype", "float32")),
  )
  parts = []
  if config.clip_norm and config.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  parts.append(adamw)
  return optax.chain(*parts), schedule
