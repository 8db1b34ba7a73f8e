"""Tests of tools/export_to_torch.py and tools/import_from_torch.py.

Flax <-> torch parity, exact export -> import round trips, reference-format
checkpoints (L1's pickled config included) and clear errors.
"""

import dataclasses
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from egpt_align import models  # noqa: E402
from tools import export_to_torch, import_from_torch  # noqa: E402
from tools.lib import bridge  # noqa: E402
from tools.lib import twins as ta  # noqa: E402

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
# What the reference's save_checkpoint writes as `config`
# (REFERENCE_NOTES §5.4).
REF_CONFIG_KEYS = {
  "l2": ("hidden_dim", "bottleneck_dim", "num_blocks"),
  "l3": ("hidden_dim", "bottleneck_dim", "num_blocks"),
  "l4": ("hidden_dim", "num_heads", "ffn_dim", "num_layers"),
  "l5": ("hidden_dim", "num_heads", "ffn_dim", "num_layers"),
  "l5f": ("hidden_dim", "num_heads", "ffn_dim", "num_layers"),
}
CAUSAL_OR_ATTN = ("l4", "l5", "b1", "l5f")


def batch(name, seed=0):
  rng = np.random.default_rng(seed)
  n = 2 if name == "l5f" else 1
  xs = [rng.normal(size=(3, 7, D)).astype(np.float32) for _ in range(n)]
  mask = np.arange(7)[None, :] < np.array([7, 4, 1])[:, None]
  return xs, mask


def flax_params(name, seed=0):
  """Flax init, then every leaf perturbed (alphas, zero up-projections...)."""
  models = pytest.importorskip("egpt_align.models")
  jax = pytest.importorskip("jax")
  module = models.create_adapter(name, **SMALL[name])
  xs, mask = batch(name)
  params = module.init(jax.random.key(seed), *xs, mask=mask)["params"]
  rng = np.random.default_rng(seed + 10)
  params = jax.tree.map(
    lambda p: (
      np.asarray(p, np.float32)
      + 0.2 * rng.normal(size=np.shape(p)).astype(np.float32)
    ),
    params,
  )
  return module, params


def flax_forward(module, params, xs, mask):
  return np.asarray(module.apply({"params": params}, *xs, mask=mask))


def torch_forward(model, xs, mask):
  with torch.no_grad():
    y = model(*[torch.from_numpy(x) for x in xs], mask=torch.from_numpy(mask))
  return y.numpy()


def rel_err(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_same_params(a, b):
  fa, fb = bridge.flatten_params(a), bridge.flatten_params(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype == np.float32, k
    assert x.shape == y.shape, k
    np.testing.assert_array_equal(x, y, err_msg=k)


def twin_from_reference_dict(ckpt):
  """Our twin from an exported dict (L1's plain-dict config as fields).

  The reference's own loader differs for L1; see reference_load_any_adapter.
  """
  name = ckpt["egpt_align_adapter"]
  if name == "l1":
    model = ta.HiddenStateAdapter(ta.HiddenAdapterConfig(**ckpt["config"]))
  else:
    model = ta.TWIN_CLASSES[name](**ckpt["config"])
  model.load_state_dict(ckpt["model_state_dict"], strict=True)
  return model.eval()


# ----------------------------------------------------------------------------
# Flax -> torch.


@pytest.mark.parametrize("name", list(models.ADAPTERS))
def test_flax_and_torch_twin_agree(name, tmp_path):
  module, params = flax_params(name)
  xs, mask = batch(name)
  want = flax_forward(module, params, xs, mask)
  (path,) = bridge.export(
    params, name, SMALL[name], tmp_path / "a.pt", fmt="pt"
  )
  ckpt = torch.load(path, map_location="cpu", weights_only=True)
  assert ckpt["adapter_type"] == models.get_spec(name).ref_type
  assert ckpt["vlm_only"] == (name == "b1")
  got = torch_forward(twin_from_reference_dict(ckpt), xs, mask)
  valid = mask if name in CAUSAL_OR_ATTN else np.ones_like(mask)
  assert rel_err(got[valid], want[valid]) <= 1e-5


@pytest.mark.parametrize("name", ["l5", "l5f"])
def test_twin_cached_decode_matches_flax(name):
  module, params = flax_params(name)
  xs, _ = batch(name)
  xs = [x[:1] for x in xs]
  want = flax_forward(module, params, xs, np.ones((1, 7), bool))
  twin = bridge.load_torch_adapter(
    name, bridge.flax_to_state_dict(name, params), **SMALL[name]
  ).eval()
  cache = twin.init_cache(1, 7)
  outs = []
  for t in range(7):
    with torch.no_grad():
      y, cache = twin.decode_step(
        *[torch.from_numpy(x[:, t : t + 1]) for x in xs], cache
      )
    outs.append(y.numpy())
  assert rel_err(np.concatenate(outs, 1), want) <= 1e-5


# ----------------------------------------------------------------------------
# Export -> import round trips.


@pytest.mark.parametrize("name", list(models.ADAPTERS))
def test_export_import_round_trip_is_exact(name, tmp_path, capsys):
  _, params = flax_params(name)
  bridge.save_params_npz(tmp_path / "p.npz", params)
  cfg = dict(SMALL[name], dropout=0.0, dtype="bfloat16", num_blocks=None)
  if name in ("l1", "l4", "l5", "b1", "l5f"):
    cfg.pop("num_blocks")
  export_to_torch.main(
    [
      "--params", str(tmp_path / "p.npz"),
      "--adapter", name,
      "--config", json.dumps({"model": cfg}),
      "--out", str(tmp_path / "exp" / "m.pt"),
      "--epoch", "3",
      "--metrics", '{"loss": 0.5}',
    ]
  )  # fmt: skip
  files = sorted(os.listdir(tmp_path / "exp"))
  assert files == ["m.config.json", "m.pt", "m.safetensors"]
  ckpt = torch.load(tmp_path / "exp" / "m.pt", weights_only=True)
  assert ckpt["epoch"] == 3 and ckpt["metrics"] == {"loss": 0.5}
  assert ckpt["egpt_align_config"]["dtype"] == "bfloat16"
  for src in ("m.pt", "m.safetensors"):
    out = tmp_path / f"imp_{src}"
    import_from_torch.main([str(tmp_path / "exp" / src), "--out", str(out)])
    assert_same_params(bridge.load_params_npz(f"{out}.npz"), params)
    with open(f"{out}.config.json") as f:
      model = json.load(f)["model"]
    want = {"name": name, **SMALL[name], "dropout": 0.0}
    assert {k: model[k] for k in want} == want
  # The imported pair exports again without flags (sibling config).
  export_to_torch.main(
    ["--params", f"{out}.npz", "--out", str(tmp_path / "again.pt")]
  )
  again = torch.load(tmp_path / "again.pt", weights_only=True)
  assert again["egpt_align_adapter"] == name
  for k, v in ckpt["model_state_dict"].items():
    assert torch.equal(again["model_state_dict"][k], v), k


def test_export_formats_and_errors(tmp_path):
  _, params = flax_params("l2")
  paths = bridge.export(
    params, "l2", SMALL["l2"], tmp_path / "x", fmt="safetensors"
  )
  assert [p.name for p in paths] == ["x.safetensors", "x.config.json"]
  with pytest.raises(ValueError, match="hidden_dim=40"):
    bridge.export(params, "l2", {"hidden_dim": 40}, tmp_path / "y")
  with pytest.raises(ValueError, match="num_heads"):
    bridge.export(params, "l2", {"num_heads": 4}, tmp_path / "y")
  with pytest.raises(ValueError, match="blocks_0"):
    bridge.export(params, "l1", {}, tmp_path / "y")
  bridge.save_params_npz(tmp_path / "p.npz", params)
  with pytest.raises(SystemExit, match="hidden_dim=40"):
    export_to_torch.main(
      ["--params", str(tmp_path / "p.npz"), "--adapter", "l2",
       "--config", '{"hidden_dim": 40}', "--out", str(tmp_path / "z.pt")]
    )  # fmt: skip
  with pytest.raises(SystemExit, match="--adapter"):
    export_to_torch.main(
      ["--params", str(tmp_path / "p.npz"), "--out", str(tmp_path / "z.pt")]
    )


def test_export_from_workdir(tmp_path):
  checkpoint = pytest.importorskip("egpt_align.checkpoint")
  base = pytest.importorskip("egpt_align.configs.base")
  _, params = flax_params("l4")
  config = base.get_config()
  config.model.name = "l4"
  config.model.num_heads = 4
  config.model.ffn_dim = 48
  config.model.num_layers = 2
  ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), async_save=False)
  state = {"step": np.int32(7), "params": params}
  val = {"loss": 1.0, "cos_sim": 0.5, "accept_90": 0.25}
  meta = {
    "config": json.loads(config.to_json_best_effort()),
    "epoch": 2,
    "epoch_step": 0,
    "last_metrics": val,
  }
  ckpt.save(7, state, meta, val_loss=1.0)
  ckpt.close()
  with open(tmp_path / "run" / "config.json", "w") as f:
    f.write(config.to_json_best_effort())
  export_to_torch.main(
    ["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "w.pt")]
  )  # fmt: skip
  got = torch.load(tmp_path / "w.pt", weights_only=True)
  assert got["egpt_align_adapter"] == "l4"
  assert got["egpt_align_step"] == 7
  assert got["epoch"] == 2 and got["metrics"] == val
  assert got["config"]["num_heads"] == 4
  want = bridge.flax_to_state_dict("l4", params)
  for k, v in want.items():
    assert torch.equal(got["model_state_dict"][k], v), k


def test_params_npz_compatible_with_egpt_align_checkpoint(tmp_path):
  checkpoint = pytest.importorskip("egpt_align.checkpoint")
  _, params = flax_params("l3")
  checkpoint.save_params_npz(str(tmp_path / "a.npz"), params)
  assert_same_params(bridge.load_params_npz(tmp_path / "a.npz"), params)
  bridge.save_params_npz(tmp_path / "b.npz", params)
  assert_same_params(
    checkpoint.load_params_npz(str(tmp_path / "b.npz")), params
  )


# ----------------------------------------------------------------------------
# Reference checkpoints -> our params.


def reference_checkpoint(name, path, seed=0):
  """A file as the reference's save_checkpoint writes it (with optimizer)."""
  torch.manual_seed(seed)
  cls = ta.TWIN_CLASSES[name]
  cfg = ta.reference_config(name, **SMALL[name])
  model = cls(**{k: cfg[k] for k in REF_CONFIG_KEYS[name]})
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=gen))
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
  xs, mask = batch(name)
  model(*[torch.from_numpy(x) for x in xs]).sum().backward()
  opt.step()
  config = {k: cfg[k] for k in REF_CONFIG_KEYS[name]}
  if name == "l5":
    config["use_token_embed"] = False
  ckpt = {
    "model_state_dict": model.state_dict(),
    "adapter_type": models.get_spec(name).ref_type,
    "config": config,
    "epoch": 12,
    "optimizer_state_dict": opt.state_dict(),
    "metrics": {"loss": 1.25, "cos_sim": 0.5, "accept_90": 0.3},
  }
  torch.save(ckpt, path)
  return model.eval()


@pytest.mark.parametrize("name", ["l2", "l3", "l4", "l5", "l5f"])
def test_reference_checkpoint_imports_and_runs_the_same(name, tmp_path):
  models = pytest.importorskip("egpt_align.models")
  model = reference_checkpoint(name, tmp_path / "best_model.pt")
  argv = [str(tmp_path / "best_model.pt"), "--out", str(tmp_path / "imp")]
  if name == "l5":
    with pytest.warns(UserWarning, match="--adapter b1"):
      import_from_torch.main(argv)
  else:
    import_from_torch.main(argv)
  params = bridge.load_params_npz(tmp_path / "imp.npz")
  assert_same_params(
    params, bridge.state_dict_to_flax(name, model.state_dict())
  )
  with open(tmp_path / "imp.config.json") as f:
    info = json.load(f)
  assert info["source"]["epoch"] == 12
  overrides = {k: v for k, v in info["model"].items() if k != "name"}
  assert info["model"]["name"] == name
  module = models.create_adapter(name, **overrides)
  xs, mask = batch(name)
  want = torch_forward(model, xs, mask)
  got = flax_forward(module, params, xs, mask)
  valid = mask if name in CAUSAL_OR_ATTN else np.ones_like(mask)
  assert rel_err(got[valid], want[valid]) <= 1e-5


def test_bare_safetensors_needs_adapter(tmp_path):
  from safetensors.torch import save_file

  model = ta.build_torch_adapter("l3", **SMALL["l3"])
  save_file(dict(model.state_dict()), str(tmp_path / "bare.safetensors"))
  argv = [str(tmp_path / "bare.safetensors"), "--out", str(tmp_path / "o")]
  with pytest.raises(SystemExit, match="pass --adapter"):
    import_from_torch.main(argv)
  import_from_torch.main(argv + ["--adapter", "l3"])
  assert_same_params(
    bridge.load_params_npz(tmp_path / "o.npz"),
    bridge.state_dict_to_flax("l3", model.state_dict()),
  )


def test_l5_eagle_as_b1_and_wrong_adapter(tmp_path):
  reference_checkpoint("l5", tmp_path / "b1.pt")
  path = str(tmp_path / "b1.pt")
  import_from_torch.main(
    [path, "--adapter", "b1", "--out", str(tmp_path / "o")]
  )
  with open(tmp_path / "o.config.json") as f:
    assert json.load(f)["model"]["name"] == "b1"
  with pytest.raises(SystemExit, match="does not fit"):
    import_from_torch.main(
      [path, "--adapter", "l4", "--out", str(tmp_path / "p")]
    )


def test_unknown_adapter_type_and_bad_files(tmp_path):
  model = ta.build_torch_adapter("l2", **SMALL["l2"])
  torch.save(
    {"model_state_dict": model.state_dict(), "adapter_type": "L9_Magic"},
    tmp_path / "u.pt",
  )
  with pytest.raises(SystemExit, match="L9_Magic"):
    import_from_torch.main(
      [str(tmp_path / "u.pt"), "--out", str(tmp_path / "u")]
    )
  torch.save(model.state_dict(), tmp_path / "bare.pt")
  with pytest.raises(SystemExit, match="model_state_dict"):
    import_from_torch.main(
      [str(tmp_path / "bare.pt"), "--out", str(tmp_path / "b")]
    )
  # No adapter_type means L1 in the reference; an L2 state dict then fails
  # with the missing/unexpected keys named, not silently.
  torch.save({"model_state_dict": model.state_dict()}, tmp_path / "n.pt")
  with pytest.raises(SystemExit, match="layers.0.down_proj.weight"):
    import_from_torch.main(
      [str(tmp_path / "n.pt"), "--out", str(tmp_path / "n")]
    )
  with pytest.raises(SystemExit, match="no such file"):
    import_from_torch.main([str(tmp_path / "none.pt"), "--out", str(tmp_path)])


@pytest.fixture
def reference_package(monkeypatch):
  """A stand-in for the reference's module holding HiddenAdapterConfig."""
  name = "feasible.feature_alignment.hidden_adapter"
  mod = types.ModuleType(name)

  @dataclasses.dataclass
  class HiddenAdapterConfig:
    hidden_dim: int = 4096
    bottleneck_dim: int = 256
    num_layers: int = 1
    dropout: float = 0.1
    alpha: float = 0.1
    use_layer_norm: bool = True
    use_gelu: bool = True

  HiddenAdapterConfig.__module__ = name
  HiddenAdapterConfig.__qualname__ = "HiddenAdapterConfig"
  mod.HiddenAdapterConfig = HiddenAdapterConfig
  for parent in ("feasible", "feasible.feature_alignment"):
    monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
  monkeypatch.setitem(sys.modules, name, mod)
  yield HiddenAdapterConfig
  for m in ("feasible", "feasible.feature_alignment", name):
    monkeypatch.delitem(sys.modules, m, raising=False)


def reference_load_any_adapter(path):
  """The reference's load_any_adapter, as REFERENCE_NOTES §5.4 describes.

  torch.load with torch's default arguments before 2.6 (weights_only=False;
  torch >= 2.6 refuses every pickled L1 config, the reference's own too),
  dispatch on `adapter_type`, anything unknown is L1, whose load_checkpoint
  builds HiddenStateAdapter(checkpoint['config']) and reads the config's
  fields as attributes. The other levels get their config as keywords.
  """
  checkpoint = torch.load(path, map_location="cpu", weights_only=False)
  classes = {
    "L2_MultiLayerBottleneck": ta.TWIN_CLASSES["l2"],
    "L3_WideBottleneck": ta.TWIN_CLASSES["l3"],
    "L4_Attention": ta.TWIN_CLASSES["l4"],
    "L5_EAGLE": ta.TWIN_CLASSES["l5"],
    "L5F_FusedEAGLE": ta.TWIN_CLASSES["l5f"],
  }
  cls = classes.get(checkpoint.get("adapter_type"))
  if cls is None:  # HiddenStateAdapter.load_checkpoint
    model = ta.HiddenStateAdapter(checkpoint["config"])
  else:
    model = cls(**checkpoint["config"])
  model.load_state_dict(checkpoint["model_state_dict"])
  return model.eval()


def test_l1_export_loads_with_the_reference_loader(reference_package, tmp_path):
  module, params = flax_params("l1")
  xs, mask = batch("l1")
  want = flax_forward(module, params, xs, mask)
  # The default export's plain-dict config: the reference's loader fails.
  (plain,) = bridge.export(
    params, "l1", SMALL["l1"], tmp_path / "plain.pt", fmt="pt"
  )
  with pytest.raises(AttributeError, match="'dict' object has no attribute"):
    reference_load_any_adapter(plain)
  # --reference_l1_config: the reference's class, its loader accepts it.
  (path,) = bridge.export(
    params,
    "l1",
    SMALL["l1"],
    tmp_path / "ref.pt",
    fmt="pt",
    reference_l1_config=True,
  )
  model = reference_load_any_adapter(path)
  assert type(model.config) is reference_package  # the reference's class
  got = torch_forward(model, xs, mask)
  assert rel_err(got, want) <= 1e-5
  # Like the reference's own L1 files, a safe load refuses the class.
  with pytest.raises(Exception, match="weights_only"):
    torch.load(path, map_location="cpu", weights_only=True)
  with pytest.raises(ValueError, match="l1 exports only"):
    bridge.export(
      flax_params("l2")[1], "l2", SMALL["l2"], tmp_path / "x.pt",
      reference_l1_config=True,
    )  # fmt: skip


def test_l1_reference_config_export_without_the_reference_package(tmp_path):
  """No reference package installed: the stand-in modules vanish again."""
  _, params = flax_params("l1")
  bridge.export(
    params, "l1", SMALL["l1"], tmp_path / "r.pt", fmt="pt",
    reference_l1_config=True,
  )  # fmt: skip
  assert bridge.REFERENCE_L1_MODULE not in sys.modules
  assert "feasible" not in sys.modules


@pytest.mark.parametrize("numpy_metric", [False, True])
def test_reference_l1_with_pickled_config(
  reference_package, tmp_path, numpy_metric, monkeypatch
):
  config = reference_package(hidden_dim=D, bottleneck_dim=8, num_layers=2)
  model = ta.build_torch_adapter("l1", **SMALL["l1"])
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape))
  ckpt = {"model_state_dict": model.state_dict(), "config": config, "epoch": 4}
  if numpy_metric:  # Another global a safe load refuses.
    ckpt["metrics"] = {"loss": np.float64(0.25)}
  torch.save(ckpt, tmp_path / "l1.pt")
  # The reference package is not importable when we read the file.
  for m in ("feasible", "feasible.feature_alignment"):
    monkeypatch.delitem(sys.modules, m)
  monkeypatch.delitem(sys.modules, "feasible.feature_alignment.hidden_adapter")
  path, out = str(tmp_path / "l1.pt"), str(tmp_path / "o")
  with pytest.raises(SystemExit, match="--trust_pickle"):
    import_from_torch.main([path, "--out", out])
  assert not os.path.exists(out + ".npz")
  if numpy_metric:
    with pytest.warns(UserWarning, match="arbitrary globals"):
      import_from_torch.main([path, "--out", out, "--trust_pickle"])
  else:
    import_from_torch.main([path, "--out", out, "--trust_pickle"])
  assert_same_params(
    bridge.load_params_npz(out + ".npz"),
    bridge.state_dict_to_flax("l1", model.state_dict()),
  )
  with open(out + ".config.json") as f:
    assert json.load(f)["model"] == {
      "name": "l1",
      "hidden_dim": D,
      "bottleneck_dim": 8,
      "num_layers": 2,
      "dropout": 0.1,
      "alpha_init": 0.1,
    }


def test_scripts_have_help():
  for script in ("export_to_torch.py", "import_from_torch.py"):
    res = subprocess.run(
      [sys.executable, "-m", f"tools.{script[:-3]}", "--help"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout and "--out" in res.stdout
