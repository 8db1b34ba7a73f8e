"""Draft trees (tools/lib/tree.py, tree_steps.py, tree_decode.py), on CPU."""

import copy
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from egpt_align.models import get_spec  # noqa: E402
from tools.lib import adapter_steps, static_kv, tree_decode, tree_steps  # noqa: E402
from tools.lib import sd_engine as sd  # noqa: E402
from tools.lib import tree as tr  # noqa: E402
from tools.lib.backends import cache_length  # noqa: E402
from tools.lib.random_models import TokenPromptBackend, random_llama  # noqa: E402
from tools.lib.sd_methods import parse_method  # noqa: E402
from tools.lib.sd_models import Adapter, Models, Target  # noqa: E402
from tools.lib.sd_timing import Timer  # noqa: E402
from tools.lib.static_kv import hf_cache_layers  # noqa: E402
from tools.lib.twins import build_torch_adapter  # noqa: E402

D, V = 32, 64
SHAPE = dict(
  vocab_size=V,
  hidden_size=D,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=256,
)
# A hand-drawn tree: 0 -> {1, 2}, 1 -> {3, 4}, 2 -> {5}, 3 -> {6}.
PARENTS = [-1, 0, 0, 1, 1, 2, 3]
DEPTHS = [0, 1, 1, 2, 2, 2, 3]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target_model():
  """A random Llama with a sharp LM head: confident, so trees grow deep
  (a random model's near-flat distributions grow bushy depth-2 trees)."""
  model = random_llama(SHAPE, seed=0)
  with torch.no_grad():
    model.lm_head.weight.mul_(60.0)
  return model


@pytest.fixture(scope="module")
def noisy_model(target_model):
  """The target plus noise: agrees often, not always (partial accepts)."""
  model = copy.deepcopy(target_model)
  g = torch.Generator().manual_seed(5)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.005 * torch.randn(p.shape, generator=g))
  return model


def _prompt(seed, length=12):
  g = torch.Generator().manual_seed(seed)
  return {"input_ids": torch.randint(3, V, (length,), generator=g).tolist()}


def _hand_tree(tokens):
  parents = torch.tensor(PARENTS)
  return tr.Tree(
    tokens=torch.tensor(tokens),
    parents=parents,
    depths=torch.tensor(DEPTHS),
    ancestors=torch.from_numpy(tr.ancestors_of(parents.tolist(), 3)),
    depth=3,
  )


# ----------------------------------------------------------------------------
# Structure: masks, positions, acceptance, growth.


def test_mask_and_positions_of_a_hand_drawn_tree():
  tree = _hand_tree([9, 10, 11, 12, 13, 14, 15])
  want = torch.tensor(
    [
      [1, 0, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0, 0],
      [1, 0, 1, 0, 0, 0, 0],
      [1, 1, 0, 1, 0, 0, 0],
      [1, 1, 0, 0, 1, 0, 0],
      [1, 0, 1, 0, 0, 1, 0],
      [1, 1, 0, 1, 0, 0, 1],
    ],
    dtype=torch.bool,
  )
  assert torch.equal(tree.ancestors, want)
  allowed = tr.tree_allowed(tree, start=5, width=14)
  assert allowed[:, :5].all() and not allowed[:, 12:].any()
  assert torch.equal(allowed[:, 5:12], want)
  # Position ids: the verification's start plus each node's depth.
  assert (5 + tree.depths).tolist() == [5, 6, 6, 7, 7, 7, 8]
  chain = tr.chain_tree(torch.tensor([4]), torch.tensor([5, 6]))
  assert chain.parents.tolist() == [-1, 0, 1] and chain.chain
  want = tr.ancestors_of(chain.parents.tolist(), 2)
  assert torch.equal(chain.ancestors, torch.from_numpy(want))


def test_acceptance_picks_the_longest_matching_path():
  # 0 -> {1: 10, 2: 10, 3: 11}; 1 -> {4: 20, 5: 21}; 2 -> {6: 22};
  # 6 -> {7: 30}; 4 -> {8: 99}. Greedy: g0 = 10, g1 = 20, g2 = 22,
  # g4 = 40 (node 8 fails), g6 = 30. Two branches match partly; the one
  # through node 2 is longer.
  parents = [-1, 0, 0, 0, 1, 1, 2, 6, 4]
  tokens = [5, 10, 10, 11, 20, 21, 22, 30, 99]
  greedy = [10, 20, 22, 0, 40, 0, 30, 0, 0]
  assert tr.accept_path(tokens, parents, greedy) == [0, 2, 6, 7]
  # Node 7 rejected: two matching paths of length 2, the first in order.
  assert tr.accept_path(tokens, parents, greedy[:6] + [31, 0, 0]) == [0, 1, 4]
  assert tr.accept_path(tokens, parents, [1] * 9) == [0]
  # Moves: node i sits at start + i, path node d goes to start + d.
  assert tr.path_moves([0, 2, 6, 7]) == ([2, 6, 7], [1, 2, 3])
  assert tr.path_moves([0, 1, 4]) == ([4], [2])


def _fake_model(width, vocab, seed):
  """Distributions of a drafting model keyed by the token path it read."""
  table = {}
  g = torch.Generator().manual_seed(seed)

  def logp(key):
    if key not in table:
      table[key] = torch.log_softmax(torch.randn(vocab, generator=g), -1)
    return table[key]

  def key_of(path):
    return path if width > 1 else len(path)

  state = {"paths": None}

  def run(level, tokens, rows, k):
    if level == 0:
      paths = [()]
    else:
      prev = state["paths"]
      rows = list(rows) if width > 1 else [0]
      toks = list(tokens) if width > 1 else [None]
      paths = [prev[r] + (t,) for r, t in zip(rows, toks, strict=True)]
    state["paths"] = paths
    top = torch.stack([logp(key_of(p)) for p in paths]).topk(k, -1)
    return top.values, top.indices

  return logp, key_of, run


def _reference_grow(logp, key_of, width, depth, topk, nodes):
  """EAGLE-2 growth written out over token paths (lists, no indices)."""
  first = logp("first").topk(topk)
  frontier = [
    (s, (t,)) for s, t in zip(first.values, first.indices.tolist(), strict=True)
  ]
  every = list(frontier)
  for _ in range(1, depth):
    new = []
    for score, path in frontier:
      # Children of a node come from the run on its parent.
      dist = logp(key_of(path[:-1]))
      top = dist.topk(topk)
      for v, t in zip(top.values, top.indices.tolist(), strict=True):
        new.append((score + v, path + (t,)))
    every += new
    frontier = sorted(new, key=lambda x: -float(x[0]))[:topk]
  every.sort(key=lambda x: -float(x[0]))
  return {p for _, p in every[: nodes - 1]}


@pytest.mark.parametrize("width,shared", [(1, True), (1, False), (3, False)])
def test_growth_keeps_the_best_nodes_of_eagle2_expansion(width, shared):
  topk, depth, nodes = 3, 4, 12
  logp, key_of, run = _fake_model(width, 12, seed=width)
  first = logp("first").topk(topk)
  if shared:  # every run made beforehand (B1's chain), grown on the device
    made = [run(level, [7], [0], topk) for level in range(depth - 1)]
    runs = tuple(torch.cat(x) for x in zip(*made, strict=True))
    packed = tr.grow_shared(
      torch.tensor([7]),
      (first.values, first.indices),
      runs,
      topk=topk,
      nodes=nodes,
    )
    tree = tr.from_packed(packed, nodes, depth)
  else:
    tree = tr.grow(
      7,
      (first.values, first.indices),
      lambda level, toks, rows: run(level, toks, rows, topk),
      depth=depth,
      topk=topk,
      nodes=nodes,
      device="cpu",
    )
  parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
  depths = tree.depths.tolist()
  if not shared:  # the host's copies are the tree the device holds
    assert tree.host["tokens"] == tokens and tree.host["parents"] == parents
    assert tree.host["depths"] == depths
    assert tree.host["runs"] == tree.runs.tolist()
  assert tree.size == nodes and tokens[0] == 7 and parents[0] == -1
  paths = [()]
  for i in range(1, nodes):
    assert 0 <= parents[i] < i and depths[i] == depths[parents[i]] + 1
    paths.append(paths[parents[i]] + (tokens[i],))
  assert set(paths[1:]) == _reference_grow(
    logp, key_of, width, depth, topk, nodes
  )
  want = tr.ancestors_of(tree.parents.tolist(), depth)
  assert torch.equal(tree.ancestors, torch.from_numpy(want))


def test_device_growth_makes_the_host_growths_tree_ties_included():
  """grow_shared (B1's trees, on the device) packs exactly the tree that
  grow makes from the same runs, over random sizes; rounded log-probs
  make ties, which both must break towards the earlier candidate."""
  g = torch.Generator().manual_seed(5)
  for trial in range(60):
    topk = int(torch.randint(1, 5, (), generator=g))
    depth = int(torch.randint(2, 6, (), generator=g))
    most = 1 + topk + (depth - 1) * topk * topk
    nodes = int(torch.randint(2, most + 1, (), generator=g))
    logp = torch.log_softmax(torch.randn(depth, 9, generator=g), -1)
    if trial % 2:
      logp = torch.round(logp * 2) / 2
    top = logp.topk(topk, -1)
    runs = (top.values[1:], top.indices[1:])
    host = tr.grow(
      7,
      (top.values[0], top.indices[0]),
      lambda level, toks, rows, r=runs: (
        (r[0][level : level + 1],) + (r[1][level : level + 1],)
      ),
      depth=depth,
      topk=topk,
      nodes=nodes,
      device="cpu",
    )
    dev = tr.grow_shared(
      torch.tensor([7]),
      (top.values[0], top.indices[0]),
      runs,
      topk=topk,
      nodes=nodes,
    )
    assert torch.equal(dev, host.packed), (topk, depth, nodes)


class _Replay:
  """A captured CUDA graph stood in for on CPU: `replay` runs the captured
  function again on its static inputs and writes what it returns into the
  captured outputs (a tensor or a tuple), as a graph replay would."""

  def __init__(self, fn, static, out):
    self.fn, self.static, self.out = fn, static, out
    self.calls = 0

  def replay(self):
    def parts(v):
      return (v,) if torch.is_tensor(v) else v

    self.calls += 1
    with torch.inference_mode():
      new = self.fn(*self.static)
      for o, n in zip(parts(self.out), parts(new), strict=True):
        o.copy_(n)


def test_a_replayed_step_returns_what_its_function_returns():
  """StepGraphs hands back a replay's outputs as the function returns
  them: a tensor (B1's packed tree) or a tuple. No CUDA here, so the
  captured entry is stood in for (`_Replay`)."""

  def packed_tree(x):
    return torch.cat([x, x + 1])

  def pair(x):
    return x * 2, x.sum(0, keepdim=True)

  for fn in (packed_tree, pair):
    graphs = static_kv.StepGraphs(fn, None, (), "cpu")
    static = (torch.zeros(3),)
    out = fn(*static)
    graphs.graphs[3] = (_Replay(fn, static, out), static, out)
    x = torch.arange(3.0)
    got, want = graphs(3, x), fn(x)
    assert type(got) is type(want)
    if torch.is_tensor(want):
      assert torch.equal(got, want)
    else:
      assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# ----------------------------------------------------------------------------
# Verification and compaction on the target (static and HF caches).


def _backend(model, eos=2):
  return TokenPromptBackend(model, model_id="tiny", eos_token_id=eos)


def _target(backend, static: bool, prompt):
  timer = Timer([torch.device("cpu")])
  lm = backend.static_decoder(64) if static else None
  t = Target(backend, timer, 16, lm)
  with torch.inference_mode():
    t.prefill(backend.prompt_inputs(prompt))
  return t


def _entries(t, length):
  """(K, V) of the first `length` cache slots, per layer."""
  if t.lm is not None:
    return [
      (t.lm.k[i, :, :, :length], t.lm.v[i, :, :, :length])
      for i in range(t.lm.k.shape[0])
    ]
  return [
    (k[:, :, :length], v[:, :, :length]) for k, v in hf_cache_layers(t.cache)
  ]


@pytest.mark.parametrize("static", [True, False])
def test_compaction_equals_decoding_the_accepted_path(target_model, static):
  tb = _backend(target_model)
  s = _prompt(3)
  tree = _hand_tree([20, 21, 22, 23, 24, 25, 26])
  for path in ([0, 1, 3, 6], [0, 2, 5], [0, 1, 4], [0]):
    t = _target(tb, static, s)
    start = t.length
    with torch.inference_mode():
      h, g = tree_decode.verify(t, tree)
      tree_decode.keep_path(t, path, start)
      ref = _target(tb, static, s)
      ids = torch.tensor([[20] + [tree.tokens[i].item() for i in path[1:]]])
      h_ref, g_ref = ref.forward(ids, "target_verify")
    assert t.length == ref.length == start + len(path)
    # Each node's state is the one of its own path, decoded as a chain.
    torch.testing.assert_close(h[path], h_ref, atol=1e-5, rtol=1e-5)
    assert g[path].tolist() == g_ref.tolist()
    got, want = _entries(t, t.length), _entries(ref, ref.length)
    for (k, v), (k_ref, v_ref) in zip(got, want, strict=True):
      for x in range(start, t.length):  # entry by entry
        torch.testing.assert_close(k[..., x, :], k_ref[..., x, :])
        torch.testing.assert_close(v[..., x, :], v_ref[..., x, :])
    if not static:
      assert cache_length(t.cache) == t.length


def test_adapter_tree_steps_and_compaction_equal_a_chain():
  """The adapter's tree runs read only their ancestors; after the moves
  its cache equals a chain decode of the accepted path."""
  torch.manual_seed(3)
  module = build_torch_adapter(
    "l5", hidden_dim=D, num_heads=4, ffn_dim=64, alpha_init=1.0
  ).eval()
  head = torch.randn(V, D)
  ta = tree_steps.TreeAdapter(
    module, head, 1, 32, topk=3, vocab=None, device="cpu", dtype=torch.float32
  )
  keys = ta.keys
  xs = torch.randn(12, D)
  with torch.inference_mode():
    pos = keys[:5]  # catch-up 0..3 and the root run at 4
    ta.step([xs[None, :5]], pos, pos, keys[None] <= pos[:, None])
    root = (keys <= 4)[None]
    # Depth 1: three nodes at position 5, slots 5..7.
    s1 = keys[5:8]
    a1 = tree_decode._rows_with(root, torch.zeros(3, dtype=torch.long), s1)
    y1, _, _ = ta.step([xs[None, 5:8]], s1, torch.full((3,), 5), a1)
    # Depth 2: children of rows 2, 0, 2 at position 6, slots 8..10.
    s2 = keys[8:11]
    a2 = tree_decode._rows_with(a1, torch.tensor([2, 0, 2]), s2)
    y2, _, _ = ta.step([xs[None, 8:11]], s2, torch.full((3,), 6), a2)
    # Accept root -> depth-1 row 2 -> depth-2 row 0 (slots 7, 8 -> 5, 6).
    ta.move(torch.tensor([7, 8]), torch.tensor([5, 6]))
    chain_in = torch.cat([xs[:5], xs[7:8], xs[8:9]])
    k, v = module.static_cache(32)
    pos = keys[:7]
    y = module.static_step(chain_in[None], k_cache=k, v_cache=v, positions=pos)[
      0
    ]
  torch.testing.assert_close(y1[2], y[5], atol=1e-5, rtol=1e-5)
  torch.testing.assert_close(y2[0], y[6], atol=1e-5, rtol=1e-5)
  torch.testing.assert_close(ta.k[:, :, :, :7], k[:, :, :, :7])
  torch.testing.assert_close(ta.v[:, :, :, :7], v[:, :, :, :7])


def test_b1_tree_runs_are_its_chain_drafts():
  """B1's runs (one causal chain made before growth) put the chain
  drafter's tokens first and leave its cache as the chain's steps do."""
  torch.manual_seed(4)
  module = build_torch_adapter(
    "b1", hidden_dim=D, num_heads=4, ffn_dim=64, alpha_init=1.0
  ).eval()
  head = torch.randn(V, D)
  kw = {"device": "cpu", "dtype": torch.float32}
  ta = tree_steps.TreeAdapter(module, head, 1, 32, topk=3, vocab=None, **kw)
  sa = adapter_steps.StaticAdapter(module, head, 1, 32, **kw)
  xs = torch.randn(1, 5, D)
  with torch.inference_mode():
    pos = ta.keys[:5]
    y, _, _ = ta.step([xs], pos, pos, ta.keys[None] <= pos[:, None])
    vals, toks = ta._chain(ta.keys[5:8], y[-1].reshape(1, 1, -1))
    out, tok = sa.step([xs], 0)
    chain = []
    for p in range(5, 8):
      out, tok = sa.step([out], p)
      chain.append(int(tok))
  assert vals.shape == toks.shape == (3, 3)
  assert toks[:, 0].tolist() == chain
  assert bool((vals[:, :1] >= vals).all())
  torch.testing.assert_close(ta.k[:, :, :, :8], sa.k[:, :, :, :8])
  torch.testing.assert_close(ta.v[:, :, :, :8], sa.v[:, :, :, :8])


# ----------------------------------------------------------------------------
# End to end: lossless, and what each model reads at every call.


class TreeOracle(torch.nn.Module):
  """An exact next-state 'adapter' with tree masks (a StaticLM inside).

  It reads the token its input state predicts (argmax through its LM head)
  and feeds it to its own model at the same slot, position and mask: its
  output at position p is that model's h[p+1]. Built on the noisy twin it
  is right often, not always. Its cache is a view of the model's buffers
  (slots from OFF on), so the runtime's moves move the model's entries.
  """

  OFF = 32  # slots [0, OFF) hold the prompt

  def __init__(self, backend, stream, max_len=96):
    super().__init__()
    self.b, self.stream = backend, stream
    self.w = backend.lm_head_weight().detach()
    self.lm = backend.static_decoder(self.OFF + max_len)
    self.max_seq_len = max_len
    self.base = 0

  def set_prompt(self, inputs):
    with torch.inference_mode():
      _, _, cache = self.b.forward(inputs, logits_to_keep=1)
    self.base = cache_length(cache)
    assert self.base <= self.OFF
    self.lm.load_prefix(cache, self.base)

  def static_cache(self, max_len, device=None, dtype=None):
    window = slice(self.OFF, self.OFF + max_len)
    return self.lm.k[:, :, :, window], self.lm.v[:, :, :, window]

  def static_step(
    self, *inputs, k_cache, v_cache, positions, slots=None, mask=None
  ):
    x = inputs[0] if self.stream == "source" else inputs[-1]
    toks = (x[0].to(self.w.dtype) @ self.w.T).argmax(-1)
    allowed = torch.zeros((toks.shape[0], self.lm.max_len), dtype=torch.bool)
    allowed[:, : self.base] = True
    allowed[:, self.OFF : self.OFF + mask.shape[1]] = mask
    h, _ = self.lm.tree_step(
      toks[None], self.OFF + slots, self.base + positions, allowed
    )
    return h[None]


class Log:
  """Every model call as (who, slots, positions, values, reads) rows,
  every cache move as (who, 'move', src, dst), and an adapter's outputs
  after its call as (who, 'out', outputs [T, D])."""

  def __init__(self):
    self.rows = []
    self.owner = {}  # id(cache object) -> who
    self.paused = False  # while a graph is captured (`_replayed_graphs`)

  def call(self, who, slots, positions, values, reads):
    if not self.paused:
      self.rows.append((who, list(slots), list(positions), values, reads))

  def move(self, who, src, dst):
    if not self.paused:
      self.rows.append((who, "move", list(src), list(dst)))

  def out(self, who, outputs):
    if not self.paused:
      self.rows.append((who, "out", outputs))


def _reads_of(allowed):
  return [set(torch.nonzero(r).reshape(-1).tolist()) for r in allowed]


class RecordingBackend(TokenPromptBackend):
  """Logs the HF forwards and the static decoder's steps and moves."""

  def __init__(self, model, log, who, eos=2):
    super().__init__(model, model_id="tiny", eos_token_id=eos)
    self.log, self.who = log, who

  def forward(
    self,
    inputs=None,
    *,
    input_ids=None,
    past_key_values=None,
    attention_mask=None,
    position_ids=None,
    **kw,
  ):
    ids = (inputs["input_ids"] if inputs is not None else input_ids)[0]
    start = cache_length(past_key_values)
    steps = ids.shape[0]
    slots = range(start, start + steps)
    if attention_mask is not None and attention_mask.dim() == 4:
      reads = _reads_of(attention_mask[0, 0] == 0)
    else:
      reads = [set(range(s + 1)) for s in slots]
    pos = slots if position_ids is None else position_ids[0].tolist()
    self.log.call(self.who, slots, pos, ids.tolist(), reads)
    out = super().forward(
      inputs,
      input_ids=input_ids,
      past_key_values=past_key_values,
      attention_mask=attention_mask,
      position_ids=position_ids,
      **kw,
    )
    self.log.owner[id(out[2])] = self.who
    return out

  def static_decoder(self, max_len, **options):
    lm = super().static_decoder(max_len, **options)
    forward, move = lm._tree_forward, lm.move_entries
    log, who = self.log, self.who

    # Every static step (chain, tree, a verified tree) ends here, with the
    # slots, positions and mask it computed (eager on CPU).
    def logged(ids, slots, positions, allowed):
      log.call(
        who,
        slots.tolist(),
        positions.tolist(),
        ids[0].tolist(),
        _reads_of(allowed),
      )
      return forward(ids, slots, positions, allowed)

    def logged_move(src, dst):
      log.move(who, src.tolist(), dst.tolist())
      return move(src, dst)

    lm._tree_forward, lm.move_entries = logged, logged_move
    return lm


class RecordingAdapter(torch.nn.Module):
  """Logs every static step of an adapter (inputs per row)."""

  def __init__(self, inner, log, who):
    super().__init__()
    self.inner, self.log, self.who = inner, log, who
    self.max_seq_len = inner.max_seq_len

  def static_cache(self, *args, **kw):
    return self.inner.static_cache(*args, **kw)

  def static_step(
    self, *inputs, k_cache, v_cache, positions, slots=None, mask=None
  ):
    slots = positions if slots is None else slots
    if mask is None:
      keys = torch.arange(k_cache.shape[3])
      mask = keys[None] <= positions[:, None]
    values = [[x[0, i].clone() for x in inputs] for i in range(len(slots))]
    self.log.call(
      self.who, slots.tolist(), positions.tolist(), values, _reads_of(mask)
    )
    out = self.inner.static_step(
      *inputs,
      k_cache=k_cache,
      v_cache=v_cache,
      positions=positions,
      slots=slots,
      mask=mask,
    )
    self.log.out(self.who, out[0].clone())
    return out


def _check_reads(log, who, truth, same):
  """Replays `who`'s calls and moves on a model of its cache.

  Every row must read exactly one entry per position 0..its own, every
  entry it reads must have been computed from a context contained in its
  own (its ancestors, never a sibling branch or a stale draft), and every
  entry written in an earlier round (rounds end at each target call) must
  hold the truth: `truth[position]`, compared with `same`.
  """
  slot_of, entries = {}, []  # slot -> entry id; id -> (pos, value, rnd, ctx)
  rnd, calls = 0, 0
  for row in log.rows:
    name = row[0]
    if name != who:
      if name == "target" and row[1] != "move":
        rnd += 1
      continue
    if row[1] == "out":
      continue
    if row[1] == "move":
      ids = [slot_of[s] for s in row[2]]
      for d, e in zip(row[3], ids, strict=True):
        slot_of[d] = e
      continue
    _, slots, positions, values, reads = row
    calls += 1
    first = len(entries)
    for i, s in enumerate(slots):
      entries.append([positions[i], values[i], rnd, None])
      slot_of[s] = first + i
    for i in range(len(slots)):
      me = first + i
      read = {slot_of[s] for s in reads[i]}
      assert me in read, (who, calls, "a row must read itself")
      got = sorted(entries[e][0] for e in read)
      assert got == list(range(positions[i] + 1)), (who, calls, i, got)
      entries[me][3] = frozenset(read)
      for e in read - {me}:
        pos, value, r, ctx = entries[e]
        assert ctx <= entries[me][3], (who, calls, i, "reads a side branch")
        if r < rnd:
          assert same(value, truth[pos]), (who, calls, i, "stale at", pos)
    if who == "target":
      rnd += 1
  assert calls > 0, who


def _check_runs_fed_back(log, who, head):
  """B1's runs (a tree's or a chain's steps, one row each) are fed, each,
  exactly the last output of the call before it in the round: the
  catch-up's, then each run's; and what the target verifies next (a tree
  or a chain) has as node 1 the token `head` (the LM head [V, D]) ranks
  first from the catch-up's last output."""
  prev, first, runs = None, None, 0
  for row in log.rows:
    if row[0] == "target" and row[1] != "move":
      if first is not None and len(row[3]) > 1:
        assert row[3][1] == first, (who, "node 1 is not the catch-up's top")
      prev = first = None
    elif row[0] == who and row[1] == "out":
      if prev is None:
        first = int((head.detach() @ row[2][-1]).argmax())
      prev = row[2][-1]
    elif row[0] == who and row[1] != "move":
      if prev is not None:
        assert len(row[1]) == 1, (who, "a run of more than one row")
        assert torch.equal(row[3][0][-1], prev), (who, row[2])
        runs += 1
  assert runs > 0, who


def _close(a, b):
  return all(
    bool(torch.allclose(x, y, atol=1e-4, rtol=1e-4))
    for x, y in zip(a, b, strict=True)
  )


def _true_states(model, prompt, tokens):
  with torch.no_grad():
    out = model.model(input_ids=torch.tensor([prompt + tokens[:-1]]))
  return out.last_hidden_state[0, len(prompt) - 1 :]


def _setup(target_model, noisy_model, eos=2):
  log = Log()
  tb = RecordingBackend(copy.deepcopy(target_model), log, "target", eos)
  db = RecordingBackend(copy.deepcopy(noisy_model), log, "drafter", eos)
  noisy = _backend(copy.deepcopy(noisy_model))
  adapters = {}
  for kind, stream in (("b1", "target"), ("l5", "source"), ("l5f", "target")):
    name = f"o{kind}"
    adapters[name] = Adapter(
      name,
      kind,
      RecordingAdapter(TreeOracle(noisy, stream), log, name),
      torch.device("cpu"),
      torch.float32,
    )
  torch.manual_seed(7)
  l4 = build_torch_adapter("l4", hidden_dim=D, num_heads=4, ffn_dim=64)
  adapters["l4"] = Adapter(
    "l4", "l4", l4.eval(), torch.device("cpu"), torch.float32
  )
  return Models(tb, db, adapters), log


@pytest.fixture
def recording(target_model, noisy_model, monkeypatch):
  models, log = _setup(target_model, noisy_model)
  _patch_moves(monkeypatch, log)
  return models, log


def _patch_moves(monkeypatch, log):
  hf_move = tr.move_cache_entries
  adapter_move = tree_steps.TreeAdapter.move

  def logged_hf(cache, src, dst, keep):
    log.move(log.owner[id(cache)], src, dst)
    return hf_move(cache, src, dst, keep)

  def logged_adapter(self, src, dst):
    log.move(self.module.who, src.tolist(), dst.tolist())
    return adapter_move(self, src, dst)

  monkeypatch.setattr(tr, "move_cache_entries", logged_hf)
  monkeypatch.setattr(tree_steps.TreeAdapter, "move", logged_adapter)


TREE_METHODS = ("tree:ob1", "tree:ol5", "tree:ol5f", "two_phase_tree:l4+ol5")


def _run(models, log, method, s, cfg):
  tb, db = models.target, models.drafter
  ti, di = tb.prompt_inputs(s), db.prompt_inputs(s)
  for name in ("ob1", "ol5", "ol5f"):
    models.adapters[name].module.inner.set_prompt(ti)
  log.rows.clear()
  return sd.run_method(method, models, ti, di, cfg)


@pytest.mark.parametrize("runtime", sd.RUNTIMES)
def test_trees_are_lossless_and_feed_each_model_only_its_path(
  recording, target_model, noisy_model, runtime
):
  """Partial accepts: every call of target, drafter and adapter reads one
  consistent context, whose earlier-round entries are all true."""
  models, log = recording
  cfg = sd.SDConfig(
    gamma=3,
    max_new_tokens=20,
    eos_token_ids=(),
    runtime=runtime,
    options={"tree_depth": 4, "tree_topk": 3, "tree_nodes": 10},
  )
  partial = {}
  for seed in (11, 12):
    s = _prompt(seed)
    prompt = s["input_ids"]
    base = _run(models, log, "baseline", s, cfg).tokens
    truth = prompt + base
    h_t = _true_states(target_model, prompt, base)
    h_d = _true_states(noisy_model, prompt, base)
    for m in TREE_METHODS:
      r = _run(models, log, m, s, cfg)
      assert r.tokens == base, (m, runtime)
      _check_reads(log, "target", truth, int.__eq__)
      name = parse_method(m)[1][-1]
      spec = get_spec(models.adapters[name].kind)
      if "source" in spec.inputs or m.startswith("two_phase"):
        _check_reads(log, "drafter", truth, int.__eq__)
      streams = {"source": h_d, "target": h_t}
      states = [[streams[x][p] for x in spec.inputs] for p in range(len(base))]
      _check_reads(log, name, states, _close)
      if spec.inputs == ("target",):
        _check_runs_fed_back(log, name, models.target.lm_head_weight())
      assert r.accepted > 0, m
      partial[m] = partial.get(m, 0) + sum(
        0 < acc < cfg.options["tree_depth"]
        for phase, _, acc in r.per_iteration
        if phase == "decode"
      )
      deep = [x for x in r.per_iteration if x[0] == "decode" and x[2] >= 3]
      assert deep or seed != 11, (m, "no accept beyond depth 2")
  assert all(v > 0 for v in partial.values()), partial
  if runtime == "fast":
    assert models.fast_notes["target"].startswith("static")


@pytest.mark.parametrize("runtime", sd.RUNTIMES)
def test_eos_inside_the_tree_stops(
  target_model, noisy_model, runtime, monkeypatch
):
  models0, log0 = _setup(target_model, noisy_model)
  cfg0 = sd.SDConfig(max_new_tokens=16, eos_token_ids=())
  toks = _run(models0, log0, "baseline", _prompt(31), cfg0).tokens
  # A token first generated at index 3..6: inside a tree, not its root.
  firsts = {t: toks.index(t) for t in toks}
  idx, eos = min((i, t) for t, i in firsts.items() if 3 <= i <= 6)
  models, log = _setup(target_model, noisy_model, eos=eos)
  _patch_moves(monkeypatch, log)
  cfg = sd.SDConfig(
    max_new_tokens=16,
    runtime=runtime,
    options={"tree_depth": 5, "tree_topk": 3, "tree_nodes": 12},
  )
  base = _run(models, log, "baseline", _prompt(31), cfg).tokens
  assert base == toks[: idx + 1]
  inside = 0
  for m in TREE_METHODS:
    r = _run(models, log, m, _prompt(31), cfg)
    assert r.tokens == base, m
    truth = _prompt(31)["input_ids"] + base
    _check_reads(log, "target", truth, int.__eq__)
    # Token 0 plus each verification's accepted nodes and the target's own
    # token; one fewer when the EOS was an accepted node, not that token.
    kept = sum(x[2] for x in r.per_iteration)
    inside += len(r.tokens) == kept + r.iterations
  assert inside > 0, "the EOS never was an accepted tree node"


@pytest.mark.parametrize("runtime", sd.RUNTIMES)
@pytest.mark.parametrize("max_new", [1, 2, 3, 7])
def test_max_new_tokens_reached_inside_the_tree(recording, max_new, runtime):
  models, log = recording
  cfg = sd.SDConfig(
    max_new_tokens=max_new,
    eos_token_ids=(),
    runtime=runtime,
    options={"tree_depth": 5, "tree_topk": 3, "tree_nodes": 12},
  )
  s = _prompt(40)
  base = _run(models, log, "baseline", s, cfg).tokens
  assert len(base) == max_new
  last = len(s["input_ids"]) + max_new - 2  # token m-1 is never fed
  for m in TREE_METHODS:
    r = _run(models, log, m, s, cfg)
    assert r.tokens == base, (m, max_new)
    fed = [
      p
      for row in log.rows
      if row[0] == "target" and row[1] != "move"
      for p in row[2]
    ]
    assert max(fed) <= last, (m, max_new)


def test_verify_benchmark_runs_on_cpu(tmp_path):
  from tools.benchmarks import benchmark_tree_verify as bench

  path = tmp_path / "tree_verify.json"
  argv = "--shape tiny --prompt_len 20 --nodes 1,5,12 --reps 1 --device cpu"
  assert bench.main(argv.split() + ["--json", str(path)]) == 0
  out = json.loads(path.read_text())
  assert sorted(out["nodes"], key=int) == ["1", "5", "12"]
  for row in out["nodes"].values():
    assert row["tree"]["sync_ms"] > 0 and "sync_ms" in row["tree_vs_decode"]
  with pytest.raises(SystemExit):
    bench.main(["--nodes", "1,a"])


def test_benchmark_cli_runs_tree_methods(tmp_path):
  from tools import benchmark_sd as bench

  out = tmp_path / "bench"
  methods = "decode:b1,tree:b1,tree:l5,tree:l5f,two_phase_tree:l4+l5"
  argv = [
    "--random_models=tiny",
    "--prompt_len=16",
    "--num_samples=2",
    "--warmup=1",
    "--max_new_tokens=9",
    "--gamma=3",
    "--tree_depth=3",
    "--tree_topk=2",
    "--tree_nodes=7",
    "--ignore_eos",
    "--methods",
    methods,
    "--bootstrap=20",
    "--no_progress",
    "--no_plots",
    f"--out={out}",
  ]
  argv += [f"--adapter={a}=random" for a in ("l4", "b1", "l5", "l5f")]
  assert bench.main(argv) == 0
  res = json.loads((out / "results.json").read_text())
  want = {"tree_depth": 3, "tree_topk": 2, "tree_nodes": 7}
  assert res["config"]["options"] == want
  for m in methods.split(","):
    for label in (m, f"{m}@eager"):
      agg = res["aggregate"][label]
      assert agg["n"] == 2 and agg["mismatched_samples"] == 0, label
  assert set(res["costs"]["target_verify_tree_ms"]) >= {"7"}
  report = (out / "report.md").read_text()
  assert "- target tree verify: " in report and "7 tokens" in report
  bad = argv[:-4] + ["--tree_nodes=99"] + argv[-4:]
  assert bench.main(bad) == 2


def _replayed_graphs(monkeypatch, log):
  """Every static step object in graph mode on CPU: each length it would
  capture on CUDA is 'captured' from its example inputs (not logged) and
  stood in for by a `_Replay`, so the CUDA path's input copies into the
  captured buffers, its replays and its read-backs run here. Returns the
  replays."""
  replays = []

  class Graphs(static_kv.StepGraphs):
    def __init__(self, fn, example, lengths, device):
      self.fn, self.example = fn, example
      self.device = torch.device(device)
      self.graphs = {}
      paused, log.paused = log.paused, True  # captures may nest
      try:
        for steps in sorted(set(lengths)):
          static = example(steps)
          with torch.inference_mode():
            out = fn(*static)
          replays.append(_Replay(fn, static, out))
          self.graphs[steps] = (replays[-1], static, out)
      finally:
        log.paused = paused

  def capture(owner, lengths, compile_layers):
    owner._set_compiled(False)
    owner.mode = "graphs"
    return Graphs(owner._forward, owner._example, lengths, owner.device)

  for module in (static_kv, adapter_steps):
    monkeypatch.setattr(module, "StepGraphs", Graphs)
    monkeypatch.setattr(module, "capture_steps", capture)
  return replays


def test_b1_chain_after_an_uncaptured_catch_up_replays_its_graph(
  monkeypatch,
):
  """A catch-up of a length with no graph (the prompt, or the prompt and
  the tokens accepted during it) runs eagerly, and the chain after it
  replays the chain's own graph, not the chain's steps one by one; the
  tokens are those of the captured path and of the eager steps."""
  log = type("Log", (), {"paused": False})()
  replays = _replayed_graphs(monkeypatch, log)
  torch.manual_seed(5)
  module = build_torch_adapter(
    "b1", hidden_dim=D, num_heads=4, ffn_dim=64, alpha_init=1.0
  ).eval()
  head = torch.randn(V, D)
  kw = {"device": "cpu", "dtype": torch.float32, "self_fed": True}
  sa = adapter_steps.StaticAdapter(
    module, head, 1, 32, **kw, lengths=range(1, 5), chains=[3]
  )
  xs = torch.randn(1, 12, D)
  chain = next(r for r in replays if r.fn.__name__ == "_chain")
  with torch.inference_mode():
    got = sa.draft([xs[:, :9]], 0, 3)  # 9: not captured
    assert chain.calls == 1
    captured = sa.draft([xs[:, 9:12]], 9, 3)  # 3: one graph, chain in it
    assert chain.calls == 1
    steps = []
    y, tok = sa.step([xs[:, :9]], 0)
    for p in range(9, 12):
      steps.append(int(tok))
      y, tok = sa.step([y], p)
    steps.append(int(tok))
    y, tok = sa.step([xs[:, 9:12]], 9)
    again = [int(tok)]
    for p in range(12, 15):
      y, tok = sa.step([y], p)
      again.append(int(tok))
  assert got.tolist() == steps
  assert captured.tolist() == again


def test_replayed_graphs_decode_and_feed_as_the_eager_steps(
  target_model, noisy_model, monkeypatch
):
  """The fast runtime's graph path, on CPU: B1's chain and tree (the
  catch-up and all drafting one graph an iteration), L5F's tree and the
  target's verifications replayed from captured buffers stay lossless and
  feed each model only what they should."""
  models, log = _setup(target_model, noisy_model)
  _patch_moves(monkeypatch, log)
  replays = _replayed_graphs(monkeypatch, log)
  cfg = sd.SDConfig(
    gamma=3,
    max_new_tokens=20,
    eos_token_ids=(),
    runtime="fast",
    options={"tree_depth": 4, "tree_topk": 3, "tree_nodes": 10},
  )
  s = _prompt(11)
  prompt = s["input_ids"]
  base = _run(models, log, "baseline", s, cfg).tokens
  truth = prompt + base
  h_t = _true_states(target_model, prompt, base)
  h_d = _true_states(noisy_model, prompt, base)
  head = models.target.lm_head_weight()
  for m in ("decode:ob1", "tree:ob1", "tree:ol5f"):
    r = _run(models, log, m, s, cfg)
    assert r.tokens == base, m
    assert r.accepted > 0, m
    _check_reads(log, "target", truth, int.__eq__)
    name = parse_method(m)[1][-1]
    spec = get_spec(models.adapters[name].kind)
    streams = {"source": h_d, "target": h_t}
    states = [[streams[x][p] for x in spec.inputs] for p in range(len(base))]
    _check_reads(log, name, states, _close)
    if name == "ob1":  # chain or tree: each step fed the one before
      _check_runs_fed_back(log, name, head)
  replayed = {r.fn.__name__ for r in replays if r.calls}
  # The full chain and tree, then the shorter ones near the token budget.
  want = {"_draft", "_draft_tree", "_verify_forward", "_chain", "_grow_tree"}
  assert want <= replayed, replayed
  assert models.fast_notes["adapter:ob1"] == "static (graphs)"
