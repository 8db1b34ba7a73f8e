"""The target's LM head: file I/O, logits, top-k agreement, token CE loss.

File format (written by `tools/extract_lm_head.py` through `save_lm_head`):
`NAME.npy` holds the weight `[V, D]` (float16 or float32) and the sidecar
`NAME.json` holds

  {"format": "egpt_align.lm_head", "version": 1, "vocab_size": V,
   "hidden_dim": D, "model_id": str, "dtype": str, "states_post_norm": true}

`states_post_norm` says the stored hidden states are already the output of the
target's final norm (true for HF Llama-family last hidden states), so logits
are simply `h @ W.T` with no norm and no bias.

Token conventions. `rank` of a token under a hidden state is the number of
vocabulary entries whose logit is strictly greater than that token's logit;
a token is in the top-k iff its rank < k. Ties therefore count in the
adapter's favour, which only matters for exactly equal logits.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "egpt_align.lm_head"
VERSION = 1
_DTYPES = ("float16", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LMHead:
  """An LM-head weight `[V, D]` and its sidecar info."""

  weight: np.ndarray
  info: dict[str, Any]

  @property
  def vocab_size(self) -> int:
    return int(self.weight.shape[0])

  @property
  def hidden_dim(self) -> int:
    return int(self.weight.shape[1])


def _paths(path: str | os.PathLike) -> tuple[str, str]:
  """(npy, json) paths from `NAME`, `NAME.npy` or `NAME.json`."""
  path = os.fspath(path)
  stem, ext = os.path.splitext(path)
  if ext not in (".npy", ".json"):
    stem = path
  return stem + ".npy", stem + ".json"


def save_lm_head(
  path: str | os.PathLike,
  weight: np.ndarray,
  *,
  model_id: str,
  states_post_norm: bool = True,
  dtype: str | None = None,
) -> tuple[str, str]:
  """Writes `weight` [V, D] as NAME.npy + NAME.json atomically."""
  weight = np.asarray(weight)
  if weight.ndim != 2:
    raise ValueError(f"LM-head weight must be [V, D], got {weight.shape}")
  dtype = dtype or str(weight.dtype)
  if dtype not in ("float16", "float32"):
    raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
  weight = weight.astype(dtype)
  npy_path, json_path = _paths(path)
  os.makedirs(os.path.dirname(os.path.abspath(npy_path)), exist_ok=True)
  info = {
    "format": FORMAT,
    "version": VERSION,
    "vocab_size": int(weight.shape[0]),
    "hidden_dim": int(weight.shape[1]),
    "model_id": str(model_id),
    "dtype": dtype,
    "states_post_norm": bool(states_post_norm),
  }
  # Write to temporaries and rename so a crash never leaves a half file.
  tmp_npy = npy_path + ".tmp.npy"
  np.save(tmp_npy, weight)
  os.replace(tmp_npy, npy_path)
  tmp_json = json_path + ".tmp"
  with open(tmp_json, "w") as f:
    json.dump(info, f, indent=2)
    f.write("\n")
  os.replace(tmp_json, json_path)
  return npy_path, json_path


def load_lm_head(path: str | os.PathLike) -> LMHead:
  """Loads and validates an LM-head file (NAME, NAME.npy or NAME.json)."""
  npy_path, json_path = _paths(path)
  if not os.path.exists(npy_path):
    raise FileNotFoundError(
      f"LM-head weight {npy_path} not found (expected NAME.npy + NAME.json "
      "as written by tools/extract_lm_head.py)"
    )
  if not os.path.exists(json_path):
    raise FileNotFoundError(
      f"LM-head sidecar {json_path} not found next to {npy_path}"
    )
  try:
    with open(json_path) as f:
      info = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{json_path}: not valid JSON ({e})") from e
  if not isinstance(info, dict) or info.get("format") != FORMAT:
    raise ValueError(
      f"{json_path}: field 'format' must be {FORMAT!r}, got "
      f"{info.get('format') if isinstance(info, dict) else info!r}"
    )
  if info.get("version") != VERSION:
    raise ValueError(
      f"{json_path}: field 'version' must be {VERSION}, got "
      f"{info.get('version')!r}"
    )
  for key in ("vocab_size", "hidden_dim", "dtype", "states_post_norm"):
    if key not in info:
      raise ValueError(f"{json_path}: missing field {key!r}")
  try:
    weight = np.load(npy_path, allow_pickle=False)
  except ValueError as e:
    raise ValueError(f"{npy_path}: not a plain .npy array ({e})") from e
  expected = (info["vocab_size"], info["hidden_dim"])
  if weight.ndim != 2 or tuple(weight.shape) != tuple(expected):
    raise ValueError(
      f"{npy_path}: weight shape {weight.shape} does not match "
      f"[vocab_size, hidden_dim] = {list(expected)} in {json_path}"
    )
  if str(weight.dtype) != info["dtype"] or info["dtype"] not in _DTYPES:
    raise ValueError(
      f"{npy_path}: dtype {weight.dtype} does not match field 'dtype' = "
      f"{info['dtype']!r} in {json_path} (expected one of {_DTYPES})"
    )
  if not info["states_post_norm"]:
    # Logits here are h @ W.T; pre-norm states would need the target's final
    # norm, which this file does not carry.
    raise ValueError(
      f"{json_path}: states_post_norm is false; egpt_align applies the LM "
      "head directly and needs post-final-norm hidden states"
    )
  return LMHead(weight=weight, info=info)


def logits(
  h_BSD: jax.Array, weight_VD: jax.Array, *, dtype: Any = jnp.float32
) -> jax.Array:
  """Logits `h @ W.T` [B, S, V]; matmul in `dtype`, accumulated in float32."""
  h_BSD = jnp.asarray(h_BSD)
  weight_VD = jnp.asarray(weight_VD)
  if h_BSD.shape[-1] != weight_VD.shape[-1]:
    raise ValueError(
      f"hidden dim {h_BSD.shape[-1]} does not match LM-head hidden dim "
      f"{weight_VD.shape[-1]}"
    )
  return jnp.einsum(
    "...d,vd->...v",
    h_BSD.astype(dtype),
    weight_VD.astype(dtype),
    preferred_element_type=jnp.float32,
  )


def token_rank(logits_BSV: jax.Array, tokens_BS: jax.Array) -> jax.Array:
  """Number of logits strictly above each token's logit: [B, S] int32."""
  tokens_BS = jnp.asarray(tokens_BS).astype(jnp.int32)
  tok_logit = jnp.take_along_axis(logits_BSV, tokens_BS[..., None], axis=-1)
  return jnp.sum(logits_BSV > tok_logit, axis=-1, dtype=jnp.int32)


def topk_agreement(
  pred_BSD: jax.Array,
  target_BSD: jax.Array | None,
  weight_VD: jax.Array,
  mask_BS: jax.Array,
  ks: Sequence[int] = (1, 5, 10),
  *,
  target_tokens_BS: jax.Array | None = None,
  dtype: Any = jnp.float32,
) -> dict[str, jax.Array]:
  """Counts of valid positions whose target token is in pred's top-k.

  The target token is argmax(target @ W.T), or `target_tokens_BS` when given
  (then `target_BSD` may be None). Returns int32 counts `top{k}` and `count`
  (valid positions), summable over batches for exact aggregation.
  """
  mask_BS = jnp.asarray(mask_BS, bool)
  if target_tokens_BS is None:
    if target_BSD is None:
      raise ValueError("topk_agreement needs target_BSD or target_tokens_BS")
    target_tokens_BS = jnp.argmax(
      logits(target_BSD, weight_VD, dtype=dtype), axis=-1
    )
  rank_BS = token_rank(
    logits(pred_BSD, weight_VD, dtype=dtype), target_tokens_BS
  )
  out = {
    f"top{k}": jnp.sum((rank_BS < k) & mask_BS, dtype=jnp.int32) for k in ks
  }
  out["count"] = jnp.sum(mask_BS, dtype=jnp.int32)
  return out


def token_ce_loss(
  pred_BSD: jax.Array,
  target_BSD: jax.Array,
  weight_VD: jax.Array,
  mask_BS: jax.Array,
  *,
  soft: bool = True,
  dtype: Any = jnp.float32,
) -> jax.Array:
  """Masked mean token cross-entropy of pred's LM-head distribution.

  soft=True: against softmax(target @ W.T) (EAGLE's soft targets);
  soft=False: against argmax(target @ W.T). No gradient flows into the
  target. Log-softmax is in float32. Returns 0 when no position is valid.
  """
  mask_BS = jnp.asarray(mask_BS, bool)
  logp_BSV = jax.nn.log_softmax(
    logits(pred_BSD, weight_VD, dtype=dtype).astype(jnp.float32), axis=-1
  )
  tgt_logits_BSV = jax.lax.stop_gradient(
    logits(target_BSD, weight_VD, dtype=dtype).astype(jnp.float32)
  )
  if soft:
    p_BSV = jax.nn.softmax(tgt_logits_BSV, axis=-1)
    ce_BS = -jnp.sum(p_BSV * logp_BSV, axis=-1)
  else:
    tok_BS = jnp.argmax(tgt_logits_BSV, axis=-1)
    ce_BS = -jnp.take_along_axis(logp_BSV, tok_BS[..., None], axis=-1)[..., 0]
  count = jnp.sum(mask_BS, dtype=jnp.float32)
  return jnp.sum(jnp.where(mask_BS, ce_BS, 0.0)) / jnp.maximum(count, 1.0)
