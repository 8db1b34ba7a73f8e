"""A decode adapter's steps for draft trees, on static buffers.

`TreeAdapter` runs an adapter (L5, B1, L5F twin with `static_step`) on
any slots, positions and attention mask of its static KV cache, with the
target's LM head's top-k log-probs out: the catch-up on true inputs, a
depth's run on a tree frontier, and for B1 (which reads no tokens) its
catch-up and chain of runs with the tree grown from them in one CUDA
graph (`tr.grow_shared`). `tree_adapter` builds one per adapter and size and
keeps it with the run's models. The proposer and the decode loop that use
it: tools/lib/tree_decode.py.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from tools.lib import static_kv
from tools.lib import tree as tr
from tools.lib.adapter_steps import AdapterBuffers


class TreeAdapter(AdapterBuffers):
  """A decode adapter's tree steps on static buffers, top-k log-probs out.

  `step(inputs, slots, positions, allowed)` decodes [1, T, D] inputs into
  cache `slots` at table `positions`, each query reading the slots set in
  `allowed` [T, max_len]; returns (outputs [T, D], log-probs [T, K],
  tokens [T, K]) of the target's LM head (the first `vocab` ids). On CUDA
  every length in `lengths` is a captured graph; lengths 1 and K (the
  catch-up after a full accept and a depth's run) are compiled. For an
  adapter that reads no tokens (B1), `draft_tree` makes the catch-up, its
  runs (`tree_runs`: their counts, a tree's depth - 1) and grows the tree
  from them; `nodes` is the trees' node budget.
  """

  def __init__(
    self,
    module: torch.nn.Module,
    lm_head: torch.Tensor,
    num_inputs: int,
    max_len: int,
    *,
    topk: int,
    vocab: int | None,
    device: torch.device,
    dtype: torch.dtype,
    lengths=(),
    tree_runs=(),
    nodes: int = 0,
    compile_step: bool = True,
  ):
    super().__init__(module, lm_head, num_inputs, max_len, device, dtype)
    self.topk, self.vocab, self.nodes = topk, vocab, nodes
    self.graphs = static_kv.capture_steps(self, lengths, compile_step)
    # Catch-up runs (true inputs at positions start..), slots, positions
    # and causal mask made in-graph.
    self.catchups = static_kv.StepGraphs(
      self._catch_up,
      self._catch_up_example,
      lengths if self.mode != "eager" else (),
      self.device,
    )
    # B1's runs (one row each: it reads no tokens) and its tree. The
    # deepest tree (depth - 1 = the largest of `tree_runs`) with the
    # catch-up before it: one graph per catch-up length (1 .. depth + 1
    # accepted tokens), its growth compiled (~90 small kernels eager),
    # eager if compiling fails. A shallower tree (the last tokens of a
    # budget): one graph per depth - 1, after the catch-up's own.
    self._grown = max(tree_runs, default=0) if num_inputs == 1 else 0
    runs = tree_runs if self.mode != "eager" and self._grown else ()
    self.trees = static_kv.StepGraphs(
      self._grow_tree,
      self._tree_example,
      [c for c in runs if c < self._grown],
      self.device,
    )
    self._grow = static_kv.cuda_compile(
      tr.grow_shared, self.device, compile_step and bool(runs)
    )
    catch_ups = range(1, self._grown + 3) if runs else ()
    try:
      self.drafts = static_kv.StepGraphs(
        self._draft_tree, self._draft_example, catch_ups, self.device
      )
    except Exception as e:  # noqa: BLE001 - any failure: eager growth
      if self._grow is tr.grow_shared:
        raise
      warnings.warn(
        f"TreeAdapter: compiled tree growth failed ({type(e).__name__}: "
        f"{e}); growing eagerly",
        stacklevel=2,
      )
      self._grow = tr.grow_shared
      self.drafts = static_kv.StepGraphs(
        self._draft_tree, self._draft_example, catch_ups, self.device
      )

  def _example(self, steps: int) -> tuple:
    x = self.zeros(steps)
    slots = self.max_len - steps + self.keys[:steps]
    allowed = self.keys[None] <= slots[:, None]
    return (slots, slots.clone(), allowed) + tuple(
      x.clone() for _ in range(self.num_inputs)
    )

  @torch.inference_mode()
  def _forward(self, slots, positions, allowed, *inputs):
    if self._compiled is not None and inputs[0].shape[1] in (1, self.topk):
      return self._compiled(slots, positions, allowed, *inputs)
    return self._step(slots, positions, allowed, *inputs)

  def _step(self, slots, positions, allowed, *inputs):
    y = self.module.static_step(
      *inputs,
      k_cache=self.k,
      v_cache=self.v,
      positions=positions,
      slots=slots,
      mask=allowed,
    )[0]
    logits = F.linear(y.to(self.lm_head.dtype), self.lm_head)
    if self.vocab is not None:
      logits = logits[:, : self.vocab]
    logp = torch.log_softmax(logits.float(), dim=-1).clamp(max=0.0)
    top = logp.topk(self.topk, dim=-1)
    return y, top.values, top.indices

  def step(self, inputs, slots, positions, allowed):
    return self.graphs(inputs[0].shape[1], slots, positions, allowed, *inputs)

  def _catch_up_example(self, steps: int) -> tuple:
    start = torch.full((1,), self.max_len - steps, device=self.device)
    return (start,) + self._example(steps)[3:]

  @torch.inference_mode()
  def _catch_up(self, start, *inputs):
    # Slots and positions as two tensors: the compiled step is traced on
    # unaliased ones (`_example`), and an aliased pair would recompile it.
    keys = self.keys[: inputs[0].shape[1]]
    slots, pos = start + keys, start + keys
    return self._forward(slots, pos, self.keys[None] <= pos[:, None], *inputs)

  def catch_up(self, inputs, start: int):
    """`step` on [1, T, D] inputs at slots = positions start..start+T-1,
    each reading the slots up to its own."""
    return self.catchups(inputs[0].shape[1], int(start), *inputs)

  def _tree_example(self, count: int) -> tuple:
    x = self.zeros(1)
    root = torch.zeros(1, dtype=torch.long, device=self.device)
    vals = torch.zeros(self.topk, device=self.device)
    toks = torch.zeros(self.topk, dtype=torch.long, device=self.device)
    return (self.max_len - count + self.keys[:count], x, root, vals, toks)

  @torch.inference_mode()
  def _chain(self, positions, y):
    """One causal step per position, each fed the previous step's output."""
    vals, toks = [], []
    for r in range(positions.shape[0]):
      pos = positions[r : r + 1]
      y, v, t = self._forward(pos, pos, self.keys[None] <= pos[:, None], y)
      y = y.reshape(1, 1, -1)
      vals.append(v)
      toks.append(t)
    return torch.cat(vals), torch.cat(toks)

  @torch.inference_mode()
  def _grow_tree(self, positions, y, root, vals, toks):
    count = positions.shape[0]
    grow = self._grow if count == self._grown else tr.grow_shared
    return grow(
      root,
      (vals, toks),
      self._chain(positions, y),
      topk=self.topk,
      nodes=tr.tree_size(count + 1, self.topk, self.nodes),
    )

  def grow_tree(self, y, start: int, count: int, root, first) -> tr.Tree:
    """B1's tree of depth count + 1: `count` one-row runs at positions
    start.., the first fed y [1, D] (`_chain`), and `tr.grow_shared` on
    them (root [1] the last accepted token, `first` the depth-1
    candidates); one graph on CUDA, the tree on the device."""
    packed = self.trees(
      count,
      self.keys[start : start + count],
      y.reshape(1, 1, -1),
      root.reshape(1),
      *first,
    )
    size = tr.tree_size(count + 1, self.topk, self.nodes)
    return tr.from_packed(packed, size, count + 1)

  def _draft_example(self, steps: int) -> tuple:
    start = self.max_len - steps - self._grown
    return (
      torch.full((1,), start, device=self.device),
      torch.zeros(1, dtype=torch.long, device=self.device),
    ) + self._example(steps)[3:]

  @torch.inference_mode()
  def _draft_tree(self, start, root, *inputs):
    y, vals, toks = self._catch_up(start, *inputs)
    positions = start + inputs[0].shape[1] + self.keys[: self._grown]
    return self._grow_tree(
      positions, y[-1:].reshape(1, 1, -1), root, vals[-1], toks[-1]
    )

  def draft_tree(self, inputs, start: int, count: int, root) -> tr.Tree:
    """`catch_up(inputs, start)` then `grow_tree` on its last output:
    B1's tree of depth count + 1 after the T = inputs' length true inputs
    at positions start..; one graph on CUDA for the deepest tree."""
    steps = inputs[0].shape[1]
    if start + steps + count > self.max_len:
      raise ValueError(
        f"adapter positions up to {start + steps + count} exceed {self.max_len}"
      )
    if count != self._grown:
      y, vals, toks = self.catch_up(inputs, start)
      return self.grow_tree(
        y[-1:], start + steps, count, root, (vals[-1], toks[-1])
      )
    packed = self.drafts(steps, int(start), root.reshape(1), *inputs)
    return tr.from_packed(
      packed, tr.tree_size(count + 1, self.topk, self.nodes), count + 1
    )

  def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copies the K/V entries at slots `src` to slots `dst`."""
    static_kv.move_slots((self.k, self.v), src, dst)


def tree_adapter(models, adapter, cfg, vocab, fast: bool) -> TreeAdapter:
  """The adapter's TreeAdapter, built once per size (kept by `models`)."""
  module = adapter.module
  if not callable(getattr(module, "static_step", None)):
    raise ValueError(
      f"adapter {adapter.name!r}: draft trees need the module's "
      "static_step (the L5 / B1 / L5F twins have it)"
    )
  o = cfg.options  # the tree options (tools/lib/sd_methods.py)
  width = o["tree_topk"] if "source" in adapter.spec.inputs else 1
  need = cfg.max_new_tokens + 2 + (o["tree_depth"] - 1) * width
  cap = getattr(module, "max_seq_len", need)
  if need > cap:
    raise ValueError(
      f"adapter {adapter.name!r}: a tree needs {need} adapter positions "
      f"(max_new_tokens + 2 + (tree_depth - 1) * {width}), its table has "
      f"{cap}; lower --max_new_tokens, --tree_depth or --tree_topk"
    )
  key = (
    "tree_adapter",
    adapter.name,
    vocab,
    o["tree_topk"],
    o["tree_nodes"],
    fast,
  )
  ta = models._static.get(key)
  if ta is not None and ta.max_len >= need:
    return ta
  models._static.pop(key, None)
  steps = max(o["tree_depth"], cfg.k_prefill) + 2
  ta = TreeAdapter(
    module,
    models.head_on(adapter.device),
    len(adapter.spec.inputs),
    min(static_kv.static_length(need), cap),
    topk=o["tree_topk"],
    vocab=vocab,
    device=adapter.device,
    dtype=adapter.dtype,
    lengths=set(range(1, steps + 1)) | {o["tree_topk"]} if fast else (),
    tree_runs=range(1, o["tree_depth"]) if fast else (),
    nodes=o["tree_nodes"],
    compile_step=models.compile_layers and fast,
  )
  models._static[key] = ta
  models.fast_notes[f"tree_adapter:{adapter.name}"] = f"static ({ta.mode})"
  return ta
