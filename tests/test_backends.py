"""Tests for tools/lib/backends.py on tiny random Llama / Video-LLaVA models."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
# Tiny models gain nothing from intra-op threads; on a shared, loaded CPU
# spinning worker threads only slow the tests down.
torch.set_num_threads(1)


from tests import toy_plugin as tp  # noqa: E402
from tools.lib import backends as bk  # noqa: E402
from tools.lib import generation, media  # noqa: E402

QUESTIONS = ["w1", "w2 w3 w4 w5 w6", "w7 w8", "w9 w10 w11 w12 w13 w14 w15"]
NEW = 10


@pytest.fixture(autouse=True)
def _no_grad():
  with torch.no_grad():
    yield


@pytest.fixture(scope="module")
def tok():
  return tp.make_tokenizer()


@pytest.fixture(scope="module")
def llama():
  return tp.make_llama(0, hidden=48, eos_boost=3.0)


def _backend(model, tok):
  return bk.CausalLMBackend(model, tok)


def _hf_greedy(model, inputs, n):
  """HF generate's tokens and last-layer states per step (batch 1)."""
  out = model.generate(
    **inputs,
    max_new_tokens=n,
    do_sample=False,
    output_hidden_states=True,
    return_dict_in_generate=True,
  )
  toks = out.sequences[0, inputs["input_ids"].shape[1] :]
  states = torch.stack([h[-1][0, -1] for h in out.hidden_states])
  return toks, states


def test_greedy_generate_batched_equals_hf_generate(llama, tok):
  b = _backend(llama, tok)
  ins = [
    b.prompt_inputs({"id": str(i), "question": q})
    for i, q in enumerate(QUESTIONS)
  ]
  assert len({x["input_ids"].shape[1] for x in ins}) == len(ins)  # ragged
  gen = generation.greedy_generate(b, b.collate(ins), NEW)
  lengths = gen.lengths.tolist()
  assert len(set(lengths)) > 1, "fixture should give different lengths"
  for i, x in enumerate(ins):
    toks, states = _hf_greedy(llama, x, NEW)
    assert gen.tokens[i, : lengths[i]].tolist() == toks.tolist()
    np.testing.assert_allclose(
      gen.hidden[i, : lengths[i]].numpy(), states.numpy(), atol=1e-5
    )


def test_forward_returns_post_norm_last_layer_and_its_logits(llama, tok):
  b = _backend(llama, tok)
  x = b.prompt_inputs({"id": "a", "question": QUESTIONS[1]})
  hidden, logits, _ = b.forward(x)
  ref = llama(**x, output_hidden_states=True)
  # HF's last hidden_states entry is the final-norm output.
  np.testing.assert_allclose(
    hidden.numpy(), ref.hidden_states[-1].numpy(), atol=1e-6
  )
  np.testing.assert_allclose(logits.numpy(), ref.logits.numpy(), atol=1e-5)
  # The post-norm claim, independently: RMSNorm of the last layer's output.
  grabbed = []
  hook = llama.model.layers[-1].register_forward_hook(
    lambda m, i, o: grabbed.append(o[0] if isinstance(o, tuple) else o)
  )
  llama(**x)
  hook.remove()
  pre = grabbed[0]
  assert not np.allclose(pre.numpy(), hidden.numpy(), atol=1e-3)
  np.testing.assert_allclose(
    hidden.numpy(), llama.model.norm(pre).numpy(), atol=1e-5
  )
  _, last, _ = b.forward(x, logits_to_keep=1)
  assert last.shape[1] == 1
  np.testing.assert_allclose(
    last[:, 0].numpy(), ref.logits[:, -1].numpy(), atol=1e-5
  )
  np.testing.assert_array_equal(
    b.lm_head_weight().numpy(), llama.lm_head.weight.numpy()
  )


def test_teacher_forced_states_equal_full_forward_per_sample(llama, tok):
  b = _backend(llama, tok)
  ins = [
    b.prompt_inputs({"id": str(i), "question": q})
    for i, q in enumerate(QUESTIONS)
  ]
  g = torch.Generator().manual_seed(0)
  lengths = torch.tensor([1, 6, 3, 6])
  tokens = torch.randint(8, 40, (4, 6), generator=g)
  hidden, ids = generation.teacher_forced_states(
    b, b.collate(ins), tokens, lengths
  )
  for i, x in enumerate(ins):
    n, p = int(lengths[i]), x["input_ids"].shape[1]
    full = torch.cat([x["input_ids"], tokens[i : i + 1, : n - 1]], dim=1)
    out = llama(input_ids=full, output_hidden_states=True)
    want = out.hidden_states[-1][0, p - 1 : p - 1 + n]
    np.testing.assert_allclose(hidden[i, :n].numpy(), want.numpy(), atol=1e-5)
    assert (
      ids[i, :n].tolist()
      == out.logits[0, p - 1 : p - 1 + n].argmax(-1).tolist()
    )


def test_crop_cache_rolls_back(llama, tok):
  b = _backend(llama, tok)
  x = b.prompt_inputs({"id": "a", "question": QUESTIONS[3]})
  p = x["input_ids"].shape[1]
  _, _, cache = b.forward(x)
  extra = torch.tensor([[11, 12, 13]])
  mask = torch.ones(1, p + 3, dtype=torch.long)
  _, _, cache = b.forward(
    input_ids=extra, attention_mask=mask, past_key_values=cache
  )
  assert bk.cache_length(cache) == p + 3
  cache = bk.crop_cache(cache, p + 1)
  assert bk.cache_length(cache) == p + 1
  h, _, _ = b.forward(
    input_ids=torch.tensor([[20]]),
    attention_mask=torch.ones(1, p + 2, dtype=torch.long),
    past_key_values=cache,
  )
  full = torch.cat([x["input_ids"], torch.tensor([[11, 20]])], dim=1)
  want = llama(input_ids=full, output_hidden_states=True).hidden_states[-1]
  np.testing.assert_allclose(h[0, -1].numpy(), want[0, -1].numpy(), atol=1e-5)


def test_parse_spec_and_errors():
  assert bk.parse_spec("causal_lm:/a/b") == bk.Spec("causal_lm", "/a/b")
  assert bk.parse_spec("video_llava:org/m") == bk.Spec("video_llava", "org/m")
  assert bk.parse_spec("pkg.mod:make:3") == bk.Spec(
    "plugin", "pkg.mod:make", "3"
  )
  assert bk.parse_spec("pkg.mod:make") == bk.Spec(
    "plugin", "pkg.mod:make", None
  )
  with pytest.raises(ValueError, match="expected 'causal_lm"):
    bk.parse_spec("no_colon")
  with pytest.raises(ValueError, match="missing the checkpoint"):
    bk.parse_spec("causal_lm:")
  with pytest.raises(ValueError, match="cannot import"):
    bk.load_backend("no_such_module_xyz:make")
  with pytest.raises(ValueError, match="no callable 'nope'"):
    bk.load_backend("tests.toy_plugin:nope")
  with pytest.raises(ValueError, match="unknown dtype"):
    bk.torch_dtype("float8")


def test_plugin_backend_loads_and_generates(tok):
  b = bk.load_backend("tests.toy_plugin:make_backend:3")
  assert b.name == "toy_plugin" and b.hidden_size == 32 and b.vocab_size == 96
  x = b.prompt_inputs({"id": "a", "question": "w1 w2", "media": {"seed": 5}})
  assert x["input_ids"].shape == (1, 1 + 5 + 2)
  toks, states = _hf_greedy(b.model, x, 6)
  gen = generation.greedy_generate(b, b.collate([x]), 6)
  assert gen.tokens[0, : gen.lengths[0]].tolist() == toks.tolist()
  np.testing.assert_allclose(
    gen.hidden[0, : len(toks)].numpy(), states.numpy(), atol=1e-5
  )


def test_causal_lm_from_disk(tmp_path, tok):
  model = tp.make_llama(4)
  model.save_pretrained(tmp_path)
  tok.save_pretrained(tmp_path)
  b = bk.load_backend(f"causal_lm:{tmp_path}", dtype="float32")
  assert (b.eos_token_id, b.pad_token_id, b.hidden_size) == (2, 0, 32)
  assert b.provenance()["prompt_template"] == bk.VICUNA_TEMPLATE
  x = b.prompt_inputs({"id": "a", "question": "w3 w4"})
  assert (
    x["input_ids"][0].tolist() == tok("USER: w3 w4 ASSISTANT:")["input_ids"]
  )


def _write_frames(directory, n, seed=0):
  from PIL import Image

  os.makedirs(directory, exist_ok=True)
  rs = np.random.RandomState(seed)
  paths = []
  for i in range(n):
    arr = np.full((30, 40, 3), 10 * i, np.uint8)  # frame i has value 10*i
    arr[0, 0] = rs.randint(0, 255, 3)
    p = os.path.join(directory, f"frame_{i:03d}.png")
    Image.fromarray(arr).save(p)
    paths.append(p)
  return paths


def test_load_frames_uniform_sampling(tmp_path):
  paths = _write_frames(tmp_path / "v", 10)
  frames = media.load_frames({"video": str(tmp_path / "v")}, 4)
  want = np.linspace(0, 9, 4).astype(int)  # reference: np.linspace
  assert [int(f[5, 5, 0]) // 10 for f in frames] == want.tolist()
  frames = media.load_frames({"frames": paths[:3]}, 5)
  assert [int(f[5, 5, 0]) // 10 for f in frames] == [0, 0, 1, 1, 2]
  with pytest.raises(FileNotFoundError, match="sample s7: video"):
    media.load_frames(
      {"video": str(tmp_path / "missing.mp4")}, 4, sample_id="s7"
    )
  with pytest.raises(ValueError, match="needs media"):
    media.load_frames({"image": "x.png"}, 4)


def make_video_llava(tok, seed=0):
  """A tiny VideoLlavaForConditionalGeneration + image processor."""
  from transformers import (
    CLIPVisionConfig,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
  )

  v = tp.vocab()
  vision = CLIPVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
    projection_dim=32,
  )
  cfg = VideoLlavaConfig(
    vision_config=vision,
    text_config=tp.llama_config(hidden=48),
    image_token_index=v["<image>"],
    video_token_index=v["<video>"],
    vision_feature_layer=-1,
  )
  torch.manual_seed(seed)
  model = VideoLlavaForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    model.lm_head.weight.mul_(8.0)
    model.lm_head.weight[2].mul_(3.0)
  model.generation_config.eos_token_id = 2
  model.generation_config.pad_token_id = 0
  ip = VideoLlavaImageProcessor(
    size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
  )
  return model, ip


def test_video_llava_backend_equals_hf_generate(tmp_path, tok):
  model, ip = make_video_llava(tok)
  b = bk.VideoLlavaBackend(model, tok, ip, num_frames=3)
  prov = b.provenance()
  assert prov["prompt_template"] == "USER: <video>\n{question} ASSISTANT:"
  assert prov["frame_policy"]["num_frames"] == 3
  paths = _write_frames(tmp_path / "v", 7)
  media = [
    {"video": str(tmp_path / "v")},
    {"frames": paths[2:]},
    {"frames": paths[:2]},
  ]
  ins = [
    b.prompt_inputs({"id": str(i), "question": QUESTIONS[i], "media": m})
    for i, m in enumerate(media)
  ]
  # 3 frames x (2 x 2 patches + CLS) placeholders.
  assert int((ins[0]["input_ids"] == tp.vocab()["<video>"]).sum()) == 15
  gen = generation.greedy_generate(b, b.collate(ins), 8)
  for i, x in enumerate(ins):
    toks, states = _hf_greedy(model, x, 8)
    n = int(gen.lengths[i])
    assert gen.tokens[i, :n].tolist() == toks.tolist()
    np.testing.assert_allclose(
      gen.hidden[i, :n].numpy(), states.numpy(), atol=1e-5
    )
  with pytest.raises(ValueError, match="needs media"):
    b.prompt_inputs({"id": "z", "question": "w1", "media": {}})
  # A tokenizer whose pad token is the video placeholder must not pad with
  # it (the padding would be counted as video slots).
  tok2 = tp.make_tokenizer()
  tok2.pad_token = "<video>"
  b2 = bk.VideoLlavaBackend(model, tok2, ip, num_frames=3)
  assert b2.pad_token_id == 2
  gen2 = generation.greedy_generate(b2, b2.collate(ins), 8)
  np.testing.assert_array_equal(gen2.lengths.numpy(), gen.lengths.numpy())


@pytest.mark.parametrize("kind", ["causal_lm", "video_llava"])
def test_static_decoder_steps_equal_forward(tmp_path, tok, llama, kind):
  """The fast runtime's static-cache steps continue the backend's prefill
  exactly as the backend's own forward does (Llama and Video-LLaVA)."""
  import copy

  if kind == "video_llava":
    model, ip = make_video_llava(tok)
    b = bk.VideoLlavaBackend(model, tok, ip, num_frames=3)
    media = {"frames": _write_frames(tmp_path / "v", 3)}
  else:
    b, media = _backend(copy.deepcopy(llama), tok), {}
  x = b.prompt_inputs({"id": "0", "question": QUESTIONS[1], "media": media})
  with torch.inference_mode():
    lm = b.static_decoder(64, lengths=(1, 3))
    _, _, cache = b.forward(x, logits_to_keep=1)
    pos = bk.cache_length(cache)
    lm.load_prefix(cache, pos)
    for ids in ([[5, 6, 7]], [[8]]):
      ids = torch.tensor(ids)
      h, g = lm.step(ids, pos)
      want_h, logits, cache = b.forward(input_ids=ids, past_key_values=cache)
      np.testing.assert_allclose(h.numpy(), want_h[0].numpy(), atol=1e-5)
      assert g.tolist() == logits[0].argmax(-1).tolist()
      pos += ids.shape[1]
