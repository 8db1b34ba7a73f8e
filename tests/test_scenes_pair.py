"""The tiny scenes pair: trains, saves, loads through both backends, dumps."""

import dataclasses
import json
import os
import types

import pytest
import torch

from egpt_align.data.reader import open_dataset
from tools import dump_hidden_states as dump
from tools.lib import backends as bk
from tools.lib import generation
from tools.scenes import drafter as drafter_lib
from tools.scenes import make_pair, models, splits, text, token_ids, world
from tools.scenes import pair as pair_lib

torch.set_num_threads(1)
TINY = models.PRESETS["tiny"]


@pytest.fixture(scope="module")
def pair(tiny_scenes_pair):
  return tiny_scenes_pair


@pytest.fixture(scope="module")
def backends(pair):
  out, _ = pair
  target = bk.load_backend(f"video_llava:{out}/target")
  draft = bk.load_backend(f"tools.scenes.drafter:make_backend:{out}")
  return target, draft


@pytest.fixture(scope="module")
def split(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("samples"))
  return splits.write_samples(out, "test", 2)


def test_samples_name_their_scene_as_the_group(split):
  with open(split) as f:
    lines = [json.loads(line) for line in f]
  assert len(lines) == 2 * len(text.QTYPES)
  assert {x["group"] for x in lines} == {str(x["seed"]) for x in lines}
  assert len({x["group"] for x in lines}) == 2


def _sample(path, role, index=0):
  with open(path) as f:
    line = json.loads(f.readlines()[index])
  root = os.path.dirname(path)
  media = {k: os.path.join(root, v) for k, v in line["media"][role].items()}
  return {"id": line["id"], "question": line["question"], "media": media}, line


def test_pair_layout_and_results(pair):
  out, info = pair
  assert info["complete"]
  for name in ("config.json", "model.safetensors", "tokenizer.json"):
    assert os.path.isfile(os.path.join(out, "target", name))
  for name in (models.DRAFTER_CONFIG, models.DRAFTER_WEIGHTS):
    assert os.path.isfile(os.path.join(out, "drafter", name))
  for role, steps in (
    ("target", TINY.target_steps),
    ("drafter", TINY.drafter_steps),
  ):
    rec = info["trained"][role]
    curve = rec["loss_every_100_steps"]
    assert [s for s, _ in curve] == list(range(0, steps, 100)) + [steps - 1]
    assert curve[-1][1] == round(rec["loss"], 4)
    assert curve[-1][1] < curve[0][1]  # it learnt something
    assert rec["deterministic"] is False  # make_pair() alone: not asked for
  with open(os.path.join(out, pair_lib.TRAINING_PLOT), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  results = info["results"]
  for role in ("target", "drafter"):
    partial = {f"{q}/{name}" for q, (name, _) in text.PARTIAL.items()}
    assert set(results[role]) == set(text.QTYPES) | partial
    assert all(0.0 <= v <= 1.0 for v in results[role].values())
  assert results["target_mean_entropy_nats"] > 0
  for role in ("target", "drafter"):
    attrs = results["describe_attributes"][role]
    assert list(attrs) == list(text.ATTRIBUTES)
    assert all(0.0 <= v <= 1.0 for v in attrs.values())
  # Every object with a wrong cell is counted once, by kind.
  seeds = world.split_seeds("test", results["eval_scenes_per_qtype"])
  objects = sum(len(world.make_scene(s).things) for s in seeds)
  for role in ("target", "drafter"):
    misses = results["describe_cell_misses"][role]
    assert list(misses) == list(text.CELL_MISSES)
    cell = results["describe_attributes"][role]["cell"]
    assert sum(misses.values()) == round(objects * (1 - cell))
  for role in ("target", "drafter"):
    forms = results["describe_wrong_cells_by_form"][role]
    assert list(forms) == list(text.SENTENCE_FORMS)
    assert all(0 <= wrong <= stated for wrong, stated in forms.values())
    swaps = results["describe_cell_swaps"][role]
    assert list(swaps) == list(text.CELL_SWAPS)
    named = swaps["named_before"] + swaps["named_after"]
    assert 0 <= swaps["rest_right"] <= named <= sum(forms[f][0] for f in forms)
  for qtype in text.FILTERED:
    for role in ("target", "drafter"):
      kinds = results[f"{qtype}_wrong_kind_by_form"][role]
      assert list(kinds) == list(text.SENTENCE_FORMS)
      assert all(0 <= wrong <= stated for wrong, stated in kinds.values())
  assert "moving answers, static objects" in pair_lib.report(info)
  assert "still answers, moving objects" in pair_lib.report(info)
  assert "  colour" in pair_lib.report(info)
  assert "  named_after" in pair_lib.report(info)
  assert "  other_object" in pair_lib.report(info)
  assert "  cell_first" in pair_lib.report(info)
  assert (
    results["visual_tokens"]["target"] > results["visual_tokens"]["drafter"]
  )


def test_same_pair_is_kept_another_is_refused(pair, tmp_path, capsys):
  out, info = pair
  assert pair_lib.make_pair(out, TINY, 0, torch.device("cpu")) == info
  with pytest.raises(pair_lib.PairError, match="holds another pair"):
    pair_lib.make_pair(out, TINY, 1, torch.device("cpu"))
  assert make_pair.main(["--out", out, "--preset", "gpu"]) == 2
  assert "holds another pair" in capsys.readouterr().err
  (tmp_path / "junk").write_text("x")
  assert make_pair.main(["--out", str(tmp_path), "--preset", "tiny"]) == 2
  err = capsys.readouterr().err
  assert str(tmp_path) in err and len(err.strip().splitlines()) == 1


def test_a_cut_off_run_goes_on_from_the_saved_target(
  pair, tmp_path, monkeypatch
):
  """Each model is saved once trained; a rerun keeps it (no retraining) and
  ends with the same pair as an uninterrupted run; a recorded model that is
  missing is one error naming it."""
  from safetensors.torch import load_file

  from tools.scenes import training

  cpu = torch.device("cpu")
  whole_out, whole = pair
  out = str(tmp_path / "p")

  real_train = training.train

  def train_but(name, fail):
    def train(model_name, *args, **kwargs):
      if model_name == name:
        raise fail
      return real_train(model_name, *args, **kwargs)

    return train

  with monkeypatch.context() as m:
    m.setattr(training, "train", train_but("drafter", KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
      pair_lib.make_pair(out, TINY, 0, cpu)
  with open(os.path.join(out, pair_lib.PAIR_FILE)) as f:
    state = json.load(f)
  assert not state["complete"] and list(state["trained"]) == ["target"]
  assert os.path.isfile(os.path.join(out, "target", "model.safetensors"))

  retrained = AssertionError("the saved target was trained again")
  with monkeypatch.context() as m:
    m.setattr(training, "train", train_but("target", retrained))
    info = pair_lib.make_pair(out, TINY, 0, cpu)
  assert info["complete"] and set(info["trained"]) == {"target", "drafter"}
  for role, name in (
    ("target", "model.safetensors"),
    ("drafter", models.DRAFTER_WEIGHTS),
  ):
    got = load_file(os.path.join(out, role, name))
    want = load_file(os.path.join(whole_out, role, name))
    assert got.keys() == want.keys()
    for k in want:
      torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
  assert info["results"]["target"] == whole["results"]["target"]
  assert info["results"]["drafter"] == whole["results"]["drafter"]

  info["complete"] = False
  with open(os.path.join(out, pair_lib.PAIR_FILE), "w") as f:
    json.dump(info, f)
  os.rename(os.path.join(out, "drafter"), os.path.join(out, "gone"))
  with pytest.raises(pair_lib.PairError, match=r"p/drafter: missing"):
    pair_lib.make_pair(out, TINY, 0, cpu)


def test_unknown_preset_is_one_line(tmp_path, capsys):
  assert make_pair.main(["--out", str(tmp_path / "p"), "--preset", "big"]) == 2
  err = capsys.readouterr().err.strip()
  assert "'big'" in err and len(err.splitlines()) == 1
  assert not (tmp_path / "p").exists()


def test_preset_overrides(tmp_path, capsys):
  got = models.override(
    TINY, ["target_steps=5", "lr=0.5", "save_dtype=float16"]
  )
  assert (got.target_steps, got.lr, got.save_dtype) == (5, 0.5, "float16")
  assert got.drafter_steps == TINY.drafter_steps and got.name == "tiny"
  out = str(tmp_path / "p")
  for bad, names in (
    ("bogus=1", "'bogus=1'"),
    ("target_steps=many", "target_steps takes a int"),
    ("lr", "'lr'"),
    ("name=x", "'name=x'"),
    ("pos_init=sinus", "pos_init=sinus: expected one of"),
    ("pos_scale=0", "pos_scale=0.0: expected > 0"),
    ("fact_weight=0", "fact_weight=0.0: expected > 0"),
    ("cell_turns=-1", "cell_turns=-1: expected >= 0"),
    ("ema=1.0", "ema=1.0: expected 0 <= ema < 1"),
    ("tower_lr=0", "tower_lr=0.0: expected > 0"),
  ):
    argv = ["--out", out, "--preset", "tiny", "--set", bad]
    assert make_pair.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert names in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "p").exists()


def test_a_field_at_its_default_leaves_the_fingerprint_as_it_was():
  """A preset field with a default (added after pairs were made) is in the
  fingerprint only away from it: an older pair's pair.json still matches."""
  older = dataclasses.asdict(TINY)
  del older["tower_lr"]
  assert pair_lib.fingerprint(TINY, 3) == {"preset": older, "seed": 3}
  changed = models.override(TINY, ["tower_lr=0.5"])
  got = pair_lib.fingerprint(changed, 3)["preset"]
  assert got == {**older, "tower_lr": 0.5}


@pytest.mark.parametrize(
  "flag, on", [(None, True), ("--no-deterministic", False)]
)
def test_deterministic_kernels_by_default(tmp_path, monkeypatch, flag, on):
  """make_pair trains within deterministic kernels (cuBLAS's fixed
  workspace too) unless told not to, on the default seed; each model's
  record says which, and torch's setting comes back afterwards."""
  monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
  out = tmp_path / "d"
  argv = ["--out", str(out), "--preset", "tiny", "--device", "cpu"]
  argv += ["--set", "target_steps=2", "--set", "drafter_steps=2"]
  assert not torch.are_deterministic_algorithms_enabled()
  assert make_pair.main(argv + ([flag] if flag else [])) == 0
  assert not torch.are_deterministic_algorithms_enabled()
  assert ("CUBLAS_WORKSPACE_CONFIG" in os.environ) == on
  with open(out / pair_lib.PAIR_FILE) as f:
    info = json.load(f)
  trained = info["trained"]
  assert [trained[k]["deterministic"] for k in ("target", "drafter")] == [
    on,
    on,
  ]
  assert info["fingerprint"]["seed"] == pair_lib.DEFAULT_SEED


def test_evaluate_counts_objects_of_the_wrong_kind_per_model(
  backends, monkeypatch
):
  """With the answers made up (the target answers `moving` and `still` by
  describing every object, the drafter truly), evaluate adds up each
  model's own wrong-kind sentences by form over the scenes."""
  target, draft = backends
  seeds = world.split_seeds("test", 6)
  scenes = [world.make_scene(s) for s in seeds]
  tok = target.tokenizer
  calls = []

  def made_up(backend, batch, max_new_tokens):
    qtype = text.QTYPES[len(calls) // 2]
    role = "target" if backend is target else "drafter"
    calls.append((qtype, role))
    said = "describe" if role == "target" and qtype in text.FILTERED else qtype
    ids = [token_ids.answer_ids(tok, text.answer(s, said)) for s in scenes]
    width = max(map(len, ids))
    hidden = target.model.config.text_config.hidden_size
    return types.SimpleNamespace(
      tokens=torch.tensor(
        [x + [tok.pad_token_id] * (width - len(x)) for x in ids]
      ),
      lengths=torch.tensor([len(x) for x in ids]),
      hidden=torch.zeros(len(ids), width, hidden),
    )

  monkeypatch.setattr(generation, "greedy_generate", made_up)
  results = pair_lib.evaluate(target, draft, seeds, 8)
  assert calls == [(q, r) for q in text.QTYPES for r in ("target", "drafter")]
  for qtype in text.FILTERED:
    got = results[f"{qtype}_wrong_kind_by_form"]
    want = {f: [0, 0] for f in text.SENTENCE_FORMS}
    for scene in scenes:
      answer = text.answer(scene, "describe")
      for f, (a, b) in text.wrong_kind_by_form(answer, scene, qtype).items():
        want[f][0] += a
        want[f][1] += b
    assert got["target"] == want
    kind = [t.moving == (qtype == "moving") for s in scenes for t in s.things]
    assert sum(a for a, _ in got["drafter"].values()) == 0
    assert sum(b for _, b in got["drafter"].values()) == sum(kind)
    assert sum(a for a, _ in want.values()) == kind.count(False) > 0


def test_loss_label_names_the_fact_weight():
  """The training plot says when fact tokens were weighted, and by what."""

  def label(preset):
    return pair_lib.loss_label({"fingerprint": {"preset": preset}})

  assert label({"fact_weight": 1.0}) == label({}) == "answer-token loss (nats)"
  assert "fact tokens x2.5" in label({"fact_weight": 2.5})


def test_grid_positions_code_row_and_column():
  side, dim = 4, 18  # 4 wavelengths; dims 16 and 17 left over
  code = models.grid_positions(side, dim).reshape(side, side, dim)
  rows, cols = code[..., :8], code[..., 8:16]
  # The first half depends on the row alone, the second on the column.
  assert torch.equal(rows, rows[:, :1].expand_as(rows))
  assert torch.equal(cols, cols[:1].expand_as(cols))
  assert torch.equal(code[..., 16:], torch.zeros(side, side, 2))
  # Every patch has its own code; a neighbour's is nearer than a far one's.
  flat = code.reshape(side * side, dim)
  dist = torch.cdist(flat, flat)
  assert (dist + torch.eye(side * side) > 1e-3).all()
  assert dist[0, 1] < dist[0, 3] and dist[0, side] < dist[0, 3 * side]
  # sin and cos of one wavelength: unit norm per (row, frequency).
  assert torch.allclose(rows[..., :4] ** 2 + rows[..., 4:] ** 2, torch.ones(1))


@pytest.mark.parametrize(
  "pos_init,pos_scale", [("grid", 1.0), ("grid", 2.5), ("normal", 1.0)]
)
def test_pos_init_writes_the_patch_positions(pos_init, pos_scale):
  tok = text.train_tokenizer(world.split_seeds("train", 20), 256)
  preset = models.override(
    TINY, [f"pos_init={pos_init}", f"pos_scale={pos_scale}"]
  )
  torch.manual_seed(0)
  target = models.build_target(preset, tok)
  drafter = models.build_drafter(preset, tok)
  towers = [
    (m.position_embedding.weight[1:], m.patch_embedding.weight)
    for m in target.modules()
    if type(m).__name__ == "CLIPVisionEmbeddings"
  ]
  assert len(towers) == 2  # image and video towers
  towers.append(
    (drafter.encoder.pos_embed[0], drafter.encoder.patch_embed.weight)
  )
  for pos, patch in towers:
    side = world.SIZE // patch.shape[-1]
    code = models.grid_positions(side, pos.shape[1])
    scale = patch.std() * patch[0].numel() ** 0.5
    is_grid = torch.allclose(pos, code * scale * pos_scale, atol=1e-6)
    assert is_grid == (pos_init == "grid")
    if pos_init == "normal":
      assert pos.std() < 0.1 * scale  # the modules' own small init


def test_compile_modes_per_model(tmp_path, capsys):
  """--compile: one mode for both models or TARGET,DRAFTER; by default the
  target compiled and graphed, the drafter graphed uncompiled."""
  assert pair_lib.compile_modes(None) == {
    "target": "graphs",
    "drafter": "eager-graphs",
  }
  assert pair_lib.compile_modes("model") == {
    "target": "model",
    "drafter": "model",
  }
  assert pair_lib.compile_modes("layers,none") == {
    "target": "layers",
    "drafter": "none",
  }
  out = str(tmp_path / "p")
  for bad in ("fast", "model,none,none", "model,", "graphs,fast"):
    assert make_pair.main(["--out", out, "--preset", "tiny", "--compile", bad])
    err = capsys.readouterr().err.strip()
    assert f"--compile {bad!r}" in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "p").exists()


def test_plugin_dir_without_drafter_files_names_the_path(pair, tmp_path):
  out, _ = pair
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    bk.load_backend(f"tools.scenes.drafter:make_backend:{tmp_path}")
  with pytest.raises(ValueError, match="needs the pair directory"):
    bk.load_backend("tools.scenes.drafter:make_backend")


def test_target_is_fed_the_files_as_trained(backends, split):
  target, _ = backends
  sample, line = _sample(split, "target")
  got = target.prompt_inputs(sample)
  _, frames = world.render(line["seed"])
  want = pair_lib.target_inputs(
    target, pair_lib.target_prompts(target), line["question"], frames
  )
  assert torch.equal(got["input_ids"], want["input_ids"])
  torch.testing.assert_close(
    got["pixel_values_videos"], want["pixel_values_videos"]
  )
  n = int((got["input_ids"] == target.video_token_id).sum())
  assert n == models.video_tokens(TINY)


def test_drafter_is_fed_events_at_its_event_tokens(backends, split):
  _, draft = backends
  sample, line = _sample(split, "draft")
  got = draft.prompt_inputs(sample)
  _, frames = world.render(line["seed"])
  assert torch.equal(
    got["event_frames"], torch.from_numpy(world.events(frames))[None]
  )
  model = draft.model
  ids = got["input_ids"]
  slots = ids[0] == model.event_token_id
  assert int(slots.sum()) == models.event_tokens(TINY)
  with torch.no_grad():
    embeds = model.embed(ids, got["event_frames"])
    plain = model.lm.model.embed_tokens(ids)
    feats = model.encoder(got["event_frames"])
  torch.testing.assert_close(embeds[0, slots], feats[0])
  torch.testing.assert_close(embeds[0, ~slots], plain[0, ~slots])
  with pytest.raises(ValueError, match="events"):
    draft.prompt_inputs({"id": "x", "question": "q", "media": {}})


def test_drafter_static_decoder_continues_its_prefill(backends, split):
  """The fast runtime's static-cache steps of the drafter continue its
  event-spliced prefill exactly as the plugin's own forward does."""
  _, draft = backends
  sample, _ = _sample(split, "draft")
  x = draft.prompt_inputs(sample)
  with torch.inference_mode():
    lm = draft.static_decoder(256, lengths=(1, 3))
    _, _, cache = draft.forward(x, logits_to_keep=1)
    pos = bk.cache_length(cache)
    lm.load_prefix(cache, pos)
    for ids in ([[5, 6, 7]], [[8]]):
      ids = torch.tensor(ids)
      h, g = lm.step(ids, pos)
      want_h, logits, cache = draft.forward(
        input_ids=ids, past_key_values=cache
      )
      torch.testing.assert_close(h, want_h[0], atol=1e-5, rtol=1e-5)
      assert g.tolist() == logits[0].argmax(-1).tolist()
      pos += ids.shape[1]


def test_target_greedy_through_backend_equals_generate(backends, split):
  target, _ = backends
  sample, _ = _sample(split, "target")
  inputs = target.prompt_inputs(sample)
  eos = target.eos_token_id
  gen = generation.greedy_generate(
    target, target.collate([inputs]), 24, suppress_tokens=[eos]
  )
  with torch.no_grad():
    ref = target.model.generate(
      **inputs,
      max_new_tokens=24,
      do_sample=False,
      suppress_tokens=[eos],
    )
  p = inputs["input_ids"].shape[1]
  assert gen.tokens[0].tolist() == ref[0, p:].tolist()
  # The states it returns are the model's own final post-norm states.
  with torch.no_grad():
    full = torch.cat([inputs["input_ids"], gen.tokens[:, :-1]], dim=1)
    out = target.model(
      input_ids=full,
      pixel_values_videos=inputs["pixel_values_videos"],
      output_hidden_states=True,
    )
  torch.testing.assert_close(
    gen.hidden[0], out.hidden_states[-1][0, p - 1 :], atol=1e-4, rtol=1e-4
  )


def test_drafter_cache_crop_and_left_padding(backends, split):
  _, draft = backends
  a, _ = _sample(split, "draft", 0)
  b, _ = _sample(split, "draft", 4)  # another scene
  b["question"] = "Which objects move, and where do they go?"
  ia, ib = draft.prompt_inputs(a), draft.prompt_inputs(b)
  toks = torch.tensor([[30, 31, 32, 33]])
  with torch.no_grad():
    whole_in = dict(ia)
    whole_in["input_ids"] = torch.cat([ia["input_ids"], toks], 1)
    whole_in["attention_mask"] = torch.ones_like(whole_in["input_ids"])
    whole, _, _ = draft.forward(whole_in)
    h0, _, cache = draft.forward(ia)
    base = bk.cache_length(cache)
    h1, _, cache = draft.forward(input_ids=toks[:, :2], past_key_values=cache)
    bk.crop_cache(cache, base + 1)  # reject the second token, redo
    h2, _, cache = draft.forward(input_ids=toks[:, 1:], past_key_values=cache)
    step = torch.cat([h0, h1[:, :1], h2], dim=1)
    torch.testing.assert_close(step, whole, atol=1e-5, rtol=1e-5)
    batch = draft.collate([ia, ib])
    hb, _, _ = draft.forward(batch)
    ha, _, _ = draft.forward(ia)
    pad = batch["input_ids"].shape[1] - ia["input_ids"].shape[1]
    assert pad != 0 or ib["input_ids"].shape[1] != ia["input_ids"].shape[1]
    torch.testing.assert_close(hb[0, pad:], ha[0], atol=1e-5, rtol=1e-5)


def test_dump_teacher_forced_gives_a_valid_dataset(pair, split, tmp_path):
  out, _ = pair
  rc = dump.main(
    [
      "--target",
      f"video_llava:{out}/target",
      "--draft",
      f"tools.scenes.drafter:make_backend:{out}",
      "--samples",
      split,
      "--out",
      str(tmp_path / "ds"),
      "--max_new_tokens",
      "12",
      "--device",
      "cpu",
      "--no_progress",
    ]
  )
  assert rc == 0
  ds = open_dataset(str(tmp_path / "ds"))
  ds.validate(progress=False)
  assert len(ds) == 2 * len(text.QTYPES)
  assert ds.header["source_dim"] == ds.header["target_dim"] == TINY.hidden
  assert ds.header["has_draft_tokens"] and ds.header["has_target_tokens"]
  prov = ds.header["provenance"]
  assert "scenes_drafter" in json.dumps(prov)


def test_drafter_dir_resolution(pair):
  out, _ = pair
  assert drafter_lib.drafter_dir(out) == os.path.join(out, "drafter")
  sub = os.path.join(out, "drafter")
  assert drafter_lib.drafter_dir(sub) == sub
