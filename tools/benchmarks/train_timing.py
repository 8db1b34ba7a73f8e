"""Timing the train-step benchmark's steps (`benchmark_train`).

Our jitted steps (`bench_jax`, a row per unrolled k in `bench_unroll`, a
kernel profile in `profile_step`) and the torch twins (`bench_torch`), each
the median of timing windows (`time_windows`), with the matmul FLOPs a step
does, the measured bf16 matmul ceiling (`measure_ceiling`) and the
collectives the compiled step runs.
"""

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from egpt_align import models, sharding, train_state
from tools.benchmarks.train_steps import (
  COMPARE,
  DEFAULT,
  build_jax_step,
  make_batch,
)
from tools.lib.environment import environment


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
  if "num_heads" in models.adapter_fields(name):
    return 12 * batch * seq * seq * hidden
  return 0


def time_windows(run, sync, steps, windows):
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

  sec, _ = time_windows(
    run, lambda: out[0] is not None and out[0].block_until_ready(), iters, 3
  )
  return 2 * n**3 / sec / 1e12


def bf16_batch(name, batch, seq, hidden):
  """`make_batch` (seed 0) with its states in bf16: what the input pipeline
  delivers (states in their storage dtype)."""
  host = make_batch(name, batch, seq, hidden, np.random.default_rng(0))
  return {
    k: v.astype(jnp.bfloat16) if v.dtype == np.float32 else v
    for k, v in host.items()
  }


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
  host = bf16_batch(name, batch, seq, hidden)
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

  sec, windows_s = time_windows(run, sync, steps, windows)
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
    streams = {"source": src, "target": tgt}
    pred = model(*(streams[k] for k in spec.inputs), m.bool())
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
    sec, windows_s = time_windows(run, sync, steps, windows)
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


def bench_unroll(
  name, ks, batch, seq, hidden, dtype, steps, windows
) -> list[dict]:
  """A row per k: the trainer's step with objective next, k unrolled steps
  (on one device; the other arguments as `bench_jax` takes them).

  A k that fails (out of memory, say) is one `error:` line and a row with
  the error; the others still run. `vs_k1` is ms / (k = 1's ms).
  """
  rows = []
  base_ms = None
  for k in ks:
    try:
      r = bench_jax(
        name,
        batch,
        seq,
        hidden,
        dtype,
        jax.devices()[:1],
        steps,
        windows,
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
  host = bf16_batch(name, batch, seq, hidden)
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
