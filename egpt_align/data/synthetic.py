"""Structured, learnable paired hidden-state sequences for demos and tests.

The source is an AR(1) process; the target is a fixed nonlinear function of
the current and previous source states plus noise:

  s[0] ~ N(0, I),  s[t] = rho s[t-1] + sqrt(1 - rho^2) e[t]
  y[t] = rms_normalize(tanh(s[t] A) + s[t-1] B) + noise_std * n[t]

with s[-1] = 0. The maps A, B (and the LM head that turns states into token
ids) come from `mapping_seed`, so datasets made with different `seed`s (train
and validation) share one mapping. A linear or per-position adapter recovers
part of it; a causal one that sees s[t-1] recovers more.
"""

import os

import numpy as np

from egpt_align.data.writer import DatasetWriter


class Mapping:
  """The fixed source -> target map and LM head of one mapping_seed."""

  def __init__(
    self,
    hidden_dim: int,
    target_dim: int,
    vocab_size: int,
    mapping_seed: int,
  ):
    rng = np.random.default_rng([mapping_seed, 0x5E7])
    self.a = rng.normal(size=(hidden_dim, target_dim)) / np.sqrt(hidden_dim)
    # tanh(s A) has per-dim variance ~0.4; B's term is kept a bit smaller
    # so the nonlinear, same-position part dominates.
    self.a *= 1.5
    self.b = (
      0.5 * rng.normal(size=(hidden_dim, target_dim)) / np.sqrt(hidden_dim)
    )
    self.lm_head = rng.normal(size=(vocab_size, target_dim)).astype(np.float32)

  def target(self, s: np.ndarray) -> np.ndarray:
    """Noise-free target [L, Dt] of a source sequence [L, D]."""
    prev = np.concatenate([np.zeros_like(s[:1]), s[:-1]], axis=0)
    y = np.tanh(s @ self.a) + prev @ self.b
    return y / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + 1e-6)

  def draft_states(self, s: np.ndarray) -> np.ndarray:
    """What a drafter 'believes': the map without its temporal term."""
    y = np.tanh(s @ self.a)
    return y / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + 1e-6)


def synthetic_lm_head(
  hidden_dim: int,
  *,
  target_dim: int | None = None,
  vocab_size: int = 256,
  mapping_seed: int = 0,
) -> np.ndarray:
  """The LM head [V, Dt] whose argmax gives the synthetic token ids."""
  target_dim = target_dim or hidden_dim
  return Mapping(hidden_dim, target_dim, vocab_size, mapping_seed).lm_head


def make_pairs(
  num_samples: int,
  *,
  hidden_dim: int,
  min_len: int = 5,
  max_len: int = 50,
  seed: int = 0,
  target_dim: int | None = None,
  rho: float = 0.8,
  noise_std: float = 0.1,
  mapping_seed: int = 0,
  vocab_size: int | None = 256,
) -> list[dict]:
  """Paired samples: dicts of source, target float32 [L, D], token ids, meta.

  Token ids are present when vocab_size is given: target_tokens are the LM
  head's argmax of the target, draft_tokens that of the drafter's guess.
  """
  if not 1 <= min_len <= max_len:
    raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
  target_dim = target_dim or hidden_dim
  mapping = Mapping(hidden_dim, target_dim, vocab_size or 1, mapping_seed)
  rng = np.random.default_rng([seed, 0xDA7A])
  # Lengths roughly like the reference's (mean ~ 0.65 of the max).
  mean = min_len + 0.65 * (max_len - min_len)
  lengths = np.clip(
    np.rint(rng.normal(mean, (max_len - min_len) / 4 + 1e-9, num_samples)),
    min_len,
    max_len,
  ).astype(np.int32)
  out = []
  innov = np.sqrt(1.0 - rho * rho)
  for i, length in enumerate(lengths):
    e = rng.normal(size=(length, hidden_dim))
    s = np.empty_like(e)
    s[0] = e[0]
    for t in range(1, length):
      s[t] = rho * s[t - 1] + innov * e[t]
    y = mapping.target(s) + noise_std * rng.normal(size=(length, target_dim))
    sample = {
      "source": s.astype(np.float32),
      "target": y.astype(np.float32),
      "meta": {"id": f"synthetic-{seed}-{i}", "sample_idx": i},
    }
    if vocab_size:
      sample["target_tokens"] = np.argmax(y @ mapping.lm_head.T, -1).astype(
        np.int32
      )
      d = mapping.draft_states(s)
      sample["draft_tokens"] = np.argmax(d @ mapping.lm_head.T, -1).astype(
        np.int32
      )
    out.append(sample)
  return out


def write_lm_head(path: str, weight: np.ndarray, *, model_id: str) -> str:
  """Writes PATH.npy + PATH.json in the lm_head file format."""
  import json

  base = path[:-4] if path.endswith(".npy") else path
  np.save(base + ".npy", weight)
  info = {
    "format": "egpt_align.lm_head",
    "version": 1,
    "vocab_size": int(weight.shape[0]),
    "hidden_dim": int(weight.shape[1]),
    "model_id": model_id,
    "dtype": str(weight.dtype),
    "states_post_norm": True,
  }
  with open(base + ".json", "w") as f:
    json.dump(info, f, indent=1)
  return base + ".npy"


def write_synthetic_dataset(
  path: str,
  num_samples: int,
  *,
  hidden_dim: int,
  min_len: int = 5,
  max_len: int = 50,
  seed: int = 0,
  target_dim: int | None = None,
  dtype: str = "bfloat16",
  samples_per_shard: int = 1024,
  rho: float = 0.8,
  noise_std: float = 0.1,
  mapping_seed: int = 0,
  vocab_size: int | None = 256,
  lm_head_path: str | None = None,
  chunk: int = 256,
) -> str:
  """Writes a synthetic dataset directory (and optionally its LM head)."""
  target_dim = target_dim or hidden_dim
  provenance = {
    "source_model": "synthetic-ar1",
    "target_model": "synthetic-tanh-map",
    "pairing": "synthetic",
    "generator": {
      "seed": seed,
      "mapping_seed": mapping_seed,
      "rho": rho,
      "noise_std": noise_std,
      "vocab_size": vocab_size,
      "min_len": min_len,
      "max_len": max_len,
    },
  }
  with DatasetWriter(
    path,
    source_dim=hidden_dim,
    target_dim=target_dim,
    dtype=dtype,
    samples_per_shard=samples_per_shard,
    provenance=provenance,
    resume=False,
  ) as writer:
    # Generate in chunks (bounded memory); each chunk its own seed stream.
    for c, start in enumerate(range(0, num_samples, chunk)):
      n = min(chunk, num_samples - start)
      pairs = make_pairs(
        n,
        hidden_dim=hidden_dim,
        min_len=min_len,
        max_len=max_len,
        seed=seed * 1_000_003 + c,
        target_dim=target_dim,
        rho=rho,
        noise_std=noise_std,
        mapping_seed=mapping_seed,
        vocab_size=vocab_size,
      )
      for j, p in enumerate(pairs):
        meta = {"id": f"synthetic-{seed}-{start + j}", "sample_idx": start + j}
        writer.append(
          p["source"],
          p["target"],
          target_tokens=p.get("target_tokens"),
          draft_tokens=p.get("draft_tokens"),
          meta=meta,
        )
  if lm_head_path and vocab_size:
    weight = Mapping(hidden_dim, target_dim, vocab_size, mapping_seed).lm_head
    write_lm_head(
      lm_head_path, weight, model_id=f"synthetic(mapping_seed={mapping_seed})"
    )
  return os.fspath(path)
