"""Probes of a scenes pair (tools/scenes/probe.py) on the tiny pair."""

import dataclasses
import json
import types

import numpy as np
import torch

from tools.lib import backends as bk
from tools.lib import generation
from tools.scenes import models, probe, text, token_ids, world
from tools.scenes import pair as pair_lib


def _scene_with_static():
  return next(
    world.make_scene(s)
    for s in world.split_seeds("test", 50)
    if any(not t.moving for t in world.make_scene(s).things)
    and any(t.moving for t in world.make_scene(s).things)
  )


def test_planted_scene_moves_only_the_static_objects_to_free_cells():
  scene = _scene_with_static()
  fake = probe.planted_scene(scene)
  cells = {t.cell for t in scene.things}
  for true, moved in zip(scene.things, fake.things, strict=True):
    if true.moving:
      assert moved == true
    else:
      assert moved.cell not in cells
      assert moved == probe.dataclasses.replace(
        true, row=moved.row, col=moved.col
      )
  assert text.correct(text.answer(fake, "still"), fake, "still")
  assert not text.correct(text.answer(fake, "still"), scene, "still")
  moving_only = next(
    world.make_scene(s)
    for s in range(200)
    if all(t.moving for t in world.make_scene(s).things)
  )
  assert probe.planted_scene(moving_only) is None


def test_planted_feeds_the_planted_answer_then_the_still_question(
  tiny_scenes_pair, monkeypatch
):
  out, _ = tiny_scenes_pair
  target = bk.load_backend(f"video_llava:{out}/target")
  fed = []
  real = generation.greedy_generate

  def spy(backend, batch, max_new_tokens):
    fed.append(batch)
    return real(backend, batch, max_new_tokens)

  monkeypatch.setattr(generation, "greedy_generate", spy)
  scene = _scene_with_static()
  got = probe.planted(target, [scene.seed, scene.seed], 8)
  assert got["scenes"] == 2 and got["true"] + got["planted"] <= 2
  prompts = pair_lib.target_prompts(target)
  fake = probe.planted_scene(scene)
  want = probe.planted_ids(prompts, scene, fake)
  _, frames = world.render(scene.seed)
  assert len(fed) == 2
  for batch in fed:
    assert batch["input_ids"][0].tolist() == want
    assert torch.equal(
      batch["pixel_values_videos"],
      models.pixels(torch.from_numpy(frames)[None]),
    )
  said = target.tokenizer.decode(want)
  assert text.answer(fake, "describe") in said
  assert text.answer(scene, "describe") not in said
  assert said.rstrip().endswith(
    f"{text.question(scene.seed, 'still')} {text.PROMPT_SUFFIX}"
  )


def test_probe_command_writes_every_probe(tiny_scenes_pair, tmp_path, capsys):
  out, _ = tiny_scenes_pair
  path = tmp_path / "probe.json"
  argv = [
    "--pair",
    out,
    "--scenes",
    "2",
    "--device",
    "cpu",
    "--json",
    str(path),
  ]
  argv += ["--max_new_tokens", "8"]
  assert probe.main(argv) == 0
  printed = capsys.readouterr().out
  assert "other_object" in printed and "planted:" in printed
  assert "cell attention" in printed
  got = json.loads(path.read_text())
  assert got["evaluate"]["eval_scenes_per_qtype"] == 2
  assert set(got["planted"]) == {"scenes", "true", "planted"}
  assert set(got["cell_attention"]) == {"right", "wrong"}
  assert set(got["readout"]) == {"cell", "shape", "objects"}
  assert set(got["tower"]) == {
    "entropy",
    "on_class",
    "common",
    "spread",
    "uniform",
  }
  assert "vision tower, per layer" in printed
  assert got["fingerprint"]["preset"]["name"] == "tiny"


def test_probe_command_runs_only_the_probes_asked_for(
  tiny_scenes_pair, tmp_path, capsys, monkeypatch
):
  out, _ = tiny_scenes_pair
  path = tmp_path / "probe.json"
  ran = []
  for name in ("cell_attention", "planted"):
    monkeypatch.setattr(
      probe, name, lambda *a, name=name, **k: ran.append(name)
    )
  monkeypatch.setattr(
    probe.pair_lib, "evaluate", lambda *a, **k: ran.append("evaluate")
  )
  argv = ["--pair", out, "--scenes", "2", "--device", "cpu"]
  argv += ["--probes", "readout", "--json", str(path)]
  assert probe.main(argv) == 0
  assert ran == []
  got = json.loads(path.read_text())
  assert set(got) == {"pair", "fingerprint", "split", "dtype", "readout"}
  assert set(got["readout"]) == {"cell", "shape", "objects"}
  assert "shape: language model" in capsys.readouterr().out


def test_probe_refuses_an_unknown_probe(tiny_scenes_pair, capsys):
  out, _ = tiny_scenes_pair
  assert probe.main(["--pair", out, "--probes", "readout,shapes"]) == 2
  err = capsys.readouterr().err.strip()
  assert "shapes" in err and len(err.splitlines()) == 1


def test_probe_refuses_a_directory_without_a_pair(tmp_path, capsys):
  assert probe.main(["--pair", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert str(tmp_path) in err and len(err.splitlines()) == 1


def test_cell_tokens_point_at_the_first_token_of_each_cell(tiny_scenes_pair):
  out, _ = tiny_scenes_pair
  target = bk.load_backend(f"video_llava:{out}/target")
  tok = target.tokenizer
  scene = next(
    world.make_scene(s)
    for s in range(100)
    if len(world.make_scene(s).things) == 3
  )
  for variant in range(4):
    ids = token_ids.answer_ids(tok, text.answer(scene, "describe", variant))
    got = probe.cell_tokens(tok, ids)
    assert sorted((c, cell) for c, cell, _ in got) == sorted(
      (t.colour, t.cell) for t in scene.things
    )
    for _, cell, k in got:
      assert tok.decode(ids[k:]).lstrip().startswith(cell)
      assert cell not in tok.decode(ids[:k]).split(".")[-1]


def test_object_tokens_are_the_patches_the_object_covers():
  scene, frames = world.render(5)
  side, first = 8, 3
  for thing in scene.things:
    for frame in (0, world.NUM_FRAMES - 1):
      got = probe.object_tokens(thing, frame, side, first)
      block = first + frame * (side * side + 1) + 1  # after the CLS token
      assert got and all(block <= p < block + side * side for p in got)
      colour = np.array(world.COLOURS[thing.colour])
      for i in range(side * side):
        r, c = divmod(i, side)
        cut = frames[frame, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8]
        painted = (cut == colour).all(-1).any()
        covered = world.mask(thing, frame)[8 * r : 8 * r + 8, 8 * c : 8 * c + 8]
        assert (block + i in got) == covered.any()
        if painted and not covered.any():
          raise AssertionError("colour outside the object's mask")


def test_cell_attention_reads_the_row_that_chose_each_cell(
  tiny_scenes_pair, monkeypatch
):
  """With the answer and the attention made up: the row before each cell
  token puts 0.75 on the object's first first-frame patch (head 1) and 0.25
  on another object's; every other row attends to token 0."""
  out, _ = tiny_scenes_pair
  target = bk.load_backend(f"video_llava:{out}/target")
  tok = target.tokenizer
  scene = next(
    world.make_scene(s)
    for s in world.split_seeds("test", 100)
    if len(world.make_scene(s).things) == 2
  )
  a, b = scene.things
  swapped = (
    dataclasses.replace(a, row=b.row, col=b.col),
    dataclasses.replace(b, row=a.row, col=a.col),
  )
  prompts = pair_lib.target_prompts(target)
  first, _ = prompts.media_span()
  side = world.SIZE // target.model.config.vision_config.patch_size
  layers = target.model.config.text_config.num_hidden_layers
  heads = target.model.config.text_config.num_attention_heads
  results = {}
  for name, things in (("right", scene.things), ("wrong", swapped)):
    told = dataclasses.replace(scene, things=things)
    answer = token_ids.answer_ids(tok, text.answer(told, "describe"))
    gen = types.SimpleNamespace(
      tokens=torch.tensor([answer]), lengths=torch.tensor([len(answer)])
    )
    monkeypatch.setattr(generation, "greedy_generate", lambda *a, g=gen, **k: g)
    prompt = prompts(text.question(scene.seed, "describe"))
    n = len(prompt) + len(answer)
    att = torch.zeros(1, heads, n, n)
    att[..., 0] = 1.0
    for colour, _, k in probe.cell_tokens(tok, answer):
      own = next(t for t in scene.things if t.colour == colour)
      other = next(t for t in scene.things if t.colour != colour)
      row = len(prompt) + k - 1
      att[0, :, row] = 0.0
      att[0, 1, row, probe.object_tokens(own, 0, side, first)[0]] = 0.75
      att[0, 1, row, probe.object_tokens(other, 0, side, first)[0]] = 0.25
    fake = types.SimpleNamespace(attentions=(att,) * layers)
    monkeypatch.setattr(target.model, "forward", lambda *a, f=fake, **k: f)
    results[name] = probe.cell_attention(target, [scene.seed], 8)
  for name in ("right", "wrong"):
    got = results[name][name]
    assert got["objects"] == 2
    assert got["own"][0] == [0.75] * layers
    assert got["own"][1:] == [[0.0] * layers] * (world.NUM_FRAMES - 1)
    assert got["others_first"] == [0.25] * layers
    other = "wrong" if name == "right" else "right"
    assert results[name][other]["objects"] == 0


def test_cell_attention_shares_are_attention_masses(tiny_scenes_pair):
  out, _ = tiny_scenes_pair
  target = bk.load_backend(f"video_llava:{out}/target")
  seeds = world.split_seeds("test", 6)
  got = probe.cell_attention(target, seeds, 40)
  layers = target.model.config.text_config.num_hidden_layers
  for v in got.values():
    assert len(v["own"]) == world.NUM_FRAMES
    assert all(len(row) == layers for row in v["own"] + [v["others_first"]])
    for f in range(world.NUM_FRAMES):
      for a, b in zip(v["own"][f], v["others_first"], strict=True):
        assert 0.0 <= a <= 1.0 and 0.0 <= b <= 1.0
  # The model goes back to the attention it was loaded with.
  assert target.model.config._attn_implementation != "eager"


def test_ridge_accuracy_reads_a_linear_label_and_not_noise():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, size=400)
  x = 3.0 * rng.normal(size=(3, 12))[y] + rng.normal(size=(400, 12))
  assert probe.ridge_accuracy(x[:300], y[:300], x[300:], y[300:], 3) > 0.95
  noise = rng.integers(0, 3, size=400)
  assert (
    probe.ridge_accuracy(x[:300], noise[:300], x[300:], noise[300:], 3) < 0.5
  )


def test_object_features_are_the_objects_first_frame_tokens(tiny_scenes_pair):
  """Stage 0 of the language model is the projector's output at the
  object's first-frame patches; the tower's stages are its hidden states
  there; the labels are the objects' start cells and shapes."""
  out, _ = tiny_scenes_pair
  target = bk.load_backend(f"video_llava:{out}/target")
  model = target.model
  seeds = world.split_seeds("test", 3)
  feats, labels = probe.object_features(target, seeds)
  things = [t for s in seeds for t in world.make_scene(s).things]
  assert labels["cell"].tolist() == [world.CELLS.index(t.cell) for t in things]
  assert labels["shape"].tolist() == [
    world.SHAPES.index(t.shape) for t in things
  ]
  vision = model.config.vision_config
  assert len(feats["tower"]) == vision.num_hidden_layers + 1
  assert len(feats["lm"]) == model.config.text_config.num_hidden_layers + 1
  side = vision.image_size // vision.patch_size
  k = 0
  with torch.no_grad():
    for s in seeds:
      scene, frames = world.render(s)
      pix = models.pixels(torch.from_numpy(frames)[None])[0]
      tower = model.model.video_tower(pix, output_hidden_states=True)
      proj = model.model.multi_modal_projector(
        tower.hidden_states[model.config.vision_feature_layer]
      )
      for thing in scene.things:
        patch = world.SIZE // side
        covered = world.mask(thing, 0).reshape(side, patch, side, patch)
        idx = 1 + np.flatnonzero(covered.any(axis=(1, 3)))
        np.testing.assert_allclose(
          feats["lm"][0][k], proj[0, idx].mean(0).numpy(), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
          feats["tower"][-1][k],
          tower.hidden_states[-1][0, idx].mean(0).numpy(),
          rtol=1e-4,
          atol=1e-5,
        )
        k += 1
  assert k == len(things)
  got = probe.readout(target, seeds, world.split_seeds("test", 2, offset=3))
  for name in ("cell", "shape"):
    assert len(got[name]["tower"]) == len(feats["tower"])
    assert len(got[name]["lm"]) == len(feats["lm"])
    assert all(0.0 <= v <= 1.0 for v in got[name]["tower"] + got[name]["lm"])
  assert got["objects"][0] == len(things)
