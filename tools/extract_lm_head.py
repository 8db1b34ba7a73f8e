r"""Extract a target model's LM head for offline token metrics.

  python tools/extract_lm_head.py --model LanguageBind/Video-LLaVA-7B-hf \
      --out data/vl_lm_head [--dtype float32|float16]
  python tools/extract_lm_head.py --spec tests.toy_plugin:make_backend:0 \
      --out /tmp/toy_lm_head

Writes OUT.npy (the weight [V, D]) and OUT.json (egpt_align.lm_head format:
vocab_size, hidden_dim, model_id, dtype, states_post_norm). Works for any HF
causal LM and for Video-LLaVA (VideoLlavaForConditionalGeneration); the head
is found with model.get_output_embeddings(), so tied embeddings and nested
language models need no special cases.

`states_post_norm` records whether the last hidden state HF returns (what
tools/dump_hidden_states.py stores) is already after the final norm, so that
logits = h @ W.T. It is checked with a short forward pass on a few token ids
(true for Llama-family models); --no_check skips that and assumes true.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

# Make `egpt_align` importable when run as a script from the repo root.
from egpt_align.lm_head import save_lm_head


def load_model(model_id: str, *, trust_remote_code: bool = False):
  """An HF model with an LM head: Video-LLaVA or any causal LM."""
  import torch
  import transformers

  config = transformers.AutoConfig.from_pretrained(
    model_id, trust_remote_code=trust_remote_code
  )
  kwargs = {"dtype": "auto", "trust_remote_code": trust_remote_code}
  if config.model_type == "video_llava":
    cls = transformers.VideoLlavaForConditionalGeneration
    kwargs.pop("trust_remote_code")
  else:
    cls = transformers.AutoModelForCausalLM
  try:
    model = cls.from_pretrained(model_id, **kwargs)
  except ValueError as e:
    if cls is not transformers.AutoModelForCausalLM:
      raise
    # Multimodal checkpoints that are not registered as causal LMs.
    try:
      model = transformers.AutoModelForImageTextToText.from_pretrained(
        model_id, **kwargs
      )
    except ValueError:
      raise ValueError(
        f"{model_id}: cannot load it as a causal LM or image-text-to-text "
        f"model ({e})"
      ) from e
  model.eval()
  torch.set_grad_enabled(False)
  return model


def lm_head_weight(model) -> np.ndarray:
  """The output-embedding weight [V, D] as a float32 numpy array."""
  head = model.get_output_embeddings()
  if head is None or getattr(head, "weight", None) is None:
    raise ValueError(
      f"{type(model).__name__} has no output embeddings "
      "(get_output_embeddings() returned None)"
    )
  if getattr(head, "bias", None) is not None:
    # egpt_align applies h @ W.T only; a bias would be silently dropped.
    raise ValueError(
      f"{type(model).__name__}: the LM head has a bias, which the "
      "egpt_align.lm_head format does not carry"
    )
  w = head.weight.detach()
  if w.is_meta:
    raise ValueError("the LM-head weight was not loaded (meta tensor)")
  return w.float().cpu().numpy()


def check_post_norm(model, weight: np.ndarray, num_tokens: int = 8) -> bool:
  """True if logits == last hidden state @ W.T on a short forward pass."""
  import torch

  vocab = weight.shape[0]
  ids = torch.arange(1, num_tokens + 1).remainder(vocab)[None]
  out = model(
    input_ids=ids,
    attention_mask=torch.ones_like(ids),
    output_hidden_states=True,
    return_dict=True,
  )
  h = out.hidden_states[-1][0].float().numpy()
  logits = out.logits[0].float().numpy()
  recon = h @ weight.T
  scale = np.abs(logits).max() + 1e-6
  return bool(np.abs(recon - logits).max() <= 1e-2 * scale)


def extract(
  model_id: str,
  out: str,
  *,
  dtype: str = "float32",
  check: bool = True,
  trust_remote_code: bool = False,
) -> tuple[str, str, dict]:
  """Loads `model_id`, writes OUT.npy + OUT.json; returns (npy, json, info)."""
  model = load_model(model_id, trust_remote_code=trust_remote_code)
  weight = lm_head_weight(model)
  post_norm = check_post_norm(model, weight) if check else True
  if not post_norm:
    print(
      "WARNING: logits != last_hidden_state @ W.T for this model: its last "
      "hidden states are not post-final-norm, and egpt_align will refuse "
      "this head (states_post_norm=false).",
      file=sys.stderr,
    )
  npy, js = save_lm_head(
    out,
    weight,
    model_id=model_id,
    states_post_norm=post_norm,
    dtype=dtype,
  )
  info = {
    "vocab_size": weight.shape[0],
    "hidden_dim": weight.shape[1],
    "states_post_norm": post_norm,
    "model_class": type(model).__name__,
  }
  return npy, js, info


def extract_from_spec(
  spec: str, out: str, *, dtype: str = "float32"
) -> tuple[str, str, dict]:
  """The LM head of a backend spec (as dump_hidden_states takes), no check.

  A backend's `forward` returns the states the dump stores, which its
  contract makes the input of this head (docs/PLUGINS.md), so
  states_post_norm is true by construction.
  """
  from tools.lib import backends

  backend = backends.load_backend(spec, device="cpu", dtype="float32")
  weight = backend.lm_head_weight().detach().float().cpu().numpy()
  npy, js = save_lm_head(
    out, weight, model_id=spec, states_post_norm=True, dtype=dtype
  )
  info = {
    "vocab_size": weight.shape[0],
    "hidden_dim": weight.shape[1],
    "states_post_norm": True,
    "model_class": type(backend).__name__,
  }
  return npy, js, info


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--model", help="HF model id or local checkpoint dir.")
  source.add_argument(
    "--spec",
    help="a model spec as tools/dump_hidden_states.py takes it "
    "(causal_lm:PATH, video_llava:PATH or a plugin module:factory[:ARG]), "
    "e.g. tests.toy_plugin:make_backend:0",
  )
  parser.add_argument(
    "--out",
    required=True,
    help="Output NAME (or NAME.npy); writes NAME.npy and NAME.json.",
  )
  parser.add_argument(
    "--dtype",
    default="float32",
    choices=["float32", "float16"],
    help="Stored weight dtype (float32 is exact for fp16/bf16 models; "
    "float16 halves the file).",
  )
  parser.add_argument(
    "--no_check",
    action="store_true",
    help="Skip the forward pass that checks the states are post-norm "
    "(then states_post_norm=true is assumed).",
  )
  parser.add_argument("--trust_remote_code", action="store_true")
  args = parser.parse_args(argv)
  try:
    if args.spec:
      npy, js, info = extract_from_spec(args.spec, args.out, dtype=args.dtype)
    else:
      npy, js, info = extract(
        args.model,
        args.out,
        dtype=args.dtype,
        check=not args.no_check,
        trust_remote_code=args.trust_remote_code,
      )
  except (OSError, ValueError) as e:  # HF raises bare OSError for bad ids.
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(
    f"{info['model_class']}: LM head [{info['vocab_size']}, "
    f"{info['hidden_dim']}] -> {npy} ({args.dtype}), {js}; "
    f"states_post_norm={info['states_post_norm']}"
  )
  return 0


if __name__ == "__main__":
  from egpt_align import cli

  sys.exit(cli.run(main))
