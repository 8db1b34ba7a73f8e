"""Static KV caches and captured steps: the fast path of the live SD runtime.

`StaticLM` decodes an HF Llama-family language model (LlamaForCausalLM,
Vicuna, the language model of VideoLlava, any plugin whose backend wraps
one) from preallocated KV buffers [layers, 1, kv_heads, max_len, head_dim]:

* the prompt is prefilled by the backend's own forward (media included) and
  its KV cache copied into the buffers (`load_prefix`);
* `step(ids, position)` feeds T tokens at absolute positions position..
  position+T-1: their K/V are written at those positions and every query
  attends to the cache positions <= its own. Rolling back to an accepted
  prefix is therefore only a smaller `position` at the next step: entries
  past a query's position are never read, and are overwritten before any
  later query can reach them.

`tree_step(ids, slots, positions, allowed)` is the general step of draft
trees (tools/lib/tree.py): K/V written at `slots`, rotary `positions`, each
query reading the cache slots `allowed` marks (the prefix and its
ancestors); `move_entries` then moves the accepted path's entries into
place. Tree steps are captured per length like the chain steps. A whole
draft tree is verified by `verify_tree(packed, start)`: the tree as one
buffer (tokens, parents, depths, runs, ancestors; tools/lib/tree.py), its
cache slots, rotary positions and mask made inside the captured graph.

`StepGraphs` captures one step function per input length T once
(`torch.cuda.CUDAGraph`) and replays it: a step costs one graph launch, no
Python per kernel. On CUDA the per-layer computation is also compiled with
`torch.compile` (fused elementwise kernels; one compilation per T serves
every layer of every model of that shape). Lengths without a graph, and CPU,
run the same function eagerly.

A decode adapter's steps use the same machinery: tools/lib/adapter_steps.py
(chains), tools/lib/tree_steps.py (draft trees).

A capture or compilation that fails falls back (with a warning) to graphs
of eager steps, then to eager steps; `mode` says which one runs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

# Lengths of the cache buffers are rounded up to this many positions, so a
# slightly longer prompt reuses the captured graphs.
LENGTH_QUANTUM = 256


class Unsupported(ValueError):
  """The model cannot run on the static path (the engine falls back)."""


def _round_up(n: int, q: int = LENGTH_QUANTUM) -> int:
  return -(-int(n) // q) * q


def hf_cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
  """(keys, values) [B, H, T, Dh] per layer of an HF cache, any version."""
  if hasattr(cache, "layers"):  # transformers >= 4.56 / 5.x
    return [(layer.keys, layer.values) for layer in cache.layers]
  if hasattr(cache, "key_cache"):
    return list(zip(cache.key_cache, cache.value_cache, strict=True))
  return [(k, v) for k, v in cache]  # legacy tuples


def text_model(decoder: torch.nn.Module) -> torch.nn.Module:
  """The Llama-family text model inside `decoder`, or raises Unsupported."""
  model = getattr(decoder, "language_model", None)
  if model is None:
    model = decoder
  for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
    if not hasattr(model, attr):
      raise Unsupported(
        f"{type(decoder).__name__} has no Llama-style `{attr}`; the static "
        "path needs embed_tokens, layers, norm and rotary_emb"
      )
  layer = model.layers[0]
  attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
  needs = [
    (attn, ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")),
    (mlp, ("gate_proj", "up_proj", "down_proj", "act_fn")),
    (layer, ("input_layernorm", "post_attention_layernorm")),
  ]
  for owner, names in needs:
    missing = [n for n in names if not hasattr(owner, n)]
    if owner is None or missing:
      raise Unsupported(
        f"{type(layer).__name__} is not a Llama decoder layer (missing "
        f"{missing or 'self_attn/mlp'})"
      )
  extra = [n for n in ("q_norm", "k_norm") if hasattr(attn, n)]
  if extra:
    raise Unsupported(f"attention with {extra} is not supported")
  config = getattr(model, "config", None)
  if getattr(config, "sliding_window", None):
    raise Unsupported("sliding-window attention is not supported")
  for norm in (layer.input_layernorm, model.norm):
    if not hasattr(norm, "variance_epsilon") or norm.weight is None:
      raise Unsupported(f"{type(norm).__name__} is not a Llama RMSNorm")
  return model


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float):
  # Exactly LlamaRMSNorm: float32 statistics, cast back, then the weight.
  xf = x.float()
  xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
  return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
  half = x.shape[-1] // 2
  return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _fuse_rows(linears: Sequence[torch.nn.Linear]) -> torch.Tensor:
  """One [sum(out), in] weight; the Linears are rebound to views of it.

  No copy stays behind: the HF modules keep working (the eager path) and
  read the same storage.
  """
  fused = torch.cat([m.weight.detach() for m in linears], dim=0)
  start = 0
  for m in linears:
    rows = m.weight.shape[0]
    m.weight.data = fused[start : start + rows]
    start += rows
  return fused


def _fused_bias(linears: Sequence[torch.nn.Linear]) -> torch.Tensor | None:
  biases = [m.bias for m in linears]
  if all(b is None for b in biases):
    return None
  return torch.cat(
    [
      b.detach() if b is not None else m.weight.new_zeros(m.weight.shape[0])
      for m, b in zip(linears, biases, strict=True)
    ]
  )


def _layer_step(x, pos, cos, sin, bias, k_cache, v_cache, weights, dims):
  """One Llama decoder layer on x [T, D] at positions `pos` [T].

  `bias` [T, M] is 0 where a query may read a cache position, else the
  dtype's minimum. Attention is written out as HF's eager attention
  (scores in the model dtype, softmax in float32), with the query heads of
  one KV head stacked, so compiled it is two GEMVs and one fused softmax.
  """
  ln1, wqkv, bqkv, wo, bo, ln2, wgu, wd, bd = weights
  heads, kv_heads, head_dim, scaling, eps, act = dims
  steps = x.shape[0]
  h = _rms_norm(x, ln1, eps)
  qkv = F.linear(h, wqkv, bqkv)
  q_size, kv_size = heads * head_dim, kv_heads * head_dim
  q = qkv[:, :q_size].view(steps, heads, head_dim).transpose(0, 1)
  k = qkv[:, q_size : q_size + kv_size].view(steps, kv_heads, head_dim)
  v = qkv[:, q_size + kv_size :].view(steps, kv_heads, head_dim)
  k = k.transpose(0, 1)
  q = q * cos + _rotate_half(q) * sin
  k = k * cos + _rotate_half(k) * sin
  k_cache.index_copy_(2, pos, k[None])
  v_cache.index_copy_(2, pos, v.transpose(0, 1)[None])
  groups = heads // kv_heads
  qg = q.reshape(kv_heads, groups * steps, head_dim)
  scores = torch.matmul(qg, k_cache[0].transpose(1, 2)) * scaling
  scores = scores.view(kv_heads, groups, steps, -1) + bias
  probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
  a = torch.matmul(probs.view(kv_heads, groups * steps, -1), v_cache[0])
  a = a.view(heads, steps, head_dim).transpose(0, 1).reshape(steps, q_size)
  x = x + F.linear(a, wo, bo)
  h = _rms_norm(x, ln2, eps)
  gu = F.linear(h, wgu)
  inter = gu.shape[-1] // 2
  return x + F.linear(act(gu[:, :inter]) * gu[:, inter:], wd, bd)


def _head_step(x, norm_weight, eps, lm_head, vocab):
  """Final RMSNorm, LM head and greedy token (over the first `vocab` ids)."""
  h = _rms_norm(x, norm_weight, eps)
  logits = F.linear(h, lm_head)
  if vocab is not None and logits.shape[-1] > vocab:
    logits = logits[:, :vocab]
  return h, logits.argmax(-1)


def capture_steps(owner, lengths, compile_layers: bool) -> StepGraphs:
  """StepGraphs of owner._forward, trying the fastest mode first.

  Modes: 'graphs+compile' (CUDA graphs of compiled layers), 'graphs',
  'eager' (no graphs, e.g. on CPU). A mode that fails to compile or capture
  falls back to the next with a warning; `owner.mode` records the result.
  """
  modes = []
  if torch.device(owner.device).type == "cuda":
    if compile_layers:
      modes.append("graphs+compile")
    modes.append("graphs")
  modes.append("eager")
  for mode in modes:
    owner._set_compiled(mode == "graphs+compile")
    try:
      graphs = StepGraphs(
        owner._forward,
        owner._example,
        () if mode == "eager" else lengths,
        owner.device,
      )
    except Exception as e:  # noqa: BLE001 - any failure: the next mode
      if mode == "eager":
        raise
      warnings.warn(
        f"{type(owner).__name__}: {mode} failed ({type(e).__name__}: {e}); "
        "falling back",
        stacklevel=3,
      )
      continue
    owner.mode = mode
    return graphs
  raise AssertionError("unreachable")


class StepGraphs:
  """One CUDA graph per input length T of `fn(*inputs) -> outputs`.

  `fn` reads only its static inputs and module state; each call copies the
  given inputs into the static buffers, replays, and returns clones of the
  outputs (so a later replay cannot overwrite what the caller holds), a
  tensor or a tuple as `fn` returns them.
  `example(T)` returns example inputs of length T; capturing runs `fn` on
  them, so their values must be harmless (e.g. positions past any length
  in use). Lengths not captured run `fn` eagerly on the caller's inputs.
  """

  def __init__(
    self,
    fn: Callable,
    example: Callable[[int], tuple],
    lengths: Iterable[int],
    device: torch.device,
  ):
    self.fn, self.example = fn, example
    self.device = torch.device(device)
    self.graphs: dict[int, tuple] = {}
    if torch.device(device).type != "cuda":
      return
    pool = torch.cuda.graph_pool_handle()
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    for steps in sorted(set(lengths)):
      static = example(steps)
      with torch.cuda.stream(side):
        for _ in range(2):  # compile, autotune and allocate outside capture
          fn(*static)
      torch.cuda.current_stream(device).wait_stream(side)
      graph = torch.cuda.CUDAGraph()
      with torch.cuda.graph(graph, pool=pool, stream=side):
        out = fn(*static)
      self.graphs[steps] = (graph, static, out)
    torch.cuda.current_stream(device).wait_stream(side)

  def extend(self, lengths: Iterable[int]) -> None:
    """Captures the lengths not captured yet (into a pool of their own)."""
    todo = set(lengths) - set(self.graphs)
    if todo:
      more = StepGraphs(self.fn, self.example, todo, self.device)
      self.graphs.update(more.graphs)

  def __contains__(self, steps: int) -> bool:
    """Whether length `steps` is captured (else it runs eagerly)."""
    return steps in self.graphs

  def __call__(self, steps: int, *inputs):
    """Runs length `steps`; an int input fills a one-element long tensor."""
    entry = self.graphs.get(steps)
    if entry is None:
      return self.fn(
        *(
          torch.full((1,), x, device=self.device) if isinstance(x, int) else x
          for x in inputs
        )
      )
    graph, static, out = entry
    for dst, src in zip(static, inputs, strict=True):
      if isinstance(src, int):
        dst.fill_(src)
      elif dst.data_ptr() != src.data_ptr():
        dst.copy_(src)
    graph.replay()
    if isinstance(out, torch.Tensor):
      return out.clone()
    return tuple(t.clone() for t in out)


def cuda_compile(fn: Callable, device, enabled: bool) -> Callable:
  if not enabled or torch.device(device).type != "cuda":
    return fn
  import torch._dynamo.config as dynamo_config

  # One compilation per input length T; every layer shares it.
  for name in ("recompile_limit", "cache_size_limit"):
    if hasattr(dynamo_config, name):
      setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
  return torch.compile(fn, dynamic=False, fullgraph=True)


class StaticLM:
  """Greedy steps of a Llama-family LM over static KV buffers (see module)."""

  def __init__(
    self,
    decoder: torch.nn.Module,
    lm_head: torch.Tensor,
    max_len: int,
    *,
    vocab: int | None = None,
    lengths: Iterable[int] = (),
    compile_layers: bool = True,
  ):
    model = text_model(decoder)
    self.model = model
    layers = model.layers
    attn0 = layers[0].self_attn
    head_dim = int(attn0.head_dim)
    heads = attn0.q_proj.weight.shape[0] // head_dim
    kv_heads = attn0.k_proj.weight.shape[0] // head_dim
    # One activation object and eps for all layers: the compiled layer
    # guards on them, so every layer reuses one compilation.
    act = layers[0].mlp.act_fn
    if type(act).__name__ in ("SiLU", "SiLUActivation"):
      act = F.silu  # the same object for every model: one compilation
    eps = float(layers[0].input_layernorm.variance_epsilon)
    self.dims = (heads, kv_heads, head_dim, float(attn0.scaling), eps, act)
    self.max_len = int(max_len)
    self.vocab = vocab
    emb = model.embed_tokens.weight
    self.device, self.dtype = emb.device, emb.dtype
    self.embed = emb.detach()
    self.lm_head = lm_head.detach()
    self.norm = (model.norm.weight.detach(), model.norm.variance_epsilon)
    self.weights = []
    for layer in layers:
      a, m = layer.self_attn, layer.mlp
      qkv = (a.q_proj, a.k_proj, a.v_proj)
      self.weights.append(
        (
          layer.input_layernorm.weight.detach(),
          _fuse_rows(qkv),
          _fused_bias(qkv),
          a.o_proj.weight.detach(),
          None if a.o_proj.bias is None else a.o_proj.bias.detach(),
          layer.post_attention_layernorm.weight.detach(),
          _fuse_rows((m.gate_proj, m.up_proj)),
          m.down_proj.weight.detach(),
          None if m.down_proj.bias is None else m.down_proj.bias.detach(),
        )
      )
      if m.gate_proj.bias is not None or m.up_proj.bias is not None:
        raise Unsupported("MLP biases on gate/up are not supported")
      if type(m.act_fn) is not type(layers[0].mlp.act_fn) or (
        layer.input_layernorm.variance_epsilon != eps
      ):
        raise Unsupported("layers differ in activation or RMSNorm eps")
    shape = (len(layers), 1, kv_heads, self.max_len, head_dim)
    self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
    self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
    positions = torch.arange(self.max_len, device=self.device)
    cos, sin = model.rotary_emb(self.k[0, 0, 0], positions[None])
    self.cos, self.sin = cos[0], sin[0]  # [max_len, Dh], model dtype
    self.positions = positions
    self._layer, self._head = _layer_step, _head_step
    self.graphs = capture_steps(self, lengths, compile_layers)
    self.tree_graphs = None  # `capture_tree`
    self.verify_graphs = None  # `capture_verify`

  def _set_compiled(self, compiled: bool) -> None:
    self._layer = cuda_compile(_layer_step, self.device, compiled)
    self._head = cuda_compile(_head_step, self.device, compiled)

  def _example(self, steps: int) -> tuple:
    ids = torch.zeros((1, steps), dtype=torch.long, device=self.device)
    # Positions at the end of the buffers: past any prefix in use.
    start = torch.full((1,), self.max_len - steps, device=self.device)
    return ids, start

  @torch.inference_mode()
  def _forward(self, ids: torch.Tensor, start: torch.Tensor):
    steps = ids.shape[1]
    pos = start + self.positions[:steps]
    # Query i sees the cache positions <= pos[i]: the accepted prefix and
    # the new tokens before it, never stale entries past it.
    allowed = self.positions[None, :] <= pos[:, None]
    return self._tree_forward(ids, pos, pos, allowed)

  @torch.inference_mode()
  def _tree_forward(self, ids, slots, pos, allowed):
    """K/V written at `slots`, rotary `pos`, `allowed` [T, max_len] bool."""
    bias = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
    bias = bias.masked_fill(~allowed, torch.finfo(self.dtype).min)
    cos, sin = self.cos[pos][None], self.sin[pos][None]
    x = F.embedding(ids[0], self.embed)
    for i, weights in enumerate(self.weights):
      x = self._layer(
        x, slots, cos, sin, bias, self.k[i], self.v[i], weights, self.dims
      )
    return self._head(x, *self.norm, self.lm_head, self.vocab)

  def _tree_example(self, steps: int) -> tuple:
    ids, start = self._example(steps)
    slots = start + self.positions[:steps]
    return ids, slots, slots.clone(), self.positions[None] <= slots[:, None]

  def _extend(self, name: str, fn, example, lengths) -> StepGraphs:
    """The StepGraphs kept as `name`, made on first use (so it steps the
    `fn` of that moment) and extended by `lengths`: graphs (of compiled
    layers, if those are compiled) on CUDA as the chain steps, eager on
    CPU."""
    graphs = getattr(self, name)
    if graphs is None:
      graphs = StepGraphs(fn, example, (), self.device)
      setattr(self, name, graphs)
    if self.mode != "eager":
      graphs.extend(lengths)
    return graphs

  def capture_tree(self, lengths: Iterable[int]) -> None:
    """Captures `tree_step` for input lengths not captured yet."""
    self._extend("tree_graphs", self._tree_forward, self._tree_example, lengths)

  @torch.inference_mode()
  def _verify_forward(self, packed, start):
    """The tree in `packed` ([tokens, parents, depths, runs] [4, T] then
    ancestors [T, T], long) at slots start..start+T-1, positions start +
    depth; node i reads the prefix [0, start) and its ancestors' slots."""
    size = math.isqrt(4 + packed.shape[0]) - 2
    ids = packed[:size][None]
    pos = start + packed[2 * size : 3 * size]
    slots = start + self.positions[:size]
    anc = packed[4 * size :].view(size, size) != 0
    rel = self.positions[None] - start  # [1, max_len]: slot - start
    cols = anc.gather(1, rel.clamp(0, size - 1).expand(size, -1))
    allowed = (rel < 0) | (cols & (rel < size))
    return self._tree_forward(ids, slots, pos, allowed)

  def _verify_example(self, size: int) -> tuple:
    packed = torch.zeros(
      4 * size + size * size, dtype=torch.long, device=self.device
    )
    return packed, torch.full((1,), self.max_len - size, device=self.device)

  def capture_verify(self, sizes: Iterable[int]) -> None:
    """Captures `verify_tree` for tree sizes not captured yet."""
    self._extend(
      "verify_graphs", self._verify_forward, self._verify_example, sizes
    )

  def verify_tree(self, packed: torch.Tensor, start: int, size: int):
    """Feeds a draft tree of `size` nodes (`packed` as `_verify_forward`)
    at cache slots start..; returns (hidden [T, D], argmax [T])."""
    if start + size > self.max_len:
      raise ValueError(
        f"tree slots up to {start + size} exceed max_len {self.max_len}"
      )
    self.capture_verify(())
    return self.verify_graphs(size, packed, int(start))

  def tree_step(self, ids, slots, positions, allowed):
    """Feeds ids [1, T] into cache `slots` [T] at rotary `positions` [T].

    Query i reads the cache slots where `allowed[i]` ([T, max_len] bool) is
    set: a draft tree's node reads the prefix and its ancestors (its own
    slot included). Returns (hidden [T, D], argmax [T]).
    """
    self.capture_tree(())
    return self.tree_graphs(ids.shape[1], ids, slots, positions, allowed)

  def move_entries(self, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copies the K/V entries at cache slots `src` to slots `dst`."""
    move_slots((self.k, self.v), src, dst)

  def load_prefix(self, cache, length: int) -> None:
    """Copies the first `length` positions of an HF cache into the buffers."""
    if length > self.max_len:
      raise ValueError(f"prefix {length} exceeds max_len {self.max_len}")
    layers = hf_cache_layers(cache)
    if len(layers) != self.k.shape[0]:
      raise ValueError(
        f"cache has {len(layers)} layers, the model {self.k.shape[0]}"
      )
    for i, (k, v) in enumerate(layers):
      self.k[i, :, :, :length] = k[:, :, :length]
      self.v[i, :, :, :length] = v[:, :, :length]

  def step(self, ids: torch.Tensor, position: int):
    """Feeds ids [1, T] at position..; returns (hidden [T, D], argmax [T])."""
    steps = ids.shape[1]
    if position + steps > self.max_len:
      raise ValueError(
        f"positions up to {position + steps} exceed max_len {self.max_len}"
      )
    return self.graphs(steps, ids.to(self.device), int(position))


def move_slots(buffers, src: torch.Tensor, dst: torch.Tensor) -> None:
  """Copies entries src -> dst along dim 3 of [L, 1, H, M, Dh] buffers.

  The source entries are gathered before any is written, so the two index
  sets may overlap.
  """
  for buf in buffers:
    buf[:, :, :, dst] = buf[:, :, :, src]


def static_length(needed: int) -> int:
  """Buffer length for `needed` positions (rounded up, see LENGTH_QUANTUM)."""
  return _round_up(needed)
