"""What an evaluation runs on: its adapter, params, data and LM head.

evaluate.evaluate's arguments become a `Request`; `from_workdir` fills one
from a training run, and `prepare` checks it and opens everything it names,
so that bad inputs are refused before the device loop starts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from egpt_align import checkpoint, models, train_state
from egpt_align import lm_head as lm_head_lib
from egpt_align import speedup as speedup_lib
from egpt_align.data import reader, splits


@dataclasses.dataclass(frozen=True)
class Request:
  """What evaluate() was asked for, before it is checked and opened."""

  data: Any = None  # Dataset directory or opened dataset.
  adapter: str | None = None  # Registry name.
  overrides: dict | None = None  # Model config fields.
  params: Any = None  # A param tree, or 'init' for a fresh adapter.
  seed: int | None = None  # Of the untrained floor (None = 0).
  lm_head: Any = None  # Path, LMHead or None.
  indices: Sequence[int] | None = None  # Samples to evaluate (None = all).
  subset: str | None = None  # How `indices` were chosen, for the record.


@dataclasses.dataclass(frozen=True)
class Inputs:
  """A checked request: the adapter built, the data and LM head opened."""

  spec: Any  # models.get_spec(adapter).
  module: Any  # The flax module.
  params: Any  # The params evaluated.
  params0: Any  # The trainer's initial params (the `untrained` floor).
  fresh: bool  # params='init' was asked for.
  overrides: dict  # Model config fields as the module was built.
  seed: int
  dataset: Any
  data_path: str | None
  indices: np.ndarray  # Samples evaluated.
  subset: str | None
  lengths: np.ndarray  # Valid positions of each sample evaluated.
  groups: np.ndarray | None  # Resampling unit of each sample, if named.
  head: lm_head_lib.LMHead | None
  lm_head: Any  # As given (path or LMHead), for the record.
  costs: dict  # speedup.resolve_costs.

  @property
  def cross_model(self) -> bool:
    """The adapter reads the drafter's states."""
    return "source" in self.spec.inputs

  @property
  def raw_source(self) -> bool:
    """The drafter's own state is a floor (cross-model, equal dims)."""
    ds = self.dataset
    return self.cross_model and ds.source_dim == ds.target_dim

  @property
  def stored_tokens(self) -> bool:
    """Token targets are the dataset's target_tokens, not LM-head argmaxes."""
    return bool(self.dataset.has_target_tokens)

  @property
  def depth_report(self) -> bool:
    """Acceptance at depth is reported: decode adapters with an LM head."""
    return self.spec.role == "decode" and self.head is not None


def run_data(config, workdir: str):
  """(data, hold-out indices or None) a run is evaluated on by default.

  Its data.test, else data.val, else the trainer's own hold-out of
  data.train (synthetic data included), as an opened dataset.
  """
  data = config.data.get("test") or config.data.get("val")
  if data:
    return data, None
  _, _, dataset, holdout = splits.open_data(config, workdir)
  return dataset, holdout


def from_workdir(request: Request, workdir: str, step) -> Request:
  """The request with a run's params, adapter, model fields and seed, and
  its LM head and data where the request names none."""
  params, config = checkpoint.load_params(workdir, step)
  model_cfg = dict(config.model)
  new = {
    "params": params,
    "adapter": model_cfg.pop("name"),
    "overrides": {**model_cfg, **(request.overrides or {})},
  }
  if request.seed is None:
    new["seed"] = int(config.get("seed", 0))
  if request.lm_head is None and config.get("lm_head"):
    new["lm_head"] = config.lm_head
  if request.data is None:
    new["data"], holdout = run_data(config, workdir)
    if holdout is not None and request.indices is None:
      new["indices"] = holdout
      new["subset"] = f"validation hold-out of data.train ({len(holdout)})"
  return dataclasses.replace(request, **new)


def prepare(request: Request, settings) -> Inputs:
  """Checks a request and opens what it names (evaluate.EvalSettings)."""
  if request.params is None:
    raise ValueError(
      "evaluate needs params (or a workdir to load them from; params='init' "
      "evaluates a freshly initialised adapter)"
    )
  if request.adapter is None:
    raise ValueError("evaluate needs an adapter name (or a workdir)")
  if request.data is None:
    raise ValueError("evaluate needs a dataset (data=DIR)")
  seed = 0 if request.seed is None else request.seed
  if settings.gamma < 1:
    raise ValueError(f"gamma must be >= 1, got {settings.gamma}")
  dataset, data_path = _open(request.data)
  spec = models.get_spec(request.adapter)
  # Before the device loop: a bad --bench_json costs no evaluation.
  costs = speedup_lib.resolve_costs(
    spec.name,
    settings.gamma,
    bench_json=settings.bench_json,
    draft_cost=settings.draft_cost,
    verify_cost=settings.verify_cost,
    # Cross-model adapters draft through the drafter's own decode.
    fallback="drafter" if "source" in spec.inputs else None,
  )
  module, overrides, params, params0 = _build_adapter(
    spec, request.overrides, request.params, dataset, seed
  )
  head = _load_head(request.lm_head, dataset, data_path)
  indices, subset = _select(
    request.indices,
    dataset.num_samples,
    data_path,
    request.subset,
    settings.max_samples,
  )
  return Inputs(
    spec=spec,
    module=module,
    params=params,
    params0=params0,
    fresh=_is_fresh(request.params),
    overrides=overrides,
    seed=seed,
    dataset=dataset,
    data_path=data_path,
    indices=indices,
    subset=subset,
    lengths=np.asarray(dataset.lengths)[indices].astype(np.int64),
    # CIs resample the independent unit: the sample, or its group (a scene
    # that several questions share) when the samples file named one.
    groups=dataset.groups(indices),
    head=head,
    lm_head=request.lm_head,
    costs=costs,
  )


def _is_fresh(params) -> bool:
  return isinstance(params, str) and params == "init"


def _build_adapter(spec, overrides, params, dataset, seed: int):
  """(module, overrides as built, params, initial params); checks shapes."""
  overrides = dict(overrides or {})
  if overrides.get("hidden_dim") is None:
    overrides["hidden_dim"] = int(dataset.target_dim)
  if overrides.get("dtype") is not None:  # 'auto' as the trainer reads it
    overrides["dtype"] = train_state.compute_dtype(overrides["dtype"])
  module = train_state.create_model({**overrides, "name": spec.name})
  params0 = init_params(spec, module, dataset, seed)
  if _is_fresh(params):
    return module, overrides, params0, params0
  params = _unwrap(params)
  set_fields = {k: v for k, v in overrides.items() if v is not None}
  models.check_param_shapes(
    f"the parameters do not fit adapter {spec.name!r} ({set_fields})",
    models.param_shapes(params),
    models.param_shapes(params0),
  )
  return module, overrides, params, params0


def init_params(spec, module, dataset, seed: int):
  """The trainer's initial params for this seed (the `untrained` floor)."""
  dims = {"source": dataset.source_dim, "target": dataset.target_dim}
  s = int(min(int(np.max(dataset.lengths)), 8))
  dummy = tuple(jnp.zeros((1, s, dims[k]), jnp.float32) for k in spec.inputs)
  # The trainer's init key for this seed (train.py: split(key(seed))[0]),
  # so for a workdir this is the run's own starting point. Initialisers
  # depend on parameter shapes only, not on the dummy input's length.
  init_rng = jax.random.split(jax.random.key(seed))[0]
  # One compiled program instead of one per op (much faster to build).
  variables = jax.jit(module.init)(
    {"params": init_rng}, *dummy, mask=jnp.ones((1, s), bool)
  )
  return variables["params"]


def _unwrap(params):
  if isinstance(params, dict) and set(params) == {"params"}:
    return params["params"]
  return params


def _open(data):
  """(dataset, path) from a directory or an opened dataset."""
  if isinstance(data, str | os.PathLike):
    path = os.fspath(data)
    dataset = reader.open_dataset(path)
  else:
    dataset, path = data, getattr(data, "path", None)
  if dataset.num_samples == 0:
    raise ValueError(f"{path}: dataset has no samples")
  return dataset, path


def _load_head(lm_head, dataset, data_path):
  if lm_head is None:
    return None
  head = (
    lm_head
    if isinstance(lm_head, lm_head_lib.LMHead)
    else lm_head_lib.load_lm_head(lm_head)
  )
  if head.hidden_dim != dataset.target_dim:
    raise ValueError(
      f"LM head hidden dim {head.hidden_dim} != dataset target_dim "
      f"{dataset.target_dim} ({data_path})"
    )
  return head


def _select(indices, n_total, data_path, subset, max_samples):
  """(sample indices, subset description)."""
  if indices is None:
    indices = np.arange(n_total)
  else:
    indices = np.asarray(indices, np.int64)
    if indices.ndim != 1 or not len(indices):
      raise ValueError("indices must be a non-empty 1-D list of samples")
    if indices.min() < 0 or indices.max() >= n_total:
      raise ValueError(
        f"{data_path}: indices must lie in [0, {n_total}), got "
        f"[{indices.min()}, {indices.max()}]"
      )
    if subset is None:
      subset = f"{len(indices)} given samples"
  if max_samples is not None:
    indices = indices[:max_samples]
  return indices, subset
