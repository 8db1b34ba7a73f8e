"""Multi-step ("training-time test") training: egpt_align/unroll.py.

What the unrolled steps are fed is checked against the live KV-cache
drafting loop (`decode_step`, what tools/lib/sd_engine.py runs), not just
against its own outputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egpt_align import lm_head as lm_head_lib
from egpt_align import losses, metrics, models, train_state, unroll
from egpt_align.configs import base
from egpt_align.models import attention

D, V, S = 16, 7, 7
OV = {
  "hidden_dim": D,
  "num_heads": 2,
  "ffn_dim": 32,
  "num_layers": 2,
  "max_seq_len": 16,
  "dtype": "float32",
}
LENGTHS = np.array([7, 5, 3, 1])


def _loss_config(**updates):
  config = base.get_config().loss
  for key, value in updates.items():
    config[key] = value
  return config


def _setup(name, seed=0, num_layers=2):
  """(module, spec, params, batch, LM head) at tiny dims, right-padded."""
  spec = models.get_spec(name)
  module = models.create_adapter(name, **{**OV, "num_layers": num_layers})
  keys = jax.random.split(jax.random.key(seed), 4)
  mask = np.arange(S)[None] < LENGTHS[:, None]
  batch = {
    "source": jax.random.normal(keys[0], (len(LENGTHS), S, D)),
    "target": jax.random.normal(keys[1], (len(LENGTHS), S, D)),
    "mask": jnp.asarray(mask),
  }
  inputs = models.adapter_inputs(name, batch)
  params = module.init(keys[2], *inputs, mask=batch["mask"])["params"]
  # alpha 0.1 keeps the output near its input: move it off, so a wrong
  # input or attention shows in the outputs.
  params = {**params, "alpha": jnp.asarray(0.7, jnp.float32)}
  weight = jax.random.normal(keys[3], (V, D))
  return module, spec, params, batch, weight


class _Live:
  """The runtime's drafting loop over a KV cache (`decode_step`).

  The true inputs of every position are decoded once; a chain from t then
  writes its fed-back inputs at t+1, t+2, ... over the cached true ones,
  as the runtime rolls back after a verification: keys after the query's
  position are never attended, so the cache holds exactly the true states
  at positions <= t and the chain's own inputs after. The drafter stream
  (L5F) stays true.
  """

  def __init__(self, module, spec, params, batch):
    self.true = [np.asarray(x) for x in models.adapter_inputs(spec.name, batch)]
    self.fed = spec.inputs.index("target")
    self.decode = jax.jit(
      lambda c, pos, *xs: module.apply(
        {"params": params}, *xs, cache=c, position=pos, method="decode_step"
      )
    )
    cache = module.init_cache(len(batch["mask"]), OV["max_seq_len"])
    self.y_true, self.cache = self.decode(cache, 0, *self.true)

  def feed(self, cache, p, state_BD):
    """Position p fed `state` in the fed-back stream: (y_BD, cache)."""
    xs = [x[:, p : p + 1] for x in self.true]
    xs[self.fed] = np.asarray(state_BD)[:, None]
    y, cache = self.decode(cache, jnp.int32(p), *xs)
    return y[:, 0], cache

  def drafts(self, t, steps):
    """Drafts 1..steps of the chain from t (fewer near the end)."""
    y, cache = self.y_true[:, t], self.cache
    out = [y]
    for p in range(t + 1, min(t + steps, S)):
      y, cache = self.feed(cache, p, y)
      out.append(y)
    return out


# --- k = 1 is today's training, bit for bit ----------------------------------


def _todays_loss(params, batch, lm_weight, rng, *, model, spec, loss_config):
  """train_step's loss before unrolling existed, written out again."""
  pred = train_state.forward(
    model, spec, params, batch, deterministic=False, rng=rng
  )
  target = batch["target"].astype(jnp.float32)
  shift = 1 if loss_config.objective == "next" else 0
  p, t, m = metrics.shift_pairs(pred, target, batch["mask"], shift)
  ce = lm_head_lib.token_ce_loss(p, t, lm_weight, m, soft=True)
  return losses.adapter_loss(
    pred,
    target,
    batch["mask"],
    predicts_next=spec.predicts_next,
    token_ce=ce,
    **losses.config_weights(loss_config),
  )


@pytest.mark.parametrize(
  "name,objective", [("b1", "reference"), ("l5f", "next")]
)
def test_one_step_is_todays_loss_and_gradient_exactly(name, objective):
  module, spec, params, batch, weight = _setup(name, num_layers=1)
  config = _loss_config(objective=objective, token_ce_weight=0.3)
  rng = jax.random.key(5)  # dropout on: the same masks both ways
  kw = {"model": module, "spec": spec, "loss_config": config}
  today = jax.jit(
    jax.value_and_grad(functools.partial(_todays_loss, **kw), has_aux=True)
  )
  (want, _), want_grads = today(params, batch, weight, rng)
  ours = jax.jit(
    jax.value_and_grad(
      lambda p, b, w, r: train_state.training_loss(
        p, batch=b, lm_weight=w, deterministic=False, rng=r, **kw
      ),
      has_aux=True,
    )
  )
  (got, _), got_grads = ours(params, batch, weight, rng)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for a, b in zip(
    jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- what each step is fed ---------------------------------------------------


def _terms_by_hand(p, t, weight):
  """(mse, cosine, soft token CE) means over rows of p vs t, numpy."""
  p, t = np.asarray(p, np.float64), np.asarray(t, np.float64)
  mse = np.mean((p - t) ** 2)
  cos = np.mean(
    (p * t).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1))
  )
  w = np.asarray(weight, np.float64)
  lp = p @ w.T
  lp = lp - lp.max(-1, keepdims=True)
  logp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
  lt = t @ w.T
  q = np.exp(lt - lt.max(-1, keepdims=True))
  q /= q.sum(-1, keepdims=True)
  return mse, cos, -(q * logp).sum(-1).mean()


def _next_loss_by_hand(pred, target, pairs, ce_weight, weight):
  """objective next + token CE over the (row, p) pairs: pred[p] vs
  target[p + 1]."""
  p = np.stack([np.asarray(pred)[b, q] for b, q in pairs])
  t = np.stack([np.asarray(target)[b, q + 1] for b, q in pairs])
  mse, cos, ce = _terms_by_hand(p, t, weight)
  return mse + 0.5 * (1 - cos) + ce_weight * ce


@pytest.mark.parametrize("name", ["b1", "l5f"])
def test_second_step_is_fed_the_first_steps_output(name):
  """Step 2's loss equals the loss of a live cache fed the recorded step-1
  outputs by hand."""
  module, spec, params, batch, weight = _setup(name)
  config = _loss_config(objective="next", unroll_steps=2, token_ce_weight=0.2)
  _, aux = train_state.training_loss(
    params,
    batch=batch,
    lm_weight=weight,
    model=module,
    spec=spec,
    loss_config=config,
    deterministic=True,
  )
  # The recorded first outputs: the teacher-forced forward.
  y1 = np.asarray(
    train_state.forward(module, spec, params, batch, deterministic=True)
  )
  live = _Live(module, spec, params, batch)
  step2 = np.zeros_like(y1)
  pairs = []
  for t in range(S - 1):
    # Fed by hand: step 1's recorded output at t, at position t + 1.
    step2[:, t + 1] = np.asarray(live.feed(live.cache, t + 1, y1[:, t])[0])
    # Draft 2 of the chain from t at position t + 1 vs target[t + 2].
    pairs += [(b, t + 1) for b in range(len(LENGTHS)) if t + 2 < LENGTHS[b]]
  want = _next_loss_by_hand(step2, batch["target"], pairs, 0.2, weight)
  np.testing.assert_allclose(float(aux["step2_loss"]), want, rtol=1e-5)
  want1 = _next_loss_by_hand(
    y1,
    batch["target"],
    [(b, q) for b in range(len(LENGTHS)) for q in range(LENGTHS[b] - 1)],
    0.2,
    weight,
  )
  np.testing.assert_allclose(float(aux["step1_loss"]), want1, rtol=1e-5)
  np.testing.assert_allclose(
    float(aux["loss"]), 0.5 * (want + want1), rtol=1e-5
  )


@pytest.mark.parametrize("name", ["b1", "l5f"])
def test_unrolled_steps_equal_live_drafting(name):
  module, spec, params, batch, _ = _setup(name, seed=1)
  steps = 3
  preds = unroll.forward(module, spec, params, batch, steps)
  live = _Live(module, spec, params, batch)
  for t in range(S - 1):
    for j, y in enumerate(live.drafts(t, steps), start=1):
      p = t + j - 1
      rows = p < LENGTHS  # chains inside the rows' valid positions
      np.testing.assert_allclose(
        np.asarray(preds[j - 1][rows, p]),
        np.asarray(y[rows]),
        rtol=2e-5,
        atol=2e-5,
        err_msg=f"step {j}, chain from {t}",
      )


def _live_keys(p, j):
  """(stream, position) keys the live cache holds for draft j at p."""
  t = p - j + 1
  keys = {(1, q) for q in range(t + 1)}
  return keys | {(s, t + s - 1) for s in range(2, j + 1)}


def test_mask_sees_exactly_what_the_live_cache_holds():
  seq = 6
  for j in range(1, 5):
    m = np.asarray(attention.unroll_mask(seq, j))[0]
    assert m.shape == (seq, j * seq)
    for p in range(seq):
      seen = {(c // seq + 1, c % seq) for c in np.flatnonzero(m[p])}
      # Never a position after the query, whatever the chain.
      assert all(q <= p for _, q in seen), (j, p)
      if p >= j - 1:
        assert seen == _live_keys(p, j), (j, p)
      else:  # no live chain: only keys of chains that start before 0
        assert all(s >= 2 and q - s + 1 < 0 for s, q in seen), (j, p)
  # Padding positions are never keys.
  mask = np.array([[True] * 4 + [False] * 2])
  m = np.asarray(attention.unroll_mask(seq, 3, mask))[0]
  assert not m.reshape(seq, 3, seq)[:, :, 4:].any()


def test_no_step_depends_on_true_states_after_its_chain_start():
  """With gradients through the whole chain, d y_j[p] / d h[q] = 0 for
  every true state q after the chain's start t = p - j + 1."""
  module, spec, params, batch, _ = _setup("b1", seed=2)
  steps = 3
  row = batch["target"][:1]

  def drafts(target):
    b = {"target": target, "mask": jnp.ones((1, S), bool)}
    preds = unroll.forward(module, spec, params, b, steps, stop_gradient=False)
    return jnp.stack(preds)[:, 0]  # [steps, S, D]

  jac = np.abs(np.asarray(jax.jit(jax.jacfwd(drafts))(row)))
  dep = jac.sum(axis=(2, 5))[:, :, 0]  # [steps, S (draft), S (true)]
  for j in range(1, steps + 1):
    for p in range(j - 1, S):
      t = p - j + 1
      assert np.all(dep[j - 1, p, t + 1 :] == 0), (j, p, dep[j - 1, p])
      assert dep[j - 1, p, t] > 0, (j, p)  # the chain's last true state


# --- settings, shapes, resume ------------------------------------------------


def test_settings_and_their_errors():
  b1, l5 = models.get_spec("b1"), models.get_spec("l5")
  assert unroll.settings(_loss_config(), b1) == (1, (1.0,), True)
  k, w, stop = unroll.settings(
    _loss_config(objective="next", unroll_steps=4), b1
  )
  assert (k, w, stop) == (4, (0.25,) * 4, True)
  with pytest.raises(ValueError, match="every step would repeat step 1"):
    unroll.settings(_loss_config(objective="next", unroll_steps=2), l5)
  with pytest.raises(ValueError, match="objective='next'"):
    unroll.settings(_loss_config(unroll_steps=2), b1)
  with pytest.raises(ValueError, match="unroll_weights must be 3"):
    unroll.settings(
      _loss_config(objective="next", unroll_steps=3, unroll_weights=(1, 1)),
      b1,
    )
  with pytest.raises(ValueError, match="unroll_steps must be an int >= 1"):
    unroll.settings(_loss_config(unroll_steps=0), b1)
  with pytest.raises(ValueError, match="is not fed its own predictions"):
    unroll.forward(None, l5, None, {}, 2)


@pytest.mark.parametrize("name", ["b1", "l5f"])
def test_unrolled_step_shapes_at_4096(name):
  """The 4-step loss and gradient at the real size, without running."""
  module = models.create_adapter(name, hidden_dim=4096, dtype="bfloat16")
  spec = models.get_spec(name)
  x = jax.ShapeDtypeStruct((64, 50, 4096), jnp.bfloat16)
  batch = {
    "source": x,
    "target": x,
    "mask": jax.ShapeDtypeStruct((64, 50), jnp.bool_),
  }
  params = jax.eval_shape(
    lambda *xs: module.init(jax.random.key(0), *xs)["params"],
    *([x] * len(spec.inputs)),
  )
  config = _loss_config(objective="next", unroll_steps=4)
  (loss, aux), grads = jax.eval_shape(
    jax.value_and_grad(
      lambda p, b, r: train_state.training_loss(
        p,
        batch=b,
        lm_weight=None,
        model=module,
        spec=spec,
        loss_config=config,
        deterministic=False,
        rng=r,
      ),
      has_aux=True,
    ),
    params,
    batch,
    jax.random.key(0),
  )
  assert loss.shape == () and aux["step4_loss"].shape == ()
  assert jax.tree.map(lambda a: a.shape, grads) == jax.tree.map(
    lambda a: a.shape, params
  )


def _train_config(**updates):
  config = base.get_config()
  settings = {
    "model.name": "b1",
    "model.hidden_dim": D,
    "model.num_heads": 2,
    "model.ffn_dim": 32,
    "model.max_seq_len": 8,
    "data.synthetic.enabled": True,
    "data.synthetic.num_samples": 36,
    "data.synthetic.hidden_dim": D,
    "data.synthetic.min_len": 4,
    "data.synthetic.max_len": 8,
    "data.synthetic.lm_head": False,
    "data.buckets": (8,),
    "data.val_fraction": 0.125,
    "batch_size": 8,
    "num_epochs": 1,
    "log_every_steps": 1,
    "eval_at_start": False,
    "progress_bar": False,
    "checkpoint.async_save": False,
    "loss.objective": "next",
    "loss.unroll_steps": 2,
    **updates,
  }
  for key, value in settings.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  config.lock()
  return config


def test_unrolled_run_resumes_mid_epoch_exactly(tmp_path):
  import json
  import os

  from egpt_align import checkpoint, metric_writer, train

  def train_losses(workdir):
    with open(os.path.join(workdir, metric_writer.METRICS_FILE)) as f:
      rows = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

  devices = jax.devices()[:1]
  whole = str(tmp_path / "whole")
  ref = train.train_and_evaluate(_train_config(), whole, devices=devices)
  assert ref["step"] == 4  # 32 training samples, batch 8
  parts = str(tmp_path / "parts")
  first = train.train_and_evaluate(
    _train_config(stop_after_steps=2), parts, devices=devices
  )
  assert first["stopped_at_step"] == 2 and first["epochs_run"] == 0
  result = train.train_and_evaluate(_train_config(), parts, devices=devices)
  assert train_losses(parts) == train_losses(whole)
  assert result["final"]["loss"] == ref["final"]["loss"]
  assert "step2_loss" in result["final"]
  got, _ = checkpoint.load_params(parts, "latest")
  want, _ = checkpoint.load_params(whole, "latest")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)


# --- validation: token CE weighted by the shifted pairs (issue 34) ---------


@pytest.mark.parametrize("steps", [1, 2])
def test_validation_token_ce_and_loss_by_hand(steps):
  """Objective next with token CE: the split's CE is the mean over every
  shifted pair (each batch's mean weighted by its own pair count), and the
  validation loss is training's formula of those means."""
  module, spec, params, batch, weight = _setup("b1", seed=3)
  config = _loss_config(
    objective="next", token_ce_weight=0.3, unroll_steps=steps
  )
  # Two batches with very different pair counts (3+1 and 6+4+2+0).
  halves = [
    {
      "target": batch["target"][rows],
      "mask": jnp.asarray(np.arange(S)[None] < lengths[:, None]),
    }
    for rows, lengths in (
      (slice(0, 2), np.array([4, 2])),
      (slice(0, 4), np.array([7, 5, 3, 1])),
    )
  ]
  step = jax.jit(
    functools.partial(
      train_state.eval_step, model=module, spec=spec, loss_config=config
    )
  )
  per_batch = [step(params, b, weight) for b in halves]
  sums = {k: sum(float(b[k]) for b in per_batch) for k in per_batch[0]}
  got = train_state.finalize_eval(sums, spec=spec, loss_config=config)
  step_losses = []
  for j in range(1, steps + 1):
    # Every valid step-j pair of both batches, pooled: pred_j[q] vs
    # target[q + 1] for chains from t = q - j + 1 >= 0.
    p_rows, t_rows = [], []
    for b in halves:
      pred = np.asarray(unroll.forward(module, spec, params, b, j)[-1])
      target = np.asarray(b["target"])
      for r, n in enumerate(np.asarray(b["mask"]).sum(1)):
        for q in range(j - 1, n - 1):
          p_rows.append(pred[r, q])
          t_rows.append(target[r, q + 1])
    mse, cos, ce = _terms_by_hand(np.stack(p_rows), np.stack(t_rows), weight)
    tag = "" if j == 1 else f"step{j}_"
    assert got[f"{tag}next_n_valid"] == len(p_rows)
    np.testing.assert_allclose(got[f"{tag}token_ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(got[f"{tag}next_mse"], mse, rtol=1e-5)
    step_losses.append(mse + 0.5 * (1 - cos) + 0.3 * ce)
  np.testing.assert_allclose(got["loss"], np.mean(step_losses), rtol=1e-5)


# --- acceptance at depth (evaluate) ------------------------------------------


def _depth_settings(gamma, bootstrap=0):
  from egpt_align import evaluate

  return evaluate.EvalSettings(
    batch_size=8, gamma=gamma, bootstrap=bootstrap, progress=False
  )


@pytest.mark.parametrize("d", [0, 1, 2, 4])
def test_a_predictor_right_for_exactly_d_tokens_gives_d(d):
  from egpt_align import eval_stats

  gamma, lengths = 4, np.array([9, 6, 4, 12])
  n, s = len(lengths), int(lengths.max())
  # Draft j is right from every chain start iff j <= d.
  steps = [np.full((n, s), j <= d) for j in range(1, gamma + 1)]
  costs = {"draft_cost": 0.1, "verify_cost": 1.0}
  entry = eval_stats.depth_entry(
    steps, lengths, settings=_depth_settings(gamma, 30), costs=costs, seed=0
  )
  assert entry["chain_starts"] == int(np.maximum(lengths - gamma, 0).sum())
  for k in range(1, gamma + 1):
    assert entry[f"depth_{k}"] == (1.0 if k <= d else 0.0)
  assert entry["tau"] == pytest.approx(1 + d)
  assert entry["ci"]["tau"] == pytest.approx([1 + d, 1 + d])
  assert entry["speedup"] == pytest.approx((1 + d) / (gamma * 0.1 + 1.0))


def test_depth_shares_count_each_chain_from_its_start():
  """Random matches against a loop over chain starts and depths."""
  from egpt_align import eval_stats

  rng = np.random.default_rng(0)
  gamma, lengths = 3, np.array([8, 5, 3, 2, 7])
  n, s = len(lengths), int(lengths.max())
  steps = [rng.random((n, s)) < 0.7 for _ in range(gamma)]
  sums = eval_stats.depth_sums(steps, lengths)
  for i, length in enumerate(lengths):
    starts = range(max(length - gamma, 0))
    assert sums["starts"][i] == len(starts)
    for d in range(1, gamma + 1):
      # Draft j of the chain from t is made at position t + j - 1.
      want = sum(
        all(steps[j - 1][i, t + j - 1] for j in range(1, d + 1)) for t in starts
      )
      assert sums[f"depth_{d}"][i] == want, (i, d)


def test_evaluate_depth_acceptance_is_live_drafting(tmp_path):
  """evaluate's free-running acceptance at depth equals drafting with the
  runtime's loop (`decode_step`, own states fed back), chain by chain; the
  teacher-forced one reads the true-state predictions."""
  from egpt_align import data as data_lib
  from egpt_align import evaluate, report

  gamma = 3
  module, spec, params, batch, weight = _setup("b1", seed=4)
  weight = np.asarray(weight)[:3]  # 3 tokens: chains match often
  rng = np.random.default_rng(4)
  lengths = np.concatenate([[2], rng.integers(4, S + 1, 23)])
  target = rng.normal(size=(len(lengths), S, D)).astype(np.float32)
  tokens = np.argmax(target @ weight.T, -1).astype(np.int32)
  with data_lib.DatasetWriter(
    str(tmp_path / "ds"), source_dim=D, target_dim=D, dtype="float32"
  ) as w:
    for i, n in enumerate(lengths):
      w.append(
        target[i, :n],
        target[i, :n],
        target_tokens=tokens[i, :n],
        meta={"id": f"s{i}"},
      )
  lm_head_lib.save_lm_head(tmp_path / "head", weight, model_id="test")
  result = evaluate.evaluate(
    str(tmp_path / "ds"),
    adapter="b1",
    overrides=OV,
    params=params,
    lm_head=str(tmp_path / "head"),
    settings=_depth_settings(gamma, bootstrap=20),
  )
  depth = result.metrics["depth_acceptance"]
  assert depth["gamma"] == gamma and depth["fed_back"]

  mask = np.arange(S)[None] < lengths[:, None]
  live = _Live(module, spec, params, {"target": target, "mask": mask})
  free = np.zeros(gamma)
  forced = np.zeros(gamma)
  starts = 0
  tf_tokens = np.argmax(np.asarray(live.y_true) @ weight.T, -1)
  for t in range(S - gamma):
    drafts = [
      np.argmax(np.asarray(y) @ weight.T, -1) for y in live.drafts(t, gamma)
    ]
    for i, n in enumerate(lengths):
      if t > n - 1 - gamma:
        continue
      starts += 1
      for d in range(1, gamma + 1):
        want = tokens[i, t + 1 : t + d + 1]
        free[d - 1] += all(drafts[j][i] == want[j] for j in range(d))
        forced[d - 1] += all(tf_tokens[i, t + j] == want[j] for j in range(d))
  assert depth["free_running"]["chain_starts"] == starts
  for d in range(1, gamma + 1):
    assert depth["free_running"][f"depth_{d}"] == pytest.approx(
      free[d - 1] / starts
    )
    assert depth["teacher_forced"][f"depth_{d}"] == pytest.approx(
      forced[d - 1] / starts
    )
  # The test has teeth: feeding its own states changes some chain.
  assert not np.array_equal(free, forced)
  assert depth["free_running"]["tau"] == pytest.approx(1 + free.sum() / starts)
  lo, hi = depth["free_running"]["ci"]["tau"]
  assert lo <= depth["free_running"]["tau"] <= hi
  text = report.render_markdown(result.metrics, result.positions, [])
  assert f"## Acceptance at depth (chain drafting, γ = {gamma})" in text
  assert "acceptance at depth" in report.summary_text(result)
