"""A toy backend plugin over a tiny random Llama, plus tiny-model helpers.

Plugin spec: `tests.toy_plugin:make_backend[:SEED]` (run from the repo root).
It proves the plugin path of tools/lib/backends.py: a model that is not
loaded by
a built-in backend, with its own prompt construction (here: a fixed "media"
prefix of token ids standing in for EventGPT's event features).
"""

from __future__ import annotations

import torch

from tools.lib import backends as bk  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<video>"]
TEMPLATE_WORDS = ["USER:", "ASSISTANT:"]


def vocab() -> dict[str, int]:
  """Token -> id of the toy word-level vocabulary."""
  toks = SPECIALS + TEMPLATE_WORDS + WORDS
  return {t: i for i, t in enumerate(toks)}


def make_tokenizer():
  """A word-level fast tokenizer (no download): <s> prepended, ws split."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  v = vocab()
  tok = Tokenizer(models.WordLevel(v, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(
    single="<s> $A", special_tokens=[("<s>", v["<s>"])]
  )
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token="<s>",
    eos_token="</s>",
    unk_token="<unk>",
    pad_token="<pad>",
  )
  fast.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
  return fast


def llama_config(*, vocab_size=96, hidden=32, layers=2, heads=4, kv_heads=2):
  """A tiny LlamaConfig sharing the toy vocabulary's special ids."""
  from transformers import LlamaConfig

  return LlamaConfig(
    vocab_size=vocab_size,
    hidden_size=hidden,
    intermediate_size=2 * hidden,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    num_key_value_heads=kv_heads,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
  )


def make_llama(seed: int, *, eos_boost: float = 1.0, **kw):
  """A tiny random float32 LlamaForCausalLM (fixed seed).

  `eos_boost` scales the EOS row of the LM head so that greedy generations
  end at different lengths.
  """
  from transformers import LlamaForCausalLM

  torch.manual_seed(seed)
  model = LlamaForCausalLM(llama_config(**kw)).eval()
  # Random init gives near-uniform logits; a larger head makes greedy
  # decoding decisive so float noise cannot flip an argmax.
  with torch.no_grad():
    model.lm_head.weight.mul_(8.0)
    model.lm_head.weight[2].mul_(eos_boost)
  model.generation_config.eos_token_id = 2
  model.generation_config.pad_token_id = 0
  return model


class ToyBackend(bk.HFBackend):
  """A plugin backend: prompt = fixed media prefix + tokenized question."""

  def __init__(self, model, tokenizer, *, prefix_len: int = 5, **kw):
    super().__init__(
      model, model.model, model.lm_head, model_id="toy", name="toy_plugin"
    )
    self.tokenizer = tokenizer
    self.prompt_template = "[media x{n}] {question}".replace(
      "{n}", str(prefix_len)
    )
    self.prefix_len = prefix_len
    self._set_special_ids(model, tokenizer)

  def provenance(self) -> dict:
    prov = super().provenance()
    prov["media_policy"] = "media.seed -> fixed pseudo-random prefix ids"
    return prov

  def prompt_inputs(self, sample: dict) -> dict:
    media = sample.get("media") or {}
    seed = media.get("seed", 0)
    if not isinstance(seed, int):
      raise ValueError(f"sample {sample['id']}: media 'seed' must be an int")
    g = torch.Generator().manual_seed(seed)
    lo = len(SPECIALS) + len(TEMPLATE_WORDS)
    prefix = torch.randint(lo, lo + len(WORDS), (self.prefix_len,), generator=g)
    ids = self.tokenizer(sample["question"], return_tensors="pt")["input_ids"]
    ids = torch.cat([ids[:, :1], prefix[None], ids[:, 1:]], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def make_backend(arg, *, device="cpu", dtype="float32", **options):
  """Plugin factory: `tests.toy_plugin:make_backend[:SEED]`."""
  seed = int(arg) if arg else 0
  model = make_llama(seed).to(device=device, dtype=bk.torch_dtype(dtype))
  return ToyBackend(model, make_tokenizer(), **options)
