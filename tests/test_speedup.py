"""Tests for egpt_align.speedup."""

import json

import numpy as np
import pytest

from egpt_align import speedup


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 0.999])
@pytest.mark.parametrize("gamma", [1, 5, 8])
def test_tokens_per_cycle_closed_form(alpha, gamma):
  expected = (1 - alpha ** (gamma + 1)) / (1 - alpha)
  np.testing.assert_allclose(
    speedup.tokens_per_cycle(alpha, gamma), expected, rtol=1e-12
  )


def test_alpha_one_limit_and_vectorised():
  assert float(speedup.tokens_per_cycle(1.0, 5)) == 6.0
  # Continuous at 1.
  near = float(speedup.tokens_per_cycle(1 - 1e-9, 5))
  assert abs(near - 6.0) < 1e-6
  got = speedup.tokens_per_cycle(np.array([0.0, 0.5, 1.0]), 2)
  np.testing.assert_allclose(got, [1.0, 1.75, 3.0])
  with pytest.raises(ValueError, match="alpha"):
    speedup.tokens_per_cycle(1.5, 2)


def test_expected_speedup_anchor_numbers():
  # ANCHORS.md: a same-size drafter, c ~ 1, alpha 0.8, gamma 5 -> ~0.6x.
  s = float(speedup.expected_speedup(0.8, 5, 1.0, 1.0))
  tau = (1 - 0.8**6) / 0.2
  assert s == pytest.approx(tau / 6.0)
  assert 0.55 < s < 0.65
  # EAGLE-like head: tau ~ 3.69, c 0.05 -> ~2.95x.
  assert float(speedup.expected_speedup(0.8, 5, 0.05, 1.0)) == pytest.approx(
    tau / 1.25
  )
  with pytest.raises(ValueError, match="verify_cost"):
    speedup.expected_speedup(0.5, 5, 0.1, 0.0)


def test_best_gamma():
  g, s = speedup.best_gamma(0.8, 0.05, 1.0, max_gamma=16)
  brute = [
    float(speedup.expected_speedup(0.8, k, 0.05, 1.0)) for k in range(1, 17)
  ]
  assert g == int(np.argmax(brute)) + 1 and s == pytest.approx(max(brute))


def _simulate_slow(match, length, gamma):
  pos = cycles = 0
  while pos < length:
    run = 0
    while run < gamma and pos + run < length and match[pos + run]:
      run += 1
    pos += run + 1
    cycles += 1
  return cycles


def test_simulated_tokens_per_cycle_matches_loop():
  rng = np.random.default_rng(0)
  match = rng.random((20, 12)) < 0.7
  lengths = rng.integers(1, 13, 20)
  for gamma in (1, 3, 5):
    cycles = sum(_simulate_slow(match[i], lengths[i], gamma) for i in range(20))
    got = speedup.simulated_tokens_per_cycle(match, lengths, gamma)
    assert got == pytest.approx(lengths.sum() / cycles)
  # All matches: gamma + 1 tokens per cycle when lengths divide evenly.
  assert speedup.simulated_tokens_per_cycle(
    np.ones((2, 12), bool), np.array([12, 6]), 5
  ) == pytest.approx(6.0)
  # No matches: one token per cycle.
  assert speedup.simulated_tokens_per_cycle(
    np.zeros((2, 5), bool), np.array([5, 3]), 5
  ) == pytest.approx(1.0)


def test_costs_from_bench(tmp_path):
  bench = {
    "costs": {
      "target_decode_ms": 20.0,
      "draft_ms_per_token": {"l5": 2.0, "drafter": 14.0},
      "verify_ms": {"5": 22.0, "3": 21.0},
    }
  }
  path = tmp_path / "bench.json"
  path.write_text(json.dumps(bench))
  c = speedup.costs_from_bench(str(path), "l5", 5)
  assert c["draft_cost"] == pytest.approx(0.1)
  assert c["verify_cost"] == pytest.approx(1.1)
  assert c["source"] == str(path)
  flat = {
    "costs": {
      "target_decode_ms": 10.0,
      "draft_ms_per_token": 5.0,
      "verify_ms": 12.0,
    }
  }
  c = speedup.costs_from_bench(flat, "anything", 7)
  assert (c["draft_cost"], c["verify_cost"]) == (0.5, 1.2)
  with pytest.raises(ValueError, match=r"no entry 'l1'.*drafter"):
    speedup.costs_from_bench(bench, "l1", 5)
  c = speedup.costs_from_bench(bench, "l1", 5, fallback="drafter")
  assert c["draft_cost"] == pytest.approx(0.7) and c["draft_key"] == "drafter"
  with pytest.raises(ValueError, match="gamma '4'"):
    speedup.costs_from_bench(bench, "l5", 4)
  with pytest.raises(ValueError, match="costs.verify_ms"):
    speedup.costs_from_bench(
      {"costs": {"target_decode_ms": 1, "draft_ms_per_token": 1}}, "l5", 5
    )


def test_resolve_costs_defaults_and_flags(tmp_path):
  c = speedup.resolve_costs("b1", 5)
  assert c["source"] == "defaults"
  assert c["draft_cost"] == speedup.DEFAULT_DRAFT_COST["b1"]
  c = speedup.resolve_costs("l1", 5)
  assert c["draft_cost"] == speedup.DEFAULT_DRAFTER_COST
  assert c["verify_cost"] == speedup.DEFAULT_VERIFY_COST
  c = speedup.resolve_costs("l1", 5, draft_cost=0.3, verify_cost=1.2)
  assert (c["draft_cost"], c["verify_cost"], c["source"]) == (0.3, 1.2, "flags")
