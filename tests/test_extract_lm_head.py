"""Tests for tools/extract_lm_head.py on tiny models built from configs."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from egpt_align import lm_head  # noqa: E402
from tools import extract_lm_head as ext  # noqa: E402

V, H = 64, 32


def _llama_config():
  return transformers.LlamaConfig(
    vocab_size=V,
    hidden_size=H,
    intermediate_size=2 * H,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
  )


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(_llama_config()).eval()
  path = tmp_path_factory.mktemp("llama")
  model.save_pretrained(path)
  return str(path), model.lm_head.weight.detach().float().numpy()


def test_llama_float32(llama_dir, tmp_path, capsys):
  path, weight = llama_dir
  assert ext.main(["--model", path, "--out", str(tmp_path / "head")]) == 0
  assert "states_post_norm=True" in capsys.readouterr().out
  head = lm_head.load_lm_head(tmp_path / "head")
  np.testing.assert_array_equal(head.weight, weight)
  assert head.weight.dtype == np.float32
  info = json.loads((tmp_path / "head.json").read_text())
  assert info["vocab_size"] == V and info["hidden_dim"] == H
  assert info["model_id"] == path and info["states_post_norm"] is True


def test_llama_float16_and_npy_suffix(llama_dir, tmp_path):
  path, weight = llama_dir
  out = str(tmp_path / "h16.npy")
  assert ext.main(["--model", path, "--out", out, "--dtype", "float16"]) == 0
  head = lm_head.load_lm_head(out)
  assert head.weight.dtype == np.float16
  np.testing.assert_array_equal(head.weight, weight.astype(np.float16))


def test_post_norm_check_can_fail(llama_dir):
  path, weight = llama_dir
  model = ext.load_model(path)
  assert ext.check_post_norm(model, weight)
  # A different head does not reproduce the model's logits.
  other = np.random.default_rng(0).normal(size=weight.shape)
  assert not ext.check_post_norm(model, other.astype(np.float32))


def test_video_llava(tmp_path):
  vision = transformers.CLIPVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
    projection_dim=32,
  )
  cfg = transformers.VideoLlavaConfig(
    vision_config=vision,
    text_config=_llama_config(),
    image_token_index=V - 2,
    video_token_index=V - 1,
    vision_feature_layer=-1,
  )
  torch.manual_seed(1)
  model = transformers.VideoLlavaForConditionalGeneration(cfg).eval()
  model.save_pretrained(tmp_path / "vl")
  npy, _, info = ext.extract(str(tmp_path / "vl"), str(tmp_path / "vlhead"))
  assert info["model_class"] == "VideoLlavaForConditionalGeneration"
  assert info["states_post_norm"] is True
  head = lm_head.load_lm_head(npy)
  np.testing.assert_array_equal(
    head.weight, model.get_output_embeddings().weight.detach().numpy()
  )


def test_missing_model_is_a_clear_error(tmp_path, capsys):
  code = ext.main(["--model", str(tmp_path / "nope"), "--out", "x"])
  assert code == 2
  assert "error:" in capsys.readouterr().err


def test_head_of_a_backend_spec(tmp_path):
  from tests import toy_plugin
  from tools.lib import backends

  spec = "tests.toy_plugin:make_backend:0"
  npy, _, info = ext.extract_from_spec(spec, str(tmp_path / "toy_head"))
  want = backends.load_backend(spec).lm_head_weight().detach().numpy()
  head = lm_head.load_lm_head(npy)
  np.testing.assert_array_equal(head.weight, want)
  assert info["states_post_norm"] and head.info["model_id"] == spec
  assert head.hidden_dim == toy_plugin.llama_config().hidden_size
