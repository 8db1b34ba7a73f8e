"""Draft trees: EAGLE-2-style growth, tree masks, acceptance, KV compaction.

A draft tree is kept in depth order: node 0 is the root (the last accepted
token, fed first in the verification), every other node is one draft token
whose parent comes before it. Node i sits at position `start + depths[i]`
and reads the committed prefix plus its ancestors (itself included): the
`ancestors` matrix. A chain of k drafts is the tree with parents
-1, 0, 1, ..., k-1.

Growth (`grow`, EAGLE-2): the depth-1 candidates are the top-k tokens of the
drafting model's first distribution; at every further depth the top-k
children of each of the k most probable frontier nodes (by cumulative
log-probability) become candidates, and the frontier for the next depth is
again the k best candidates. The tree is then the `nodes - 1` best
candidates over all depths, by cumulative log-probability. A child's score
is its parent's plus a log-probability <= 0, and ties are broken towards
the earlier (shallower) candidate, so every kept node's parent is kept.

Acceptance (`accept_path`): the longest root path along which each node's
token equals the target's greedy token at its parent; the new tokens are
that path's tokens plus the target's token at its last node.

Compaction: the verification writes the K/V of every node into cache slots
start.. start+T-1 (node order); afterwards the accepted path's entries move
to the slots that decoding the path token by token would have used
(`path_moves`), so the cache equals a chain decode's, entry by entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from tools.lib.backends import crop_cache
from tools.lib.static_kv import hf_cache_layers


def check_config(depth: int, topk: int, nodes: int) -> None:
  """Raises ValueError unless (depth, topk, nodes) describe a valid tree."""
  if depth < 1 or topk < 1:
    raise ValueError(
      f"tree_depth and tree_topk must be >= 1, got {depth} and {topk}"
    )
  most = 1 + topk + (depth - 1) * topk * topk
  if not 2 <= nodes <= most:
    raise ValueError(
      f"tree_nodes (verified tokens, the root included) must be in [2, "
      f"{most}] for tree_depth {depth} and tree_topk {topk}, got {nodes}"
    )


def tree_size(depth: int, topk: int, nodes: int) -> int:
  """Nodes of a tree grown to `depth` (at most `nodes`, root included)."""
  return min(nodes, 1 + topk + (depth - 1) * topk * topk)


@dataclasses.dataclass
class Tree:
  """A draft tree in depth order (device tensors, node 0 = the root)."""

  tokens: torch.Tensor  # [T] long
  parents: torch.Tensor  # [T] long, -1 for the root
  depths: torch.Tensor  # [T] long, 0 for the root
  ancestors: torch.Tensor  # [T, T] bool: node i reads node j
  # [T] long: the node's row in its depth's drafting run, -1 if it was not
  # run (root: 0 when run). Only for drafting models that read tokens.
  runs: torch.Tensor | None = None
  depth: int = 0  # the deepest node's depth (host)
  chain: bool = False  # parents are 0, 1, 2, ...: a chain verification

  @property
  def size(self) -> int:
    return int(self.tokens.shape[0])

  def to(self, device) -> Tree:
    """The same tree with its tensors on `device`."""
    moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for name, value in moved.items():
      if isinstance(value, torch.Tensor):
        moved[name] = value.to(device)
    return Tree(**moved)


def ancestors_of(parents: torch.Tensor, depth: int) -> torch.Tensor:
  """[T, T] bool: row i marks node i and its ancestors (depth-order tree)."""
  size = parents.shape[0]
  anc = torch.eye(size, dtype=torch.bool, device=parents.device)
  up = parents.clamp(min=0)
  for _ in range(depth):
    anc = anc | anc[up]
  return anc


def chain_tree(root: torch.Tensor, drafts: torch.Tensor | None) -> Tree:
  """The tree of a chain: the root, then each draft a child of the last."""
  tokens = root.reshape(1)
  if drafts is not None:
    tokens = torch.cat([tokens, drafts.reshape(-1).to(tokens.device)])
  size = tokens.shape[0]
  steps = torch.arange(size, device=tokens.device)
  return Tree(
    tokens=tokens,
    parents=steps - 1,
    depths=steps,
    ancestors=steps[None, :] <= steps[:, None],
    depth=size - 1,
    chain=True,
  )


def accept_path(
  tokens: Sequence[int], parents: Sequence[int], greedy: Sequence[int]
) -> list[int]:
  """The longest root path whose every node's token is its parent's greedy.

  Breadth first, so among equally long paths the first in node order wins.
  Returns node indices, the root (0) first.
  """
  children: list[list[int]] = [[] for _ in tokens]
  for i in range(1, len(tokens)):
    children[parents[i]].append(i)
  best, queue = [0], [[0]]
  for path in queue:
    last = path[-1]
    for c in children[last]:
      if tokens[c] == greedy[last]:
        queue.append(path + [c])
        if len(path) + 1 > len(best):
          best = path + [c]
  return best


def path_moves(path: Sequence[int], runs: Sequence[int] | None = None):
  """(src, dst) offsets that make a path's entries contiguous.

  Without `runs` the offsets are node indices (a verification: node i sits
  at start + i; path node d must end at start + d). With `runs` they are
  drafting-run slots (node at depth d, row r: 1 + (d - 1) * width + r,
  given as runs[node] = that offset); the moves stop at the first path node
  that was not run. Pairs already in place are left out.
  """
  src, dst = [], []
  for d, node in enumerate(path[1:], 1):
    at = node if runs is None else runs[node]
    if at < 0:
      break
    if at != d:
      src.append(at)
      dst.append(d)
  return src, dst


def moved_depth(path: Sequence[int], runs: Sequence[int]) -> int:
  """How many path nodes after the root have drafting-run entries."""
  count = 0
  for node in path[1:]:
    if runs[node] < 0:
      break
    count += 1
  return count


def move_cache_entries(cache, src: Sequence[int], dst: Sequence[int], keep):
  """HF cache: copies the entries at slots src to dst, keeps `keep` slots."""
  if src:
    layers = hf_cache_layers(cache)
    device = layers[0][0].device
    s = torch.tensor(list(src), device=device)
    d = torch.tensor(list(dst), device=device)
    for k, v in layers:
      k[:, :, d] = k[:, :, s]
      v[:, :, d] = v[:, :, s]
  return crop_cache(cache, keep)


def hf_tree_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
  """[1, 1, T, L] additive mask (0 = read, dtype min = masked) for HF."""
  bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
  return bias.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def tree_allowed(tree: Tree, start: int, width: int) -> torch.Tensor:
  """[T, width] bool: the prefix [0, start) plus each node's ancestors."""
  size = tree.size
  keys = torch.arange(width, device=tree.tokens.device)
  allowed = (keys < start)[None].expand(size, width).clone()
  allowed[:, start : start + size] = tree.ancestors
  return allowed


# ----------------------------------------------------------------------------
# Growth.

# run(level, tokens [R], rows [R]) -> (log-probs [W, K], tokens [W, K]): the
# drafting model on the frontier of depth `level` (level 0: the root, one
# row), each node's inputs taken from row `rows[i]` of the previous run. W
# is R for models that read the tokens, else 1 (one shared row).
RunFn = Callable[[int, torch.Tensor, torch.Tensor], tuple]


def grow(
  root: torch.Tensor,
  first: tuple[torch.Tensor, torch.Tensor],
  run: RunFn,
  *,
  depth: int,
  topk: int,
  nodes: int,
) -> Tree:
  """An EAGLE-2 dynamic tree (see the module docstring).

  `root` [1] is the last accepted token; `first` = (log-probs [K], tokens
  [K]) of the depth-1 candidates, best first. Children of a frontier node
  at depth d come from the run on its parent (row `rows`): the adapters
  here predict the state one token late, so a node's children depend on
  its ancestors, not on its own token. The run on the frontier of depth
  d - 1 is made only when depth d + 1 is grown.
  """
  dev = root.device
  vals, toks = first
  k = int(toks.shape[0])
  f_tok, f_score = toks, vals
  f_rows = torch.zeros(k, dtype=torch.long, device=dev)
  f_glob = torch.arange(k, device=dev)
  scores, tokens, parents, depths = [vals], [toks], [f_glob * 0 - 1], [1]
  total = k
  run_of: list[torch.Tensor] = []  # global ids of each run's nodes
  prev = run(0, root.reshape(1), f_rows[:1]) if depth >= 2 else None
  p_tok = p_rows = p_glob = None  # the frontier one depth up
  for d in range(1, depth):
    if d >= 2:
      prev = run(d - 1, p_tok, p_rows)
      run_of.append(p_glob)
    pv, pt = prev
    rows = f_rows if pv.shape[0] > 1 else torch.zeros_like(f_rows)
    cand = (f_score[:, None] + pv[rows]).reshape(-1)
    ctok = pt[rows].reshape(-1)
    scores.append(cand)
    tokens.append(ctok)
    parents.append(f_glob.repeat_interleave(pt.shape[1]))
    depths.append(d + 1)
    top = cand.topk(min(topk, cand.shape[0]))
    p_tok, p_rows, p_glob = f_tok, f_rows, f_glob
    f_tok, f_score = ctok[top.indices], top.values
    f_rows = top.indices // pt.shape[1]
    f_glob = total + top.indices
    total += cand.shape[0]
  score = torch.cat(scores)
  order = torch.sort(score, descending=True, stable=True).indices
  sel = torch.sort(order[: nodes - 1]).values
  where = torch.full((total,), -1, dtype=torch.long, device=dev)
  where[sel] = torch.arange(1, sel.shape[0] + 1, device=dev)
  par = torch.cat(parents)[sel]
  par = torch.where(par < 0, 0, where[par.clamp(min=0)])
  depth_of = torch.cat(
    [
      torch.full((t.shape[0],), d, device=dev)
      for t, d in zip(tokens, depths, strict=True)
    ]
  )
  parents_t = torch.cat([par.new_full((1,), -1), par])
  runs = torch.full((total,), -1, dtype=torch.long, device=dev)
  for glob in run_of:
    runs[glob] = torch.arange(glob.shape[0], device=dev)
  return Tree(
    tokens=torch.cat([root.reshape(1), torch.cat(tokens)[sel]]),
    parents=parents_t,
    depths=torch.cat([depth_of.new_zeros(1), depth_of[sel]]),
    ancestors=ancestors_of(parents_t, depth),
    runs=torch.cat([runs.new_full((1,), 0 if depth >= 2 else -1), runs[sel]]),
    depth=depth,
  )
