"""Draft-tree speculative decoding for the decode adapters (L5, B1, L5F).

`tree:A` grows an EAGLE-2 dynamic tree (tools/lib/tree.py) with the decode
adapter A every iteration, verifies all its nodes in one target forward (a
tree attention mask and tree position ids over the target's KV cache) and
keeps the longest accepted path; `two_phase_tree:P+A` verifies the prefill
drafts of P first (a chain), then grows trees with A. Lossless: the tokens
are the target's greedy tokens.

What each model is fed in one iteration with n accepted tokens (h[t] and
h_d[t] as in tools/lib/sd_engine.py; token n-1, the root, is not yet fed):

* adapter, catch-up: positions fed..n-1 with true inputs (causal); its
  output at n-1 gives the depth-1 candidates.
* drafter (L5, L5F): catch-up to token n-2, then the root token (state
  h_d[n]); then, for each depth d = 1 .. depth-2, the k frontier tokens of
  depth d in one forward, each reading the prefix and its ancestors.
* adapter runs: the root run at position n (inputs h_d[n] / its own output
  at n-1), then one run per depth d = 1 .. depth-2 at position n + d on the
  frontier (h_d of the node / the parent run's output). A run on a node
  gives its children's children: these adapters predict the state one
  token late. B1 reads no tokens, so its runs are one row per depth,
  made as one causal chain; its tree is grown from them on the device
  (`tr.grow_shared`), chain and growth one CUDA graph, and the loop reads
  the tree back with the target's greedy tokens (one sync an iteration).
* target: root + tree nodes, slots P..P+T-1, positions P + depth.

After the verification every cache keeps exactly the accepted path's
entries, moved to the slots a token-by-token decode of the path would have
filled: the target all of them; the drafter the root and the path nodes it
was fed; the adapter its true positions (< n for B1 / L5F, whose inputs
beyond n are its own predictions; for L5 the root and path runs, up to
position n + accepted - 1, like the chain).

Span names: target_verify_tree[T], draft_decode_tree (one per depth),
tree_adapter:NAME (every adapter call: the catch-up, each run, B1's chain
of runs; kept apart from the chains' adapter:NAME steps, whose cost the
report gives), and the chain ones of sd_engine.
"""

from __future__ import annotations

import torch

from tools.lib import tree as tr
from tools.lib.tree_steps import TreeAdapter, tree_adapter

METHOD_KINDS = ("tree", "two_phase_tree")


def extra_positions(cfg) -> int:
  """Cache positions a tree iteration may use beyond the accepted tokens."""
  o = cfg.options  # the tree options (tools/lib/sd_methods.py)
  return max(o["tree_nodes"], (o["tree_depth"] - 1) * o["tree_topk"] + 1)


def _rows_with(vis: torch.Tensor, rows, slots) -> torch.Tensor:
  """vis[rows] with each row's own slot set (a node reads itself)."""
  allowed = vis[rows].clone()
  allowed[torch.arange(slots.shape[0], device=slots.device), slots] = True
  return allowed


class TreeProposer:
  """tree:ADAPTER: grows one draft tree per iteration (module docstring)."""

  def __init__(self, adapter, target, drafter, steps: TreeAdapter, timer, cfg):
    self.a, self.t, self.d = adapter, target, drafter
    self.steps = steps
    self.timer = timer
    self.inputs = adapter.spec.inputs
    self.src = "source" in self.inputs
    if self.src and drafter is None:
      raise ValueError(f"adapter {adapter.name!r} needs a drafter (--draft)")
    self.depth, self.topk, self.nodes = (
      cfg.options["tree_depth"],
      cfg.options["tree_topk"],
      cfg.options["tree_nodes"],
    )
    self.width = self.topk if self.src else 1
    self.fed = 0  # leading adapter positions fed with true inputs
    self.hbuf = None  # drafter states of the runs [depth, width, D]
    if self.src and drafter.lm is not None:
      drafter.lm.capture_tree([self.topk])

  @classmethod
  def create(cls, ctx) -> TreeProposer:
    """The proposer of one run (a `DraftContext`; tools/lib/sd_proposers.py)
    with the method's last (decode) adapter and the run's SDConfig."""
    cfg, ad = ctx.config, ctx.adapters[-1]
    o = cfg.options  # the tree options (tools/lib/sd_methods.py)
    src = "source" in ad.spec.inputs
    vocab = ctx.drafter.vocab if src else None
    steps = tree_adapter(ctx.models, ad, cfg, vocab, ctx.fast)
    lm = ctx.target.lm
    if lm is not None:
      lm.capture_verify(
        {
          tr.tree_size(d, o["tree_topk"], o["tree_nodes"])
          for d in range(1, o["tree_depth"] + 1)
        }
      )
    drafter = ctx.drafter if src else None
    return cls(ad, ctx.target, drafter, steps, ctx.timer, cfg)

  def _args(self, srcs, tgts) -> list[torch.Tensor]:
    a = self.a
    args = [
      x
      for x, name in ((srcs, "source"), (tgts, "target"))
      if name in self.inputs
    ]
    return [x.to(a.device, a.dtype).reshape(1, -1, x.shape[-1]) for x in args]

  def _adapter(self, slots, positions, allowed, srcs, tgts):
    a = self.a
    with self.timer.span(
      f"tree_adapter:{a.name}", a.device, units=slots.shape[0]
    ):
      return self.steps.step(self._args(srcs, tgts), slots, positions, allowed)

  def propose(self, tokens: list[int], budget: int) -> tr.Tree:
    n = len(tokens)
    depth = min(self.depth, budget)
    p0 = self.fed
    srcs = tgts = None
    if self.src:
      self.d.sync_to(tokens)
      self.d.catch_up(tokens, n - 1, self.t.tokens_dev)
      srcs = self.d.states[p0:n]
    if "target" in self.inputs:
      tgts = self.t.states[p0:n]
    args = self._args(srcs, tgts)
    self.fed = n
    if self.width == 1 and depth >= 2:  # B1: its runs read no tokens
      with self.timer.span(
        f"tree_adapter:{self.a.name}", self.a.device, units=n - p0 + depth - 1
      ):
        root = self.t.tokens_dev[n - 1 : n].to(self.a.device)
        tree = self.steps.draft_tree(args, p0, depth - 1, root)
      self.tree = tree.to(self.t.device)
      return self.tree
    with self.timer.span(
      f"tree_adapter:{self.a.name}", self.a.device, units=n - p0
    ):
      y, vals, toks = self.steps.catch_up(args, p0)
    self.n, self.y, self.last = n, y[-1:], tokens[-1]
    self.tree = tr.grow(
      tokens[-1],
      (vals[-1], toks[-1]),
      self._run,
      depth=depth,
      topk=self.topk,
      nodes=tr.tree_size(depth, self.topk, self.nodes),
      device=self.t.device,
    )
    return self.tree

  def _run(self, level: int, tokens: list[int], rows: list[int]):
    """The drafter (if read) and the adapter on one depth's frontier."""
    n, keys = self.n, self.steps.keys
    src = None
    if level == 0:
      pos = keys[n : n + 1]
      allowed = keys[None] <= pos[:, None]
      tgt = self.y
      if self.src:
        d = self.d
        d.feed(self.t.tokens_dev[n - 1 : n], host=[self.last])
        src = d.states[n : n + 1]
        self.start = d.base + n - 1  # the drafter's root slot
        width = (
          d.lm.max_len
          if d.lm is not None
          else (self.start + 1 + max(self.depth - 2, 0) * self.width)
        )
        dkeys = torch.arange(width, device=d.device)
        self.vis_d = (dkeys <= self.start)[None]
        if self.hbuf is None:
          self.hbuf = d.states.new_empty(
            (self.depth, self.width, d.states.shape[-1])
          )
    else:
      width = self.width
      both = torch.tensor(tokens + rows, device=self.steps.device)
      tokens, rows = both[:width], both[width:]  # one host-to-device copy
      first = n + 1 + (level - 1) * width
      slots = keys[first : first + width]
      pos = torch.full_like(slots, n + level)
      allowed = _rows_with(self.vis_a, rows, slots)
      tgt = self.y[rows]
      if self.src:
        src = self._feed_drafter(level, tokens, rows)
    y, vals, toks = self._adapter(
      pos if level == 0 else slots, pos, allowed, src, tgt
    )
    self.vis_a = allowed
    self.y = y
    return vals, toks

  def _feed_drafter(self, level, tokens, rows) -> torch.Tensor:
    """Feeds one depth's frontier tokens to the drafter; their states."""
    d, width = self.d, self.width
    first = self.start + 1 + (level - 1) * width
    slots = torch.arange(first, first + width, device=d.device)
    pos = torch.full_like(slots, self.start + level)
    allowed = _rows_with(self.vis_d, rows.to(d.device), slots)
    self.vis_d = allowed
    ids = tokens.to(d.device).reshape(1, -1)
    with self.timer.span("draft_decode_tree", d.device, units=width):
      if d.lm is not None:
        h, _ = d.lm.tree_step(ids, slots, pos, allowed)
      else:
        end = first + width
        h, _, d.cache = d.b.forward(
          input_ids=ids,
          past_key_values=d.cache,
          attention_mask=tr.hf_tree_mask(allowed[:, :end], d.b.dtype),
          position_ids=pos[None],
          logits_to_keep=1,
        )
        h = h[0]
    self.hbuf[level] = h
    return h

  def after_verify(self, tokens, n, path, runs, depths) -> None:
    """Keeps the accepted path's entries (module docstring)."""
    tree = self.tree
    offs = [
      -1 if r < 0 or i == 0 else 1 + (depths[i] - 1) * self.width + r
      for i, r in enumerate(runs)
    ]
    root_run = int(tree.depth >= 2)
    moved = tr.moved_depth(path, offs)
    accepted = len(path) - 1
    if "target" in self.inputs:
      self.fed = n
    else:
      self.fed = n + min(root_run + moved, accepted)
      src, dst = tr.path_moves(path[: self.fed - n], offs)
      if src:
        dev = self.steps.device
        self.steps.move(
          torch.tensor(src, device=dev) + n, torch.tensor(dst, device=dev) + n
        )
    if self.src:
      self._keep_drafter(tokens, n, path[: 1 + moved], offs, root_run, moved)

  def _keep_drafter(self, tokens, n, path, offs, root_run, moved) -> None:
    d = self.d
    fed = n - 1 + root_run + moved
    src, dst = tr.path_moves(path, offs)
    if moved:
      levels = torch.arange(1, moved + 1, device=d.device)
      rows = torch.tensor([offs[v] - 1 for v in path[1:]], device=d.device)
      rows = rows - (levels - 1) * self.width
      d.states[n + 1 : n + 1 + moved] = self.hbuf[levels, rows]
    if d.lm is not None:
      if src:
        s = torch.tensor(src, device=d.device) + self.start
        d.lm.move_entries(s, torch.tensor(dst, device=d.device) + self.start)
    elif root_run:
      d.cache = tr.move_cache_entries(
        d.cache,
        [self.start + s for s in src],
        [self.start + x for x in dst],
        d.base + fed,
      )
    d.fed_ids()
    d.fed_host = list(tokens[:fed])
    d.num_fed = fed
    d.next_token = None
    d.sync_to(tokens)


# ----------------------------------------------------------------------------
# Verification and the decode loop.


def verify(target, tree: tr.Tree):
  """One target forward over the tree; returns (hidden [T, D], greedy [T])."""
  if tree.chain:
    k = tree.size - 1
    name = f"target_verify[{k + 1}]" if k else "target_decode"
    return target.forward(tree.tokens.view(1, -1), name)
  start, size = target.length, tree.size
  with target.timer.span(
    f"target_verify_tree[{size}]", target.device, units=size
  ):
    if target.lm is not None:  # slots, positions and mask made in-graph
      h, g = target.lm.verify_tree(tr.packed(tree), start, size)
    else:
      allowed = tr.tree_allowed(tree, start, start + size)
      h, logits, target.cache = target.b.forward(
        input_ids=tree.tokens.view(1, -1),
        past_key_values=target.cache,
        attention_mask=tr.hf_tree_mask(allowed, target.b.dtype),
        position_ids=(start + tree.depths)[None],
      )
      h, g = h[0], logits[0].argmax(-1)
  target.length += size
  return h, g


def keep_path(target, path: list[int], start: int, moves=None, defer=False):
  """The target's cache keeps the prefix, the root and the accepted path
  (`moves`: the path's (src, dst) slots on the device, if made already).
  With `defer`, the static cache's moves are returned, not made (None if
  there are none): the caller makes them before the target's next call."""
  src, dst = tr.path_moves(path)
  keep = start + len(path)
  target.length = keep
  if target.lm is not None:
    if src:
      if moves is None:
        moves = _path_indices(path, 0, start, target.device)[1]
      if defer:
        return moves
      target.lm.move_entries(*moves)
  else:
    target.cache = tr.move_cache_entries(
      target.cache, [start + s for s in src], [start + d for d in dst], keep
    )
  return None


def _path_indices(path, count: int, start: int, device):
  """One host-to-device copy: the first `count` path nodes (their states
  and greedy tokens are kept) and the target's cache moves (src, dst)."""
  src, dst = tr.path_moves(path)
  idx = torch.tensor(
    path[:count] + [start + x for x in src + dst],
    pin_memory=torch.device(device).type == "cuda",
  ).to(device, non_blocking=True)  # no host wait
  return idx[:count], idx[count:].view(2, -1)


def decode_loop(target, y0, cfg, eos, result, first, proposer) -> list[int]:
  """Greedy SD with one draft tree per iteration (see sd_engine's loop)."""
  tokens = [y0]
  m = cfg.max_new_tokens
  done = y0 in eos or m == 1
  moves = None  # the target's cache moves of the last accepted path
  while not done:
    n = len(tokens)
    budget = m - n - 1  # tree depth that can still be followed by a token
    root = target.tokens_dev[n - 1 : n]
    phase = "decode"
    if first is not None and first.drafts is not None:
      drafts, phase = first.take(budget), "prefill"
      if drafts is not None and drafts.numel() == 0:
        drafts = None
      tree = tr.chain_tree(root, drafts)
    elif proposer is not None and budget > 0:
      tree = proposer.propose(tokens, budget)
    else:
      tree = tr.chain_tree(root, None)
    if moves is not None:  # made once the drafting is under way
      target.lm.move_entries(*moves)
    start = target.length
    h, g = verify(target, tree)
    k = tree.size - 1
    if tree.host is not None:  # grown on the host: read only greedy
      greedy = g.tolist()  # the one sync
      toks, parents = tree.host["tokens"], tree.host["parents"]
      depths, runs = tree.host["depths"], tree.host["runs"]
    elif tree.chain:
      host = torch.cat([tree.tokens.to(target.device), g]).tolist()  # sync
      toks, greedy = host[: k + 1], host[k + 1 :]
      parents = list(range(-1, k))
    else:  # grown on the device: its rows and greedy in one read
      size = k + 1
      host = torch.cat([tree.packed[: 4 * size], g]).tolist()
      toks, parents, depths, runs, greedy = (
        host[i * size : (i + 1) * size] for i in range(5)
      )
    path = tr.accept_path(toks, parents, greedy)
    new = [toks[i] for i in path[1:]] + [greedy[path[-1]]]
    for i, t in enumerate(new):
      if t in eos:
        new = new[: i + 1]
        done = True
        break
    if len(new) > m - n:
      raise AssertionError("budget overrun")  # depth <= m - n - 1
    idx, moves = _path_indices(path, len(new), start, target.device)
    torch.index_select(h, 0, idx, out=target.states[n : n + len(new)])
    torch.index_select(g, 0, idx, out=target.tokens_dev[n : n + len(new)])
    tokens.extend(new)
    result.count(phase, k, min(len(path) - 1, len(new)))
    if len(tokens) >= m:
      done = True
    if done:
      break
    moves = keep_path(target, path, start, moves, defer=True)
    if phase == "decode" and proposer is not None and not tree.chain:
      proposer.after_verify(tokens, n, path, runs, depths)
  return tokens
