"""Tests for tools/plugins/eventgpt.py (the EventGPT drafter backend).

The bad-input tests need no EventGPT checkout. The integration tests run
only when EVENTGPT_REPO points at a checkout: they build a tiny random
EventChat checkpoint from the checkout's own classes (the 1024-dim CLIP and
4096-dim Llama widths its code fixes, one layer each, a 49-token vocabulary)
and compare the plugin with the checkout's own `generate` and forward.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
torch.set_num_threads(1)

from egpt_align.data.reader import open_dataset  # noqa: E402
from tests import toy_plugin as tp  # noqa: E402
from tools import dump_hidden_states as dump  # noqa: E402
from tools.lib import backends as bk  # noqa: E402
from tools.lib import generation  # noqa: E402
from tools.plugins import eventgpt as eg  # noqa: E402

REPO = os.environ.get(eg.REPO_ENV)
needs_repo = pytest.mark.skipif(
  not REPO,
  reason=f"{eg.REPO_ENV} is not set (the path of an EventGPT checkout)",
)
NEW = 6
CLIP = "clip-tiny"  # the checkpoint's mm_visual_tower: a name, as upstream
QUESTIONS = ["w1 w2 w3 w4", "w5"]


@pytest.fixture(autouse=True)
def _no_grad():
  with torch.no_grad():
    yield


def _fake_checkout(root, skip=()):
  """A directory holding the files the plugin checks for (all empty)."""
  for rel in eg.REPO_FILES:
    if rel not in skip:
      path = os.path.join(root, rel)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      open(path, "w").close()
  return str(root)


def _write_events(path, num, seed):
  rs = np.random.RandomState(seed)
  events = {
    "x": rs.randint(0, 40, num),
    "y": rs.randint(0, 30, num),
    "p": rs.randint(0, 2, num),
    "t": np.sort(rs.randint(0, 50_000, num)),
  }
  np.save(path, events)
  return str(path)


# Bad inputs (no checkout needed) ---------------------------------------------


def test_no_checkout_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.delenv(eg.REPO_ENV, raising=False)
  with pytest.raises(ValueError, match=f"set {eg.REPO_ENV}=DIR"):
    eg.make_backend(str(tmp_path))
  missing = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match=f"checkout {missing}: not a dir"):
    eg.make_backend(str(tmp_path), repo=missing)


def test_checkout_without_model_file_names_it(tmp_path):
  repo = _fake_checkout(tmp_path / "egpt", skip=("model/EventChatModel.py",))
  with pytest.raises(ValueError) as e:
    eg.make_backend(str(tmp_path), repo=repo)
  msg = str(e.value)
  assert repo in msg and "model/EventChatModel.py is missing" in msg
  assert "\n" not in msg


def test_unknown_checkout_version_and_module_clash(tmp_path):
  """Run in a child process: the fake modules must not stay imported."""
  repo = _fake_checkout(tmp_path / "old")  # EventChatModel.py defines nothing
  code = (
    "import sys, types\n"
    "from tools.plugins import eventgpt as eg\n"
    "def show(f):\n"
    "  try:\n"
    "    f()\n"
    "  except ValueError as e:\n"
    "    print(e)\n"
    "sys.modules['model'] = types.ModuleType('model')\n"
    "sys.modules['model'].__file__ = '/elsewhere/model.py'\n"
    "show(lambda: eg.import_repo(eg.find_repo(sys.argv[1])))\n"
    "del sys.modules['model']\n"
    "show(lambda: eg.import_repo(eg.find_repo(sys.argv[1])))\n"
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [sys.executable, "-c", code, repo],
    cwd=root,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.splitlines()
  assert out[0] == (
    f"cannot import EventGPT from {repo}: a module 'model' is already "
    "imported from /elsewhere/model.py"
  )
  assert out[1].startswith(
    f"EventGPT checkout {repo}: model/EventChatModel.py defines no "
    "'EventChatModel' (a version this plugin does not know"
  )
  assert len(out) == 2


def test_checkpoint_without_config_names_it(tmp_path):
  repo = _fake_checkout(tmp_path / "egpt")
  ckpt = tmp_path / "EventGPT-7b"
  ckpt.mkdir()
  with pytest.raises(ValueError, match=f"{ckpt}/config.json: missing"):
    eg.make_backend(str(ckpt), repo=repo)
  with pytest.raises(ValueError, match=f"checkpoint {tmp_path}/x: not a dir"):
    eg.make_backend(str(tmp_path / "x"), repo=repo)
  with pytest.raises(ValueError, match="needs the checkpoint directory"):
    eg.make_backend(None, repo=repo)


def test_event_file_of_wrong_shape_names_it(tmp_path):
  flat = tmp_path / "flat.npy"
  np.save(flat, np.zeros((100, 4)))
  with pytest.raises(ValueError) as e:
    eg.read_event_stream(str(flat), "s3")
  msg = str(e.value)
  assert msg.startswith(f"sample s3: events file {flat}: expected EventGPT")
  assert "ndarray of shape (100, 4)" in msg and "\n" not in msg
  ragged = tmp_path / "ragged.npy"
  np.save(ragged, {"x": np.zeros(9, int), "y": np.zeros(8, int), "p": [1] * 9,
                   "t": np.arange(9)})  # fmt: skip
  with pytest.raises(ValueError, match=f"{ragged}: .*got shapes"):
    eg.read_event_stream(str(ragged))
  short = _write_events(tmp_path / "short.npy", 3, 0)
  with pytest.raises(ValueError, match=f"{short}: holds 3 events"):
    eg.read_event_stream(short)
  with pytest.raises(FileNotFoundError, match="missing.npy does not exist"):
    eg.read_event_stream(str(tmp_path / "missing.npy"))
  assert eg.read_event_stream(_write_events(tmp_path / "ok.npy", 50, 1)) == 50


def test_missing_visual_tower_names_where_it_looked(tmp_path, monkeypatch):
  monkeypatch.delenv(eg.VISUAL_TOWER_ENV, raising=False)
  repo, ckpt = tmp_path / "repo", tmp_path / "ckpts" / "EventGPT-7b"
  with pytest.raises(ValueError) as e:
    eg.resolve_visual_tower("openai/clip-l", ckpt=str(ckpt), repo=str(repo))
  msg = str(e.value)
  assert f"{repo}/checkpoints/openai/clip-l" in msg
  assert f"{tmp_path}/ckpts/clip-l" in msg and eg.VISUAL_TOWER_ENV in msg
  tower = tmp_path / "ckpts" / "clip-l"
  tower.mkdir(parents=True)
  (tower / "config.json").write_text("{}")
  with pytest.raises(ValueError, match="preprocessor_config.json missing"):
    eg.resolve_visual_tower("openai/clip-l", ckpt=str(ckpt), repo=str(repo))
  (tower / "preprocessor_config.json").write_text("{}")
  got = eg.resolve_visual_tower("openai/clip-l", ckpt=str(ckpt), repo=str(repo))
  assert got == str(tower)
  monkeypatch.setenv(eg.VISUAL_TOWER_ENV, str(tmp_path / "nope"))
  with pytest.raises(ValueError, match=f"tower {tmp_path}/nope: not a dir"):
    eg.resolve_visual_tower("openai/clip-l", ckpt=str(ckpt), repo=str(repo))


def test_dump_tool_reports_a_missing_checkout_in_one_line(
  tmp_path, monkeypatch, capsys
):
  monkeypatch.delenv(eg.REPO_ENV, raising=False)
  tp.make_llama(0).save_pretrained(tmp_path / "t")
  tp.make_tokenizer().save_pretrained(tmp_path / "t")
  samples = tmp_path / "s.jsonl"
  samples.write_text('{"id": "a", "question": "w1"}\n')
  rc = dump.main(
    [
      "--target",
      f"causal_lm:{tmp_path / 't'}",
      "--draft",
      f"tools.plugins.eventgpt:make_backend:{tmp_path / 'ckpt'}",
      "--samples",
      str(samples),
      "--out",
      str(tmp_path / "out"),
      "--device",
      "cpu",
      "--no_progress",
    ]
  )
  assert rc == dump.EXIT_USAGE
  err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
  assert len(err) == 1 and f"set {eg.REPO_ENV}=DIR" in err[0]


# Integration with a real checkout --------------------------------------------


def _tokenizer():
  """The toy word-level tokenizer plus the event patch token (49 ids)."""
  tok = tp.make_tokenizer()
  tok.add_tokens(["<ev_patch>"], special_tokens=True)
  return tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A saved tiny EventChat checkpoint, its in-memory model, event files."""
  from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

  api = eg.import_repo(eg.find_repo(REPO))
  root = tmp_path_factory.mktemp("egpt")
  ckpts = root / "checkpoints"
  # EventChatLlamaModel fixes the widths: CLIP hidden 1024 -> Llama 4096.
  vision = CLIPVisionConfig(
    hidden_size=1024,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
  )
  torch.manual_seed(0)
  CLIPVisionModel(vision).save_pretrained(ckpts / CLIP)
  CLIPImageProcessor(
    size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
  ).save_pretrained(ckpts / CLIP)
  tok = _tokenizer()
  config = api.EventChatModel.config_class(
    vocab_size=len(tok),
    hidden_size=4096,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
  )
  config.mm_visual_tower = str(ckpts / CLIP)
  config.event_feature_adaptor = True
  model = api.EventChatModel(config)
  with torch.no_grad():
    # A larger head makes greedy decoding decisive (no float-noise flips);
    # EOS is boosted so that generations end at different lengths.
    model.lm_head.weight.mul_(8.0)
    model.lm_head.weight[2].mul_(2.5)
  model.generation_config.eos_token_id = 2
  model.generation_config.pad_token_id = 0
  model.config.mm_visual_tower = CLIP  # resolved by the plugin
  model.save_pretrained(ckpts / "EventGPT-tiny")
  # Saved without <ev_patch>: the plugin adds it, as inference.py does.
  tp.make_tokenizer().save_pretrained(ckpts / "EventGPT-tiny")
  events = [
    _write_events(root / f"ev{i}.npy", 200 + 70 * i, i) for i in range(2)
  ]
  return {
    "api": api,
    "root": root,
    "ckpt": str(ckpts / "EventGPT-tiny"),
    "clip": str(ckpts / CLIP),
    # The visual tower and projector stay bfloat16 as the checkout builds
    # them, so their values survive the saved checkpoint exactly.
    "model": model.float().eval(),
    "tok": tok,
    "events": events,
  }


@pytest.fixture(scope="module")
def backend(tiny):
  return bk.load_backend(
    f"tools.plugins.eventgpt:make_backend:{tiny['ckpt']}", repo=REPO
  )


def _repo_prompt(tiny, question):
  """The checkout's own prompt ids (one EVENT_TOKEN_INDEX placeholder)."""
  api = tiny["api"]
  prompt = api.prepare_event_prompt(question, "eventgpt_v1")
  return api.tokenizer_event_token(
    prompt, tiny["tok"], api.EVENT_TOKEN_INDEX, return_tensors="pt"
  )[None]


def _repo_frames(tiny, path):
  proc = tiny["model"].get_visual_tower().event_processor
  _, frames = tiny["api"].process_event_data(path, proc, torch.device("cpu"))
  return [f.float() for f in frames]


def _repo_states(tiny, ids, frames):
  """Last-layer states of the model's own splicing + forward over `ids`."""
  model = tiny["model"]
  embeds = model.prepare_inputs_labels_for_multimodal(
    ids, None, None, None, None, event_tensors=[frames]
  )[4]
  out = model(inputs_embeds=embeds, output_hidden_states=True)
  return out.hidden_states[-1][0]


@needs_repo
def test_loads_with_the_checkouts_template_and_provenance(tiny, backend):
  assert backend.hidden_size == 4096 and backend.vocab_size == len(tiny["tok"])
  assert backend.eos_token_id == 2
  prov = backend.provenance()
  assert prov["backend"] == "eventgpt" and prov["model_id"] == tiny["ckpt"]
  assert (
    prov["visual_tower"] == tiny["clip"] and prov["mm_visual_tower"] == CLIP
  )
  assert prov["conv_mode"] == "eventgpt_v1"
  assert prov["prompt_template"].endswith(
    "USER: <ev_start><event><ev_end>\n{question} ASSISTANT:"
  )
  json.dumps(prov)
  for name, p in tiny["model"].state_dict().items():
    torch.testing.assert_close(
      backend.model.state_dict()[name], p, rtol=0, atol=0, msg=name
    )


@needs_repo
def test_prompt_inputs_feed_the_checkouts_ids_and_frames(tiny, backend):
  api = tiny["api"]
  x = backend.prompt_inputs(
    {
      "id": "a",
      "question": QUESTIONS[0],
      "media": {"events": tiny["events"][0]},
    }
  )
  want = _repo_prompt(tiny, QUESTIONS[0])[0]
  ids = x["input_ids"][0]
  slots = ids == api.EVENT_TOKEN_INDEX
  # 5 event images -> 5 temporal + (2 x 2 patches + CLS) spatial features.
  assert int(slots.sum()) == 5 + 5
  assert ids[~slots].tolist() == want[want != api.EVENT_TOKEN_INDEX].tolist()
  k = int((want == api.EVENT_TOKEN_INDEX).nonzero())
  assert bool(slots[k : k + 10].all())
  frames = torch.stack(_repo_frames(tiny, tiny["events"][0]))
  torch.testing.assert_close(x["event_tensors"][0], frames, rtol=0, atol=0)


@needs_repo
def test_greedy_and_states_equal_the_checkouts_generate_and_forward(
  tiny, backend
):
  samples = [
    {"id": str(i), "question": q, "media": {"events": tiny["events"][i]}}
    for i, q in enumerate(QUESTIONS)
  ]
  ins = [backend.prompt_inputs(s) for s in samples]
  assert ins[0]["input_ids"].shape[1] != ins[1]["input_ids"].shape[1]
  batch = backend.collate(ins)  # left padded: the rows differ in length
  gen = generation.greedy_generate(backend, batch, NEW)
  tf_hidden, tf_ids = generation.teacher_forced_states(
    backend, batch, gen.tokens, gen.lengths
  )
  for i, q in enumerate(QUESTIONS):
    ids = _repo_prompt(tiny, q)
    frames = _repo_frames(tiny, tiny["events"][i])
    out = tiny["model"].generate(
      ids,
      event_tensors=frames,
      do_sample=False,
      max_new_tokens=NEW,
      use_cache=True,
    )
    n = int(gen.lengths[i])
    assert gen.tokens[i, :n].tolist() == out[0].tolist()
    # h[t] predicts token t: the last prompt position onwards.
    full = torch.cat([ids, out[:, :-1]], dim=1)
    states = _repo_states(tiny, full, frames)[-n:]
    torch.testing.assert_close(gen.hidden[i, :n], states, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tf_hidden[i, :n], states, rtol=1e-4, atol=1e-4)
    assert tf_ids[i, :n].tolist() == out[0].tolist()


@needs_repo
def test_cache_crops_back_to_a_prefix(tiny, backend):
  x = backend.prompt_inputs(
    {"id": "a", "question": "w3", "media": {"events": tiny["events"][1]}}
  )
  _, _, cache = backend.forward(x, logits_to_keep=1)
  base = bk.cache_length(cache)
  h_a, _, cache = backend.forward(
    input_ids=torch.tensor([[7, 8, 9]]), past_key_values=cache
  )
  cache = bk.crop_cache(cache, base + 1)
  h_b, _, _ = backend.forward(
    input_ids=torch.tensor([[8, 9]]), past_key_values=cache
  )
  torch.testing.assert_close(h_b, h_a[:, 1:], rtol=1e-5, atol=1e-5)


@needs_repo
def test_event_images_as_media(tiny, backend, tmp_path):
  from PIL import Image

  rs = np.random.RandomState(3)
  paths = []
  for i in range(2):
    p = tmp_path / f"ev_{i}.png"
    Image.fromarray(rs.randint(0, 255, (30, 40, 3), np.uint8)).save(p)
    paths.append(str(p))
  x = backend.prompt_inputs(
    {"id": "i", "question": "w2", "media": {"images": paths}}
  )
  assert x["event_tensors"].shape == (1, 2, 3, 28, 28)
  assert int((x["input_ids"] == tiny["api"].EVENT_TOKEN_INDEX).sum()) == 2 + 5
  gen = generation.greedy_generate(backend, backend.collate([x]), NEW)
  frames = list(x["event_tensors"][0])
  out = tiny["model"].generate(
    _repo_prompt(tiny, "w2"),
    event_tensors=frames,
    do_sample=False,
    max_new_tokens=NEW,
  )
  assert gen.tokens[0, : int(gen.lengths[0])].tolist() == out[0].tolist()
  with pytest.raises(ValueError, match="sample z: EventGPT needs media"):
    backend.prompt_inputs({"id": "z", "question": "w1", "media": {}})
  with pytest.raises(ValueError, match="sample y: media 'image' must be"):
    backend.prompt_inputs(
      {"id": "y", "question": "w1", "media": {"images": paths[0]}}
    )


@needs_repo
def test_custom_prompt_template(tiny, backend):
  parts = (backend.model, backend.tokenizer, backend.event_processor)
  custom = eg.EventGPTBackend(
    *parts, backend.api, prompt_template="USER: <event>\n{question} ASSISTANT:"
  )
  x = custom.prompt_inputs(
    {"id": "c", "question": "w4", "media": {"events": tiny["events"][0]}}
  )
  ids = x["input_ids"][0]
  text = ids[ids != tiny["api"].EVENT_TOKEN_INDEX].tolist()
  assert (
    text
    == tiny["tok"]("USER:")["input_ids"]
    + tiny["tok"]("w4 ASSISTANT:")["input_ids"][1:]
  )
  assert custom.provenance()["conv_mode"] is None
  for bad in ("USER: {question}", "USER: <event> ASSISTANT:"):
    with pytest.raises(ValueError, match="must contain '<event>' exactly"):
      eg.EventGPTBackend(*parts, backend.api, prompt_template=bad)


@needs_repo
def test_checkpoint_missing_weights_names_them(tiny, tmp_path):
  from safetensors.torch import load_file, save_file

  ckpt = tmp_path / "partial"
  shutil.copytree(tiny["ckpt"], ckpt)
  weights = load_file(ckpt / "model.safetensors")
  del weights["model.feature_adaptor.weight"]
  save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError) as e:
    eg.make_backend(str(ckpt), repo=REPO, visual_tower=tiny["clip"])
  msg = str(e.value)
  assert msg.startswith(f"EventGPT checkpoint {ckpt}: no weights for 1 ")
  assert "model.feature_adaptor.weight" in msg


@needs_repo
def test_wrong_model_type_checkpoint(tiny, tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(ValueError, match="expected 'EventChat_llama'"):
    eg.make_backend(str(tmp_path), repo=REPO)


@pytest.fixture(scope="module")
def target(tiny):
  """A saved tiny Video-LLaVA target + a samples file for both models."""
  from tests.test_backends import _write_frames, make_video_llava

  root = tiny["root"]
  tok = tp.make_tokenizer()
  vl, ip = make_video_llava(tok, seed=2)
  # Every target id must be a drafter id (the drafter has 49).
  vl.resize_token_embeddings(len(tiny["tok"]))
  vl.save_pretrained(root / "vl")
  tok.save_pretrained(root / "vl")
  ip.save_pretrained(root / "vl")
  _write_frames(root / "clip0", 4, seed=0)
  samples = root / "samples.jsonl"
  with open(samples, "w") as f:
    for i, q in enumerate(QUESTIONS):
      media = {"target": {"video": "clip0"}, "draft": {"events": f"ev{i}.npy"}}
      f.write(json.dumps({"id": f"e{i}", "question": q, "media": media}) + "\n")
  return {"spec": f"video_llava:{root / 'vl'}", "samples": str(samples)}


@needs_repo
def test_dump_tool_with_a_video_llava_target(
  tiny, target, tmp_path, monkeypatch
):
  monkeypatch.setenv(eg.REPO_ENV, REPO)
  out = tmp_path / "ds"
  rc = dump.main(
    [
      "--target",
      target["spec"],
      "--draft",
      f"tools.plugins.eventgpt:make_backend:{tiny['ckpt']}",
      "--samples",
      target["samples"],
      "--out",
      str(out),
      "--num_frames",
      "2",
      "--max_new_tokens",
      str(NEW),
      "--store_dtype",
      "float32",
      "--device",
      "cpu",
      "--no_progress",
    ]
  )
  assert rc == 0
  ds = open_dataset(str(out))
  ds.validate(progress=False)
  assert ds.num_samples == 2
  source = ds.header["provenance"]["source"]
  assert source["backend"] == "eventgpt" and source["model_id"] == tiny["ckpt"]
  for i, q in enumerate(QUESTIONS):
    rec = ds[i]
    toks = torch.tensor(np.asarray(rec["target_tokens"]))[None]
    full = torch.cat([_repo_prompt(tiny, q), toks[:, :-1]], dim=1)
    frames = _repo_frames(tiny, tiny["events"][i])
    want = _repo_states(tiny, full, frames)[-toks.shape[1] :]
    np.testing.assert_allclose(rec["source"], want.numpy(), atol=1e-4)
    assert rec["source"].shape[1] == 4096


@needs_repo
def test_live_benchmark_drafts_with_eventgpt(
  tiny, target, tmp_path, monkeypatch
):
  from tools import benchmark_sd as bench

  out = tmp_path / "bench"
  argv = [
    f"--target={target['spec']}",
    f"--draft=tools.plugins.eventgpt:make_backend:{tiny['ckpt']}",
    f"--samples={target['samples']}",
    "--warmup=0",
    f"--max_new_tokens={NEW}",
    "--gamma=2",
    "--methods=baseline,draft_tokens",
    "--bootstrap=0",
    "--no_plots",
    "--no_progress",
    "--device=cpu",
    f"--out={out}",
  ]
  monkeypatch.setenv(eg.REPO_ENV, REPO)
  assert bench.main(argv) == 0
  res = json.loads((out / "results.json").read_text())
  agg = res["aggregate"]["draft_tokens"]
  assert agg["n"] == 2 and agg["mismatched_samples"] == 0
  assert agg["drafted"] > 0
