r"""Train-step benchmark: our jitted JAX step against the torch twins.

Times, in one process on one card, for each adapter level:
  * ours: the trainer's jitted train step (forward + backward + clip + AdamW),
    bf16 compute with float32 params, donated state;
  * torch, the reference recipe: fp32 eager, torch.optim.AdamW, clip 1.0;
  * torch, the best a careful user gets: bf16 autocast + torch.compile +
    fused AdamW.
All at the reference's shapes (batch 64, sequence 50, hidden 4096) unless told
otherwise. It reports ms/step (median of timing windows), tokens/s, achieved
TFLOP/s of the matmuls, the fraction of the measured bf16 matmul ceiling, and
compile time separately. `--scaling` adds data-parallel runs over 1, 2, 4 ...
devices with the global batch fixed and scaled.

  # GPU, full size (about 5 minutes on an H100):
  python -m tools.benchmarks.benchmark_train --out runs/bench_train
  # Multi-step training (config.loss.unroll_steps, objective next), a row
  # per k = 1..4 for B1 (one H100, under 9 minutes):
  python -m tools.benchmarks.benchmark_train --levels= --torch= \
    --unroll b1 --out runs/bench_unroll
  # CPU smoke test:
  python -m tools.benchmarks.benchmark_train --small --out /tmp/bench_train
"""

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from egpt_align import (  # noqa: E402
  losses,
  metrics,
  models,
  optim,
  sharding,
  train_state,
)
from tools.lib.environment import environment  # noqa: E402

# Every architecture once (B1 is L5 trained on other data).
LEVELS = tuple(name for name in models.ADAPTERS if name != "b1")


def _optim_config():
  """The reference recipe's optimizer block, from the trainer's base config."""
  from egpt_align.configs import base

  return base.get_config().optim


def matmul_flops_per_step(params, tokens):
  """6 x (matmul parameters) x tokens: forward + both backward matmuls."""
  n = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    if leaf.ndim == 2 and "pos_embed" not in name:
      n += leaf.size
  return 6 * n * tokens


def attention_flops_per_step(name, batch, seq, hidden):
  """QK^T and PV: 4*B*S^2*D forward, x3 with the backward."""
  if name in ("l4", "l5", "b1", "l5f"):
    return 12 * batch * seq * seq * hidden
  return 0


def _time_windows(run, sync, steps, windows):
  """Median per-step seconds over `windows` windows of `steps` steps."""
  per_step = []
  for _ in range(windows):
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
      run()
    sync()
    per_step.append((time.perf_counter() - t0) / steps)
  return statistics.median(per_step), per_step


def measure_ceiling(n, dtype=jnp.bfloat16, iters=20):
  """Measured matmul ceiling (TFLOP/s) of an n^3 matmul in JAX."""
  key = jax.random.PRNGKey(0)
  a = jax.random.normal(key, (n, n), dtype)
  b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  out = [None]

  def run():
    out[0] = f(a, b)

  sec, _ = _time_windows(
    run, lambda: out[0] is not None and out[0].block_until_ready(), iters, 3
  )
  return 2 * n**3 / sec / 1e12


def make_batch(name, batch, seq, hidden, rng):
  """A full-length random batch (all positions valid) on the host."""
  src = rng.standard_normal((batch, seq, hidden), np.float32)
  tgt = rng.standard_normal((batch, seq, hidden), np.float32)
  return {
    "source": src,
    "target": tgt,
    "mask": np.ones((batch, seq), bool),
  }


@dataclasses.dataclass(frozen=True)
class Variant:
  """How a timed step differs from the trainer's (--compare); all off = it.

  The dropout PRNG, the bf16 kernel copies and the AdamW first-moment dtype
  are settings of the trainer's own step; a materialized prediction or the
  autodiff loss are this benchmark's own step (`variant_train_step`).
  """

  dropout_rng: str = "auto"  # config.dropout_rng_impl
  kernel_copies: bool = True  # bf16 copies in the state (else cast in step)
  mu_dtype: str | None = None  # config.optim.mu_dtype
  materialized_pred: bool = False  # an optimization barrier on the output
  autodiff_loss: bool = False  # the loss as plain jnp, differentiated by XLA

  @property
  def own_step(self) -> bool:
    return self.materialized_pred or self.autodiff_loss


# Alternative implementations timed by --compare (each an older path or an
# opt-in setting, timed against the trainer's default).
COMPARE = {
  "materialized_pred": Variant(materialized_pred=True),
  "autodiff_loss": Variant(autodiff_loss=True),
  "threefry_dropout": Variant(dropout_rng="threefry2x32"),
  "cast_kernels_in_step": Variant(kernel_copies=False),
  # Opt-in rather than an older path: config.optim.mu_dtype=bfloat16.
  "bf16_mu": Variant(mu_dtype="bfloat16"),
}
DEFAULT = Variant()


def autodiff_loss(pred_BSD, target_BSD, mask_BS, *, predicts_next):
  """The reference loss (default weights) in plain jnp, for XLA to
  differentiate: what `losses.adapter_loss`'s written-out gradient replaced."""

  def terms(p, t, mask):
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    sq = jnp.sum(jnp.square(p - t), axis=-1)
    mse = jnp.sum(sq * m) / (n * p.shape[-1])
    return mse, jnp.sum(metrics.cosine(p, t) * m) / n

  mse, cos = terms(pred_BSD, target_BSD, mask_BS)
  align = mse + 0.5 * (1.0 - cos)
  if not predicts_next:
    return align
  next_mse, _ = terms(pred_BSD[:, :-1], target_BSD[:, 1:], mask_BS[:, 1:])
  return 0.5 * align + 0.5 * next_mse


def variant_train_step(state, batch, rng, *, model, spec, tx, variant):
  """The trainer's step (one card) with the forward or the loss swapped."""
  rng = jax.random.fold_in(rng, state.step)
  target = batch["target"].astype(jnp.float32)

  def loss_fn(weights):
    pred = train_state.forward(
      model, spec, weights, batch, deterministic=False, rng=rng
    )
    if variant.materialized_pred:
      pred = jax.lax.optimization_barrier(pred)
    if variant.autodiff_loss:
      return autodiff_loss(
        pred, target, batch["mask"], predicts_next=spec.predicts_next
      )
    loss, _ = losses.adapter_loss(
      pred, target, batch["mask"], predicts_next=spec.predicts_next
    )
    return loss

  copies = state.compute_params
  weights = train_state.forward_params(state.params, copies)
  loss, grads = jax.value_and_grad(loss_fn)(weights)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if copies is not None:
    dtype = jax.tree.leaves(copies)[0].dtype
    copies = train_state.compute_params(params, dtype)
  new = state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    compute_params=copies,
  )
  return new, {"loss": loss}


def state_layout(state, mesh, *, shard_update, min_size, gather_at_end):
  """The trainer's layout; `gather_at_end` keeps the bf16 copies replicated
  (gathered when the step writes them instead of at its start)."""
  layout = train_state.state_shardings(
    state, mesh, shard_update=shard_update, min_size=min_size
  )
  if not gather_at_end:
    return layout
  rep = sharding.replicated(mesh)
  return layout.replace(
    compute_params=jax.tree.map(lambda _: rep, layout.compute_params)
  )


def build_jax_step(
  name,
  hidden,
  dtype,
  mesh,
  batch_example,
  ablation="full",
  shard_update=True,
  gather_at_end=False,
  variant=DEFAULT,
  unroll_steps=None,
):
  """Initial state and the jitted train step, as the trainer builds them.

  `unroll_steps` (an int) trains with the loss objective 'next' and that
  many unrolled steps (config.loss.unroll_steps); None keeps the base
  config's loss (the reference objective, one step).

  'full' is the trainer's own `train_state.train_step` (or, for a `variant`
  that swaps the forward or the loss, `variant_train_step`). The ablations
  see where the time goes: 'nodrop' (dropout off), 'grad' (forward +
  backward, no optimizer), 'fwd' (loss only), 'opt' (clip + AdamW on fixed
  gradients). The state is laid out as the trainer lays it out
  (`train_state.state_shardings`; `shard_update` is
  config.shard_weight_update).
  """
  from egpt_align.configs import base

  config = base.get_config()
  if variant.mu_dtype:
    config.optim.mu_dtype = variant.mu_dtype
  if unroll_steps is not None:
    config.loss.objective = "next"
    config.loss.unroll_steps = unroll_steps
  model = models.create_adapter(name, hidden_dim=hidden, dtype=dtype)
  spec = models.get_spec(name)
  tx, schedule = optim.create_optimizer(
    config.optim, steps_per_epoch=1000, num_epochs=config.num_epochs
  )
  inputs = models.adapter_inputs(name, batch_example)
  example = tuple(jnp.zeros(x.shape, jnp.float32) for x in inputs)
  state = jax.jit(
    lambda k: train_state.init_state(
      k, model=model, tx=tx, example_inputs=example
    )
  )(jax.random.PRNGKey(0))
  if variant.kernel_copies:  # As the trainer does for bf16 compute.
    state = train_state.with_compute_params(state, dtype)

  def loss_fn(params, batch, rng):
    pred = train_state.forward(
      model,
      spec,
      params,
      batch,
      deterministic=ablation == "nodrop",
      rng=rng,
    )
    return losses.adapter_loss(
      pred,
      batch["target"].astype(jnp.float32),
      batch["mask"],
      predicts_next=spec.predicts_next,
    )

  def ablated_step(state, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    params = state.params
    opt_state = state.opt_state
    if ablation == "fwd":
      loss, _ = loss_fn(params, batch, rng)
    elif ablation == "grad":
      (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch, rng
      )
      loss = loss + 0 * sum(jnp.sum(g) for g in jax.tree.leaves(grads))
    else:
      if ablation == "opt":
        loss = jnp.zeros(())
        grads = jax.tree.map(lambda p: p * 1e-3, params)
      else:  # nodrop
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, batch, rng
        )
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new, {"loss": loss}

  layout = state_layout(
    state,
    mesh,
    shard_update=shard_update,
    min_size=config.shard_min_size,
    gather_at_end=gather_at_end,
  )
  if ablation != "full":
    step_fn = ablated_step
  elif variant.own_step:
    step_fn = functools.partial(
      variant_train_step, model=model, spec=spec, tx=tx, variant=variant
    )
  else:
    step_fn = functools.partial(
      train_state.train_step,
      lm_weight=None,
      model=model,
      spec=spec,
      tx=tx,
      schedule=schedule,
      loss_config=config.loss,
      grad_shardings=layout.params if shard_update else None,
    )
  rep = sharding.replicated(mesh)
  bsh = sharding.batch_sharding(mesh)
  state = jax.device_put(state, layout)
  step = jax.jit(
    step_fn,
    in_shardings=(layout, bsh, rep),
    out_shardings=(layout, rep),
    donate_argnums=(0,),
  )
  return model, state, step


def collective_counts(hlo_text):
  """How many of each collective the compiled step runs."""
  import re

  kinds = ("all-reduce", "reduce-scatter", "all-gather")
  return {k: len(re.findall(rf" {k}(?:-start)?\(", hlo_text)) for k in kinds}


def bench_jax(
  name,
  batch,
  seq,
  hidden,
  dtype,
  devices,
  steps,
  windows,
  variant="full",
  shard_update=True,
  gather_at_end=False,
  unroll_steps=None,
):
  """Times our jitted step on `devices`; returns a result dict.

  `variant` is 'full' (the trainer's step), an ablation (fwd, grad, nodrop,
  opt) or a COMPARE name; `unroll_steps` as in `build_jax_step`.
  """
  impl = COMPARE.get(variant, DEFAULT)
  ablation = "full" if variant in COMPARE else variant
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  host = make_batch(name, batch, seq, hidden, np.random.default_rng(0))
  host = {
    k: v.astype(jnp.bfloat16) if v.dtype == np.float32 else v
    for k, v in host.items()
  }  # The input pipeline delivers states in the storage dtype (bf16).
  model, state, step = build_jax_step(
    name,
    hidden,
    dtype,
    mesh,
    host,
    ablation,
    shard_update,
    gather_at_end,
    impl,
    unroll_steps,
  )
  bsh = sharding.batch_sharding(mesh)
  dev_batch = jax.device_put(host, bsh)
  rng = train_state.dropout_key(jax.random.key(1), impl.dropout_rng)
  rng = jax.device_put(rng, sharding.replicated(mesh))
  t0 = time.perf_counter()
  compiled = step.lower(state, dev_batch, rng).compile()
  compile_s = time.perf_counter() - t0
  collectives = collective_counts(compiled.as_text())
  xla_flops = None
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
      cost = cost[0]
    xla_flops = float(cost.get("flops", 0.0)) or None
  except Exception:  # cost analysis is best effort
    pass
  holder = {"state": state, "metrics": None}

  def run():
    holder["state"], holder["metrics"] = compiled(
      holder["state"], dev_batch, rng
    )

  for _ in range(3):
    run()
  jax.block_until_ready(holder["state"])

  def sync():
    jax.block_until_ready(holder["state"])

  sec, windows_s = _time_windows(run, sync, steps, windows)
  params = holder["state"].params
  n_params = sum(x.size for x in jax.tree.leaves(params))
  tokens = batch * seq
  flops = matmul_flops_per_step(params, tokens) + attention_flops_per_step(
    name, batch, seq, hidden
  )
  # k unrolled forwards and backwards (attention over k streams of keys
  # is a small part at S = 50, not counted).
  flops *= unroll_steps or 1
  loss = float(holder["metrics"]["loss"])
  return {
    "impl": f"jax {jnp.dtype(dtype).name} compute"
    + ("" if variant == "full" else f" [{variant}]")
    + ("" if unroll_steps is None else f" [next, unroll k={unroll_steps}]"),
    "unroll_steps": unroll_steps,
    "level": name,
    "devices": len(devices),
    "batch": batch,
    "params": int(n_params),
    "ms": sec * 1e3,
    "windows_ms": [w * 1e3 for w in windows_s],
    "tokens_per_s": tokens / sec,
    "model_flops": flops,
    "xla_flops": xla_flops,
    "tflops": flops / sec / 1e12,
    "compile_s": compile_s,
    "final_loss": loss,
    "shard_update": bool(shard_update and len(devices) > 1),
    "collectives": collectives,
  }


def bench_torch(name, batch, seq, hidden, mode, steps, windows):
  """Times a torch twin: mode 'fp32' (reference) or 'compile' (bf16)."""
  import torch

  from tools.lib import backends as bk
  from tools.lib import twins

  dev = bk.torch_device()
  torch.manual_seed(0)
  model = twins.build_torch_adapter(name, hidden_dim=hidden).to(dev)
  model.train()
  spec = models.get_spec(name)
  rng = np.random.default_rng(0)
  host = make_batch(name, batch, seq, hidden, rng)
  src = torch.from_numpy(host["source"]).to(dev)
  tgt = torch.from_numpy(host["target"]).to(dev)
  mask = torch.ones(batch, seq, device=dev)
  fused = mode == "compile" and dev.type == "cuda"
  opt = torch.optim.AdamW(
    model.parameters(), lr=1e-3, weight_decay=0.01, fused=fused
  )

  def ref_loss(pred, target, m):
    mf = m.unsqueeze(-1)
    n = m.sum().clamp_min(1)
    mse = (((pred - target) ** 2) * mf).sum() / (n * pred.shape[-1])
    cos = torch.nn.functional.cosine_similarity(pred, target, dim=-1)
    align = mse + 0.5 * (1 - (cos * m).sum() / n)
    if not spec.predicts_next:
      return align
    mn = m[:, 1:].unsqueeze(-1)
    nmse = (((pred[:, :-1] - target[:, 1:]) ** 2) * mn).sum() / (
      mn.sum().clamp_min(1) * pred.shape[-1]
    )
    return 0.5 * align + 0.5 * nmse

  def fwd_loss(src, tgt, m):
    if name == "l5f":
      pred = model(src, tgt, m.bool())
    elif name == "b1":
      pred = model(tgt, m.bool())
    else:
      pred = model(src, m.bool())
    return ref_loss(pred.float(), tgt, m)

  if mode == "compile":
    compiled = torch.compile(fwd_loss)

    def loss_call():
      with torch.autocast(dev.type, dtype=torch.bfloat16):
        return compiled(src, tgt, mask)
  else:

    def loss_call():
      return fwd_loss(src, tgt, mask)

  def run():
    opt.zero_grad(set_to_none=True)
    loss = loss_call()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  def sync():
    if dev.type == "cuda":
      torch.cuda.synchronize()

  prev_tf32 = torch.backends.cuda.matmul.allow_tf32
  torch.backends.cuda.matmul.allow_tf32 = False  # reference: no TF32
  try:
    t0 = time.perf_counter()
    for _ in range(3):
      run()
    sync()
    warm_s = time.perf_counter() - t0
    sec, windows_s = _time_windows(run, sync, steps, windows)
  finally:
    torch.backends.cuda.matmul.allow_tf32 = prev_tf32
  n_params = sum(p.numel() for p in model.parameters())
  tokens = batch * seq
  run = loss_call = compiled = None  # noqa: F841  (free the graph)
  if dev.type == "cuda":
    torch.cuda.empty_cache()
  return {
    "impl": "torch fp32 eager (reference)"
    if mode == "fp32"
    else "torch bf16 autocast + compile + fused AdamW",
    "level": name,
    "devices": 1,
    "batch": batch,
    "params": int(n_params),
    "ms": sec * 1e3,
    "windows_ms": [w * 1e3 for w in windows_s],
    "tokens_per_s": tokens / sec,
    "warmup_s": warm_s,
  }


def bench_unroll(name, ks, args, dtype) -> list[dict]:
  """A row per k: the trainer's step with objective next, k unrolled steps.

  A k that fails (out of memory, say) is one `error:` line and a row with
  the error; the others still run. `vs_k1` is ms / (k = 1's ms).
  """
  rows = []
  base_ms = None
  for k in ks:
    try:
      r = bench_jax(
        name,
        args.batch,
        args.seq,
        args.hidden,
        dtype,
        jax.devices()[:1],
        args.steps,
        args.windows,
        unroll_steps=k,
      )
    except Exception as e:  # report, keep going
      line = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
      print(f"error: {name} unroll k={k}: {type(e).__name__}: {line[:300]}")
      r = {"level": name, "unroll_steps": k, "impl": "jax", "error": line}
    else:
      if k == 1:
        base_ms = r["ms"]
      if base_ms:
        r["vs_k1"] = r["ms"] / base_ms
      print(json.dumps(r), flush=True)
    rows.append(r)
  return rows


def profile_step(name, batch, seq, hidden, dtype, steps, out_dir):
  """Traces `steps` steps and prints the device kernels by total time."""
  import collections
  import glob

  from jax.profiler import ProfileData

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  host = make_batch(name, batch, seq, hidden, np.random.default_rng(0))
  host = {
    k: v.astype(jnp.bfloat16) if v.dtype == np.float32 else v
    for k, v in host.items()
  }
  _, state, step = build_jax_step(name, hidden, dtype, mesh, host)
  dev_batch = jax.device_put(host, sharding.batch_sharding(mesh))
  rng = train_state.dropout_key(jax.random.key(1), DEFAULT.dropout_rng)
  for _ in range(3):
    state, _ = step(state, dev_batch, rng)
  jax.block_until_ready(state)
  trace_dir = os.path.join(out_dir or "/tmp", f"trace_{name}")
  jax.profiler.start_trace(trace_dir)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, _ = step(state, dev_batch, rng)
  jax.block_until_ready(state)
  wall = (time.perf_counter() - t0) / steps
  jax.profiler.stop_trace()
  path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
  data = ProfileData.from_file(path)
  totals = collections.Counter()
  counts = collections.Counter()
  for plane in data.planes:
    if not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      print(f"#  plane {plane.name} line {line.name}")
      if "stream" not in line.name.lower() and "ops" not in line.name.lower():
        continue
      for ev in line.events:
        totals[ev.name] += ev.duration_ns
        counts[ev.name] += 1
  busy = sum(totals.values()) / steps / 1e6
  print(
    f"# profile {name}: wall {wall * 1e3:.2f} ms/step, kernels busy "
    f"{busy:.2f} ms/step, {sum(counts.values()) / steps:.0f} kernels/step"
  )
  for k, v in totals.most_common(30):
    print(f"#  {v / steps / 1e3:8.1f} us  x{counts[k] / steps:4.1f}  {k[:110]}")


def versions():
  out = environment(("jax", "flax", "optax", "torch"))
  out.update(
    device=str(jax.devices()[0].device_kind),
    backend=jax.default_backend(),
    num_devices=jax.device_count(),
  )
  return out


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--levels", default=",".join(LEVELS))
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seq", type=int, default=50)
  p.add_argument("--hidden", type=int, default=4096)
  p.add_argument("--dtype", default="bfloat16", help="JAX compute dtype")
  p.add_argument("--steps", type=int, default=20, help="steps per window")
  p.add_argument("--windows", type=int, default=5)
  p.add_argument(
    "--torch",
    default="fp32,compile",
    help="torch variants to run: fp32, compile (empty: none)",
  )
  p.add_argument(
    "--torch_levels",
    default="",
    help="levels to run the torch variants on (default: all --levels)",
  )
  p.add_argument(
    "--scaling",
    default="",
    help="levels for the multi-device scaling table (e.g. l4,l5f)",
  )
  p.add_argument(
    "--scaling_update",
    default="sharded,replicated",
    help="weight-update layouts for the scaling table: sharded (the "
    "trainer's default, config.shard_weight_update; bf16 kernel copies "
    "gathered at the step's start), sharded_gather_end (copies kept "
    "replicated, gathered when written) and/or replicated",
  )
  p.add_argument(
    "--ablate",
    default="",
    help="levels to time ablated steps for (fwd, grad, nodrop, opt)",
  )
  p.add_argument(
    "--profile", default="", help="levels to trace and list kernels for"
  )
  p.add_argument(
    "--variants",
    default="",
    help="the --compare implementations to time (default: all)",
  )
  p.add_argument(
    "--compare",
    default="",
    help="levels to also time with alternative implementations: "
    + ", ".join(COMPARE),
  )
  p.add_argument(
    "--unroll",
    default="",
    help="levels (b1, l5f) to time with the loss objective 'next' and "
    "config.loss.unroll_steps = each of --unroll_steps",
  )
  p.add_argument(
    "--unroll_steps", default="1,2,3,4", help="the k of the --unroll rows"
  )
  p.add_argument("--ceiling_n", type=int, default=8192)
  p.add_argument(
    "--prng",
    default=None,
    help="jax_default_prng_impl for dropout (threefry2x32, rbg, unsafe_rbg)",
  )
  p.add_argument("--small", action="store_true", help="CPU smoke test sizes")
  p.add_argument("--out", default=None, help="directory for results.json")
  args = p.parse_args(argv)
  if args.small:
    args.batch, args.seq, args.hidden = 8, 16, 64
    args.steps, args.windows, args.ceiling_n = 2, 2, 256
  if args.prng:
    jax.config.update("jax_default_prng_impl", args.prng)
  levels = [x for x in args.levels.split(",") if x]
  dtype = jnp.dtype(args.dtype)
  info = versions()
  info["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  print(f"# {info}", flush=True)
  ceiling = measure_ceiling(args.ceiling_n)
  info["bf16_matmul_ceiling_tflops"] = ceiling
  print(f"# bf16 {args.ceiling_n}^3 matmul ceiling: {ceiling:.0f} TFLOP/s")
  rows = []
  torch_modes = [m for m in args.torch.split(",") if m]

  def one_card(name, variant="full", *, with_ceiling=True):
    r = bench_jax(
      name,
      args.batch,
      args.seq,
      args.hidden,
      dtype,
      jax.devices()[:1],
      args.steps,
      args.windows,
      variant,
    )
    if with_ceiling:
      r["ceiling_frac"] = r["tflops"] / ceiling
    rows.append(r)
    print(json.dumps(r), flush=True)

  for name in levels:
    one_card(name)
    for mode in torch_modes:
      if args.torch_levels and name not in args.torch_levels.split(","):
        continue
      try:
        t = bench_torch(
          name, args.batch, args.seq, args.hidden, mode, args.steps, 3
        )
      except Exception as e:  # report, keep going
        t = {"impl": f"torch {mode}", "level": name, "error": repr(e)}
      rows.append(t)
      print(json.dumps(t), flush=True)
  for name in [x for x in args.ablate.split(",") if x]:
    for variant in ("fwd", "grad", "nodrop", "opt"):
      one_card(name, variant, with_ceiling=False)  # partial steps
  variants = [v for v in args.variants.split(",") if v] or list(COMPARE)
  unknown = set(variants) - set(COMPARE)
  if unknown:
    p.error(f"--variants: unknown {sorted(unknown)}; known: {list(COMPARE)}")
  for name in [x for x in args.compare.split(",") if x]:
    for variant in variants:
      one_card(name, variant)
  unroll_rows = []
  for name in [x for x in args.unroll.split(",") if x]:
    unroll_rows += bench_unroll(
      name, [int(k) for k in args.unroll_steps.split(",") if k], args, dtype
    )
  rows += unroll_rows
  for name in [x for x in args.profile.split(",") if x]:
    profile_step(
      name, args.batch, args.seq, args.hidden, dtype, args.steps, args.out
    )
  scaling = []
  n_dev = jax.device_count()
  # layout -> (shard_update, gather_at_end)
  modes = {
    "sharded": (True, False),
    "sharded_gather_end": (True, True),
    "replicated": (False, False),
  }
  update_modes = [m for m in args.scaling_update.split(",") if m]
  unknown = set(update_modes) - set(modes)
  if unknown:
    p.error(
      f"--scaling_update: unknown {sorted(unknown)}; known: {list(modes)}"
    )
  for name in [x for x in args.scaling.split(",") if x]:
    counts = [n for n in (1, 2, 4, 8) if n <= n_dev]
    for n in counts:
      for label, b in (("fixed", args.batch), ("scaled", args.batch * n)):
        if label == "scaled" and n == 1:
          continue
        for mode in update_modes if n > 1 else update_modes[:1]:
          r = bench_jax(
            name,
            b,
            args.seq,
            args.hidden,
            dtype,
            jax.devices()[:n],
            args.steps,
            args.windows,
            shard_update=modes[mode][0],
            gather_at_end=modes[mode][1],
          )
          r["batch_mode"] = label
          r["update"] = mode if n > 1 else "-"
          scaling.append(r)
          print(json.dumps(r), flush=True)
  # The table.
  print()
  print("| level | impl | ms/step | tokens/s | TFLOP/s | of ceiling |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['level']} | {r['impl']} | error: {r['error'][:60]} |||")
      continue
    tf = f"{r['tflops']:.0f}" if "tflops" in r else "-"
    frac = f"{r['ceiling_frac']:.0%}" if "ceiling_frac" in r else "-"
    print(
      f"| {r['level']} | {r['impl']} | {r['ms']:.2f} | "
      f"{r['tokens_per_s']:,.0f} | {tf} | {frac} |"
    )
  if unroll_rows:
    print()
    print("| level | k | ms/step | x k=1 | at most k x k=1 |")
    print("|---|---|---|---|---|")
    for r in unroll_rows:
      if "error" in r:
        print(f"| {r['level']} | {r['unroll_steps']} | error ||| ")
        continue
      ratio = r.get("vs_k1")
      print(
        f"| {r['level']} | {r['unroll_steps']} | {r['ms']:.2f} | "
        + ("-" if ratio is None else f"{ratio:.2f}")
        + " | "
        + ("-" if ratio is None else str(ratio <= r["unroll_steps"]))
        + " |"
      )
  if scaling:
    print()
    print(
      "| level | devices | weight update | batch | ms/step | tokens/s | "
      "speedup vs 1 | collectives (AR/RS/AG) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base = {r["level"]: r for r in scaling if r["devices"] == 1}
    for r in scaling:
      sp = r["tokens_per_s"] / base[r["level"]]["tokens_per_s"]
      c = r["collectives"]
      print(
        f"| {r['level']} | {r['devices']} | {r['update']} | {r['batch']} | "
        f"{r['ms']:.2f} | {r['tokens_per_s']:,.0f} | {sp:.2f}x | "
        f"{c['all-reduce']}/{c['reduce-scatter']}/{c['all-gather']} |"
      )
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmark_train.json"), "w") as f:
      json.dump({"info": info, "rows": rows, "scaling": scaling}, f, indent=1)
  return 0


if __name__ == "__main__":
  from egpt_align import cli

  sys.exit(cli.run(main))
