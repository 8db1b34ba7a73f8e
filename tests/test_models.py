"""Tests for egpt_align.models: counts, trees, init, formulas, masks, cache."""

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egpt_align import models
from egpt_align.models import (
  ADAPTERS,
  count_params,
  create_adapter,
  from_ref_type,
)

# The reference's state-dict listing (REFERENCE_NOTES §2), vendored as test
# data.
STATE_DICTS = (
  pathlib.Path(__file__).resolve().parent
  / "data"
  / "reference_state_dicts.json"
)

# Tiny dims for formula tests.
D, H, F, BN = 32, 4, 48, 8
SMALL = {
  "l1": dict(hidden_dim=D, bottleneck_dim=BN, num_layers=2),
  "l2": dict(hidden_dim=D, bottleneck_dim=BN, num_blocks=2),
  "l3": dict(hidden_dim=D, bottleneck_dim=BN, num_blocks=2),
  "l4": dict(hidden_dim=D, num_heads=H, ffn_dim=F, num_layers=2),
  "l5": dict(
    hidden_dim=D, num_heads=H, ffn_dim=F, num_layers=2, max_seq_len=12
  ),
  "b1": dict(
    hidden_dim=D, num_heads=H, ffn_dim=F, num_layers=2, max_seq_len=12
  ),
  "l5f": dict(
    hidden_dim=D, num_heads=H, ffn_dim=F, num_layers=2, max_seq_len=12
  ),
}
B, S = 3, 7
LENGTHS = np.array([7, 4, 1])
MASK = np.arange(S)[None, :] < LENGTHS[:, None]


def _inputs(name, seed=0, b=B, s=S):
  rng = np.random.default_rng(seed)
  return tuple(
    rng.normal(size=(b, s, D)).astype(np.float32) * 2.0 + 0.5
    for _ in ADAPTERS[name].inputs
  )


def _perturbed_params(name, seed=0):
  """Init, then perturb every leaf so zero/identity inits hide nothing."""
  model = create_adapter(name, **SMALL[name])
  params = jax.jit(model.init)(jax.random.key(seed), *_inputs(name))
  rng = np.random.default_rng(seed + 100)
  params = jax.tree.map(
    lambda a: a + 0.2 * rng.normal(size=a.shape).astype(np.float32), params
  )
  return model, params


@functools.cache
def _jitted(model, method=None, deterministic=True):
  def fn(params, *xs, rngs=None, **kw):
    if method is not None:
      return model.apply(params, *xs, method=method, rngs=rngs, **kw)
    return model.apply(
      params, *xs, deterministic=deterministic, rngs=rngs, **kw
    )

  return jax.jit(fn)


def _apply(model, params, *xs, method=None, deterministic=True, **kw):
  """model.apply, jitted once per (module, method) to keep CPU compiles few."""
  return _jitted(model, method, deterministic)(params, *xs, **kw)


@pytest.fixture(scope="module")
def perturbed():
  return {name: _perturbed_params(name) for name in ADAPTERS}


# ---------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------


def test_registry_specs():
  assert list(ADAPTERS) == ["l1", "l2", "l3", "l4", "l5", "b1", "l5f"]
  assert ADAPTERS["l1"].ref_type == "L1_Bottleneck"
  assert ADAPTERS["b1"].ref_type == ADAPTERS["l5"].ref_type == "L5_EAGLE"
  assert ADAPTERS["l5f"].ref_level == 6
  assert [n for n, s in ADAPTERS.items() if s.role == "decode"] == [
    "l5",
    "b1",
    "l5f",
  ]
  assert from_ref_type(None) == ("l1",)
  assert from_ref_type("L5_EAGLE") == ("l5", "b1")
  assert from_ref_type("nope") == ()
  model = ADAPTERS["l1"].from_config({"name": "l1", "hidden_dim": 32})
  assert model.hidden_dim == 32
  assert ADAPTERS["b1"].inputs == ("target",)
  assert ADAPTERS["l5f"].inputs == ("source", "target")
  assert [n for n, s in ADAPTERS.items() if s.predicts_next] == [
    "l5",
    "b1",
    "l5f",
  ]
  assert not ADAPTERS["l4"].causal and ADAPTERS["l5"].causal


def test_create_adapter_defaults_and_errors():
  l3 = create_adapter("l3")
  assert (l3.bottleneck_dim, l3.num_blocks, l3.hidden_dim) == (1024, 2, 4096)
  l2 = create_adapter("l2")
  assert (l2.bottleneck_dim, l2.num_blocks) == (256, 3)
  l5 = create_adapter("L5", num_heads=None)  # None -> default.
  assert (l5.num_heads, l5.ffn_dim, l5.max_seq_len, l5.dropout) == (
    8,
    2048,
    512,
    0.1,
  )
  with pytest.raises(ValueError, match="unknown adapter name 'l9'"):
    create_adapter("l9")
  with pytest.raises(ValueError, match="num_heads"):
    create_adapter("l1", num_heads=4)
  with pytest.raises(ValueError, match="input_names"):
    create_adapter("l5", input_names=("x",))
  with pytest.raises(ValueError, match="float64"):
    create_adapter("l4", dtype="float64")
  assert create_adapter("l4", dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_adapter_inputs():
  batch = {"source": 1, "target": 2, "mask": 3}
  assert models.adapter_inputs("l1", batch) == (1,)
  assert models.adapter_inputs("b1", batch) == (2,)
  assert models.adapter_inputs("l5f", batch) == (1, 2)
  with pytest.raises(ValueError, match=r"\['target'\]"):
    models.adapter_inputs("l5f", {"source": 1})


# ---------------------------------------------------------------------------
# Parameter counts and trees at hidden 4096 (never materialised).
# ---------------------------------------------------------------------------


def _abstract_params(name, **overrides):
  model = create_adapter(name, **overrides)
  x = jax.ShapeDtypeStruct((1, 4, model.hidden_dim), jnp.float32)
  n_in = len(ADAPTERS[name].inputs)
  return jax.eval_shape(
    lambda k: model.init(k, *([jnp.zeros(x.shape, x.dtype)] * n_in)),
    jax.random.key(0),
  )["params"]


@pytest.mark.parametrize(
  "name,overrides,expected",
  [
    ("l1", {}, 2_113_537),
    ("l2", {}, 6_324_227),
    ("l3", {}, 16_797_698),
    ("l3", {"num_blocks": 3}, 25_188_355),
    ("l4", {}, 100_714_497),
    ("l5", {}, 102_819_841),
    ("b1", {}, 102_819_841),
    ("l5f", {}, 169_936_897),
  ],
)
def test_param_counts_at_4096(name, overrides, expected):
  params = _abstract_params(name, **overrides)
  assert count_params(params) == expected
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def _torch_name(name, path):
  """DESIGN.md's flax path -> torch state-dict name (written independently)."""
  parts = [
    p.replace("layers_", "layers.").replace("blocks_", "blocks.") for p in path
  ]
  leaf = {"scale": "weight", "kernel": "weight"}.get(parts[-1], parts[-1])
  parts[-1] = leaf
  head = parts[0]
  if head.startswith("alphas_"):
    return "alphas." + head.split("_")[1]
  if name == "l3" and head.startswith("blocks."):
    idx = {"down": "0", "norm": "1", "up": "4"}[parts[1]]
    return ".".join([head, idx, parts[2]])
  if name == "l4" and head == "output_norm":
    return "output_proj.0." + leaf
  if name == "l4" and head == "output_proj":
    return "output_proj.1." + leaf
  if head == "gate":
    return "gate.0." + leaf
  if len(parts) > 1 and parts[1] in ("ffn_up", "ffn_down"):
    return f"{head}.ffn.{'0' if parts[1] == 'ffn_up' else '3'}.{leaf}"
  if len(parts) > 2 and parts[1] == "attn" and parts[2] == "in_proj":
    return f"{head}.attn.in_proj_{leaf}"
  return ".".join(parts)


@pytest.mark.skipif(not STATE_DICTS.exists(), reason="no state_dicts.json")
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_param_tree_matches_reference_state_dict(name):
  ref = json.loads(STATE_DICTS.read_text())[
    {"b1": "L5", "l5f": "L5F"}.get(name, name.upper())
  ]
  params = _abstract_params(name)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  ours = {}
  for path, leaf in flat:
    keys = [p.key for p in path]
    shape = list(leaf.shape)
    if len(shape) == 2:
      shape = shape[::-1]  # Flax [in, out] is torch weight.T.
    ours[_torch_name(name, keys)] = shape
  assert ours == {k: list(v) for k, v in ref.items()}


# ---------------------------------------------------------------------------
# Initialisation, as distributions.
# ---------------------------------------------------------------------------


def _check_uniform(x, bound, what):
  x = np.asarray(x).ravel()
  assert np.abs(x).max() <= bound * (1 + 1e-6), what
  assert np.abs(x).max() > 0.95 * bound, what
  np.testing.assert_allclose(
    x.std(), bound / math.sqrt(3), rtol=0.05, err_msg=what
  )
  assert abs(x.mean()) < 0.05 * bound, what


def _check_normal(x, std, what):
  x = np.asarray(x).ravel()
  np.testing.assert_allclose(x.std(), std, rtol=0.04, err_msg=what)
  assert abs(x.mean()) < 0.05 * std, what
  # Untruncated: about 0.27% of a normal lies beyond 3 std.
  assert (np.abs(x) > 3 * std).mean() > 0.001, what


def _init(name, **overrides):
  model = create_adapter(name, **overrides)
  n_in = len(ADAPTERS[name].inputs)
  x = jnp.zeros((1, 2, model.hidden_dim))
  return jax.jit(model.init)(jax.random.key(1), *([x] * n_in))["params"]


def test_init_bottlenecks():
  d, bn = 512, 128
  p = _init("l2", hidden_dim=d, bottleneck_dim=bn, num_blocks=2)
  for blk in ("blocks_0", "blocks_1"):
    _check_normal(p[blk]["down_proj"]["kernel"], 1 / math.sqrt(d), blk)
    assert not np.any(p[blk]["up_proj"]["kernel"])
    assert float(p[blk]["alpha_param"]) == pytest.approx(0.1)
    assert np.all(p[blk]["layer_norm"]["scale"] == 1)
    assert not np.any(p[blk]["layer_norm"]["bias"])
  assert not np.array_equal(
    p["blocks_0"]["down_proj"]["kernel"], p["blocks_1"]["down_proj"]["kernel"]
  )
  p = _init("l3", hidden_dim=d, bottleneck_dim=bn)
  # kaiming_normal_ default (leaky_relu, a=0): gain sqrt(2).
  _check_normal(p["blocks_0"]["down"]["kernel"], math.sqrt(2 / d), "l3 down")
  assert not np.any(p["blocks_1"]["up"]["kernel"])
  assert p["alphas_1"].shape == () and float(p["alphas_1"]) == pytest.approx(
    0.1
  )
  assert np.all(p["blocks_0"]["norm"]["scale"] == 1)


def test_init_attention_family():
  d, h, f = 256, 4, 384
  p = _init("l5f", hidden_dim=d, num_heads=h, ffn_dim=f, max_seq_len=512)
  layer = p["layers_0"]
  # nn.MultiheadAttention: xavier_uniform over the whole [3D, D] matrix.
  _check_uniform(
    layer["attn"]["in_proj"]["kernel"], math.sqrt(6 / (4 * d)), "in"
  )
  assert not np.any(layer["attn"]["in_proj"]["bias"])
  _check_uniform(layer["attn"]["out_proj"]["kernel"], 1 / math.sqrt(d), "out")
  assert not np.any(layer["attn"]["out_proj"]["bias"])
  # nn.Linear default: kernel and bias U(+-1/sqrt(fan_in)).
  _check_uniform(layer["ffn_up"]["kernel"], 1 / math.sqrt(d), "ffn_up")
  _check_uniform(layer["ffn_up"]["bias"], 1 / math.sqrt(d), "ffn_up b")
  _check_uniform(layer["ffn_down"]["kernel"], 1 / math.sqrt(f), "ffn_down")
  assert np.abs(layer["ffn_down"]["bias"]).max() <= 1 / math.sqrt(f)
  _check_uniform(p["gate"]["kernel"], 1 / math.sqrt(2 * d), "gate")
  assert np.abs(p["gate"]["bias"]).max() <= 1 / math.sqrt(2 * d)
  assert np.abs(p["gate"]["bias"]).max() > 0.8 / math.sqrt(2 * d)
  _check_uniform(p["fusion_proj"]["kernel"], math.sqrt(6 / (3 * d)), "fusion")
  assert not np.any(p["fusion_proj"]["bias"])
  np.testing.assert_array_equal(p["output_proj"]["kernel"], np.eye(d))
  assert not np.any(p["output_proj"]["bias"])
  assert float(p["alpha"]) == pytest.approx(0.1)
  # trunc_normal_(std=0.02) truncates at +-2 absolute, i.e. not at all here:
  # about 4.6% of the values lie beyond 2 std (0 if cut at +-2 std).
  pos = np.asarray(p["pos_embed"])
  assert pos.shape == (1, 512, d)
  _check_normal(pos, 0.02, "pos_embed")
  assert 0.035 < (np.abs(pos) > 0.04).mean() < 0.057
  for ln in ("fusion_norm", "output_norm"):
    assert np.all(p[ln]["scale"] == 1) and not np.any(p[ln]["bias"])


# ---------------------------------------------------------------------------
# Formulas against an independent numpy (float64) implementation.
# ---------------------------------------------------------------------------

_erf = np.vectorize(math.erf)


def np_ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def np_gelu(x):
  return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def np_linear(x, p):
  """torch F.linear with weight = kernel.T."""
  w = np.asarray(p["kernel"], np.float64).T
  y = x @ w.T
  return y + p["bias"] if "bias" in p else y


def np_mha(x, p, num_heads, allowed):
  """nn.MultiheadAttention(x, x, x) with a boolean [B, Q, K] allowed mask."""
  d = x.shape[-1]
  dh = d // num_heads
  w = np.asarray(p["in_proj"]["kernel"], np.float64).T  # torch [3D, D]
  bias = np.asarray(p["in_proj"]["bias"], np.float64)
  q = x @ w[:d].T + bias[:d]
  k = x @ w[d : 2 * d].T + bias[d : 2 * d]
  v = x @ w[2 * d :].T + bias[2 * d :]
  out = np.zeros_like(x)
  for h in range(num_heads):
    sl = slice(h * dh, (h + 1) * dh)
    logits = q[..., sl] / math.sqrt(dh) @ np.swapaxes(k[..., sl], -1, -2)
    logits = np.where(allowed, logits, -np.inf)
    # A query with no allowed key (padding): a uniform softmax, as ours.
    logits = np.where(allowed.any(-1, keepdims=True), logits, 0.0)
    logits = logits - logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    out[..., sl] = probs @ v[..., sl]
  return np_linear(out, p["out_proj"])


def np_layers(x, p, num_layers, num_heads, allowed):
  for i in range(num_layers):
    lp = p[f"layers_{i}"]
    x = x + np_mha(np_ln(x, lp["attn_norm"]), lp["attn"], num_heads, allowed)
    hdn = np_gelu(np_linear(np_ln(x, lp["ffn_norm"]), lp["ffn_up"]))
    x = x + np_linear(hdn, lp["ffn_down"])
  return x


def np_forward(name, params, inputs, mask):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  xs = [np.asarray(x, np.float64) for x in inputs]
  cfg = SMALL[name]
  if name in ("l1", "l2"):
    prefix, n = (
      ("layers", cfg["num_layers"])
      if name == "l1"
      else (
        "blocks",
        cfg["num_blocks"],
      )
    )
    x = xs[0]
    for i in range(n):
      bp = p[f"{prefix}_{i}"]
      h = np_linear(np_ln(x, bp["layer_norm"]), bp["down_proj"])
      x = x + bp["alpha_param"] * np_linear(np_gelu(h), bp["up_proj"])
    return np_ln(x, p["final_norm"])
  if name == "l3":
    x = np_ln(xs[0], p["input_norm"])
    for i in range(cfg["num_blocks"]):
      bp = p[f"blocks_{i}"]
      h = np_gelu(np_ln(np_linear(x, bp["down"]), bp["norm"]))
      x = x + p[f"alphas_{i}"] * np_linear(h, bp["up"])
    return np_ln(x, p["final_norm"])
  s = xs[0].shape[1]
  key_ok = np.ones(xs[0].shape[:2], bool) if mask is None else mask
  allowed = np.broadcast_to(key_ok[:, None, :], (len(key_ok), s, s))
  if name == "l4":
    h = xs[0]
    x = h
  else:
    allowed = allowed & np.tril(np.ones((s, s), bool))[None]
    if name == "l5f":
      e, h = xs
      c = np.concatenate([e, h], -1)
      g = 1 / (1 + np.exp(-np_linear(c, p["gate"])))
      fused = g * e + (1 - g) * h
      x = np_ln(fused + np_linear(c, p["fusion_proj"]), p["fusion_norm"])
    else:
      h = xs[0]
      x = np_ln(h, p["input_norm"])
    x = x + p["pos_embed"][:, :s]
  x = np_layers(x, p, cfg["num_layers"], cfg["num_heads"], allowed)
  out = np_linear(np_ln(x, p["output_norm"]), p["output_proj"])
  return h + p["alpha"] * (out - h)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_forward_matches_numpy_reference(name, perturbed):
  model, params = perturbed[name]
  inputs = _inputs(name, seed=3)
  y = _apply(model, params, *inputs, mask=MASK)
  assert y.shape == (B, S, D) and y.dtype == jnp.float32
  ref = np_forward(name, params, inputs, MASK)
  np.testing.assert_allclose(
    np.asarray(y)[MASK], ref[MASK], rtol=2e-5, atol=2e-5
  )
  assert np.all(np.isfinite(np.asarray(y)))


# The reference mixes a float causal mask with a bool padding mask; torch
# warns that this is deprecated but computes what we compare against.
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
def test_mha_matches_torch():
  torch = pytest.importorskip("torch")
  mha_mod = models.MultiHeadSelfAttention(num_heads=H, dropout=0.0)
  x = np.random.default_rng(0).normal(size=(B, S, D)).astype(np.float32)
  params = mha_mod.init(jax.random.key(0), x, None, deterministic=True)
  params = jax.tree.map(
    lambda a: a + 0.1 * jax.random.normal(jax.random.key(9), a.shape), params
  )
  p = jax.tree.map(np.asarray, params["params"])
  ref = torch.nn.MultiheadAttention(D, H, batch_first=True)
  with torch.no_grad():
    ref.in_proj_weight.copy_(torch.from_numpy(p["in_proj"]["kernel"].T.copy()))
    ref.in_proj_bias.copy_(torch.tensor(p["in_proj"]["bias"]))
    ref.out_proj.weight.copy_(
      torch.from_numpy(p["out_proj"]["kernel"].T.copy())
    )
    ref.out_proj.bias.copy_(torch.tensor(p["out_proj"]["bias"]))
  causal = np.tril(np.ones((S, S), bool))
  ours = mha_mod.apply(
    params, x, causal[None] & MASK[:, None, :], deterministic=True
  )[0]
  xt = torch.from_numpy(x)
  attn_mask = torch.triu(torch.ones(S, S), diagonal=1).masked_fill(
    torch.triu(torch.ones(S, S), diagonal=1) == 1, float("-inf")
  )
  theirs, _ = ref(
    xt,
    xt,
    xt,
    attn_mask=attn_mask,
    key_padding_mask=torch.from_numpy(~MASK),
    need_weights=False,
  )
  np.testing.assert_allclose(
    np.asarray(ours)[MASK], theirs.detach().numpy()[MASK], rtol=1e-5, atol=1e-5
  )


# ---------------------------------------------------------------------------
# Masks, causality, errors.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_padding_never_changes_valid_outputs(name, perturbed):
  model, params = perturbed[name]
  clean = _inputs(name, seed=4)
  clean = tuple(np.where(MASK[..., None], x, 0.0) for x in clean)
  garbage = tuple(
    np.where(MASK[..., None], x, 50.0 * g)
    for x, g in zip(clean, _inputs(name, seed=5), strict=True)
  )
  y0 = np.asarray(_apply(model, params, *clean, mask=MASK))
  y1 = np.asarray(_apply(model, params, *garbage, mask=MASK))
  np.testing.assert_allclose(y1[MASK], y0[MASK], rtol=1e-6, atol=1e-6)
  assert np.all(np.isfinite(y1))
  if name == "l4":
    # Without the mask padding leaks into valid outputs (the reference's D11).
    y2 = np.asarray(_apply(model, params, *garbage))
    assert np.abs(y2[MASK] - y0[MASK]).max() > 1e-3


# Left padding and holes: a causal adapter's valid query sees padded keys
# before it, so only a key mask (not a query mask, nor causality alone) keeps
# them out.
HOLES = np.array(
  [
    [False, False, True, True, True, True, True],  # left padding
    [True, False, True, False, False, True, True],  # holes
    [False, True, True, False, True, False, False],  # both, then right pad
  ]
)


@pytest.mark.parametrize("name", ["l4", "l5", "b1", "l5f"])
def test_padding_mask_is_a_key_mask(name, perturbed):
  """Documented (models/attention.py): the [B, S] mask masks keys."""
  model, params = perturbed[name]
  clean = _inputs(name, seed=7)
  garbage = tuple(
    np.where(HOLES[..., None], x, 50.0 * g)
    for x, g in zip(clean, _inputs(name, seed=8), strict=True)
  )
  y0 = np.asarray(_apply(model, params, *clean, mask=HOLES))
  y1 = np.asarray(_apply(model, params, *garbage, mask=HOLES))
  np.testing.assert_allclose(y1[HOLES], y0[HOLES], rtol=1e-6, atol=1e-6)
  assert np.all(np.isfinite(y1))
  ref = np_forward(name, params, clean, HOLES)
  np.testing.assert_allclose(y0[HOLES], ref[HOLES], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["l4", "l5", "l5f"])
def test_causality(name, perturbed):
  model, params = perturbed[name]
  x = _inputs(name, seed=6)
  x2 = tuple(np.concatenate([a[:, :4], a[:, 4:] * -1.5], 1) for a in x)
  y, y2 = _apply(model, params, *x), _apply(model, params, *x2)
  delta = np.abs(np.asarray(y2 - y))[:, :4].max()
  if ADAPTERS[name].causal:
    assert delta < 1e-6
  else:
    assert delta > 1e-3


@pytest.mark.parametrize("name", ["l4", "l5f"])
def test_all_padding_rows_are_finite(name, perturbed):
  model, params = perturbed[name]
  mask = MASK.copy()
  mask[2] = False
  y = _apply(model, params, *_inputs(name), mask=mask)
  assert np.all(np.isfinite(np.asarray(y)))


def test_errors():
  model, params = _perturbed_params("l5")
  long_x = np.zeros((1, 13, D), np.float32)
  with pytest.raises(ValueError, match=r"13.*max_seq_len=12"):
    model.apply(params, long_x)
  with pytest.raises(ValueError, match=r"'source' must be \[batch, seq, 32\]"):
    model.apply(params, np.zeros((1, 3, D + 1), np.float32))
  with pytest.raises(ValueError, match="mask"):
    model.apply(params, np.zeros((2, 3, D), np.float32), mask=np.ones((2, 4)))
  l5f = create_adapter("l5f", **SMALL["l5f"])
  with pytest.raises(TypeError, match="takes 2 input"):
    l5f.init(jax.random.key(0), np.zeros((1, 3, D), np.float32))
  with pytest.raises(ValueError, match="divisible"):
    create_adapter("l4", hidden_dim=30, num_heads=4).init(
      jax.random.key(0), np.zeros((1, 2, 30), np.float32)
    )


# ---------------------------------------------------------------------------
# Dropout and compute dtype.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["l1", "l3", "l5f"])
def test_dropout(name, perturbed):
  model, params = perturbed[name]
  x = _inputs(name)
  y = _apply(model, params, *x, mask=MASK)
  kw = dict(mask=MASK, deterministic=False)
  ya = _apply(model, params, *x, **kw, rngs={"dropout": jax.random.key(1)})
  yb = _apply(model, params, *x, **kw, rngs={"dropout": jax.random.key(2)})
  assert np.abs(np.asarray(ya - y)).max() > 1e-4
  assert np.abs(np.asarray(ya - yb)).max() > 1e-4
  no_drop = create_adapter(name, **SMALL[name], dropout=0.0)
  y0 = _apply(no_drop, params, *x, **kw, rngs={"dropout": jax.random.key(1)})
  np.testing.assert_allclose(
    np.asarray(y0), np.asarray(y), rtol=1e-6, atol=1e-6
  )


@pytest.mark.parametrize("name", ["l4", "l5", "l5f"])
def test_head_major_attention_equals_cache_layout(name, perturbed, monkeypatch):
  # Full-sequence calls lay q|k|v out head-major; the KV-cache path keeps
  # [B, S, H, Dh]. Same outputs, dropout masks and gradients either way.
  from egpt_align.models import attention

  model, params = perturbed[name]
  x = _inputs(name)
  kw = dict(mask=MASK, deterministic=False, rngs={"dropout": jax.random.key(4)})

  def run():  # traced afresh each time (not the cached _apply)
    def loss(p):
      y = model.apply(p, *x, **kw)
      return jnp.sum(jnp.where(MASK[..., None], y, 0.0) ** 2), y

    return jax.value_and_grad(loss, has_aux=True)(params)

  (_, y_a), g_a = run()
  monkeypatch.setitem(attention._HEADS_FIRST, "on", False)
  (_, y_b), g_b = run()
  np.testing.assert_allclose(
    np.asarray(y_a)[MASK], np.asarray(y_b)[MASK], rtol=1e-5, atol=1e-5
  )
  for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b), strict=True):
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5
    )


def _all_eqns(jaxpr):
  """Every equation of a jaxpr, recursing into sub-jaxprs (pjit, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _all_eqns(sub)


@pytest.mark.parametrize("name", ["l2", "l4", "l5f"])
def test_bfloat16_compute(name, perturbed):
  _, params = perturbed[name]
  x = _inputs(name)
  y32 = _apply(create_adapter(name, **SMALL[name]), params, *x, mask=MASK)
  bf = create_adapter(name, **SMALL[name], dtype="bfloat16")
  y16 = _apply(bf, params, *x, mask=MASK)
  assert y16.dtype == jnp.float32
  rel = np.linalg.norm(np.asarray(y16 - y32)[MASK]) / np.linalg.norm(
    np.asarray(y32)[MASK]
  )
  assert 0 < rel < 3e-2
  # The matmuls really run in bf16; params stay float32.
  jaxpr = jax.make_jaxpr(lambda p: bf.apply(p, *x, mask=MASK))(params)
  dots = [
    e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"
  ]
  assert dots
  assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  fresh = bf.init(jax.random.key(0), *x)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(fresh))


# ---------------------------------------------------------------------------
# KV-cached decoding.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["l5", "b1", "l5f"])
def test_decode_matches_full_forward(name, perturbed):
  model, params = perturbed[name]
  x = _inputs(name, seed=7)
  full = np.asarray(_apply(model, params, *x, mask=MASK))
  step = jax.jit(
    lambda p, c, *xs, m: model.apply(
      p, *xs, cache=c, mask=m, method=model.decode_step
    )
  )
  cache = model.init_cache(B, 10)
  outs = []
  for t in range(S):
    y, cache = step(
      params, cache, *(a[:, t : t + 1] for a in x), m=MASK[:, t : t + 1]
    )
    outs.append(np.asarray(y))
  np.testing.assert_allclose(
    np.concatenate(outs, 1)[MASK], full[MASK], rtol=1e-5, atol=1e-5
  )
  np.testing.assert_array_equal(cache["index"], [S] * B)
  # A prefill chunk, then single steps, with explicit positions.
  cache = model.init_cache(B, S)
  y0, cache = _apply(
    model,
    params,
    *(a[:, :3] for a in x),
    cache=cache,
    position=0,
    mask=MASK[:, :3],
    method="decode_step",
  )
  rest = []
  for t in range(3, S):
    y, cache = _apply(
      model,
      params,
      *(a[:, t : t + 1] for a in x),
      cache=cache,
      position=t,
      mask=MASK[:, t : t + 1],
      method="decode_step",
    )
    rest.append(np.asarray(y))
  got = np.concatenate([np.asarray(y0)] + rest, 1)
  np.testing.assert_allclose(got[MASK], full[MASK], rtol=1e-5, atol=1e-5)


def test_decode_rollback_and_per_row_positions(perturbed):
  model, params = perturbed["l5f"]
  x = _inputs("l5f", seed=8, b=2, s=6)
  x_alt = tuple(np.concatenate([a[:, :3], a[:, 3:] * -1.5], 1) for a in x)
  cache = model.init_cache(2, 8)
  # Draft 6 positions of x, then roll back to position 3 and decode x_alt.
  _, cache = _apply(model, params, *x, cache=cache, method="decode_step")
  outs = []
  for t in range(3, 6):
    y, cache = _apply(
      model,
      params,
      *(a[:, t : t + 1] for a in x_alt),
      cache=cache,
      position=t,
      method="decode_step",
    )
    outs.append(np.asarray(y))
  full_alt = np.asarray(_apply(model, params, *x_alt))
  np.testing.assert_allclose(
    np.concatenate(outs, 1), full_alt[:, 3:], rtol=1e-5, atol=1e-5
  )
  # Rows at different positions: row 0 at 5, row 1 at 2 (after a rollback).
  y, _ = _apply(
    model,
    params,
    *(a[:, 5:6] for a in x_alt),
    cache=cache,
    position=np.array([5, 2]),
    method="decode_step",
  )
  np.testing.assert_allclose(
    np.asarray(y)[0], full_alt[0, 5:6], rtol=1e-5, atol=1e-5
  )
  x_row1 = tuple(
    np.concatenate([a[1:, :2], b[1:, 5:6]], 1)
    for a, b in zip(x_alt, x_alt, strict=True)
  )
  ref1 = np.asarray(_apply(model, params, *x_row1))[0, 2]
  np.testing.assert_allclose(np.asarray(y)[1, 0], ref1, rtol=1e-5, atol=1e-5)


def test_cache_errors(perturbed):
  model, params = perturbed["l5"]
  with pytest.raises(ValueError, match="max_seq_len=12"):
    model.init_cache(1, 13)
  cache = model.init_cache(1, 4)
  assert cache["layers_1"]["k"].shape == (1, 4, H, D // H)
  with pytest.raises(ValueError, match="outside the cache"):
    model.apply(
      params,
      np.zeros((1, 1, D), np.float32),
      cache=cache,
      position=4,
      method="decode_step",
    )


def test_layer_norm_matches_two_pass_float64_with_an_offset():
  # Single-pass float32 statistics stay accurate for hidden-state-like rows,
  # including a mean well away from zero and a few large outlier dims.
  from egpt_align.models.bottleneck import layer_norm

  rng = np.random.default_rng(0)
  x = 3.0 + rng.standard_normal((4, 4096))
  x[:, :3] = [80.0, -60.0, 120.0]  # "massive activation" dims
  ln = layer_norm("ln")
  params = ln.init(jax.random.PRNGKey(0), jnp.zeros((1, 4096)))
  got = np.asarray(ln.apply(params, jnp.asarray(x, jnp.float32)))
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  want = (x - mean) / np.sqrt(var + 1e-5)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_layer_norm_eps_on_low_variance_rows():
  # With variance ~1e-6 the eps (torch's 1e-5) dominates the denominator, so
  # a different eps shows here and not on unit-variance inputs.
  from egpt_align.models.bottleneck import layer_norm

  rng = np.random.default_rng(1)
  x = 1e-3 * rng.standard_normal((3, 64))
  ln = layer_norm("ln")
  params = ln.init(jax.random.PRNGKey(0), jnp.zeros((1, 64)))
  got = np.asarray(ln.apply(params, jnp.asarray(x, jnp.float32)))
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  np.testing.assert_allclose(
    got, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-3, atol=1e-6
  )
