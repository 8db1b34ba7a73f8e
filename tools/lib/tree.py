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
`grow` works on the host, reading each depth's run as it goes;
`grow_shared` makes the same tree on the device, in fixed-shape tensor
operations, for a model whose runs read no tokens (B1: one run per depth,
all made beforehand).

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

import numpy as np
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
  # The host's copies (lists: tokens, parents, depths, runs) where the
  # tree was built on the host; then the decode loop reads only greedy.
  host: dict[str, list[int]] | None = None
  # [tokens, parents, depths, runs, ancestors] in one long buffer on the
  # device (`packed`), as grow writes it.
  packed: torch.Tensor | None = None

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


def ancestors_of(parents, depth: int):
  """[T, T] bool: row i marks node i and its ancestors (depth-order tree;
  -1 the root's parent). A torch tensor of `parents` gives a tensor on its
  device (`grow_shared`), anything else a numpy array."""
  if isinstance(parents, torch.Tensor):
    anc = torch.eye(len(parents), dtype=torch.bool, device=parents.device)
    up = parents.clamp(min=0)
  else:
    anc = np.eye(len(parents), dtype=bool)
    up = np.clip(np.asarray(parents), 0, None)
  for _ in range(depth):
    anc = anc | anc[up]
  return anc


def packed(tree: Tree) -> torch.Tensor:
  """The tree as one long buffer: [tokens, parents, depths, runs] [4, T]
  then ancestors [T, T] (runs -1 where the tree has none)."""
  if tree.packed is not None:
    return tree.packed
  runs = (
    tree.runs if tree.runs is not None else torch.full_like(tree.tokens, -1)
  )
  parts = (tree.tokens, tree.parents, tree.depths, runs, tree.ancestors)
  return torch.cat([x.reshape(-1).long() for x in parts])


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

# run(level, tokens, rows) -> (log-probs [W, K], tokens [W, K]) on the
# device: the drafting model on the frontier of depth `level` (level 0: the
# root, one row), node i of the frontier (host list `tokens`) taking its
# inputs from row `rows[i]` of the previous run. W is the frontier's size
# for models that read the tokens, else 1 (one shared row per depth).
RunFn = Callable[[int, list, list], tuple]


def _to_host(parts: Sequence[torch.Tensor]) -> list[np.ndarray]:
  """The tensors on the host in one device read: float32 log-probs and
  integer token ids travel together as float64 (exact both ways)."""
  flat = torch.cat([p.reshape(-1).double() for p in parts]).cpu().numpy()
  out, at = [], 0
  for p in parts:
    x = flat[at : at + p.numel()].reshape(p.shape)
    at += p.numel()
    out.append(x.astype(np.float32 if p.is_floating_point() else np.int64))
  return out


def _best(score: np.ndarray, count: int) -> np.ndarray:
  """Indices of the `count` highest scores, ties to the earlier index."""
  return np.argsort(-score, kind="stable")[:count]


def grow(
  root: int,
  first: tuple[torch.Tensor, torch.Tensor],
  run: RunFn | None,
  *,
  depth: int,
  topk: int,
  nodes: int,
  device,
) -> Tree:
  """An EAGLE-2 dynamic tree (see the module docstring), grown on the host.

  `root` is the last accepted token; `first` = (log-probs [K], tokens [K])
  of the depth-1 candidates on the device. Children of a frontier node at
  depth d come from the run on its parent: the adapters here predict the
  state one token late, so a node's children depend on its ancestors, not
  on its own token. The run on the frontier of depth d - 1 is made only
  when depth d + 1 is grown. The device is read once per depth and
  written once, with the finished tree on `device`; the host's copies stay
  in `Tree.host`. (A model whose runs read no tokens, as B1, makes them
  all beforehand and grows its tree on the device: `grow_shared`.)
  """
  vals, toks = _to_host(first)
  k = toks.shape[0]
  # Candidates in global order, one block per depth; the frontier (the k
  # best of the last block): its scores, tokens, rows and global ids.
  scores, tokens, parents, ends = [vals], [toks], [np.full(k, -1)], [k]
  f_score, f_tok, f_rows = vals, toks, np.zeros(k, np.int64)
  f_glob = np.arange(k)
  run_of: list[np.ndarray] = []  # global ids of each run's nodes
  p_tok = p_rows = p_glob = None  # the frontier one depth up
  for d in range(1, depth):
    if d == 1:
      pv, pt = _to_host(run(0, [root], [0]))
    else:
      pv, pt = _to_host(run(d - 1, p_tok.tolist(), p_rows.tolist()))
    pv, pt = (pv[f_rows], pt[f_rows]) if pv.shape[0] > 1 else (pv[0], pt[0])
    if d >= 2:
      run_of.append(p_glob)
    cand = f_score[:, None] + pv  # [frontier, children]
    ctok = np.broadcast_to(pt, cand.shape).reshape(-1)
    n_child = cand.shape[1]
    cand = cand.reshape(-1)
    scores.append(cand)
    tokens.append(ctok)
    parents.append(np.repeat(f_glob, n_child))
    top = _best(cand, min(topk, cand.shape[0]))
    p_tok, p_rows, p_glob = f_tok, f_rows, f_glob
    f_tok, f_score = ctok[top], cand[top]
    f_rows, f_glob = top // n_child, ends[-1] + top
    ends.append(ends[-1] + cand.shape[0])
  sel = np.sort(_best(np.concatenate(scores), nodes - 1))
  size = sel.shape[0] + 1
  where = np.full(ends[-1], -1)
  where[sel] = np.arange(1, size)
  # [tokens, parents, depths, runs, ancestors]: one host-to-device copy.
  packed = np.empty(4 * size + size * size, np.int64)
  tree = packed[: 4 * size].reshape(4, size)
  tree[:, 0] = (root, -1, 0, 0 if depth >= 2 else -1)
  tree[0, 1:] = np.concatenate(tokens)[sel]
  par = np.concatenate(parents)[sel]
  tree[1, 1:] = np.where(par < 0, 0, where[np.maximum(par, 0)])
  tree[2, 1:] = np.searchsorted(ends, sel, side="right") + 1
  runs = np.full(ends[-1], -1)
  for glob in run_of:
    runs[glob] = np.arange(glob.shape[0])
  tree[3, 1:] = runs[sel]
  packed[4 * size :] = ancestors_of(tree[1], depth).reshape(-1)
  host = dict(zip(FIELDS, tree.tolist(), strict=True))
  return from_packed(torch.from_numpy(packed).to(device), size, depth, host)


FIELDS = ("tokens", "parents", "depths", "runs")  # the packed [4, T] rows


def from_packed(packed: torch.Tensor, size: int, depth: int, host=None):
  """The Tree whose fields are views of one packed buffer (`packed`)."""
  t, p, d, r = packed[: 4 * size].view(4, size)
  return Tree(
    tokens=t,
    parents=p,
    depths=d,
    ancestors=packed[4 * size :].view(size, size).bool(),
    runs=r,
    depth=depth,
    host=host,
    packed=packed,
  )


def _best_dev(score: torch.Tensor, count: int) -> torch.Tensor:
  """`_best` on the device: a stable sort, ties to the earlier index."""
  return torch.sort(score, descending=True, stable=True).indices[:count]


def grow_shared(
  root: torch.Tensor,
  first: tuple[torch.Tensor, torch.Tensor],
  shared: tuple[torch.Tensor, torch.Tensor],
  *,
  topk: int,
  nodes: int,
) -> torch.Tensor:
  """`grow` for a model whose runs read no tokens (B1), on the device.

  Such a model has one run per depth, the same for every node, all made
  beforehand: `shared` = (log-probs [depth - 1, K], tokens [depth - 1,
  K]), row r the run on depth r. The tree is the one `grow` makes from
  those runs (the same float32 sums and tie order), built of fixed-shape
  tensor operations with no host read, so it can be captured in a CUDA
  graph behind the runs that feed it. `root` [1] is the last accepted
  token, `first` as in `grow`; depth = 1 + the rows of `shared` (>= 2).
  Returns the packed tree (`packed`): [tokens, parents, depths, runs]
  [4, T], then ancestors [T, T], all long.
  """
  vals, toks = first
  dev, k = vals.device, vals.shape[0]
  depth = shared[0].shape[0] + 1
  scores, tokens, parents = [vals.float()], [toks], [toks.new_full((k,), -1)]
  f_score, f_glob, end = scores[0], torch.arange(k, device=dev), k
  f_prev, ends, run_of = f_glob, [k], []
  for d in range(1, depth):
    pv, pt = shared[0][d - 1].float(), shared[1][d - 1]
    if d >= 2:
      run_of.append(f_prev)
    cand = (f_score[:, None] + pv[None, :]).reshape(-1)
    scores.append(cand)
    shape = (f_score.shape[0], pv.shape[0])
    tokens.append(pt[None].expand(shape).reshape(-1))
    parents.append(f_glob[:, None].expand(shape).reshape(-1))
    top = _best_dev(cand, min(topk, cand.shape[0]))
    f_prev, f_score, f_glob = f_glob, cand[top], end + top
    end += cand.shape[0]
    ends.append(end)
  sel = torch.sort(_best_dev(torch.cat(scores), nodes - 1)).values
  size = sel.shape[0] + 1
  where = torch.zeros(end, dtype=torch.long, device=dev)
  where[sel] = torch.arange(1, size, device=dev)
  par = torch.cat(parents)[sel]
  runs = torch.full((end,), -1, dtype=torch.long, device=dev)
  for glob in run_of:
    runs[glob] = torch.arange(glob.shape[0], device=dev)
  # A candidate's depth: 1 + the depth blocks that end at or before it.
  depths = 1 + sum(sel >= e for e in ends[:-1])
  tree = torch.stack(
    [
      torch.cat([root.reshape(1), torch.cat(tokens)[sel]]),
      torch.cat(
        [par.new_full((1,), -1), torch.where(par < 0, 0, where[par.clamp(0)])]
      ),
      torch.cat([sel.new_zeros(1), depths]),
      torch.cat([sel.new_full((1,), 0), runs[sel]]),
    ]
  ).long()
  anc = ancestors_of(tree[1], depth)
  return torch.cat([tree.reshape(-1), anc.reshape(-1).long()])
