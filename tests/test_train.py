"""Trainer: learning, device-count invariance, exact resume, CLI outputs."""

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egpt_align import (
  checkpoint,
  data,
  losses,
  metric_writer,
  models,
  optim,
  sharding,
  train,
  train_state,
)
from egpt_align import workdir as workdir_lib
from egpt_align.configs import base
from egpt_align.data import splits, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo_config():
  spec = importlib.util.spec_from_file_location(
    "demo", os.path.join(REPO, "experiments", "demo.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _tiny_config(**updates):
  """L1 at hidden 32 on 64 synthetic sequences: 7 steps/epoch of 8."""
  config = base.get_config()
  config.model.name = "l1"
  config.model.hidden_dim = 32
  config.model.bottleneck_dim = 16
  config.data.synthetic.enabled = True
  config.data.synthetic.num_samples = 64
  config.data.synthetic.hidden_dim = 32
  config.data.synthetic.min_len = 4
  config.data.synthetic.max_len = 8
  config.data.buckets = (8,)
  config.data.val_fraction = 0.125
  config.batch_size = 8
  config.num_epochs = 2
  config.log_every_steps = 3
  config.eval_at_start = False
  config.progress_bar = False
  config.checkpoint.async_save = False
  for key, value in updates.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  config.lock()
  return config


_L5 = {
  "model.name": "l5",
  "model.num_heads": 2,
  "model.ffn_dim": 64,
  "model.max_seq_len": 16,
}


def _params_close(a, b, **tol):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted 2-epoch run on all 8 (fake CPU) devices."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  result = train.train_and_evaluate(_tiny_config(), workdir)
  params, _ = checkpoint.load_params(workdir, "latest")
  return workdir, result, params


def test_demo_adapter_beats_untrained(tmp_path):
  config = _demo_config()
  config.num_epochs = 3
  config.progress_bar = False
  config.loss.token_ce_weight = 0.1  # through the synthetic LM head
  config.lock()
  result = train.train_and_evaluate(
    config, str(tmp_path), devices=jax.devices()[:1]
  )
  initial, final = result["initial"], result["final"]
  assert final["cos_sim"] > initial["cos_sim"] + 0.3
  assert final["accept_90"] > initial["accept_90"]
  assert final["accept_90"] > 0.02
  assert final["loss"] < 0.5 * initial["loss"]
  # Token-level agreement through the synthetic LM head, both readings.
  assert final["token_top1"] > initial["token_top1"]
  assert 0 <= final["next_token_top1"] <= 1
  # The loss includes the weighted token CE on top of the hidden-state loss.
  align = final["mse"] + 0.5 * (1 - final["cos_sim"])
  hidden = 0.5 * align + 0.5 * final["next_mse"]
  np.testing.assert_allclose(
    final["loss"], hidden + 0.1 * final["token_ce"], rtol=1e-6
  )
  # The whole held-out split is validated (10 % of 1024 samples), every
  # epoch, and padding rows are not counted.
  ds = data.open_dataset(os.path.join(str(tmp_path), splits.SYNTHETIC_DIR))
  _, val_idx = splits.holdout_split(ds.num_samples, 0.1, 0)
  assert len(val_idx) == 102
  assert final["n_valid"] == int(ds.lengths[val_idx].sum())
  assert final["next_n_valid"] == int((ds.lengths[val_idx] - 1).sum())


def test_one_device_matches_eight(reference_run, tmp_path):
  _, result8, params8 = reference_run
  assert len(jax.devices()) == 8
  result1 = train.train_and_evaluate(
    _tiny_config(), str(tmp_path), devices=jax.devices()[:1]
  )
  params1, _ = checkpoint.load_params(str(tmp_path), "latest")
  # Adam normalises updates, so float reduction-order noise in the gradient
  # all-reduce shows up at ~lr * 1e-2 after a few steps.
  _params_close(params1, params8, rtol=1e-3, atol=1e-4)
  for key in ("loss", "cos_sim", "accept_80"):
    np.testing.assert_allclose(
      result1["final"][key], result8["final"][key], rtol=1e-4
    )


def test_interrupted_runs_resume_exactly(reference_run, tmp_path, monkeypatch):
  """Stop at step 4, resume, SIGTERM at step 10, resume: as uninterrupted.

  One process stops at the step after the signal whatever
  config.distributed.stop_check_every_steps is (the check every N steps is
  for several processes): here 1000, and a step that is no multiple of 10.
  """
  ref_dir, ref_result, ref_params = reference_run
  workdir = str(tmp_path)
  steps_per_epoch = ref_result["step"] // 2
  first = train.train_and_evaluate(_tiny_config(stop_after_steps=4), workdir)
  assert first["stopped_at_step"] == 4 and first["epochs_run"] == 0

  original = data.InputPipeline.batches

  def batches_then_sigterm(self, epoch, start_step=0):
    for i, batch in enumerate(original(self, epoch, start_step)):
      yield batch
      # SIGTERM after the 3rd batch of the 2nd training epoch (step 10).
      if self.shuffle and epoch == 1 and start_step + i == 2:
        os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(data.InputPipeline, "batches", batches_then_sigterm)
  rare_checks = {"distributed.stop_check_every_steps": 1000}
  with pytest.raises(train.TrainingInterrupted) as info:
    train.train_and_evaluate(_tiny_config(**rare_checks), workdir)
  assert info.value.signum == signal.SIGTERM
  # The flag is seen after the step in flight: step 4 of the epoch, 11.
  assert info.value.step == steps_per_epoch + 4 == 11
  ckpt = checkpoint.Checkpointer(workdir)
  # The newest (mid-epoch) checkpoint and the best epoch-end one are kept.
  assert ckpt.latest_step() == info.value.step
  assert ckpt.best_step() == steps_per_epoch
  ckpt.close()
  monkeypatch.setattr(data.InputPipeline, "batches", original)

  result = train.train_and_evaluate(_tiny_config(), workdir)
  params, _ = checkpoint.load_params(workdir, "latest")
  _params_close(params, ref_params, rtol=1e-6, atol=1e-7)
  assert result["step"] == ref_result["step"]
  assert result["best_epoch"] == ref_result["best_epoch"]
  for key, values in ref_result["history"].items():
    np.testing.assert_allclose(result["history"][key], values, rtol=1e-6)

  # The metrics log (truncated to each checkpoint on resume) holds every
  # epoch record once and train records in step order, each step once.
  def records(d):
    with open(os.path.join(d, metric_writer.METRICS_FILE)) as f:
      return [json.loads(line) for line in f]

  got, want = records(workdir), records(ref_dir)
  epochs = [(r["step"], r["eval/loss"]) for r in got if "eval/loss" in r]
  ref_epochs = [(r["step"], r["eval/loss"]) for r in want if "eval/loss" in r]
  np.testing.assert_allclose(epochs, ref_epochs, rtol=1e-6)
  train_steps = [r["step"] for r in got if "train/loss" in r]
  assert train_steps == sorted(set(train_steps))
  assert {r["step"] for r in want if "train/loss" in r} <= set(train_steps)


def _delete_half(directory):
  """Deletes every second file under `directory` (a damaged checkpoint)."""
  files = sorted(
    os.path.join(root, f) for root, _, fs in os.walk(directory) for f in fs
  )
  for path in files[::2]:
    os.remove(path)


def test_resume_falls_back_to_the_newest_intact_checkpoint(
  reference_run, tmp_path, caplog
):
  _, ref_result, ref_params = reference_run
  workdir = str(tmp_path)
  ckpt_dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
  train.train_and_evaluate(_tiny_config(stop_after_steps=10), workdir)
  assert sorted(os.listdir(ckpt_dir)) == ["10", "7"]  # newest + best
  _delete_half(os.path.join(ckpt_dir, "10"))

  # Resumes from step 7, says so, sets step 10 aside and saves a new one.
  with caplog.at_level("WARNING"):
    result = train.train_and_evaluate(
      _tiny_config(stop_after_steps=10), workdir
    )
  assert result["stopped_at_step"] == 10
  assert "checkpoint step 10 does not restore" in caplog.text
  assert "resuming from step 7, the newest intact checkpoint" in caplog.text
  broken = os.path.join(workdir, checkpoint.BROKEN_DIR, "10")
  assert os.path.isdir(broken) and broken in caplog.text
  checkpoint.load_params(workdir, 10)  # the new step 10 restores
  # ... and the rest of the run is the uninterrupted one.
  result = train.train_and_evaluate(_tiny_config(), workdir)
  params, _ = checkpoint.load_params(workdir, "latest")
  _params_close(params, ref_params, rtol=1e-6, atol=1e-7)
  assert result["step"] == ref_result["step"]

  # Nothing restores: one error naming every step and what to do.
  for step in os.listdir(ckpt_dir):
    _delete_half(os.path.join(ckpt_dir, step))
  steps = sorted(map(int, os.listdir(ckpt_dir)), reverse=True)
  with pytest.raises(ValueError) as info:
    train.train_and_evaluate(_tiny_config(), workdir)
  message = str(info.value)
  assert message.startswith(f"no checkpoint in {ckpt_dir} restores (step ")
  assert all(f"step {k}: " in message for k in steps)
  assert message.endswith(
    f"delete {ckpt_dir} to start over, or train in a new workdir"
  )


_HOLD = """
import sys, time
from egpt_align import workdir
with workdir.owned(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(600)
"""


def test_workdir_is_owned_by_one_run(tmp_path):
  """A second run is refused before writing; a dead holder blocks nothing."""
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLD, workdir],
    cwd=REPO,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirBusy) as info:
      train.train_and_evaluate(_tiny_config(), workdir)
    assert str(info.value).startswith(
      f"{workdir} is in use by another training run (pid {holder.pid} on "
    )
    assert os.listdir(workdir) == [workdir_lib.LOCK_FILE]
  finally:
    holder.kill()  # SIGKILL: no clean-up, the lock file stays behind
    holder.wait()
  assert os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))
  with workdir_lib.owned(workdir):
    pass  # the kernel dropped the dead holder's lock


def test_eval_aggregation_is_exact(tmp_path):
  """Sums over padded batches equal the loss over all positions at once."""
  path = synthetic.write_synthetic_dataset(
    str(tmp_path / "d"), 11, hidden_dim=32, min_len=3, max_len=8, seed=3
  )
  ds = data.open_dataset(path)
  spec = models.get_spec("l5")
  model = models.create_adapter(
    "l5", hidden_dim=32, num_heads=2, ffn_dim=64, max_seq_len=8
  )
  full = ds.read_batch(np.arange(11), 8)
  params = jax.jit(model.init)(
    jax.random.key(1), jnp.asarray(full["source"], jnp.float32)
  )["params"]
  loss_config = _tiny_config().loss
  step_fn = jax.jit(
    functools.partial(
      train_state.eval_step,
      lm_weight=None,
      model=model,
      spec=spec,
      loss_config=loss_config,
    )
  )
  sums = None
  for rows in (np.arange(0, 4), np.arange(4, 8), np.arange(8, 11)):
    padded = np.concatenate([rows, -np.ones(4 - len(rows), int)])
    batch = ds.read_batch(padded, 8)  # index -1: an all-masked padding row
    out = jax.device_get(step_fn(params, batch))
    sums = out if sums is None else {k: sums[k] + out[k] for k in sums}
  sums = {k: float(v) for k, v in sums.items()}

  @jax.jit
  def whole_set_losses(params, source, target, mask):
    pred = model.apply({"params": params}, source, mask=mask)
    return {
      objective: losses.adapter_loss(
        pred, target, mask, predicts_next=True, objective=objective
      )
      for objective in losses.OBJECTIVES
    }

  want = whole_set_losses(
    params,
    jnp.asarray(full["source"], jnp.float32),
    jnp.asarray(full["target"], jnp.float32),
    full["mask"],
  )
  for objective, (loss, aux) in want.items():
    with loss_config.unlocked():
      loss_config.objective = objective
    got = train_state.finalize_eval(sums, spec=spec, loss_config=loss_config)
    np.testing.assert_allclose(got["loss"], float(loss), rtol=1e-5)
    np.testing.assert_allclose(got["cos_sim"], float(aux["cos_sim"]), rtol=1e-5)
    np.testing.assert_allclose(
      got["next_cos_sim"], float(aux["next_cos_sim"]), rtol=1e-5
    )
    assert got["n_valid"] == ds.lengths.sum()
    assert got["next_n_valid"] == (ds.lengths - 1).sum()


def test_early_stopping_is_strict_with_patience():
  losses_seq = [1.0, 0.8, 0.8, 0.9, 0.79, 0.85, 0.85, 0.85]
  best, bad, log = None, 0, []
  for loss in losses_seq:
    improved, bad, stop = train.early_stopping(best, bad, loss, 3)
    best = loss if improved else best
    log.append((improved, bad, stop))
  assert [i for i, _, _ in log] == [1, 1, 0, 0, 1, 0, 0, 0]
  assert [b for _, b, _ in log] == [0, 0, 1, 2, 0, 1, 2, 3]
  assert [s for _, _, s in log] == [0] * 7 + [1]
  assert not train.early_stopping(0.5, 99, 0.6, 0)[2]  # patience 0: never


def test_batch_size_must_divide_device_count(tmp_path):
  with pytest.raises(ValueError, match="multiple of the device count"):
    train.train_and_evaluate(_tiny_config(batch_size=6), str(tmp_path))


def test_rbg_dropout_trains_and_differs_from_threefry(tmp_path, reference_run):
  key = jax.random.key(0)
  assert train_state.dropout_key(key, "threefry2x32") is key
  rbg = train_state.dropout_key(key, "rbg")
  assert "rbg" in str(jax.random.key_impl(rbg))
  with pytest.raises(ValueError, match="dropout_rng_impl"):
    train_state.dropout_key(key, "philox")
  # 'auto' is threefry on CPU: the reference run used it.
  assert train_state.dropout_key(key, "auto") is key
  workdir = str(tmp_path / "rbg")
  train.train_and_evaluate(_tiny_config(dropout_rng_impl="rbg"), workdir)
  params, _ = checkpoint.load_params(workdir, "latest")
  leaves = jax.tree.leaves(params)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
  # Other dropout masks, so other parameters than the threefry run.
  ref = jax.tree.leaves(reference_run[2])
  assert any(
    not np.allclose(np.asarray(a), np.asarray(b))
    for a, b in zip(leaves, ref, strict=True)
  )


def test_missing_train_data_is_a_clear_error(tmp_path):
  config = base.get_config()
  config.lock()
  with pytest.raises(ValueError, match="config.data.train is required"):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("key", ["train", "val"])
def test_missing_dataset_dir_is_a_clear_error(tmp_path, key):
  config = _demo_config()
  config.data[key] = str(tmp_path / "nowhere")
  config.lock()
  with pytest.raises(ValueError, match=f"config.data.{key}=.*nowhere: no such"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_cli_smoke_run_writes_outputs(tmp_path):
  """The demo config given a dataset: it trains on it (not on its own)."""
  data = str(tmp_path / "user_ds")
  synthetic.write_synthetic_dataset(
    data, 30, hidden_dim=48, min_len=8, max_len=16
  )
  workdir = tmp_path / "run"
  cmd = [
    sys.executable,
    "-m",
    "egpt_align.train",
    "--config",
    os.path.join(REPO, "experiments", "demo.py"),
    "--workdir",
    str(workdir),
    "--config.num_epochs=1",
    "--config.batch_size=8",
    f"--config.data.train={data}",
    "--config.data.val_fraction=0.2",  # 24 train samples: 3 steps
    "--config.data.buckets=(16,)",
    "--config.progress_bar=False",
    "--config.tensorboard=True",
  ]
  env = dict(os.environ)  # one CPU device: a quicker compile
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  proc = subprocess.run(
    cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = json.loads((workdir / "config.json").read_text())
  assert config["batch_size"] == 8
  assert config["data"]["train"] == data
  assert not config["data"]["synthetic"]["enabled"]
  assert config["model"]["hidden_dim"] == 48  # the given data's size
  assert not (workdir / splits.SYNTHETIC_DIR).exists()
  records = [
    json.loads(line)
    for line in (workdir / "metrics.jsonl").read_text().split("\n")
    if line
  ]
  assert any("train/loss" in r for r in records)
  assert records[-1]["step"] == 3 and "eval/accept_90" in records[-1]
  history = json.loads((workdir / "history.json").read_text())
  assert len(history["val_accept_90"]) == 1
  # Which reading each number is: in the history and in the log.
  assert (
    "same position"
    in history["readings"]["val_cos_sim, val_accept_*, val_token_top1"]
  )
  assert "same pos.: cos" in proc.stderr and "next pos.: cos" in proc.stderr
  # The log's config: the changed keys and essentials; config.json has all.
  log = proc.stderr.splitlines()
  start = next(i for i, x in enumerate(log) if "config (changed from" in x)
  shown = []
  for line in log[start + 1 :]:
    if not line.startswith("  "):
      break
    shown.append(line.strip())
  assert "num_epochs: 1" in shown and "model.name: 'l5'" in shown
  assert not any(line.startswith("optim.b2") for line in shown)
  assert 10 < len(shown) < 25
  assert (workdir / "training_curves.png").stat().st_size > 0
  assert checkpoint.Checkpointer(str(workdir)).all_steps() == [3]
  try:
    import tensorboardX  # noqa: F401
  except ImportError:
    return
  assert os.listdir(workdir / "tensorboard")


def test_train_step_finite_with_zero_padding_outputs():
  """Untrained L1 outputs exact zero vectors at zero padding: no NaN grads."""
  config = base.get_config()
  model = models.create_adapter("l1", hidden_dim=32, bottleneck_dim=8)
  spec = models.get_spec("l1")
  tx, schedule = optim.create_optimizer(
    config.optim, steps_per_epoch=1, num_epochs=1
  )
  rng = np.random.default_rng(0)
  src = rng.standard_normal((2, 6, 32)).astype(np.float32)
  mask = np.array([[1] * 6, [1] * 3 + [0] * 3], bool)
  src[~mask] = 0.0  # padding is zeros, as the pipeline writes it
  batch = {
    "source": jnp.asarray(src),
    "target": jnp.asarray(rng.standard_normal((2, 6, 32)), jnp.float32),
    "mask": jnp.asarray(mask),
  }
  state = train_state.init_state(
    jax.random.PRNGKey(0), model=model, tx=tx, example_inputs=(batch["source"],)
  )
  pred = model.apply({"params": state.params}, batch["source"], mask=mask)
  assert np.all(np.asarray(pred)[~mask] == 0.0)  # the hazardous case
  step = functools.partial(
    train_state.train_step,
    lm_weight=None,
    model=model,
    spec=spec,
    tx=tx,
    schedule=schedule,
    loss_config=config.loss,
  )
  new_state, out = jax.jit(step)(state, batch, jax.random.PRNGKey(1))
  assert np.isfinite(float(out["loss"]))
  assert np.isfinite(float(out["grad_norm"]))
  for leaf in jax.tree.leaves(new_state.params):
    assert np.all(np.isfinite(np.asarray(leaf)))


def _l5_step_setup(dtype):
  """A small L5 (state without kernel copies), a padded batch, its step."""
  config = base.get_config()
  model = models.create_adapter(
    "l5", hidden_dim=32, num_heads=2, ffn_dim=64, max_seq_len=8, dtype=dtype
  )
  spec = models.get_spec("l5")
  tx, schedule = optim.create_optimizer(
    config.optim, steps_per_epoch=4, num_epochs=1
  )
  rng = np.random.default_rng(0)
  batch = {
    "source": rng.standard_normal((8, 8, 32)).astype(np.float32),
    "target": rng.standard_normal((8, 8, 32)).astype(np.float32),
    "mask": np.arange(8)[None] < rng.integers(1, 9, size=(8, 1)),
  }
  state = train_state.init_state(
    jax.random.PRNGKey(0),
    model=model,
    tx=tx,
    example_inputs=(jnp.zeros((1, 8, 32)),),
  )
  step = functools.partial(
    train_state.train_step,
    lm_weight=None,
    model=model,
    spec=spec,
    tx=tx,
    schedule=schedule,
    loss_config=config.loss,
  )
  return state, batch, step


@pytest.fixture(scope="module")
def l5_bf16_step():
  """The bf16 L5 setup with its step jitted once for the tests below."""
  state, batch, step = _l5_step_setup(jnp.bfloat16)
  return state, batch, jax.jit(step)


def test_dropout_masks_change_every_step(l5_bf16_step):
  # Same params, batch and key; only state.step differs: the dropout masks,
  # hence the training loss, must differ (the key is folded with the step).
  state, batch, step = l5_bf16_step
  key = jax.random.PRNGKey(1)
  later = state.replace(step=state.step + 1)
  loss = lambda s: float(step(s, batch, key)[1]["loss"])  # noqa: E731
  assert loss(state) == loss(state)  # deterministic given (key, step)
  assert loss(state) != loss(later)


def test_bf16_kernel_copies_leave_the_step_unchanged(l5_bf16_step):
  # A bf16-compute L5 (LayerNorms, pos_embed, biases, kernels): stepping with
  # the optimizer-written bf16 kernel copies equals casting inside the model.
  state, batch, step = l5_bf16_step
  fast = train_state.with_compute_params(state, jnp.bfloat16)
  kinds = {
    "/".join(str(getattr(k, "key", k)) for k in path): leaf.dtype
    for path, leaf in jax.tree_util.tree_leaves_with_path(
      train_state.forward_params(fast.params, fast.compute_params)
    )
  }
  assert kinds["layers_0/attn/in_proj/kernel"] == jnp.bfloat16
  assert kinds["layers_0/attn/in_proj/bias"] == jnp.float32
  assert kinds["layers_0/attn_norm/scale"] == jnp.float32
  assert kinds["pos_embed"] == jnp.float32
  copies = jax.tree.leaves(fast.compute_params)
  assert copies and all(x.dtype == jnp.bfloat16 for x in copies)
  assert (
    train_state.with_compute_params(state, jnp.float32).compute_params is None
  )
  key = jax.random.PRNGKey(1)
  for _ in range(3):
    state, out_a = step(state, batch, key)
    fast, out_b = step(fast, batch, key)
  assert float(out_a["loss"]) == pytest.approx(float(out_b["loss"]), rel=1e-6)
  _params_close(state.params, fast.params, rtol=1e-6, atol=1e-7)
  # The copies track the updated float32 kernels.
  _params_close(
    train_state.compute_params(fast.params, jnp.bfloat16), fast.compute_params
  )


def test_bf16_compute_checkpoints_hold_no_copies(tmp_path):
  workdir = str(tmp_path / "bf16")
  cfg = {"model.dtype": "bfloat16", "num_epochs": 1}
  train.train_and_evaluate(_tiny_config(**cfg), workdir)
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  step = ckpt.latest_step()
  tree = ckpt.manager.item_metadata(step)["state"]
  tree = getattr(tree, "tree", tree)
  assert jax.tree.leaves(tree["params"])
  assert not jax.tree.leaves(tree.get("compute_params"))  # no arrays saved
  ckpt.close()
  # Resuming (restore, then the copies are rebuilt) trains on.
  cfg["num_epochs"] = 2
  train.train_and_evaluate(_tiny_config(**cfg), workdir)
  params, _ = checkpoint.load_params(workdir, "latest")
  leaves = jax.tree.leaves(params)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)


def _spec_of(sharding):
  return tuple(sharding.spec)


def test_weight_update_sharding_layout():
  mesh = sharding.make_mesh()  # 8 devices
  state, _, _ = _l5_step_setup(jnp.bfloat16)
  state = train_state.with_compute_params(state, jnp.bfloat16)
  layout = train_state.state_shardings(
    state, mesh, shard_update=True, min_size=64
  )
  params = layout.params["layers_0"]
  # [32, 96]: the leading axis divides by 8 -> split there (contiguous).
  assert _spec_of(params["attn"]["in_proj"]["kernel"]) == ("data", None)
  # 96 elements >= 64 and 96 % 8 == 0 -> split; a [32] LN scale is too small.
  assert _spec_of(params["attn"]["in_proj"]["bias"]) == ("data",)
  assert _spec_of(params["attn_norm"]["scale"]) == ()
  assert _spec_of(layout.step) == ()
  # The AdamW moments and the bf16 copies follow their params.
  split = sum(
    _spec_of(s) == ("data", None) for s in jax.tree.leaves(layout.params)
  )
  mus = [
    s
    for s in jax.tree.leaves(layout.opt_state)
    if _spec_of(s) == ("data", None)
  ]
  assert len(mus) == 2 * split
  copies = jax.tree.leaves(layout.compute_params)
  assert sum(_spec_of(s) == ("data", None) for s in copies) == split
  # A leaf no axis of which divides by 8 stays replicated.
  odd = sharding.weight_update_sharding((6, 10), mesh, min_size=1)
  assert _spec_of(odd) == ()
  # Replicated layout, or too small for the threshold: nothing is split.
  for shard_update, min_size in ((False, 1), (True, 10**9)):
    flat = train_state.state_shardings(
      state, mesh, shard_update=shard_update, min_size=min_size
    )
    assert all(_spec_of(s) == () for s in jax.tree.leaves(flat))


def test_weight_update_sharding_min_size_is_inclusive():
  """A leaf of exactly min_size elements is split; one fewer is not."""
  mesh = sharding.make_mesh()  # 8 devices
  for shape in ((64,), (8, 8), (2, 32)):
    exact = sharding.weight_update_sharding(shape, mesh, min_size=64)
    assert _spec_of(exact) != (), shape
    above = sharding.weight_update_sharding(shape, mesh, min_size=65)
    assert _spec_of(above) == (), shape


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sharded_weight_update_matches_replicated(dtype):
  mesh = sharding.make_mesh()  # 8 devices
  rep = sharding.replicated(mesh)
  bsh = sharding.batch_sharding(mesh)
  state0, batch, step = _l5_step_setup(dtype)
  state0 = train_state.with_compute_params(state0, dtype)
  key = jax.random.PRNGKey(1)
  results = {}
  for shard_update in (False, True):
    layout = train_state.state_shardings(
      state0, mesh, shard_update=shard_update, min_size=64
    )
    fn = jax.jit(
      functools.partial(
        step, grad_shardings=layout.params if shard_update else None
      ),
      in_shardings=(layout, bsh, rep),
      out_shardings=(layout, rep),
    )
    compiled = fn.lower(state0, batch, key).compile()  # compiled once
    hlo = compiled.as_text()
    state = jax.device_put(state0, layout)
    for _ in range(3):
      state, out = compiled(state, batch, key)
    results[shard_update] = (state, out, hlo)
  (rep_state, rep_out, rep_hlo), (sh_state, sh_out, sh_hlo) = (
    results[False],
    results[True],
  )

  # The optimizer's share really is split: each device holds 1/8 of a kernel
  # and of its moments.
  def local_shape(state):
    kernel = state.params["layers_0"]["attn"]["in_proj"]["kernel"]
    return kernel.addressable_shards[0].data.shape

  assert local_shape(sh_state) == (4, 96)
  assert local_shape(rep_state) == (32, 96)
  assert "all-gather" in sh_hlo and "all-gather" not in rep_hlo
  # Same arithmetic: only the order of float sums differs.
  assert float(sh_out["loss"]) == pytest.approx(
    float(rep_out["loss"]), rel=1e-5
  )
  _params_close(sh_state.params, rep_state.params, rtol=1e-4, atol=1e-6)
  if dtype == jnp.bfloat16:
    _params_close(
      train_state.compute_params(sh_state.params, jnp.bfloat16),
      sh_state.compute_params,
    )
    copy = sh_state.compute_params["layers_0"]["attn"]["in_proj"]["kernel"]
    assert copy.addressable_shards[0].data.shape == (4, 96)


def test_sharded_run_resumes_on_another_device_count(reference_run, tmp_path):
  """8 devices with the update sharded, stopped; resumed on one device."""
  _, ref_result, ref_params = reference_run
  workdir = str(tmp_path)
  first = train.train_and_evaluate(
    _tiny_config(stop_after_steps=4, shard_min_size=64), workdir
  )
  assert first["stopped_at_step"] == 4
  result = train.train_and_evaluate(
    _tiny_config(shard_min_size=64), workdir, devices=jax.devices()[:1]
  )
  params, _ = checkpoint.load_params(workdir, "latest")
  assert result["step"] == ref_result["step"]
  # As test_one_device_matches_eight: Adam magnifies reduction-order noise.
  _params_close(params, ref_params, rtol=1e-3, atol=1e-4)
