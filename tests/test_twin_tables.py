"""The twins' tables (tools/lib/twins): one per registry adapter, exact.

Every registry adapter has a twin whose `naming` covers exactly its Flax
tree and its torch state dict (names, order and shapes) at tiny dims, reads
its config back off the state dict, and builds the reference's `config`;
and the torch side never spells an adapter name outside the registry.
"""

import ast
import dataclasses
import inspect
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

from egpt_align import models  # noqa: E402
from tools.lib import twins as ta  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny values for whichever of these fields an adapter has (depth: 2).
TINY = dict(hidden_dim=16, bottleneck_dim=4, ffn_dim=24, num_heads=2)
TINY_MAX_SEQ_LEN = 8


def tiny_config(name):
  """A config of tiny dims for adapter `name`, from its own fields."""
  twin = ta.twin(name)
  cfg = {k: v for k, v in TINY.items() if k in twin.fields}
  cfg[twin.naming.depth] = 2
  if "max_seq_len" in twin.fields:
    cfg["max_seq_len"] = TINY_MAX_SEQ_LEN
  return cfg


def flax_shapes(name, cfg):
  """{'a/b/c': shape} of the Flax module's params, without computing them."""
  module = models.create_adapter(name, **cfg)
  spec = models.get_spec(name)
  xs = [np.zeros((1, 3, cfg["hidden_dim"]), np.float32) for _ in spec.inputs]
  tree = jax.eval_shape(
    lambda: module.init(jax.random.key(0), *xs, mask=np.ones((1, 3), bool))
  )["params"]
  return {
    "/".join(str(k.key) for k in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_every_registry_module_has_a_twin():
  assert set(ta.TWINS) == {s.module for s in models.ADAPTERS.values()}
  assert set(ta.BY_NAME) == set(models.ADAPTERS)
  for name, twin in ta.BY_NAME.items():
    assert twin.spec is models.ADAPTERS[name]
    assert isinstance(twin.naming, ta.Naming), name


@pytest.mark.parametrize("name", list(models.ADAPTERS))
def test_table_covers_flax_tree_and_state_dict_exactly(name):
  cfg = tiny_config(name)
  table = ta.twin(name).naming.params(2)
  state = ta.build_torch_adapter(name, **cfg).state_dict()
  flax = flax_shapes(name, cfg)
  # Torch keys in the state dict's own order; Flax paths as a set.
  assert [tkey for _, tkey, _ in table] == list(state)
  assert sorted("/".join(fpath) for fpath, _, _ in table) == sorted(flax)
  for fpath, tkey, transpose in table:
    shape = flax["/".join(fpath)]
    assert (shape[::-1] if transpose else shape) == tuple(state[tkey].shape), (
      fpath,
      tkey,
    )


@pytest.mark.parametrize("name", list(models.ADAPTERS))
def test_table_reads_the_config_back(name):
  cfg = tiny_config(name)
  state = ta.build_torch_adapter(name, **cfg).state_dict()
  heads = cfg.get("num_heads")
  assert ta.infer_config(name, state, heads) == cfg
  assert ta.resolve_config(name, state, {"num_heads": heads}) == cfg


@pytest.mark.parametrize("name", ["l1", "l5f"])
def test_loading_names_every_key_that_does_not_fit(name):
  """One ValueError naming the missing key and the mis-shaped one, raised
  before torch's own strict load (which stops at the first)."""
  cfg = tiny_config(name)
  state = dict(ta.build_torch_adapter(name, **cfg).state_dict())
  missing, *rest = sorted(state)
  del state[missing]
  bad = rest[-1]
  state[bad] = torch.zeros(*state[bad].shape, 3)
  with pytest.raises(ValueError) as e:
    ta.load_torch_adapter(name, state, **cfg)
  assert missing in str(e.value) and bad in str(e.value)


@pytest.mark.parametrize("name", list(models.ADAPTERS))
def test_reference_config_is_the_twin_constructor(name):
  twin = ta.twin(name)
  ref = ta.reference_config(name, **tiny_config(name))
  naming = twin.naming
  assert list(ref) == list(naming.reference) + list(naming.fixed)
  model = twin.module(**ref)  # The reference builds its adapter so.
  assert list(model.state_dict()) == [t for _, t, _ in naming.params(2)]
  if naming.config_class is not None:
    fields = dataclasses.fields(naming.config_class)
    defaults = {f.name: f.default for f in fields}
  else:
    params = inspect.signature(twin.module).parameters.values()
    defaults = {p.name: p.default for p in params}
  assert set(ref) <= set(defaults), name
  # The Flax defaults are the reference's (a None field means default).
  for ours, value in twin.defaults.items():
    key = ta.REFERENCE_NAMES.get(ours, ours)
    assert defaults[key] == value, (name, key)


def _string_constants(path):
  """String constants of a file, docstrings left out."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  docs = {
    id(node.body[0].value)
    for node in ast.walk(tree)
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
    and node.body
    and isinstance(node.body[0], ast.Expr)
  }
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      if id(node) not in docs:
        yield node


def test_torch_side_never_branches_on_adapter_names():
  # What an adapter is comes from the registry and the twins' tables; the
  # one name written out is the kind 'identity' builds (sd_adapters).
  allowed = {("tools/lib/sd_adapters.py", "l4")}
  files = [
    os.path.join(dirpath, n)
    for dirpath, _, names in os.walk(os.path.join(REPO, "tools", "lib"))
    for n in names
    if n.endswith(".py")
  ]
  for name in ("benchmark_train.py", "train_steps.py", "train_timing.py"):
    files.append(os.path.join(REPO, "tools", "benchmarks", name))
  found = set()
  for path in files:
    rel = os.path.relpath(path, REPO)
    for node in _string_constants(path):
      if node.value.lower() in models.ADAPTERS:
        found.add((rel, node.value))
  assert found == allowed
