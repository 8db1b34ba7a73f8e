"""Tests for egpt_align.evaluate and egpt_align.report.

The constructed datasets have answers known in closed form: (1) the target
is the adapter's own output, so every metric is at its maximum; (2) the
adapter is an exact numpy function (L1 with its residual scale at 0 is a
LayerNorm), the target is a noisy version, and every metric is recomputed
here in plain numpy loops.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from egpt_align import (
  eval_device,
  eval_stats,
  evaluate,
  lm_head,
  report,
  speedup,
)

models = pytest.importorskip("egpt_align.models")
data_lib = pytest.importorskip("egpt_align.data")

D, V = 32, 48
L1_OV = {"hidden_dim": D, "bottleneck_dim": 8, "dtype": "float32"}
L5_OV = {
  "hidden_dim": D,
  "num_heads": 4,
  "ffn_dim": 64,
  "max_seq_len": 32,
  "dtype": "float32",
}
THR = (0.80, 0.85, 0.90, 0.95)
COND = (0.80, 0.85, 0.90, 0.92, 0.95, 0.98)
GAMMA = 3


def _write(path, sources, targets, groups=None, **tokens):
  with data_lib.DatasetWriter(
    str(path), source_dim=D, target_dim=D, dtype="float32", resume=False
  ) as w:
    for i, (s, t) in enumerate(zip(sources, targets, strict=True)):
      kw = {k: v[i] for k, v in tokens.items()}
      meta = {"id": f"s{i}"}
      if groups is not None and groups[i] is not None:
        meta["group"] = groups[i]
      w.append(s, t, meta=meta, **kw)
  return str(path)


def _lengths(rng, n):
  return rng.integers(2, 15, n)


def _ln(x, scale=1.0, bias=0.0):
  x = x.astype(np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * scale + bias


def _init(name, ov, seed):
  module = models.create_adapter(name, **ov)
  x = np.zeros((1, 4, D), np.float32)
  inputs = (x,) * len(models.get_spec(name).inputs)
  return module, jax.jit(module.init)(jax.random.key(seed), *inputs)["params"]


def _perturb(params, seed):
  """Random values everywhere, so the adapter is not near-identity."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  new = [
    np.asarray(x) + 0.3 * rng.normal(size=np.shape(x)).astype(np.float32)
    for x in leaves
  ]
  return jax.tree.unflatten(tree, new)


def _apply_padded(module, params, sources):
  """The adapter on all samples in one zero-padded, masked call."""
  s = max(len(x) for x in sources)
  x = np.zeros((len(sources), s, D), np.float32)
  for i, src in enumerate(sources):
    x[i, : len(src)] = src
  mask = np.arange(s)[None] < np.array([len(v) for v in sources])[:, None]
  return np.asarray(module.apply({"params": params}, x, mask=mask))


def _head(tmp_path, seed=0):
  w = np.random.default_rng(seed).normal(size=(V, D)).astype(np.float32)
  lm_head.save_lm_head(tmp_path / "head", w, model_id="test")
  return w, str(tmp_path / "head")


def _check_exact(metrics, lengths, reading):
  m = metrics["results"]["adapter"][reading]
  eff = lengths - (reading == "next")
  has = eff > 0
  assert m["valid_positions"] == int(eff.sum())
  assert m["cos_sim_mean"] == pytest.approx(1.0, abs=1e-5)
  assert m["cos_sim_min"] == pytest.approx(1.0, abs=1e-5)
  for t in THR:
    tag = f"{round(t * 100)}"
    assert m[f"accept_{tag}"] == 1.0
    assert m[f"consecutive_mean_{tag}"] == pytest.approx(eff[has].mean())
    assert m[f"consecutive_max_{tag}"] == eff.max()
  for k in (1, 5, 10):
    assert m[f"token_top{k}"] == 1.0
  assert m["token_consecutive_mean"] == pytest.approx(eff[has].mean())
  for t in COND:
    c = m["p_match_given_cos"][f"{round(t * 100)}"]
    assert c["p_match"] == 1.0 and c["count"] == int(eff.sum())
  assert m["cos_token_pearson_r"] is None  # Both constant: undefined.
  sp = m["speedup"]
  assert sp["alpha"] == 1.0
  assert sp["tokens_per_cycle"] == pytest.approx(GAMMA + 1)
  cycles = np.ceil(eff[has] / (GAMMA + 1)).sum()
  assert sp["simulated_tokens_per_cycle"] == pytest.approx(
    eff[has].sum() / cycles
  )
  c = metrics["settings"]["costs"]
  assert sp["speedup"] == pytest.approx(
    (GAMMA + 1) / (GAMMA * c["draft_cost"] + c["verify_cost"])
  )
  # CIs collapse on a metric that is constant over samples.
  assert m["ci"]["token_top1"] == [1.0, 1.0]


def test_exact_same_position_l1(tmp_path):
  rng = np.random.default_rng(0)
  module, params = _init("l1", L1_OV, 0)
  params = _perturb(params, 1)
  lengths = _lengths(rng, 13)  # 13 samples: the last batch has padding rows.
  sources = [rng.normal(size=(n, D)).astype(np.float32) for n in lengths]
  outs = _apply_padded(module, params, sources)
  targets = [o[:n] for o, n in zip(outs, lengths, strict=True)]
  _, head = _head(tmp_path)
  path = _write(tmp_path / "ds", sources, targets)
  result = evaluate.evaluate(
    path,
    adapter="l1",
    overrides=L1_OV,
    params=params,
    lm_head=head,
    settings=evaluate.EvalSettings(
      batch_size=8, gamma=GAMMA, bootstrap=50, progress=False, pad_multiple=64
    ),
  )
  m = result.metrics
  assert m["primary_reading"] == "same"
  assert m["data"]["total_valid_positions"] == int(lengths.sum())
  assert m["lm_head"]["token_targets"].startswith("argmax")
  _check_exact(m, lengths, "same")
  # Baselines are present and below the ceiling.
  assert set(m["results"]) == {"adapter", "untrained", "raw_source"}
  assert m["results"]["untrained"]["same"]["token_top1"] < 1.0
  # Every position of every sample appears once in the per-position table.
  per_pos = result.positions["adapter"]["same"]
  assert sum(e["num_samples"] for e in per_pos) == int(lengths.sum())
  assert len(per_pos) == lengths.max()


def test_exact_next_position_l5(tmp_path):
  rng = np.random.default_rng(1)
  module, params = _init("l5", L5_OV, 0)
  params = _perturb(params, 2)
  lengths = _lengths(rng, 10)
  sources = [rng.normal(size=(n, D)).astype(np.float32) for n in lengths]
  targets = []
  for s, out in zip(
    sources, _apply_padded(module, params, sources), strict=True
  ):
    out = out[: len(s)]
    # target[t + 1] := output[t]; target[0] is arbitrary.
    t0 = rng.normal(size=(1, D)).astype(np.float32)
    targets.append(np.concatenate([t0, out[:-1]], 0))
  w, head = _head(tmp_path)
  tokens = [np.argmax(t @ w.T, -1).astype(np.int32) for t in targets]
  path = _write(tmp_path / "ds", sources, targets, target_tokens=tokens)
  result = evaluate.evaluate(
    path,
    adapter="l5",
    overrides=L5_OV,
    params=params,
    lm_head=head,
    settings=evaluate.EvalSettings(
      batch_size=8, gamma=GAMMA, bootstrap=50, progress=False, pad_multiple=64
    ),
  )
  m = result.metrics
  assert m["primary_reading"] == "next"
  assert m["lm_head"]["token_targets"] == "stored target_tokens"
  _check_exact(m, lengths, "next")
  assert m["results"]["adapter"]["same"]["valid_positions"] == lengths.sum()
  assert m["data"]["total_valid_next_positions"] == int((lengths - 1).sum())
  assert "copy_target" in m["results"]
  assert any("Primary reading is `next`" in n for n in m["notes"])


def test_cis_resample_whole_groups_when_samples_name_them(tmp_path):
  # 6 distinct samples, each written 4 times as one group. A group bootstrap
  # draws 6 groups, so every CI equals that of the 6 distinct samples alone;
  # treating the 24 copies as independent gives other (narrower) CIs.
  rng = np.random.default_rng(4)
  module, params = _init("l5", L5_OV, 0)
  params = _perturb(params, 2)
  lengths = rng.integers(6, 15, 6)
  sources = [rng.normal(size=(n, D)).astype(np.float32) for n in lengths]
  outs = _apply_padded(module, params, sources)
  targets = [
    np.concatenate([np.zeros((1, D)), o[: len(s) - 1]], 0).astype(np.float32)
    + rng.normal(size=(len(s), D)).astype(np.float32) * 0.6
    for s, o in zip(sources, outs, strict=True)
  ]
  w, head = _head(tmp_path)
  tokens = [np.argmax(t @ w.T, -1).astype(np.int32) for t in targets]
  settings = evaluate.EvalSettings(
    batch_size=8, gamma=GAMMA, bootstrap=200, progress=False, pad_multiple=64
  )

  def run(name, copies, groups):
    rep = lambda xs: [x for x in xs for _ in range(copies)]  # noqa: E731
    path = _write(
      tmp_path / name,
      rep(sources),
      rep(targets),
      groups=groups,
      target_tokens=rep(tokens),
    )
    return evaluate.evaluate(
      path,
      adapter="l5",
      overrides=L5_OV,
      params=params,
      lm_head=head,
      settings=settings,
      seed=7,
    )

  def cis(m):
    a = m["results"]["adapter"]["next"]["ci"]
    d = m["depth_acceptance"]["teacher_forced"]["ci"]
    return a, d

  alone = run("alone", 1, None).metrics
  grouped_result = run("grouped", 4, [f"g{i // 4}" for i in range(24)])
  grouped = grouped_result.metrics
  loose = run("loose", 4, None).metrics
  assert grouped["settings"]["ci_resampling"] == "group"
  assert grouped["settings"]["num_groups"] == 6
  assert loose["settings"]["ci_resampling"] == "sample"
  assert loose["settings"]["num_groups"] is None
  a_alone, d_alone = cis(alone)
  a_grp, d_grp = cis(grouped)
  assert a_alone["token_top1"][1] > a_alone["token_top1"][0]
  for key in ("token_top1", "accept_90"):
    np.testing.assert_allclose(a_grp[key], a_alone[key])
  np.testing.assert_allclose(d_grp["tau"], d_alone["tau"])
  a_loose, _ = cis(loose)
  width = lambda ci: ci[1] - ci[0]  # noqa: E731
  assert width(a_loose["token_top1"]) < width(a_grp["token_top1"])
  text = report.render_markdown(grouped, grouped_result.positions, [])
  assert "resamples of whole groups (6 groups" in text

  # Some samples with a group and some without: one line naming the sample.
  mixed = _write(
    tmp_path / "mixed",
    sources,
    targets,
    groups=["a", "a", None, "b", "b", "b"],
    target_tokens=tokens,
  )
  msg = "meta.jsonl: sample 's2' has no 'group'"
  with pytest.raises(data_lib.DatasetFormatError, match=msg):
    evaluate.evaluate(
      mixed,
      adapter="l5",
      overrides=L5_OV,
      params=params,
      lm_head=head,
      settings=settings,
    )


def _np_metrics(pred, targets, tok_same, lengths, w):
  """Every per-reading metric recomputed with plain loops (same reading)."""
  cos_all, match_all, rank_all = [], [], []
  runs = {t: [] for t in THR}
  tok_runs = []
  for p, y, tok in zip(pred, targets, tok_same, strict=True):
    c = (p * y).sum(-1) / (
      np.linalg.norm(p, axis=-1) * np.linalg.norm(y, axis=-1)
    )
    lg = p.astype(np.float64) @ w.T.astype(np.float64)
    r = np.array([(lg[i] > lg[i, tok[i]]).sum() for i in range(len(tok))])
    cos_all.append(c)
    rank_all.append(r)
    match_all.append(r == 0)
    for t in THR:
      n = 0
      while n < len(c) and c[n] > t:
        n += 1
      runs[t].append(n)
    n = 0
    while n < len(r) and r[n] == 0:
      n += 1
    tok_runs.append(n)
  cos = np.concatenate(cos_all)
  rank = np.concatenate(rank_all)
  match = rank == 0
  out = {
    "valid_positions": len(cos),
    "cos_sim_mean": cos.mean(),
    "cos_sim_std": cos.std(),
    "cos_sim_median": np.median(cos),
    "cos_sim_min": cos.min(),
    "cos_sim_max": cos.max(),
    "token_top1": match.mean(),
    "token_top5": (rank < 5).mean(),
    "token_top10": (rank < 10).mean(),
    "token_consecutive_mean": np.mean(tok_runs),
    "token_consecutive_max": np.max(tok_runs),
    "cos_token_pearson_r": np.corrcoef(cos, match)[0, 1],
  }
  for t in THR:
    tag = f"{round(t * 100)}"
    out[f"accept_{tag}"] = (cos > t).mean()
    out[f"consecutive_mean_{tag}"] = np.mean(runs[t])
    out[f"consecutive_median_{tag}"] = np.median(runs[t])
  cond = {}
  for t in COND:
    sel = cos > t
    cond[f"{round(t * 100)}"] = (
      match[sel].mean() if sel.any() else None,
      int(sel.sum()),
    )
  per_pos = []
  for t in range(lengths.max()):
    rows = [i for i in range(len(pred)) if lengths[i] > t]
    cs = np.array([cos_all[i][t] for i in rows])
    ms = np.array([match_all[i][t] for i in rows])
    per_pos.append((len(rows), cs.mean(), (cs > 0.9).mean(), ms.mean()))
  return out, cond, per_pos


def _compare(m, per_pos_got, expected):
  out, cond, per_pos = expected
  for key, val in out.items():
    assert m[key] == pytest.approx(val, rel=1e-5, abs=1e-6), key
  for tag, (p, n) in cond.items():
    got = m["p_match_given_cos"][tag]
    assert got["count"] == n, tag
    if p is None:
      assert got["p_match"] is None
    else:
      assert got["p_match"] == pytest.approx(p), tag
  assert len(per_pos_got) == len(per_pos)
  for e, (n, cm, a90, t1) in zip(per_pos_got, per_pos, strict=True):
    assert e["num_samples"] == n
    assert e["cos_mean"] == pytest.approx(cm, rel=1e-5, abs=1e-6)
    assert e["accept_90"] == pytest.approx(a90)
    assert e["token_top1"] == pytest.approx(t1)


def test_partial_agreement_matches_numpy(tmp_path):
  rng = np.random.default_rng(2)
  _, params = _init("l1", L1_OV, 0)
  # alpha = 0 turns every block into the identity, leaving the final norm:
  # output = LN(x) * scale + bias, an exact numpy function.
  params = jax.tree.map(np.asarray, params)
  for k in params:
    if k.startswith("layers_"):
      params[k]["alpha_param"] = np.zeros((), np.float32)
  scale = (1 + 0.3 * rng.normal(size=D)).astype(np.float32)
  bias = (0.2 * rng.normal(size=D)).astype(np.float32)
  params["final_norm"] = {"scale": scale, "bias": bias}
  w, head = _head(tmp_path, 3)

  lengths = _lengths(rng, 20)
  sources = [rng.normal(size=(n, D)).astype(np.float32) for n in lengths]
  pred = [_ln(s, scale, bias) for s in sources]
  # Noise levels vary per position so cosines spread over (0.6, 1).
  targets = [
    (p + rng.uniform(0.1, 1.0, (len(p), 1)) * rng.normal(size=p.shape)).astype(
      np.float32
    )
    for p in pred
  ]
  tokens = []
  draft = []
  for t in targets:
    tok = np.argmax(t.astype(np.float64) @ w.T, -1)
    # Stored tokens differ from the argmax at some positions, so the test
    # tells the stored-token path from the argmax path.
    flip = rng.random(len(tok)) < 0.15
    tok = np.where(flip, rng.integers(0, V, len(tok)), tok)
    tokens.append(tok.astype(np.int32))
    keep = rng.random(len(tok)) < 0.6
    draft.append(np.where(keep, tok, (tok + 1) % V).astype(np.int32))
  path = _write(
    tmp_path / "ds", sources, targets, target_tokens=tokens, draft_tokens=draft
  )
  result = evaluate.evaluate(
    path,
    adapter="l1",
    overrides=L1_OV,
    params=params,
    lm_head=head,
    settings=evaluate.EvalSettings(
      batch_size=16,
      gamma=GAMMA,
      draft_cost=0.2,
      verify_cost=1.1,
      bootstrap=100,
      progress=False,
      pad_multiple=64,
    ),
  )
  res = result.metrics["results"]
  pred32 = [p.astype(np.float32).astype(np.float64) for p in pred]
  targets64 = [t.astype(np.float64) for t in targets]
  exp = _np_metrics(pred32, targets64, tokens, lengths, w)
  assert 0.1 < exp[0]["token_top1"] < 0.9  # Really partial.
  assert 0.05 < exp[0]["accept_90"] < 0.95
  _compare(res["adapter"]["same"], result.positions["adapter"]["same"], exp)
  # The untrained L1 (zero up-projection, unit final norm) is LN(source).
  untrained = [_ln(s) for s in sources]
  _compare(
    res["untrained"]["same"],
    result.positions["untrained"]["same"],
    _np_metrics(untrained, targets64, tokens, lengths, w),
  )
  # The raw drafter state through the target LM head.
  _compare(
    res["raw_source"]["same"],
    result.positions["raw_source"]["same"],
    _np_metrics(
      [s.astype(np.float64) for s in sources], targets64, tokens, lengths, w
    ),
  )
  # The drafter's own tokens.
  d = res["drafter_tokens"]["same"]
  eq = [a == b for a, b in zip(draft, tokens, strict=True)]
  assert d["token_top1"] == pytest.approx(np.concatenate(eq).mean())
  runs = [int(np.argmin(np.append(e, False))) for e in eq]
  assert d["token_consecutive_mean"] == pytest.approx(np.mean(runs))
  # Speedup from the closed form with the flag costs.
  a = exp[0]["token_top1"]
  tau = (1 - a ** (GAMMA + 1)) / (1 - a)
  sp = res["adapter"]["same"]["speedup"]
  assert sp["tokens_per_cycle"] == pytest.approx(tau)
  assert sp["speedup"] == pytest.approx(tau / (GAMMA * 0.2 + 1.1))
  lo, hi = sp["speedup_ci"]
  assert lo <= sp["speedup"] <= hi
  for key, (lo, hi) in res["adapter"]["same"]["ci"].items():
    assert lo <= res["adapter"]["same"][key] + 1e-12, key
    assert res["adapter"]["same"][key] <= hi + 1e-12, key


def test_bootstrap_matches_loop():
  rng = np.random.default_rng(0)
  n = 37
  sums = {
    "n": rng.integers(1, 9, n).astype(float),
    "has": np.ones(n),
    "token_top1": None,
    "token_consecutive": rng.integers(0, 4, n).astype(float),
  }
  sums["token_top1"] = np.floor(sums["n"] * rng.random(n))
  cis, samples = eval_stats.bootstrap_ci(
    sums, num_resamples=230, seed=5, chunk=100
  )
  # The same draws, one resample at a time.
  rng2 = np.random.default_rng(5)
  vals = []
  for r in (100, 100, 30):
    draws = rng2.integers(0, n, size=(r, n))
    for row in draws:
      vals.append(sums["token_top1"][row].sum() / sums["n"][row].sum())
  np.testing.assert_allclose(samples["token_top1"], vals)
  assert cis["token_top1"] == pytest.approx(
    [np.percentile(vals, 2.5), np.percentile(vals, 97.5)]
  )
  assert set(cis) == {"token_top1", "token_consecutive_mean"}


def test_leading_run_and_pearson():
  ok = np.array([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]], bool)
  valid = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], bool)
  np.testing.assert_array_equal(eval_stats.leading_run(ok, valid), [2, 0, 2])
  x = np.array([0.1, 0.5, 0.9, 0.3])
  y = np.array([0, 1, 1, 0])
  assert eval_stats.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
  assert eval_stats.pearson(x, np.ones(4)) is None


def test_batch_plan_uses_few_shapes():
  # Lengths 1..50 in random order: batches must share a handful of padded
  # lengths (one compile each), not one per batch maximum.
  lengths = np.random.default_rng(0).integers(1, 51, size=1000)
  plan = eval_device.plan_batches(lengths, 16, 16)
  pads = {pad for _, pad in plan}
  assert pads <= {16, 32, 48, 50}
  seen = np.concatenate([idx[idx >= 0] for idx, _ in plan])
  np.testing.assert_array_equal(np.sort(seen), np.arange(1000))
  for idx, pad in plan:
    rows = idx[idx >= 0]
    assert lengths[rows].max() <= pad
    assert pad - lengths[rows].max() < 16


def _make_run(tmp_path, head, *, val=True):
  from egpt_align import checkpoint
  from egpt_align.configs import base

  rng = np.random.default_rng(4)
  lengths = _lengths(rng, 11)
  sources = [rng.normal(size=(n, D)).astype(np.float32) for n in lengths]
  targets = [rng.normal(size=(n, D)).astype(np.float32) for n in lengths]
  draft = [rng.integers(0, V, n).astype(np.int32) for n in lengths]
  path = _write(tmp_path / "val_ds", sources, targets, draft_tokens=draft)
  config = base.get_config()
  config.model.name = "l1"
  config.model.hidden_dim = D
  config.model.bottleneck_dim = 8
  config.data.train = path
  config.data.val = path if val else None
  config.data.val_fraction = 0.3
  config.lm_head = head
  workdir = tmp_path / "run"
  os.makedirs(workdir)
  with open(workdir / checkpoint.CONFIG_FILE, "w") as f:
    json.dump(config.to_dict(), f)
  _, params = _init("l1", L1_OV, 7)
  ckpt = checkpoint.Checkpointer(str(workdir), async_save=False)
  ckpt.save(3, {"params": _perturb(params, 8)}, {}, val_loss=1.0)
  ckpt.close()
  return str(workdir), path, lengths


def test_cli_writes_report(tmp_path):
  pytest.importorskip("egpt_align.checkpoint")
  pytest.importorskip("egpt_align.configs.base")
  _, head = _head(tmp_path)
  workdir, path, lengths = _make_run(tmp_path, head)
  import matplotlib

  env = dict(os.environ, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  # A home of its own: the compilation cache goes to the session's temporary
  # one (tests/conftest.py), never to the user's ~/.cache/egpt_align/jax.
  env["MPLCONFIGDIR"] = matplotlib.get_configdir()
  env["HOME"] = str(tmp_path / "home")
  bench = tmp_path / "bench.json"
  bench.write_text(
    json.dumps(
      {
        "costs": {
          "target_decode_ms": 10.0,
          "draft_ms_per_token": {"drafter": 7.0},
          "verify_ms": {"4": 12.0},
        }
      }
    )
  )
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "egpt_align.evaluate",
      f"--workdir={workdir}",
      f"--bench_json={bench}",
      "--bootstrap=20",
      "--gamma=4",
      "--batch_size=8",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"costs from {bench}" in proc.stdout
  assert not (tmp_path / "home" / ".cache").exists()
  out = os.path.join(workdir, "eval_val_ds")  # RUN/eval_<data name>
  for name in (
    "metrics.json",
    "positions.json",
    "report.md",
    "cosine_hist.png",
    "positions.png",
    "p_match_given_cos.png",
  ):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  with open(os.path.join(out, "metrics.json")) as f:
    m = json.load(f)
  assert m["run"]["adapter"] == "l1" and m["run"]["step"] == "best"
  assert m["results"]["adapter"]["same"]["valid_positions"] == lengths.sum()
  assert m["settings"]["gamma"] == 4
  costs = m["settings"]["costs"]
  assert costs["draft_key"] == "drafter"  # l1 drafts through the drafter.
  # The bench has no run of l1: said plainly, in metrics and report.
  assert "no run of 'l1'" in costs["note"]
  assert "no run of 'l1'" in open(os.path.join(out, "report.md")).read()
  assert "note: " in proc.stdout and "no run of 'l1'" in proc.stdout
  # Libraries stay quiet: no orbax INFO flood, no false read-only warning,
  # no missing-TPU message.
  for noise in ("read only", "orbax", "libtpu", "backend 'tpu'"):
    assert noise not in proc.stderr, proc.stderr[-3000:]
  assert costs["draft_cost"] == pytest.approx(0.7)
  assert costs["verify_cost"] == pytest.approx(1.2)
  assert "drafter_tokens" in m["results"]
  text = open(os.path.join(out, "report.md")).read()
  assert "untrained adapter" in text and "drafter's own tokens" in text
  assert "![cosine_hist](cosine_hist.png)" in text

  # A second evaluation into the same directory is refused in one line
  # (before evaluating), unless --overwrite; a bad --bench_json is refused
  # before the evaluation runs. Neither touches the first report.
  before = open(os.path.join(out, "metrics.json")).read()
  again = [sys.executable, "-m", "egpt_align.evaluate", f"--workdir={workdir}"]
  run = functools.partial(
    subprocess.run, env=env, capture_output=True, text=True, timeout=300
  )
  proc = run(again)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
    f"error: {out} already holds an evaluation (metrics.json, report.md); "
    "pass --overwrite to replace it, or --out DIR to write elsewhere"
  )
  (tmp_path / "bad_bench.json").write_text("{not json")
  proc = run(again + ["--overwrite", f"--bench_json={tmp_path}/bad_bench.json"])
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {tmp_path}/bad_bench.json: not JSON"), last
  assert "evaluated" not in proc.stdout and "Traceback" not in proc.stderr
  assert open(os.path.join(out, "metrics.json")).read() == before


def _verdict_metrics(adapter_top1, speedups):
  entry = lambda top1, sp: {"token_top1": top1, "speedup": {"speedup": sp}}  # noqa: E731
  return {
    "primary_reading": "same",
    "results": {
      "adapter": {"same": entry(adapter_top1, speedups[0])},
      "untrained": {"same": entry(0.01, speedups[1])},
      "drafter_tokens": {"same": entry(0.30, speedups[2])},
    },
  }


def test_report_verdict_says_when_the_adapter_loses():
  from egpt_align import report

  lines = report.verdict(_verdict_metrics(0.25, (0.8, 0.5, 0.9)))
  assert any(
    "does NOT beat drafter's own tokens" in x and "untrained" not in x
    for x in lines
  )
  assert any("beats untrained adapter" in x for x in lines)
  assert any("Every expected speedup is below 1x" in x for x in lines)
  lines = report.verdict(_verdict_metrics(0.5, (1.3, 0.5, 0.9)))
  assert not any("NOT" in x or "below 1x" in x for x in lines)
  lines = report.verdict(_verdict_metrics(0.5, (0.9, 0.5, 1.2)))
  assert any("adapter's expected speedup is below 1x" in x for x in lines)


def test_report_render_b1_note(tmp_path):
  rng = np.random.default_rng(6)
  module, params = _init("b1", L5_OV, 0)
  lengths = _lengths(rng, 6)
  sources = [rng.normal(size=(n, D)).astype(np.float32) for n in lengths]
  targets = [rng.normal(size=(n, D)).astype(np.float32) for n in lengths]
  path = _write(tmp_path / "ds", sources, targets)
  result = evaluate.evaluate(
    path,
    adapter="b1",
    overrides=L5_OV,
    params=params,
    settings=evaluate.EvalSettings(
      bootstrap=0, batch_size=8, progress=False, pad_multiple=64
    ),
  )
  m = result.metrics
  # No LM head and no stored tokens: hidden-state metrics only.
  assert "token_top1" not in m["results"]["adapter"]["next"]
  assert "raw_source" not in m["results"]  # b1 is not cross-model.
  assert any("trivially high" in n for n in m["notes"])
  paths = report.write_outputs(result, str(tmp_path / "out"))
  assert {os.path.basename(p) for p in paths} >= {
    "metrics.json",
    "positions.json",
    "report.md",
    "cosine_hist.png",
    "positions.png",
  }
  text = open(tmp_path / "out" / "report.md").read()
  assert "trivially high" in text
  json.load(open(tmp_path / "out" / "metrics.json"))  # Strict JSON.


def test_errors(tmp_path):
  rng = np.random.default_rng(0)
  sources = [rng.normal(size=(4, D)).astype(np.float32)]
  path = _write(tmp_path / "ds", sources, sources)
  _, params = _init("l1", L1_OV, 0)
  w = np.zeros((V, D + 1), np.float32)
  lm_head.save_lm_head(tmp_path / "bad", w, model_id="x")
  with pytest.raises(ValueError, match="LM head hidden dim"):
    evaluate.evaluate(
      path,
      adapter="l1",
      overrides=L1_OV,
      params=params,
      lm_head=str(tmp_path / "bad"),
      settings=evaluate.EvalSettings(progress=False, pad_multiple=64),
    )
  with pytest.raises(ValueError, match="unknown adapter"):
    evaluate.evaluate(
      path,
      adapter="l9",
      params=params,
      settings=evaluate.EvalSettings(progress=False, pad_multiple=64),
    )
  with pytest.raises(ValueError, match="needs params"):
    evaluate.evaluate(
      path,
      adapter="l1",
      settings=evaluate.EvalSettings(progress=False, pad_multiple=64),
    )
  assert speedup.tokens_per_cycle(1.0, 1) == 2.0


def test_bad_inputs_are_refused_before_the_device_loop(tmp_path, monkeypatch):
  """A bench JSON without costs, or L5 weights under another adapter's name
  (the L4 forward would ignore pos_embed and run), never reach the loop."""
  rng = np.random.default_rng(0)
  sources = [rng.normal(size=(4, D)).astype(np.float32)]
  path = _write(tmp_path / "ds", sources, sources)

  def no_loop(*args, **kwargs):
    raise AssertionError("the evaluation ran")

  monkeypatch.setattr(evaluate.eval_device, "run", no_loop)
  settings = functools.partial(
    evaluate.EvalSettings, progress=False, pad_multiple=64
  )
  (tmp_path / "bench.json").write_text(json.dumps({"runs": []}))
  with pytest.raises(ValueError, match="bench.json: missing object 'costs'"):
    evaluate.evaluate(
      path,
      adapter="l1",
      params="init",
      overrides=L1_OV,
      settings=settings(bench_json=str(tmp_path / "bench.json")),
    )
  _, l5 = _init("l5", L5_OV, 0)
  l4_ov = {k: v for k, v in L5_OV.items() if k != "max_seq_len"}
  for name, ov, fragment in (
    ("l4", l4_ov, "unexpected ['input_norm/bias', 'input_norm/scale', 'pos"),
    ("l1", L1_OV, "missing ['final_norm/bias'"),
    ("l5", {**L5_OV, "ffn_dim": 48}, "(32, 64) != (32, 48)"),
  ):
    with pytest.raises(models.ParamsMismatch) as info:
      evaluate.evaluate(
        path, adapter=name, overrides=ov, params=l5, settings=settings()
      )
    message = str(info.value)
    assert f"do not fit adapter {name!r}" in message, message
    assert fragment in message, message


def test_params_npz_path(tmp_path):
  from egpt_align import checkpoint

  rng = np.random.default_rng(9)
  lengths = _lengths(rng, 5)
  sources = [rng.normal(size=(n, D)).astype(np.float32) for n in lengths]
  path = _write(tmp_path / "ds", sources, sources)
  _, params = _init("l1", L1_OV, 3)
  checkpoint.save_params_npz(str(tmp_path / "imp.npz"), params)
  (tmp_path / "imp.config.json").write_text(
    json.dumps({"model": {"name": "l1", **L1_OV}})
  )
  name, ov, loaded = evaluate._load_npz_params(str(tmp_path / "imp.npz"))
  assert name == "l1" and ov == L1_OV
  result = evaluate.evaluate(
    path,
    adapter=name,
    overrides=ov,
    params=loaded,
    settings=evaluate.EvalSettings(
      bootstrap=0, progress=False, pad_multiple=64
    ),
  )
  m = result.metrics["results"]["adapter"]["same"]
  assert m["valid_positions"] == int(lengths.sum())
  assert result.metrics["run"]["params"] == "given"
  with pytest.raises(FileNotFoundError, match="config.json"):
    evaluate._load_npz_params(str(tmp_path / "missing.npz"))


def test_untrained_is_the_trainers_init(tmp_path):
  import optax

  from egpt_align import train_state

  rng = np.random.default_rng(10)
  sources = [rng.normal(size=(n, D)).astype(np.float32) for n in (3, 9)]
  ds = data_lib.open_dataset(_write(tmp_path / "ds", sources, sources))
  module = models.create_adapter("l5", **L5_OV)
  got = evaluate._init_params(models.get_spec("l5"), module, ds, 5)
  # train.py: init_rng, _ = split(key(config.seed)); init_state(init_rng).
  init_rng = jax.random.split(jax.random.key(5))[0]
  state = train_state.init_state(
    init_rng,
    model=module,
    tx=optax.identity(),
    example_inputs=(np.zeros((1, 8, D), np.float32),),
  )
  for a, b in zip(
    jax.tree.leaves(got), jax.tree.leaves(state.params), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_workdir_default_is_the_trainers_holdout(tmp_path):
  from egpt_align.data import splits

  _, head = _head(tmp_path)
  workdir, path, lengths = _make_run(tmp_path, head, val=False)
  result = evaluate.evaluate(
    workdir=workdir,
    settings=evaluate.EvalSettings(
      bootstrap=0, progress=False, pad_multiple=64
    ),
  )
  _, holdout = splits.holdout_split(len(lengths), 0.3, 0)
  m = result.metrics
  assert m["data"]["subset"].startswith("validation hold-out")
  assert m["data"]["num_samples"] == len(holdout)
  assert m["results"]["adapter"]["same"]["valid_positions"] == int(
    lengths[holdout].sum()
  )
  assert m["lm_head"]["path"] == head  # The run's config.lm_head.


def test_benchmark_script_small(tmp_path, capsys):
  from tools.benchmarks import benchmark_evaluate

  out = tmp_path / "bench.json"
  argv = ["--small", "--data", str(tmp_path / "bd"), "--out", str(out)]
  assert benchmark_evaluate.main(argv) == 0
  res = json.loads(out.read_text())
  (run,) = res["runs"]
  ds = data_lib.open_dataset(str(tmp_path / "bd"))
  assert run["num_samples"] == ds.num_samples == 64
  assert run["positions"] == int(ds.lengths.sum())
  assert "positions/s" in capsys.readouterr().out
