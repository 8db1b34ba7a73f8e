"""Batched greedy generation and teacher-forced states over a `Backend`.

Convention (docs/DESIGN.md): h[t] is the state whose LM-head argmax is
generated token t; h[0] is the last prompt position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tools.lib.backends import Backend


@dataclasses.dataclass
class Generation:
  """Result of `greedy_generate` for a batch of B prompts.

  tokens: [B, N] long, generated ids (positions >= lengths are padding).
  lengths: [B] long, tokens generated per row, the stop token included.
  hidden: [B, N, D] states h[t] that predicted tokens[:, t] (model dtype).
  prompt_mask: [B, P] the collated prompt attention mask.
  past_key_values: the cache after the last step (covers P + N - 1).
  """

  tokens: torch.Tensor
  lengths: torch.Tensor
  hidden: torch.Tensor
  prompt_mask: torch.Tensor
  past_key_values: Any = None


@torch.inference_mode()
def greedy_generate(
  backend: Backend,
  batch: dict,
  max_new_tokens: int,
  *,
  stop_at_eos: bool = True,
  suppress_tokens: Sequence[int] = (),
) -> Generation:
  """Batched greedy decoding over left-padded prompts with a KV cache.

  Equivalent to HF `generate(do_sample=False)` per row: a row stops at its
  first stop token (included in its length); finished rows keep running on
  padding until all rows are done, and their extra tokens are masked out.
  `suppress_tokens` get -inf logits (benchmarks use it to disable EOS).
  """
  mask = batch["attention_mask"].to(backend.device)
  bsz = mask.shape[0]
  hidden, logits, cache = backend.forward(batch, logits_to_keep=1)
  hs, toks = [], []
  done = torch.zeros(bsz, dtype=torch.bool, device=mask.device)
  lengths = torch.zeros(bsz, dtype=torch.long, device=mask.device)
  eos = torch.tensor(list(backend.eos_token_ids), device=mask.device)
  suppress = list(suppress_tokens)
  for step in range(max_new_tokens):
    last = logits[:, -1].float()
    if suppress:
      last[:, suppress] = -float("inf")
    nxt = last.argmax(-1)
    hs.append(hidden[:, -1])
    toks.append(torch.where(done, backend.pad_token_id, nxt))
    lengths += (~done).long()
    if stop_at_eos:
      done = done | torch.isin(nxt, eos)
    if bool(done.all()) or step == max_new_tokens - 1:
      break
    mask = torch.cat([mask, (~done).long()[:, None].to(mask.dtype)], dim=1)
    hidden, logits, cache = backend.forward(
      input_ids=toks[-1][:, None],
      attention_mask=mask,
      past_key_values=cache,
      logits_to_keep=1,
    )
  return Generation(
    tokens=torch.stack(toks, 1),
    lengths=lengths,
    hidden=torch.stack(hs, 1),
    prompt_mask=batch["attention_mask"],
    past_key_values=cache,
  )


@torch.inference_mode()
def teacher_forced_states(
  backend: Backend, batch: dict, tokens: torch.Tensor, lengths: torch.Tensor
):
  """States h[t] predicting `tokens[:, t]`, with the model fed the tokens.

  One prefill over the left-padded prompts plus one forward over the given
  tokens (right padding at the end is harmless for a causal model). Returns
  (hidden [B, N, D], argmax ids [B, N] of the model's own LM head).
  """
  n = tokens.shape[1]
  mask = batch["attention_mask"].to(backend.device)
  h0, l0, cache = backend.forward(batch, logits_to_keep=1)
  if n == 1:
    return h0[:, -1:], l0[:, -1:].argmax(-1)
  steps = torch.arange(n - 1, device=mask.device)[None]
  valid = (steps < (lengths.to(mask.device)[:, None] - 1)).to(mask.dtype)
  full = torch.cat([mask, valid], dim=1)
  h1, l1, _ = backend.forward(
    input_ids=tokens[:, :-1].to(backend.device),
    attention_mask=full,
    past_key_values=cache,
    # True so the cache is read in every transformers version (the new
    # entries are discarded with it).
    use_cache=True,
  )
  hidden = torch.cat([h0[:, -1:], h1], dim=1)
  ids = torch.cat([l0[:, -1:].argmax(-1), l1.argmax(-1)], dim=1)
  return hidden, ids


def _np32(x: torch.Tensor) -> np.ndarray:
  return x.detach().float().cpu().numpy()


def _ids(sample: dict) -> dict:
  """The sample's id, question and (when the samples file gives one) group,
  which evaluation resamples as the independent unit."""
  out = {"id": sample["id"], "question": sample["question"]}
  if "group" in sample:
    out["group"] = sample["group"]
  return out


def _text(key: str, backend: Backend, tokens: torch.Tensor) -> dict:
  """{key: decoded text} when the backend has a tokenizer, else {}."""
  tok = getattr(backend, "tokenizer", None)
  if tok is None or not hasattr(tok, "decode"):
    return {}
  try:
    return {key: tok.decode(tokens.tolist(), skip_special_tokens=True)}
  except Exception:  # noqa: BLE001 - texts are informational only
    return {}


def run_batch(
  target: Backend,
  draft: Backend,
  items: Sequence[tuple[dict, dict, dict]],
  *,
  pairing: str,
  max_new_tokens: int,
  suppress_tokens: Sequence[int] = (),
) -> list[tuple[dict, dict | str]]:
  """Processes prepared (sample, target_inputs, draft_inputs) together.

  Returns, per item, (sample, record) where record is the dict to write or
  a string saying why the sample failed. `suppress_tokens` never get
  generated (benchmarks suppress EOS so every sample has the same length).
  """
  t_batch = target.collate([t for _, t, _ in items])
  gen = greedy_generate(
    target, t_batch, max_new_tokens, suppress_tokens=suppress_tokens
  )
  t_len = gen.lengths.cpu()
  results: list = [None] * len(items)
  if pairing == "teacher_forced":
    keep = []
    for i in range(len(items)):
      toks = gen.tokens[i, : t_len[i]]
      if int(toks.max()) >= draft.vocab_size:
        bad = int(toks.max())
        results[i] = (
          f"target token id {bad} is outside the drafter's vocabulary "
          f"(size {draft.vocab_size}); the models must share token ids"
        )
      else:
        keep.append(i)
    if keep:
      d_batch = draft.collate([items[i][2] for i in keep])
      lengths = t_len[keep]
      n = int(lengths.max())
      toks = gen.tokens[keep, :n].clone()
      cols = torch.arange(n, device=toks.device)[None]
      toks[cols >= lengths[:, None].to(toks.device)] = draft.pad_token_id
      d_hidden, d_ids = teacher_forced_states(draft, d_batch, toks, lengths)
      for j, i in enumerate(keep):
        n_i = int(t_len[i])
        results[i] = {
          "source": _np32(d_hidden[j, :n_i]),
          "target": _np32(gen.hidden[i, :n_i]),
          "target_tokens": gen.tokens[i, :n_i].cpu().numpy(),
          "draft_tokens": d_ids[j, :n_i].cpu().numpy(),
          "meta": {
            **_ids(items[i][0]),
            **_text("target_text", target, gen.tokens[i, :n_i]),
          },
        }
  elif pairing == "free_running":
    d_batch = draft.collate([d for _, _, d in items])
    d_gen = greedy_generate(
      draft, d_batch, max_new_tokens, suppress_tokens=suppress_tokens
    )
    d_len = d_gen.lengths.cpu()
    for i, (s, _, _) in enumerate(items):
      n_i = int(min(t_len[i], d_len[i]))
      results[i] = {
        "source": _np32(d_gen.hidden[i, :n_i]),
        "target": _np32(gen.hidden[i, :n_i]),
        "target_tokens": gen.tokens[i, :n_i].cpu().numpy(),
        "draft_tokens": d_gen.tokens[i, :n_i].cpu().numpy(),
        "meta": {
          **_ids(s),
          "target_length": int(t_len[i]),
          "draft_length": int(d_len[i]),
          **_text("target_text", target, gen.tokens[i, : t_len[i]]),
          **_text("draft_text", draft, d_gen.tokens[i, : d_len[i]]),
        },
      }
  else:
    raise ValueError(f"unknown pairing {pairing!r}")
  return [(items[i][0], results[i]) for i in range(len(items))]
