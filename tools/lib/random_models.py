"""Random-weight Llama models and random-token prompts, for benchmarks.

`random_llama` builds a LlamaForCausalLM of a named shape (SHAPES) with
random weights; `TokenPromptBackend` drives it through the `Backend`
interface with samples that carry their prompt as token ids
(`random_prompts`). Acceptance between such models is meaningless; their
costs are real.
"""

from __future__ import annotations

import torch

from tools.lib import backends as bk

SHAPES = {
  "tiny": dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=2048,
  ),
  "vicuna7b": dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
  ),
}


class TokenPromptBackend(bk.HFBackend):
  """A causal LM whose samples carry their prompt as token ids."""

  def __init__(self, model, *, model_id: str, eos_token_id: int = 2):
    super().__init__(
      model,
      model.get_decoder(),
      model.get_output_embeddings(),
      model_id=model_id,
      name="random_llama",
    )
    self.eos_token_id = int(eos_token_id)
    self.eos_token_ids = (self.eos_token_id,)
    self.pad_token_id = 0
    self.prompt_template = "(token ids)"

  def prompt_inputs(self, sample: dict) -> dict:
    ids = sample.get("input_ids")
    if not isinstance(ids, list) or not ids:
      raise ValueError(
        f"sample {sample.get('id')!r}: random-model samples need a non-empty "
        "'input_ids' list"
      )
    if max(ids) >= self.vocab_size or min(ids) < 0:
      raise ValueError(
        f"sample {sample.get('id')!r}: input_ids outside [0, {self.vocab_size})"
      )
    t = torch.tensor([ids], dtype=torch.long)
    return {"input_ids": t, "attention_mask": torch.ones_like(t)}


def random_llama(
  shape: str | dict,
  *,
  seed: int,
  device: str | torch.device = "cpu",
  dtype: str | torch.dtype = "float32",
  **overrides,
):
  """A random-weight LlamaForCausalLM of a named shape (see SHAPES)."""
  from transformers import LlamaConfig, LlamaForCausalLM

  if isinstance(shape, str):
    if shape not in SHAPES:
      raise ValueError(
        f"unknown --random_models shape {shape!r}; expected one of "
        f"{sorted(SHAPES)}"
      )
    shape = SHAPES[shape]
  config = LlamaConfig(**{**shape, **overrides})
  dtype = bk.torch_dtype(dtype)
  torch.manual_seed(seed)
  old = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  try:
    with torch.device(device):
      model = LlamaForCausalLM(config)
  finally:
    torch.set_default_dtype(old)
  return model.eval()


def random_prompts(
  num: int, prompt_len: int, vocab_size: int, seed: int
) -> list[dict]:
  """Samples of random prompt token ids (ids 3.. avoid the special ids)."""
  g = torch.Generator().manual_seed(seed)
  return [
    {
      "id": f"random{i:04d}",
      "question": "",
      "input_ids": torch.randint(
        3, vocab_size, (prompt_len,), generator=g
      ).tolist(),
    }
    for i in range(num)
  ]
