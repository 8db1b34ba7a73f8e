"""Tests of tools/lib/twins.py (twins, KV decoding) and bridge.py (mapping)."""

import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from egpt_align import models  # noqa: E402
from tools.lib import bridge  # noqa: E402
from tools.lib import twins as ta  # noqa: E402

# The reference's state-dict listing (REFERENCE_NOTES §2), vendored as test
# data.
REF_JSON = os.path.join(
  os.path.dirname(__file__), "data", "reference_state_dicts.json"
)
REF_KEY = {
  "l1": "L1",
  "l2": "L2",
  "l3": "L3",
  "l4": "L4",
  "l5": "L5",
  "b1": "L5",
  "l5f": "L5F",
}
# Issue 2 / REFERENCE_NOTES §2, at hidden_dim 4096 with reference defaults.
COUNTS_4096 = {
  "l1": 2_113_537,
  "l2": 6_324_227,
  "l3": 16_797_698,
  "l4": 100_714_497,
  "l5": 102_819_841,
  "b1": 102_819_841,
  "l5f": 169_936_897,
}
D = 32
SMALL = {
  "l1": dict(hidden_dim=D, bottleneck_dim=8, num_layers=2),
  "l2": dict(hidden_dim=D, bottleneck_dim=8),
  "l3": dict(hidden_dim=D, bottleneck_dim=16),
  "l4": dict(hidden_dim=D, num_heads=4, ffn_dim=48, num_layers=2),
  "l5": dict(
    hidden_dim=D, num_heads=4, ffn_dim=48, num_layers=2, max_seq_len=16
  ),
  "b1": dict(hidden_dim=D, num_heads=4, ffn_dim=48, max_seq_len=16),
  "l5f": dict(hidden_dim=D, num_heads=4, ffn_dim=48, max_seq_len=16),
}
LENGTHS = (7, 5, 2, 0)  # The last row is all padding.


def random_twin(name, seed=0, **cfg):
  """A twin in eval mode with every parameter perturbed (nothing trivial)."""
  torch.manual_seed(seed)
  model = ta.build_torch_adapter(name, **(cfg or SMALL[name])).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.3 * torch.randn(p.shape, generator=gen))
  return model


def batch(name, seed=0, lengths=LENGTHS, seq=7):
  rng = np.random.default_rng(seed)
  n = 2 if name == "l5f" else 1
  xs = [
    rng.normal(size=(len(lengths), seq, D)).astype(np.float32) for _ in range(n)
  ]
  mask = np.arange(seq)[None, :] < np.asarray(lengths)[:, None]
  return xs, mask


# ----------------------------------------------------------------------------
# Independent numpy implementation of the reference formulas (float64).

_erf = np.vectorize(math.erf)


def np_ln(x, sd, key):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * sd[key + ".weight"] + sd[
    key + ".bias"
  ]


def np_gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def np_linear(x, sd, key, bias=True):
  y = x @ sd[key + ".weight"].T
  return y + sd[key + ".bias"] if bias else y


def np_layer(x, sd, key, heads, allowed):
  """Pre-LN MHA + FFN; allowed [B, Q, K] bool."""
  b, s, d = x.shape
  h = np_ln(x, sd, key + ".attn_norm")
  qkv = h @ sd[key + ".attn.in_proj_weight"].T + sd[key + ".attn.in_proj_bias"]
  q, k, v = (
    t.reshape(b, s, heads, d // heads).transpose(0, 2, 1, 3)
    for t in np.split(qkv, 3, axis=-1)
  )
  logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)
  logits = np.where(allowed[:, None], logits, -np.inf)
  top = np.max(logits, -1, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)
  w = np.exp(logits - top)
  w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
  a = (w @ v).transpose(0, 2, 1, 3).reshape(b, s, d)
  x = x + np_linear(a, sd, key + ".attn.out_proj")
  f = np_gelu(np_linear(np_ln(x, sd, key + ".ffn_norm"), sd, key + ".ffn.0"))
  return x + np_linear(f, sd, key + ".ffn.3")


def np_forward(name, model, xs, mask):
  sd = {k: v.double().numpy() for k, v in model.state_dict().items()}
  xs = [x.astype(np.float64) for x in xs]
  x = xs[0]
  if name in ("l1", "l2"):
    prefix = "layers" if name == "l1" else "blocks"
    for i in range(bridge.torch_depth(name, sd)):
      k = f"{prefix}.{i}"
      h = np_gelu(
        np_linear(np_ln(x, sd, k + ".layer_norm"), sd, k + ".down_proj", False)
      )
      x = x + sd[k + ".alpha_param"] * np_linear(h, sd, k + ".up_proj", False)
    return np_ln(x, sd, "final_norm")
  if name == "l3":
    x = np_ln(x, sd, "input_norm")
    for i in range(bridge.torch_depth(name, sd)):
      k = f"blocks.{i}"
      h = np_ln(np_linear(x, sd, k + ".0", False), sd, k + ".1")
      x = x + sd[f"alphas.{i}"] * np_linear(np_gelu(h), sd, k + ".4", False)
    return np_ln(x, sd, "final_norm")
  seq = x.shape[1]
  allowed = np.broadcast_to(mask[:, None, :], (len(mask), seq, seq))
  if name != "l4":
    allowed = allowed & np.tril(np.ones((seq, seq), bool))[None]
  residual = x
  if name == "l4":
    h = x
  elif name == "l5f":
    e, v = xs
    c = np.concatenate([e, v], -1)
    g = 1 / (1 + np.exp(-np_linear(c, sd, "gate.0")))
    h = np_ln(
      g * e + (1 - g) * v + np_linear(c, sd, "fusion_proj"), sd, "fusion_norm"
    )
    h = h + sd["pos_embed"][:, :seq]
    residual = v
  else:
    h = np_ln(x, sd, "input_norm") + sd["pos_embed"][:, :seq]
  for i in range(bridge.torch_depth(name, sd)):
    h = np_layer(h, sd, f"layers.{i}", model.num_heads, allowed)
  if name == "l4":
    out = np_linear(np_ln(h, sd, "output_proj.0"), sd, "output_proj.1")
  else:
    out = np_linear(np_ln(h, sd, "output_norm"), sd, "output_proj")
  return residual + sd["alpha"] * (out - residual)


def run(model, xs, mask=None, grad=False):
  inputs = [torch.from_numpy(x) for x in xs]
  m = None if mask is None else torch.from_numpy(mask)
  with torch.set_grad_enabled(grad):
    return model(*inputs, mask=m).detach().numpy()


def rel_err(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------
# Structure, counts, initialisation.


@pytest.mark.parametrize("name", list(models.ADAPTERS))
def test_param_count_at_4096(name):
  with torch.device("meta"):
    model = ta.build_torch_adapter(name, hidden_dim=4096)
  assert ta.num_params(model) == COUNTS_4096[name]


def test_l3_three_blocks_count():
  with torch.device("meta"):
    model = ta.build_torch_adapter("l3", hidden_dim=4096, num_blocks=3)
  assert ta.num_params(model) == 25_188_355
  assert "alphas.2" in model.state_dict()


@pytest.mark.skipif(not os.path.exists(REF_JSON), reason="no reference JSON")
@pytest.mark.parametrize("name", list(models.ADAPTERS))
def test_state_dict_equals_reference_listing(name):
  with open(REF_JSON) as f:
    ref = json.load(f)
  with torch.device("meta"):
    model = ta.build_torch_adapter(name, hidden_dim=4096)
  sd = model.state_dict()
  want = ref[REF_KEY[name]]
  assert list(sd) == list(want)  # Same keys in the same (torch) order.
  assert {k: list(v.shape) for k, v in sd.items()} == want
  counts = ref["param_counts"][REF_KEY[name]]["trainable_params"]
  assert ta.num_params(model) == counts


def test_l1_state_dict_listing():
  with torch.device("meta"):
    model = ta.build_torch_adapter("l1", hidden_dim=4096)
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert shapes == {
    "layers.0.alpha_param": (),
    "layers.0.down_proj.weight": (256, 4096),
    "layers.0.up_proj.weight": (4096, 256),
    "layers.0.layer_norm.weight": (4096,),
    "layers.0.layer_norm.bias": (4096,),
    "final_norm.weight": (4096,),
    "final_norm.bias": (4096,),
  }


def test_initialisation_matches_reference():
  dim = 256
  torch.manual_seed(0)
  l1 = ta.build_torch_adapter("l1", hidden_dim=dim, bottleneck_dim=128)
  blk = l1.layers[0]
  assert torch.all(blk.up_proj.weight == 0)
  assert blk.alpha_param.item() == pytest.approx(0.1)
  assert blk.alpha_param.shape == ()
  # kaiming_normal_(fan_in, 'linear'): std 1/sqrt(fan_in).
  assert blk.down_proj.weight.std().item() == pytest.approx(dim**-0.5, rel=0.05)
  l3 = ta.build_torch_adapter("l3", hidden_dim=dim, bottleneck_dim=128)
  std = l3.blocks[0][0].weight.std().item()
  assert std == pytest.approx(math.sqrt(2 / dim), rel=0.05)  # leaky_relu gain
  assert torch.all(l3.blocks[1][4].weight == 0)
  assert [a.item() for a in l3.alphas] == pytest.approx([0.1, 0.1])
  l4 = ta.build_torch_adapter("l4", hidden_dim=dim, num_heads=4, ffn_dim=64)
  assert torch.equal(l4.output_proj[1].weight, torch.eye(dim))
  assert torch.all(l4.output_proj[1].bias == 0)
  attn = l4.layers[0].attn
  assert torch.all(attn.in_proj_bias == 0) and torch.all(
    attn.out_proj.bias == 0
  )
  bound = math.sqrt(6 / (dim + 3 * dim))  # xavier_uniform on [3D, D]
  assert attn.in_proj_weight.abs().max().item() <= bound
  assert attn.in_proj_weight.std().item() == pytest.approx(
    bound / math.sqrt(3), rel=0.05
  )
  ffn = l4.layers[0].ffn[0].weight
  assert ffn.abs().max().item() <= dim**-0.5  # nn.Linear default bound
  l5 = ta.build_torch_adapter("l5", hidden_dim=dim, num_heads=4, ffn_dim=64)
  assert l5.pos_embed.shape == (1, 512, dim)
  assert l5.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
  assert torch.equal(l5.output_proj.weight, torch.eye(dim))
  l5f = ta.build_torch_adapter("l5f", hidden_dim=dim, num_heads=4, ffn_dim=64)
  bound = math.sqrt(6 / (3 * dim))  # xavier_uniform on [D, 2D]
  assert l5f.fusion_proj.weight.abs().max().item() <= bound
  assert l5f.fusion_proj.weight.abs().max().item() > 0.9 * bound
  assert torch.all(l5f.fusion_proj.bias == 0)
  assert l5f.gate[0].weight.abs().max().item() <= (2 * dim) ** -0.5
  assert l5f.alpha.item() == pytest.approx(0.1)


def test_unknown_field_and_name():
  with pytest.raises(ValueError, match="num_heads"):
    ta.build_torch_adapter("l1", num_heads=4)
  with pytest.raises(ValueError, match="l9"):
    ta.build_torch_adapter("l9")
  # Flax-only fields and None values are accepted.
  model = ta.build_torch_adapter(
    "l2", hidden_dim=D, dtype="bfloat16", num_heads=None
  )
  assert model.final_norm.weight.shape == (D,)


# ----------------------------------------------------------------------------
# Forward: reference formulas with the mask used right.


@pytest.mark.parametrize("name", list(models.ADAPTERS))
def test_forward_matches_numpy_reference(name):
  model = random_twin(name)
  xs, mask = batch(name)
  got = run(model, xs, mask)
  want = np_forward(name, model, xs, mask)
  assert np.all(np.isfinite(got))  # Even the all-padding row.
  valid = mask if name in ("l4", "l5", "b1", "l5f") else np.ones_like(mask)
  assert rel_err(got[valid], want[valid]) <= 1e-5


@pytest.mark.parametrize("name", ["l4", "l5", "l5f"])
def test_padding_never_changes_valid_outputs(name):
  model = random_twin(name)
  xs, mask = batch(name)
  noisy = [np.where(mask[..., None], x, 100.0 * x + 3.0) for x in xs]
  a, b = run(model, xs, mask), run(model, noisy, mask)
  np.testing.assert_array_equal(a[mask], b[mask])
  if name == "l4":  # Unmasked, padding leaks into L4 (D11): can fail.
    c, d = run(model, xs), run(model, noisy)
    assert not np.allclose(c[mask], d[mask])


def test_padding_mask_with_autograd_path():
  model = random_twin("l5")
  xs, mask = batch("l5")
  np.testing.assert_allclose(
    run(model, xs, mask, grad=True)[mask],
    run(model, xs, mask)[mask],
    rtol=1e-5,
    atol=1e-6,
  )


def test_l5_is_causal_and_l4_is_not():
  xs, _ = batch("l5", lengths=(7, 7))
  later = [x.copy() for x in xs]
  later[0][:, 4:] += 1.0
  l5, l4 = random_twin("l5"), random_twin("l4")
  a, b = run(l5, xs), run(l5, later)
  np.testing.assert_array_equal(a[:, :4], b[:, :4])
  assert not np.allclose(a[:, 4:], b[:, 4:])
  assert not np.allclose(run(l4, xs)[:, :4], run(l4, later)[:, :4])


def test_sequence_longer_than_table_raises():
  model = random_twin("l5")
  x = torch.zeros(1, 17, D)
  with pytest.raises(ValueError, match="max_seq_len=16"):
    model(x)


# ----------------------------------------------------------------------------
# KV-cached decoding.


def _decode(model, xs, steps, cache, mask=None):
  """Decodes xs in chunks of the given sizes; returns concatenated outputs."""
  outs, pos = [], 0
  for n in steps:
    chunk = [torch.from_numpy(x[:, pos : pos + n]) for x in xs]
    m = None if mask is None else torch.from_numpy(mask[:, pos : pos + n])
    with torch.no_grad():
      y, cache = model.decode_step(*chunk, cache, position=pos, mask=m)
    outs.append(y.numpy())
    pos += n
  return np.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("name", ["l5", "l5f"])
def test_cached_decode_equals_full_forward(name):
  model = random_twin(name)
  xs, _ = batch(name, lengths=(9, 9), seq=9)
  full = run(model, xs)
  cache = model.init_cache(2, 12)
  one_by_one, cache = _decode(model, xs, [1] * 9, cache)
  assert cache["length"] == 9
  assert rel_err(one_by_one, full) <= 1e-5
  chunked, _ = _decode(model, xs, [4, 1, 1, 3], model.init_cache(2, 9))
  assert rel_err(chunked, full) <= 1e-5


@pytest.mark.parametrize("name", ["l5", "l5f"])
def test_cached_decode_rollback(name):
  model = random_twin(name)
  xs, _ = batch(name, lengths=(9, 9), seq=9)
  full = run(model, xs)
  cache = model.init_cache(2, 9)
  _, cache = _decode(model, [x[:, :5] for x in xs], [5], cache)
  junk = [np.random.default_rng(3).normal(size=x[:, :3].shape) for x in xs]
  junk = [j.astype(np.float32) for j in junk]
  with torch.no_grad():
    model.decode_step(*[torch.from_numpy(j) for j in junk], cache)
  assert cache["length"] == 8
  model.truncate(cache, 5)
  assert cache["length"] == 5 and not cache["valid"][:, 5:].any()
  outs = []
  for t in range(5, 9):
    with torch.no_grad():
      y, cache = model.decode_step(
        *[torch.from_numpy(x[:, t : t + 1]) for x in xs], cache
      )
    outs.append(y.numpy())
  assert rel_err(np.concatenate(outs, 1), full[:, 5:]) <= 1e-5


def test_cached_decode_with_padding_mask():
  model = random_twin("l5")
  xs, mask = batch("l5", lengths=(8, 5, 0), seq=8)
  full = run(model, xs, mask)
  got, _ = _decode(model, xs, [3, 1, 1, 1, 1, 1], model.init_cache(3, 8), mask)
  assert np.all(np.isfinite(got))
  assert rel_err(got[mask], full[mask]) <= 1e-5


def test_decode_errors():
  model = random_twin("l5")
  cache = model.init_cache(1, 4)
  x = torch.zeros(1, 1, D)
  with pytest.raises(ValueError, match="position 2"):
    model.decode_step(x, cache, position=2)  # Gap: nothing at 0, 1.
  with pytest.raises(ValueError, match="overflows"):
    model.decode_step(torch.zeros(1, 5, D), cache)
  with pytest.raises(ValueError, match="max_seq_len"):
    model.init_cache(1, 17)
  with pytest.raises(ValueError, match="truncate length"):
    model.truncate(cache, 1)
  model.train()
  with pytest.raises(RuntimeError, match="eval"):
    model.decode_step(x, cache)


# ----------------------------------------------------------------------------
# Mapping.


@pytest.mark.parametrize("name", list(models.ADAPTERS))
def test_mapping_round_trip_is_exact(name):
  sd = random_twin(name).state_dict()
  params = bridge.state_dict_to_flax(name, sd)
  leaves = bridge.flatten_params(params)
  assert all(v.dtype == np.float32 for v in leaves.values())
  back = bridge.flax_to_state_dict(name, {"params": params})
  assert list(back) == list(sd)
  for k in sd:
    assert back[k].shape == sd[k].shape, k
    assert torch.equal(back[k], sd[k]), k


def test_flax_tree_follows_design():
  sd = random_twin("l4").state_dict()
  p = bridge.state_dict_to_flax("l4", sd)
  attn = p["layers_0"]["attn"]
  w = sd["layers.0.attn.in_proj_weight"].numpy()
  assert attn["in_proj"]["kernel"].shape == (D, 3 * D)
  # Columns are q | k | v: q = x @ kernel[:, :D] = x @ W_q.T.
  np.testing.assert_array_equal(attn["in_proj"]["kernel"][:, :D], w[:D].T)
  np.testing.assert_array_equal(
    attn["in_proj"]["kernel"][:, 2 * D :], w[2 * D :].T
  )
  assert p["layers_0"]["ffn_up"]["kernel"].shape == (D, 48)
  assert p["layers_0"]["ffn_down"]["kernel"].shape == (48, D)
  assert p["alpha"].shape == ()
  assert set(p) == {
    "alpha",
    "layers_0",
    "layers_1",
    "output_norm",
    "output_proj",
  }
  l3 = bridge.state_dict_to_flax("l3", random_twin("l3").state_dict())
  assert set(l3) == {
    "input_norm",
    "blocks_0",
    "blocks_1",
    "alphas_0",
    "alphas_1",
    "final_norm",
  }
  assert set(l3["blocks_0"]) == {"down", "norm", "up"}
  assert l3["blocks_0"]["down"]["kernel"].shape == (D, 16)
  assert set(l3["final_norm"]) == {"scale", "bias"}
  l5f = bridge.state_dict_to_flax("l5f", random_twin("l5f").state_dict())
  assert set(l5f) == {
    "gate",
    "fusion_proj",
    "fusion_norm",
    "pos_embed",
    "layers_0",
    "output_norm",
    "output_proj",
    "alpha",
  }
  assert l5f["gate"]["kernel"].shape == (2 * D, D)
  assert l5f["pos_embed"].shape == (1, 16, D)
  l1 = bridge.state_dict_to_flax("l1", random_twin("l1").state_dict())
  assert set(l1["layers_1"]) == {
    "layer_norm",
    "down_proj",
    "up_proj",
    "alpha_param",
  }


def test_mapping_errors_name_the_keys():
  sd = dict(random_twin("l4").state_dict())
  params = bridge.state_dict_to_flax("l4", sd)
  del params["layers_1"]["ffn_up"]["bias"]
  with pytest.raises(ValueError, match="layers_1/ffn_up/bias"):
    bridge.flax_to_state_dict("l4", params)
  params = bridge.state_dict_to_flax("l4", sd)
  params["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
  with pytest.raises(ValueError, match="extra/kernel"):
    bridge.flax_to_state_dict("l4", params)
  bad = dict(sd)
  bad["layers.0.attn.bias_k"] = torch.zeros(1)
  with pytest.raises(ValueError, match="bias_k"):
    bridge.state_dict_to_flax("l4", bad)
  gap = {k: v for k, v in sd.items() if not k.startswith("layers.0.")}
  with pytest.raises(ValueError, match="not 0..0"):
    bridge.state_dict_to_flax("l4", gap)
  with pytest.raises(ValueError, match="hidden_dim=40"):
    bridge.resolve_config("l4", sd, {"hidden_dim": 40})
  with pytest.raises(ValueError, match=r"layers.0.ffn.0.weight: \(48, 32\)"):
    bridge.check_state_dict(
      "l4", sd, hidden_dim=D, num_heads=4, ffn_dim=64, num_layers=2
    )


def test_resolve_config_infers_and_checks():
  sd = random_twin("l5").state_dict()
  cfg = bridge.resolve_config("l5", sd, {"num_heads": 4, "dropout": 0.0})
  assert cfg == dict(SMALL["l5"], dropout=0.0)
  with pytest.raises(ValueError, match="ffn_dim=64"):
    bridge.resolve_config("l5", sd, {"num_heads": 4, "ffn_dim": 64})
  with pytest.raises(ValueError, match="does not divide"):
    bridge.resolve_config("l5", sd, {"num_heads": 5})


def test_params_npz_round_trip(tmp_path):
  params = bridge.state_dict_to_flax("l5f", random_twin("l5f").state_dict())
  path = tmp_path / "p.npz"
  bridge.save_params_npz(path, {"params": params})
  back = bridge.load_params_npz(path)
  a, b = bridge.flatten_params(params), bridge.flatten_params(back)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
    assert a[k].shape == b[k].shape


@pytest.mark.parametrize("name", ["l4", "l5f"])
def test_bfloat16_twin_runs_and_stays_close(name):
  model = random_twin(name)
  xs, mask = batch(name, lengths=(7, 3))
  want = run(model, xs, mask)
  model = model.to(torch.bfloat16)
  inputs = [torch.from_numpy(x).bfloat16() for x in xs]
  with torch.no_grad():
    got = model(*inputs, mask=torch.from_numpy(mask))
    assert got.dtype == torch.bfloat16
    got = got.float().numpy()
    assert rel_err(got[mask], want[mask]) < 3e-2
    if name == "l5f":
      cache = model.init_cache(2, 7)
      steps = []
      for t in range(7):
        y, cache = model.decode_step(
          *[x[:, t : t + 1] for x in inputs], cache,
          mask=torch.from_numpy(mask[:, t : t + 1]),
        )  # fmt: skip
        steps.append(y.float().numpy())
      got = np.concatenate(steps, 1)
      assert np.all(np.isfinite(got))
      assert rel_err(got[mask], want[mask]) < 3e-2
