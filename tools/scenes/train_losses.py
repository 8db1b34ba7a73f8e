"""The scenes pair's training losses: both models' answer-token loss.

The models' own forward passes with the media spliced in at the prompts'
fixed span (`splice`), causal attention without a mask
(`causal_attention`), scored after the media only (`answer_loss`), fact
tokens optionally weighted above wording (`token_weights`,
`preset.fact_weight`): `target_loss` and `drafter_loss`.
`tools.scenes.training.make_loss` binds one of them to a model.
"""

from __future__ import annotations

import torch

from tools.scenes import models, text


def splice(embed, ids, feats, start: int):
  """Input embeddings of `ids` [B, T] with `feats` [B, N, D] in place of the
  positions start..start+N (the media placeholders). Only the text is
  looked up: the embedding's backward then adds up a few hundred rows a
  sequence, not also the hundreds of placeholders that all hit one row."""
  text_before = embed(ids[:, :start])
  text_after = embed(ids[:, start + feats.shape[1] :])
  feats = feats.to(text_before.dtype)
  return torch.cat([text_before, feats, text_after], dim=1)


def answer_loss(lm_head, hidden, labels, first: int, weights=None):
  """Cross-entropy of the labelled tokens of a batch, none of which comes
  before position `first` (the text after the media): logits are made only
  from there. Their mean, or with `weights` ([vocab], `token_weights`)
  their mean weighted by each label's weight."""
  logits = lm_head(hidden[:, first - 1 : -1]).float()
  logits = logits.reshape(-1, logits.shape[-1])
  labels = labels[:, first:].reshape(-1)
  if weights is None:
    return torch.nn.functional.cross_entropy(logits, labels)
  ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
  w = weights[labels.clamp(min=0)] * (labels != -100)
  return (ce * w).sum() / w.sum()


def token_weights(tokenizer, fact_weight: float) -> torch.Tensor:
  """[vocab] weights of the answer loss: `fact_weight` for the tokens that
  spell a fact word (`text.FACT_WORDS`, each one token of the scenes'
  tokenizer), 1 for the rest.

  An answer's wording varies by seed and carries most of its loss, while
  the facts that make it right (which cell, which colour) are a few tokens
  of it: weighting them makes the facts a larger share of the gradient.
  """
  weights = torch.ones(len(tokenizer))
  for token, i in tokenizer.get_vocab().items():
    word = tokenizer.convert_tokens_to_string([token]).strip().lower()
    if word in text.FACT_WORDS:
      weights[i] = fact_weight
  return weights


# The losses below are the models' own forward passes with the media spliced
# in at a fixed position (every prompt starts with the same prefix, so the
# placeholders of a batch sit at one known span): the models' generic
# placeholder search (a data-dependent mask and a count check) would make
# the host wait for the GPU every step and break the compiled graph. Neither
# takes an attention mask: batches are right-padded and the padding is
# unlabelled, so under causal attention no real token ever sees a pad and
# the loss equals the masked one, while SDPA takes its causal kernel.


def target_loss(model, ids, labels, frames, start: int, weights=None):
  """The target's answer-token loss (`weights`: as `answer_loss` takes);
  `frames`: uint8 clips of the batch, `start`: first media position."""
  inner = model.model
  px = models.pixels(frames)
  out = inner.video_tower(px.flatten(0, 1), output_hidden_states=True)
  feats = inner.multi_modal_projector(
    out.hidden_states[model.config.vision_feature_layer]
  )
  feats = feats.reshape(px.shape[0], -1, feats.shape[-1])
  lm = inner.language_model
  embeds = splice(lm.get_input_embeddings(), ids, feats, start)
  hidden = lm(inputs_embeds=embeds, use_cache=False).last_hidden_state
  first = start + feats.shape[1]
  return answer_loss(model.lm_head, hidden, labels, first, weights)


def drafter_loss(model, ids, labels, events, start: int, weights=None):
  """The drafter's answer-token loss (`weights`: as `answer_loss` takes);
  `events`: event frames of the batch."""
  lm = model.lm.model
  feats = model.encoder(events)
  embeds = splice(lm.embed_tokens, ids, feats, start)
  hidden = lm(inputs_embeds=embeds, use_cache=False).last_hidden_state
  first = start + feats.shape[1]
  return answer_loss(model.lm.lm_head, hidden, labels, first, weights)


CAUSAL_ATTENTION = "scenes_causal_sdpa"


def language_model(name: str, model):
  """The transformers text model inside model `name`."""
  return model.model.language_model if name == "target" else model.lm.model


def causal_attention(lm) -> None:
  """Sets the text model `lm` to transformers' own SDPA attention under a
  name of its own (`training.train` restores the implementation it had
  before the model is used with padding).

  transformers builds no attention mask for an implementation without a
  registered mask function, so SDPA always takes its causal path. Under
  torch.compile (torch < 2.14) the stock "sdpa" builds an explicit causal
  mask instead, and the masked kernels took twice the time on an H100.
  Training batches are right-padded and unlabelled there, so no mask is
  needed (see the losses above).
  """
  from transformers import AttentionInterface
  from transformers.integrations.sdpa_attention import sdpa_attention_forward

  AttentionInterface.register(CAUSAL_ATTENTION, sdpa_attention_forward)
  lm.set_attn_implementation(CAUSAL_ATTENTION)
