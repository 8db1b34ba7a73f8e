"""Tests of the live SD runtime (tools/lib/sd_engine.py and the modules under
it): lossless SD on tiny random Llamas (CPU)."""

import copy
import dataclasses
import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from egpt_align.models import get_spec  # noqa: E402
from tools.lib import sd_engine as sd  # noqa: E402
from tools.lib.backends import cache_length, crop_cache  # noqa: E402
from tools.lib.random_models import TokenPromptBackend, random_llama  # noqa: E402
from tools.lib.sd_methods import check_method, parse_method  # noqa: E402
from tools.lib.sd_models import Adapter, Models  # noqa: E402
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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
  # Tiny models: thread fan-out only adds contention on a busy CPU.
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


def _backend(model, eos=2):
  return TokenPromptBackend(model, model_id="tiny", eos_token_id=eos)


@pytest.fixture(scope="module")
def target_model():
  return random_llama(SHAPE, seed=0)


@pytest.fixture(scope="module")
def noisy_model(target_model):
  """The target plus noise: agrees often, not always (partial accepts)."""
  model = copy.deepcopy(target_model)
  g = torch.Generator().manual_seed(5)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.01 * torch.randn(p.shape, generator=g))
  return model


def _prompt(seed, length=12):
  g = torch.Generator().manual_seed(seed)
  return {"input_ids": torch.randint(3, V, (length,), generator=g).tolist()}


def _adapter(kind, alpha=None, seed=7, name=None):
  torch.manual_seed(seed)
  kw = (
    dict(hidden_dim=D, bottleneck_dim=8)
    if kind in ("l1", "l2", "l3")
    else dict(hidden_dim=D, num_heads=4, ffn_dim=64)
  )
  if alpha is not None:
    kw["alpha_init"] = alpha
  module = build_torch_adapter(kind, **kw).eval()
  return Adapter(name or kind, kind, module, torch.device("cpu"), torch.float32)


class OracleNext(torch.nn.Module):
  """An exact next-state 'adapter' for the decode off-by-one test.

  It reads the token its input state predicts (argmax through the LM head),
  feeds that token to its own copy of the target's KV cache and returns the
  target's next state: output at position p = h[p+1], exactly what a perfect
  decode adapter must produce. `stream` picks the input it reads.
  """

  def __init__(self, backend, stream):
    super().__init__()
    self.b = backend
    self.stream = stream
    self.prompt = None
    self.w = backend.lm_head_weight().detach()

  def init_cache(self, batch_size, max_len, device=None, dtype=None):
    _, _, kv = self.b.forward(self.prompt, logits_to_keep=1)
    return {"kv": kv, "base": cache_length(kv), "length": 0}

  def truncate(self, cache, length):
    assert 0 <= length <= cache["length"]
    cache["kv"] = crop_cache(cache["kv"], cache["base"] + length)
    cache["length"] = length
    return cache

  def decode_step(self, *inputs, cache, position):
    assert position == cache["length"], (position, cache["length"])
    x = inputs[0] if self.stream == "source" else inputs[-1]
    toks = (x[0] @ self.w.T).argmax(-1)
    h, _, cache["kv"] = self.b.forward(
      input_ids=toks[None], past_key_values=cache["kv"]
    )
    cache["length"] += toks.numel()
    return h, cache


def _greedy_no_cache(model, ids, max_new, eos):
  """Independent greedy reference: full recompute every step, no KV cache."""
  ids = list(ids)
  out = []
  with torch.no_grad():
    for _ in range(max_new):
      logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
      t = int(logits.argmax())
      out.append(t)
      ids.append(t)
      if t in eos:
        break
  return out


PREFILL_METHODS = (
  "prefill_hiding:l1",
  "prefill_hiding:l2",
  "prefill_hiding:l3",
)


def test_baseline_matches_uncached_greedy(target_model):
  tb = _backend(target_model)
  models = Models(tb)
  cfg = sd.SDConfig(gamma=3, max_new_tokens=12, eos_token_ids=())
  s = _prompt(1)
  r = sd.run_method("baseline", models, tb.prompt_inputs(s), None, cfg)
  ref = _greedy_no_cache(target_model, s["input_ids"], 12, eos=())
  assert r.tokens == ref
  assert r.drafted == 0 and r.iterations == 11
  assert r.phases["target_decode"]["calls"] == 11
  assert r.total_ms == pytest.approx(r.prefill_ms + r.decode_ms)


@pytest.mark.parametrize("runtime", sd.RUNTIMES)
def test_every_method_equals_baseline_with_partial_accepts(
  target_model, noisy_model, runtime
):
  tb, db = _backend(target_model), _backend(noisy_model)
  adapters = {
    k: _adapter(k, alpha=1.0)
    for k in ("l1", "l2", "l3", "l4", "b1", "l5", "l5f")
  }
  models = Models(tb, db, adapters)
  methods = [
    "draft_tokens",
    "prefill_hiding:l4",
    "prefill_hiding:l1",
    "prefill_hiding:l3",
    "decode:b1",
    "decode:l5",
    "decode:l5f",
    "two_phase:l2+l5f",
  ]
  cfg = sd.SDConfig(
    gamma=4, max_new_tokens=16, eos_token_ids=(), runtime=runtime
  )
  eager = dataclasses.replace(cfg, runtime="eager")
  partial = 0
  for seed in (11, 12):
    s = _prompt(seed)
    ti, di = tb.prompt_inputs(s), db.prompt_inputs(s)
    base = sd.run_method("baseline", models, ti, None, cfg).tokens
    assert len(base) == 16
    for m in methods:
      r = sd.run_method(m, models, ti, di, cfg)
      assert r.tokens == base, (m, seed)
      assert 0 <= r.accepted <= r.drafted
      # The same drafts and accepts (rollbacks) as the eager runtime.
      ref = sd.run_method(m, models, ti, di, eager) if runtime != "eager" else r
      assert r.per_iteration == ref.per_iteration, (m, seed)
      partial += sum(
        0 < acc < k for phase, k, acc in r.per_iteration if m == "draft_tokens"
      )
  # Rollback after a partial accept happened and output still matched.
  assert partial > 0


@pytest.mark.parametrize("runtime", sd.RUNTIMES)
def test_identity_adapters_accept_everything(target_model, runtime):
  """Drafter == target + identity / exact adapters: 100% acceptance.

  Identity for prefill: L4 with alpha = 0 returns its input exactly
  (h + 0 * (out - h)), so the drafts are the drafter's own tokens. L1-L3
  end in a LayerNorm and cannot be identities. For decode an identity is
  wrong by design (B1 with alpha = 0 drafts the previous token again), so
  the exact next-state oracle above stands in for a perfect L5/B1/L5F.
  """
  tb, db = _backend(target_model), _backend(copy.deepcopy(target_model))
  oracles = {}
  for kind, stream in (("b1", "target"), ("l5", "source"), ("l5f", "target")):
    o = OracleNext(tb, stream)
    oracles[kind] = o
  adapters = {"l4": _adapter("l4", alpha=0.0)}
  adapters.update(
    {
      f"o{k}": Adapter(f"o{k}", k, o, torch.device("cpu"), torch.float32)
      for k, o in oracles.items()
    }
  )
  models = Models(tb, db, adapters)
  cfg = sd.SDConfig(
    gamma=4, max_new_tokens=18, eos_token_ids=(), runtime=runtime
  )
  s = _prompt(21)
  ti, di = tb.prompt_inputs(s), db.prompt_inputs(s)
  for o in oracles.values():
    o.prompt = ti
  base = sd.run_method("baseline", models, ti, None, cfg).tokens
  for m in (
    "draft_tokens",
    "prefill_hiding:l4",
    "two_phase:l4+ob1",
    "two_phase:l4+ol5",
    "decode:ob1",
    "decode:ol5",
    "decode:ol5f",
  ):
    r = sd.run_method(m, models, ti, di, cfg)
    assert r.tokens == base, m
    assert r.drafted > 0 and r.accepted == r.drafted, (m, r.per_iteration)
    if m.startswith(("prefill_hiding", "two_phase")):
      assert r.per_iteration[0] == ("prefill", 4, 4)
      assert r.first_draft_match is True
  # Full accepts give gamma + 1 tokens per decode iteration.
  r = sd.run_method("decode:ob1", models, ti, di, cfg)
  assert r.verify_iterations == 4  # 1 + 5 + 5 + 5 tokens, then 2 left: 1 + 1
  # B1 with alpha = 0 drafts "the previous token": still lossless.
  models.adapters["b1"] = _adapter("b1", alpha=0.0)
  assert sd.run_method("decode:b1", models, ti, di, cfg).tokens == base


@pytest.mark.parametrize("runtime", sd.RUNTIMES)
def test_eos_inside_accepted_prefix_stops(target_model, runtime):
  """EOS accepted as a draft ends generation; later drafts are dropped."""
  tb0 = _backend(target_model)
  models0 = Models(tb0)
  cfg0 = sd.SDConfig(gamma=5, max_new_tokens=16, eos_token_ids=())
  s = None
  for seed in range(30, 60):
    cand = _prompt(seed)
    toks = sd.run_method(
      "baseline", models0, tb0.prompt_inputs(cand), None, cfg0
    ).tokens
    # A token whose first occurrence is at index 2..4: a draft of iteration 1.
    firsts = {t: toks.index(t) for t in toks}
    hits = [(i, t) for t, i in firsts.items() if 2 <= i <= 4]
    if hits:
      s, (idx, eos) = cand, min(hits)
      break
  assert s is not None, "no prompt with a usable EOS candidate"
  tb = _backend(target_model, eos=eos)
  db = _backend(copy.deepcopy(target_model), eos=eos)
  models = Models(tb, db, {"l4": _adapter("l4", alpha=0.0)})
  cfg = sd.SDConfig(gamma=5, max_new_tokens=16, runtime=runtime)
  ti, di = tb.prompt_inputs(s), db.prompt_inputs(s)
  base = sd.run_method("baseline", models, ti, None, cfg)
  assert base.tokens == toks[: idx + 1] and base.tokens[-1] == eos
  for m in ("draft_tokens", "prefill_hiding:l4"):
    r = sd.run_method(m, models, ti, di, cfg)
    assert r.tokens == base.tokens, m
    # One verification: drafts 1..idx accepted, the EOS being one of them.
    assert r.verify_iterations == 1 and r.drafted == 5
    assert r.accepted == idx


@pytest.mark.parametrize("runtime", sd.RUNTIMES)
@pytest.mark.parametrize("max_new", [1, 2, 3, 7])
def test_max_new_tokens_never_exceeded(target_model, max_new, runtime):
  tb, db = _backend(target_model), _backend(copy.deepcopy(target_model))
  adapters = {"l4": _adapter("l4", alpha=0.0), "b1": _adapter("b1", 1.0)}
  models = Models(tb, db, adapters)
  cfg = sd.SDConfig(
    gamma=5, max_new_tokens=max_new, eos_token_ids=(), runtime=runtime
  )
  s = _prompt(40)
  ti, di = tb.prompt_inputs(s), db.prompt_inputs(s)
  base = sd.run_method("baseline", models, ti, None, cfg).tokens
  assert len(base) == max_new
  for m in (
    "draft_tokens",
    "prefill_hiding:l4",
    "decode:b1",
    "two_phase:l4+b1",
  ):
    r = sd.run_method(m, models, ti, di, cfg)
    assert r.tokens == base, (m, max_new)
    # Drafts are cut to the budget: never more than max_new - 1 verified.
    assert all(k <= max_new - 1 for _, k, _ in r.per_iteration)


def test_phases_and_overlap_recorded(target_model, noisy_model):
  tb, db = _backend(target_model), _backend(noisy_model)
  models = Models(tb, db, {"l4": _adapter("l4"), "l5": _adapter("l5")})
  cfg = sd.SDConfig(gamma=3, max_new_tokens=10, eos_token_ids=())
  s = _prompt(50)
  ti, di = tb.prompt_inputs(s), db.prompt_inputs(s)
  r = sd.run_method("two_phase:l4+l5", models, ti, di, cfg)
  names = set(r.phases)
  assert {"target_prefill", "draft_prefill", "prefill_adapter:l4"} <= names
  assert "adapter:l5" in names and any(
    n.startswith("target_verify[") for n in names
  )
  # Drafter steps in the prefill: prefill_gamma (= gamma) single tokens.
  assert r.phases["prefill_draft_decode"]["units"] == 3
  ov = r.overlap
  assert ov["concurrent"] is False and ov["overlap_ms"] == 0.0
  assert ov["wall_ms"] == pytest.approx(ov["target_ms"] + ov["drafter_ms"])
  assert r.prefill_ms >= ov["wall_ms"]


def test_method_parsing_and_checks(target_model):
  assert parse_method("two_phase:l4+b1") == ("two_phase", ("l4", "b1"))
  for bad in ("decode", "two_phase:l4", "foo", "baseline:l4", "decode:a+b"):
    with pytest.raises(ValueError):
      parse_method(bad)
  tb = _backend(target_model)
  models = Models(tb, None, {"l4": _adapter("l4"), "b1": _adapter("b1")})
  with pytest.raises(ValueError, match="needs a drafter"):
    check_method("draft_tokens", models)
  with pytest.raises(ValueError, match="needs one of"):
    check_method("decode:l4", models)
  with pytest.raises(ValueError, match="no adapter named"):
    check_method("decode:l5", models)
  check_method("decode:b1", models)  # B1 needs no drafter


def test_first_difference():
  assert sd.first_difference([1, 2, 3], [1, 2, 3]) is None
  assert sd.first_difference([1, 2, 3], [1, 5, 3]) == 1
  assert sd.first_difference([1, 2], [1, 2, 3]) == 2


def test_token_margins_match_logits(target_model):
  tb = _backend(target_model)
  s = _prompt(60)
  toks = _greedy_no_cache(target_model, s["input_ids"], 5, eos=())
  margins = sd.token_margins(tb, tb.prompt_inputs(s), toks)
  with torch.no_grad():
    ids = torch.tensor([s["input_ids"] + toks[:-1]])
    logits = target_model(input_ids=ids).logits[0, -len(toks) :]
  top2 = logits.topk(2, -1).values
  want = (top2[:, 0] - top2[:, 1]).tolist()
  assert margins == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_thread_overlap_is_lossless_and_measured(target_model, noisy_model):
  """The concurrent prefill path (a drafter thread) on CPU."""
  tb, db = _backend(target_model), _backend(noisy_model)
  models = Models(tb, db, {"l4": _adapter("l4"), "b1": _adapter("b1")})
  s = _prompt(70)
  ti, di = tb.prompt_inputs(s), db.prompt_inputs(s)
  cfg = sd.SDConfig(gamma=3, max_new_tokens=10, eos_token_ids=())
  base = sd.run_method("baseline", models, ti, None, cfg).tokens
  tcfg = sd.SDConfig(
    gamma=3, max_new_tokens=10, eos_token_ids=(), overlap="thread"
  )
  for m in ("draft_tokens", "prefill_hiding:l4", "two_phase:l4+b1"):
    r = sd.run_method(m, models, ti, di, tcfg)
    assert r.tokens == base, m
    ov = r.overlap
    assert ov["concurrent"] is True
    assert ov["wall_ms"] == pytest.approx(
      max(ov["target_ms"], ov["drafter_ms"])
    )
    assert ov["target_alone_ms"] > 0 and ov["drafter_alone_ms"] > 0
    assert ov["overlap_ms"] == pytest.approx(
      ov["target_alone_ms"] + ov["drafter_alone_ms"] - ov["wall_ms"]
    )
  # The drafter's spans made in its thread are recorded too.
  assert r.phases["prefill_draft_decode"]["units"] == 3
  with pytest.raises(ValueError, match="overlap"):
    sd.SDConfig(overlap="streams")


class ThreadNoting(TokenPromptBackend):
  """Notes the thread of every forward; raises when told to."""

  def __init__(self, model, eos=2):
    super().__init__(model, model_id="tiny", eos_token_id=eos)
    self.threads: list[str] = []
    self.fail = False

  def forward(self, *args, **kw):
    self.threads.append(threading.current_thread().name)
    if self.fail:
      raise RuntimeError("drafter broke")
    return super().forward(*args, **kw)


def test_overlap_reuses_one_drafter_thread(target_model, noisy_model):
  """Every sample's drafter side runs on the same long-lived thread (a new
  thread per sample pays CUDA's per-thread set-up each time), and an error
  raised there reaches the caller."""
  tb, db = _backend(target_model), ThreadNoting(noisy_model)
  models = Models(tb, db, {"l4": _adapter("l4")})
  cfg = sd.SDConfig(
    gamma=3, max_new_tokens=6, eos_token_ids=(), overlap="thread"
  )
  main = threading.current_thread().name
  for seed in (71, 72, 73):
    s = _prompt(seed)
    for m in ("draft_tokens", "prefill_hiding:l4"):
      sd.run_method(m, models, tb.prompt_inputs(s), db.prompt_inputs(s), cfg)
  side = set(db.threads) - {main}
  assert len(side) == 1, side
  db.fail = True
  s = _prompt(74)
  with pytest.raises(RuntimeError, match="drafter broke"):
    sd.run_method(
      "draft_tokens", models, tb.prompt_inputs(s), db.prompt_inputs(s), cfg
    )


# ----------------------------------------------------------------------------
# The fast runtime (static KV buffers) against the eager one, and what each
# model was fed.


class RecordingBackend(TokenPromptBackend):
  """Logs every call as (who, cache position, token ids), on both runtimes."""

  def __init__(self, model, log, who, eos=2):
    super().__init__(model, model_id="tiny", eos_token_id=eos)
    self.log, self.who = log, who

  def forward(self, inputs=None, *, input_ids=None, past_key_values=None, **kw):
    if inputs is not None:
      pos, ids = 0, inputs["input_ids"]
    else:
      pos, ids = cache_length(past_key_values), input_ids
    self.log.append((self.who, pos, ids.reshape(-1).tolist()))
    return super().forward(
      inputs, input_ids=input_ids, past_key_values=past_key_values, **kw
    )

  def static_decoder(self, max_len, **options):
    lm = super().static_decoder(max_len, **options)
    step = lm.step

    def logged(ids, position):
      self.log.append((self.who, position, ids.reshape(-1).tolist()))
      return step(ids, position)

    lm.step = logged
    return lm


class RecordingAdapter(torch.nn.Module):
  """Logs the position and input states of every adapter step, then its
  output states as ("out:" + who, position, [outputs])."""

  def __init__(self, inner, log, who):
    super().__init__()
    self.inner = inner
    self.log, self.who = log, who
    self.max_seq_len = getattr(inner, "max_seq_len", 256)
    if hasattr(inner, "static_step"):
      self.static_step = self._static_step

  def init_cache(self, *args, **kw):
    return self.inner.init_cache(*args, **kw)

  def truncate(self, cache, length):
    return self.inner.truncate(cache, length)

  def static_cache(self, *args, **kw):
    return self.inner.static_cache(*args, **kw)

  def _logged(self, pos, inputs, y):
    self.log.append((self.who, pos, [x[0].clone() for x in inputs]))
    self.log.append(("out:" + self.who, pos, [y[0].clone()]))

  def decode_step(self, *inputs, cache, position=None):
    y, cache = self.inner.decode_step(*inputs, cache=cache, position=position)
    self._logged(position, inputs, y)
    return y, cache

  def _static_step(self, *inputs, k_cache, v_cache, positions):
    y = self.inner.static_step(
      *inputs, k_cache=k_cache, v_cache=v_cache, positions=positions
    )
    self._logged(int(positions[0]), inputs, y)
    return y


def _check_fed(log, who, truths, same):
  """What `who` attends to at each call is true, or drafted this round.

  A round ends with each target forward (its verification). At every call
  of `who` at position p, each cached entry x < p is either the truth
  (accepted token / true state) or was written in the current round: an
  entry that verification rejected must be rolled back before the next
  round reads it. The target itself never reads an unverified entry.
  `truths[s]` is the truth of input stream s, `same(a, b)` compares two.
  """
  seen = None  # per stream: [(value, round)]
  rnd = 0
  for i, (name, pos, items) in enumerate(log):
    if name != who:
      if name == "target":
        rnd += 1
      continue
    if seen is None:
      seen = [[] for _ in truths]
    for s, (values, truth) in enumerate(
      zip(items_of(items, truths), truths, strict=True)
    ):
      prev = seen[s][:pos]
      assert len(prev) == pos, (who, i, "position past the fed entries")
      for x, (v, r) in enumerate(prev):
        ok = same(v, truth[x]) or (r == rnd and who != "target")
        assert ok, (who, i, f"reads a stale entry at {x} from round {r}")
      seen[s] = prev + [(v, rnd) for v in values]
    if name == "target":
      rnd += 1


def _check_fed_back(log, who, stream):
  """Each drafting step of `who` (a call after the round's first) is fed,
  on input `stream`, exactly the output of its step before (B1 and L5F
  draft from their own predicted states)."""
  rnd, prev, steps = 0, None, 0
  for name, pos, items in log:
    if name == "target":
      rnd, prev = rnd + 1, None
    elif name == "out:" + who:
      prev = items[0][-1]
    elif name == who:
      if prev is not None:
        assert items[stream].shape[0] == 1, (who, rnd, pos)
        assert torch.equal(items[stream][0], prev), (who, rnd, pos)
        steps += 1
  assert steps > 0, who  # some round drafted more than one token


def items_of(items, truths):
  """A token list is one stream; adapters log one tensor per stream."""
  return [items] if len(truths) == 1 and isinstance(items[0], int) else items


def _verifications(log, truth):
  """(drafts, accepted) of each target call with drafts, from its inputs."""
  out = []
  for name, pos, ids in log:
    if name != "target" or pos == 0 or len(ids) == 1:
      continue
    k, j = len(ids) - 1, 0
    while (
      j < k and pos + 1 + j < len(truth) and ids[1 + j] == truth[pos + 1 + j]
    ):
      j += 1
    out.append((k, j))
  return out


def _true_states(model, prompt, tokens):
  """h[t] of `model` teacher-forced on prompt + tokens (t = 0..len-1)."""
  with torch.no_grad():
    ids = torch.tensor([prompt + tokens[:-1]])
    out = model.model(input_ids=ids)
  return out.last_hidden_state[0, len(prompt) - 1 :]


def _close(a, b):
  return bool(torch.allclose(a, b, atol=1e-4, rtol=1e-4))


@pytest.fixture(scope="module")
def recording(target_model, noisy_model):
  """Recording target + noisy drafter, random and oracle-like adapters."""
  log = []
  tb = RecordingBackend(copy.deepcopy(target_model), log, "target")
  db = RecordingBackend(copy.deepcopy(noisy_model), log, "drafter")
  adapters = {
    k: _adapter(k, alpha=1.0) for k in ("l2", "l4", "b1", "l5", "l5f")
  }
  # Next-state predictors from the noisy model: right often, not always,
  # and never exactly the target's states (partial accepts, and a kept
  # prediction is told apart from a true state).
  noisy = _backend(copy.deepcopy(noisy_model))
  for kind, stream in (("b1", "target"), ("l5", "source"), ("l5f", "target")):
    adapters[f"o{kind}"] = Adapter(
      f"o{kind}",
      kind,
      OracleNext(noisy, stream),
      torch.device("cpu"),
      torch.float32,
    )
  for name, ad in adapters.items():
    if get_spec(ad.kind).role == "decode":
      ad.module = RecordingAdapter(ad.module, log, name)
  return Models(tb, db, adapters), log


FED_METHODS = (
  "draft_tokens",
  "prefill_hiding:l4",
  "decode:b1",
  "decode:l5f",
  "decode:ob1",
  "decode:ol5",
  "decode:ol5f",
  "two_phase:l2+l5",
  "two_phase:l4+ol5f",
  "two_phase:l4+ob1",
)


@pytest.mark.parametrize("runtime", sd.RUNTIMES)
def test_every_model_is_fed_only_accepted_text(
  recording, target_model, noisy_model, runtime
):
  """Partial accepts: what target, drafter and adapter saw at every step.

  After every rollback each model attends only to accepted tokens (target
  and drafter) or to the true states of accepted positions (adapters); the
  acceptance counts follow from the drafts the target was fed.
  """
  models, log = recording
  tb, db = models.target, models.drafter
  cfg = sd.SDConfig(
    gamma=4, max_new_tokens=20, eos_token_ids=(), runtime=runtime
  )
  partial = {}
  for seed in (11, 12):
    s = _prompt(seed)
    prompt = s["input_ids"]
    ti, di = tb.prompt_inputs(s), db.prompt_inputs(s)
    for o in ("ob1", "ol5", "ol5f"):
      models.adapters[o].module.inner.prompt = ti
    base = sd.run_method("baseline", models, ti, None, cfg).tokens
    truth = prompt + base
    h_t = _true_states(target_model, prompt, base)
    h_d = _true_states(noisy_model, prompt, base)
    for m in FED_METHODS:
      log.clear()
      r = sd.run_method(m, models, ti, di, cfg)
      assert r.tokens == base, (m, runtime)
      _check_fed(log, "target", [truth], int.__eq__)
      _check_fed(log, "drafter", [truth], int.__eq__)
      assert _verifications(log, truth) == [
        (k, acc) for _, k, acc in r.per_iteration
      ], m
      kind, names = parse_method(m)
      if kind in ("decode", "two_phase"):
        ad = models.adapters[names[-1]]
        truths = [
          {"source": h_d, "target": h_t}[x] for x in get_spec(ad.kind).inputs
        ]
        assert any(x[0] == names[-1] for x in log), m
        _check_fed(log, names[-1], truths, _close)
        if "target" in get_spec(ad.kind).inputs:
          _check_fed_back(
            log, names[-1], get_spec(ad.kind).inputs.index("target")
          )
      partial[m] = partial.get(m, 0) + sum(
        0 < acc < k for _, k, acc in r.per_iteration
      )
  for m in ("draft_tokens", "decode:ob1", "decode:ol5", "decode:ol5f"):
    assert partial[m] > 0, (m, partial)
  if runtime == "fast":
    assert models.fast_notes["target"].startswith("static")
    assert models.fast_notes["drafter"].startswith("static")
    assert models.fast_notes["adapter:b1"].startswith("static")


@pytest.mark.parametrize("runtime", sd.RUNTIMES)
def test_eos_as_first_token_ends_generation(target_model, runtime):
  tb0 = _backend(target_model)
  s = _prompt(90)
  y0 = _greedy_no_cache(target_model, s["input_ids"], 1, eos=())[0]
  log = []
  tb = RecordingBackend(copy.deepcopy(target_model), log, "target", eos=y0)
  db = RecordingBackend(copy.deepcopy(target_model), log, "drafter", eos=y0)
  adapters = {k: _adapter(k) for k in ("l4", "b1", "l5f")}
  models = Models(tb, db, adapters)
  cfg = sd.SDConfig(gamma=3, max_new_tokens=10, runtime=runtime)
  ti = tb0.prompt_inputs(s)
  for m in ("baseline", "draft_tokens", "prefill_hiding:l4", "decode:b1"):
    log.clear()
    r = sd.run_method(m, models, ti, ti, cfg)
    assert r.tokens == [y0], m
    assert r.iterations == 0 and r.drafted == 0, m
    assert [x[1] for x in log if x[0] == "target"] == [0], m  # prefill only


def test_static_lm_rollback_never_reads_stale_entries(target_model):
  """Rolled-back positions hold garbage; the next steps must not see it."""
  from tools.lib import static_kv

  model = copy.deepcopy(target_model)
  tb = _backend(model)
  s = _prompt(95)
  prompt = s["input_ids"]
  with torch.inference_mode():
    lm = tb.static_decoder(64)
    _, _, cache = tb.forward(tb.prompt_inputs(s), logits_to_keep=1)
    p = len(prompt)
    lm.load_prefix(cache, p)
    lm.step(torch.tensor([[7, 8, 9]]), p)  # three drafts
    # Keep one, reject two: garbage beyond p + 1 (finite, so a masked-out
    # entry contributes exactly zero), then two new tokens at p + 1.
    g = torch.Generator().manual_seed(0)
    for buf in (lm.k, lm.v):
      stale = buf[:, :, :, p + 1 :]
      stale.copy_(1e3 * torch.randn(stale.shape, generator=g))
    h, ids = lm.step(torch.tensor([[10, 11]]), p + 1)
  with torch.no_grad():
    out = model(input_ids=torch.tensor([prompt + [7, 10, 11]]))
    ref = model.model(input_ids=torch.tensor([prompt + [7, 10, 11]]))
  torch.testing.assert_close(
    h, ref.last_hidden_state[0, -2:], atol=1e-5, rtol=1e-5
  )
  assert ids.tolist() == out.logits[0, -2:].argmax(-1).tolist()
  assert isinstance(lm, static_kv.StaticLM) and lm.mode == "eager"


def test_static_adapter_rollback_never_reads_stale_entries():
  from tools.lib import adapter_steps

  for kind in ("b1", "l5f"):
    ad = _adapter(kind, alpha=1.0)
    w = torch.randn(V, D)
    n_in = len(get_spec(kind).inputs)
    xs = [torch.randn(1, 6, D) for _ in range(n_in)]
    with torch.inference_mode():
      sa = adapter_steps.StaticAdapter(
        ad.module, w, n_in, 16, device="cpu", dtype=torch.float32
      )
      sa.step([x[:, :4] for x in xs], 0)
      for buf in (sa.k, sa.v):
        buf[:, :, :, 2:].copy_(1e3 * torch.randn(buf[:, :, :, 2:].shape))
      y, tok = sa.step([x[:, 2:6] for x in xs], 2)
      cache = ad.module.init_cache(1, 16)
      want, _ = ad.module.decode_step(*xs, cache=cache, position=0)
    torch.testing.assert_close(y, want[:, -1:], atol=1e-5, rtol=1e-5)
    assert tok.tolist() == (want[0, -1:] @ w.T).argmax(-1).tolist()


def test_b1_chain_traces_its_compiled_step_once_whatever_the_catch_up(
  monkeypatch,
):
  """The compiled one-position step of B1's chain is traced once: a
  catch-up of a new length (the prompt, or the prompt and the tokens
  accepted during it) must not hand the step after it an output whose
  strides differ (each new stride would compile again, in a timed run).
  Dynamo with its eager backend stands in for the CUDA compile."""
  import torch._dynamo
  from torch._dynamo.utils import counters

  from tools.lib import adapter_steps

  def compile_anywhere(fn, device, enabled):
    if not enabled:
      return fn
    return torch.compile(fn, dynamic=False, fullgraph=True, backend="eager")

  monkeypatch.setattr(adapter_steps, "cuda_compile", compile_anywhere)
  ad = _adapter("b1", alpha=1.0)
  w = torch.randn(V, D)
  xs = torch.randn(1, 40, D)
  kw = {"device": "cpu", "dtype": torch.float32, "self_fed": True}
  plain = adapter_steps.StaticAdapter(ad.module, w, 1, 64, **kw, chains=[3])
  sa = adapter_steps.StaticAdapter(ad.module, w, 1, 64, **kw, chains=[3])
  sa._set_compiled(True)
  torch._dynamo.reset()
  counters.clear()
  position = 0
  with torch.inference_mode():
    for steps in (7, 3, 12, 5):  # each catch-up length new
      x = xs[:, position : position + steps]
      got = sa.draft([x], position, 3)
      assert got.tolist() == plain.draft([x], position, 3).tolist()
      position += steps
  assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("runtime", sd.RUNTIMES)
def test_wider_drafter_head_still_drafts_the_last_shared_id(
  target_model, runtime
):
  """The drafter's head has 16 ids more than the target's vocabulary.

  Its logits are built so the widest ids win over everything and, among the
  ids both models share (0..V-1), the last one (V-1) wins: every draft must
  be V-1 on both runtimes (the fast one takes the argmax inside its captured
  LM-head step). Cutting the head one id short, or not at all, drafts
  another token.
  """
  drafter = random_llama(SHAPE, seed=3, vocab_size=V + 16)
  with torch.no_grad():
    # h = e_0 * sqrt(D) for every position: a huge embedding component 0
    # dominates the residual stream; the final norm keeps only component 0.
    drafter.model.embed_tokens.weight[:, 0] = 100.0
    drafter.model.norm.weight.zero_()
    drafter.model.norm.weight[0] = 1.0
    scale = torch.ones(V + 16)
    scale[V - 1], scale[V:] = 2.0, 3.0
    drafter.lm_head.weight.zero_()
    drafter.lm_head.weight[:, 0] = scale
  log = []
  tb = RecordingBackend(copy.deepcopy(target_model), log, "target")
  db = _backend(drafter)
  models = Models(tb, db)
  cfg = sd.SDConfig(
    gamma=3, max_new_tokens=8, eos_token_ids=(), runtime=runtime
  )
  s = _prompt(97)
  ti, di = tb.prompt_inputs(s), db.prompt_inputs(s)
  base = sd.run_method("baseline", models, ti, None, cfg).tokens
  log.clear()
  r = sd.run_method("draft_tokens", models, ti, di, cfg)
  assert r.tokens == base
  drafts = [ids[1:] for _, pos, ids in log if pos > 0 and len(ids) > 1]
  assert drafts and all(d == [V - 1] * len(d) for d in drafts), drafts
  if runtime == "fast":
    assert models.fast_notes["drafter"].startswith("static")


def test_a_span_makes_the_timer_wait_for_its_device(monkeypatch):
  """A span on a device nobody bound (a tree adapter's, say) is still
  waited for by `sync` and `collect` (CUDA calls faked: runs on CPU)."""
  from tools.lib.sd_timing import Timer

  synced = []

  class Event:
    def __init__(self, **_):
      pass

    def record(self, stream):
      pass

    def elapsed_time(self, end):
      return 1.0

  monkeypatch.setattr(torch.cuda, "Event", Event)
  monkeypatch.setattr(torch.cuda, "current_stream", lambda d: None)
  monkeypatch.setattr(torch.cuda, "synchronize", synced.append)
  timer = Timer([torch.device("cuda:0")])
  with timer.span("tree_adapter:b1", torch.device("cuda:1"), units=5):
    pass
  out = timer.collect()
  assert out["tree_adapter:b1"] == {"ms": 1.0, "units": 5, "calls": 1}
  assert [str(d) for d in synced] == ["cuda:0", "cuda:1"]
