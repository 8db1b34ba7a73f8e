"""L1-L4 widths on the seed's capacity axis at any hidden size.

The seed compares L1-L4 at hidden 4096, where the recipes that train them
(experiments/*.py, as the reference's command builds them: L3 with 3 blocks)
have 2.10M : 6.30M : 25.2M : 100.7M parameters. At a smaller
hidden size the recipes' fixed widths (bottleneck 256 and 1024, FFN 2048)
no longer form that axis: at hidden 256 a 256-wide bottleneck is no
bottleneck, and L4 (whose count grows as hidden^2) ends up smaller than
L3. `solve(hidden)` picks each adapter's width (L1-L3 `bottleneck_dim`,
L4 `ffn_dim`) so that the four counts stand in the seed's ratios again.
Every count comes from the adapter the trainer builds from the recipe
(egpt_align.train_state.create_model), never a formula written here.
"""

from __future__ import annotations

import functools

SEED_HIDDEN = 4096
# The width each prefill adapter's solver moves, and its recipe value.
WIDTH_FIELD = {
  "l1": "bottleneck_dim",
  "l2": "bottleneck_dim",
  "l3": "bottleneck_dim",
  "l4": "ffn_dim",
}
ANCHOR = "l1"  # the others are sized against it
TOLERANCE = 0.02  # the largest relative error of a ratio the solver accepts


class WidthError(ValueError):
  """No widths give the seed's ratios at this hidden size."""


@functools.cache
def param_count(name: str, hidden: int, width: int | None = None) -> int:
  """Adapter NAME's parameter count at HIDDEN as its recipe trains it (the
  width overridden when given; shapes only, nothing run)."""
  import jax
  import jax.numpy as jnp

  from egpt_align.models import ADAPTERS, count_params
  from egpt_align.train_state import create_model
  from tools.study import layout

  # The recipe's model block (experiments/NAME.py: L3 trains 3 blocks, not
  # the registry's default 2) built as the trainer builds it, at HIDDEN.
  config = layout.experiment_config(name).model.to_dict()
  config["hidden_dim"] = hidden
  if width is not None:
    config[WIDTH_FIELD[name]] = width
  model = create_model(config)
  n_in = len(ADAPTERS[name].inputs)
  x = jnp.zeros((1, 2, hidden), jnp.float32)
  shapes = jax.eval_shape(
    lambda k: model.init(k, *([x] * n_in)), jax.random.key(0)
  )
  return count_params(shapes["params"])


def seed_ratios() -> dict[str, float]:
  """Each prefill adapter's count over L1's, recipes at hidden 4096."""
  base = param_count(ANCHOR, SEED_HIDDEN)
  return {n: param_count(n, SEED_HIDDEN) / base for n in WIDTH_FIELD}


def _line(name: str, hidden: int) -> tuple[int, int]:
  """(intercept, slope) of the count in the width (it is affine in it)."""
  p1, p2 = param_count(name, hidden, 1), param_count(name, hidden, 2)
  return p1 - (p2 - p1), p2 - p1


def solve(hidden: int, tolerance: float = TOLERANCE) -> dict:
  """Widths for L1-L4 at HIDDEN with the seed's parameter ratios.

  L1's bottleneck starts at the recipe's share of the hidden size (256 of
  4096) and grows until every other adapter's nearest width gives a ratio
  within `tolerance` of the seed's (integer widths round the counts); a
  bottleneck wider than the hidden size is refused. Returns widths (the
  config overrides), counts, ratios and the seed's ratios; WidthError
  (naming the hidden size and the worst ratio) when none fits.
  """
  target = seed_ratios()
  start = max(1, round(256 * hidden / SEED_HIDDEN))
  best = None
  lines = {n: _line(n, hidden) for n in WIDTH_FIELD}
  for w1 in range(start, hidden + 1):
    a, b = lines[ANCHOR]
    p1 = a + b * w1
    widths = {ANCHOR: w1}
    for name in WIDTH_FIELD:
      if name != ANCHOR:
        a, b = lines[name]
        widths[name] = max(1, round((target[name] * p1 - a) / b))
    counts = {n: lines[n][0] + lines[n][1] * w for n, w in widths.items()}
    ratios = {n: counts[n] / p1 for n in counts}
    error = max(abs(ratios[n] / target[n] - 1) for n in target)
    bottleneck_ok = all(
      w <= hidden for n, w in widths.items() if WIDTH_FIELD[n] != "ffn_dim"
    )
    if bottleneck_ok and (best is None or error < best[0]):
      best = (error, widths, counts, ratios)
    if bottleneck_ok and error <= tolerance:
      for n, w in widths.items():  # the registry's own count, not the line's
        counts[n] = param_count(n, hidden, w)
      assert counts == {
        n: lines[n][0] + lines[n][1] * w for n, w in widths.items()
      }, f"{counts}: a count is not affine in its width"
      return {
        "hidden": hidden,
        "overrides": {n: {WIDTH_FIELD[n]: w} for n, w in widths.items()},
        "params": counts,
        "ratios": ratios,
        "seed_ratios": target,
        "max_relative_error": error,
      }
  worst = "no width fits" if best is None else f"best error {best[0]:.1%}"
  raise WidthError(
    f"hidden {hidden}: no L1-L4 widths give the seed's parameter ratios "
    f"(L1 : L2 : L3 : L4 = "
    + " : ".join(f"{target[n]:.2f}" for n in WIDTH_FIELD)
    + f") within {tolerance:.0%} with bottlenecks no wider than the hidden "
    f"size ({worst})"
  )
