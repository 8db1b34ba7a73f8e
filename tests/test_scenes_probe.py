"""Probes of a scenes pair (tools/scenes/probe.py) on the tiny pair."""

import json

import torch

from tools.lib import backends as bk
from tools.lib import generation
from tools.scenes import make_pair, models, probe, text, world


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
  prompts = make_pair.target_prompts(target)
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


def test_probe_command_writes_both_probes(tiny_scenes_pair, tmp_path, capsys):
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
  got = json.loads(path.read_text())
  assert got["evaluate"]["eval_scenes_per_qtype"] == 2
  assert set(got["planted"]) == {"scenes", "true", "planted"}
  assert got["fingerprint"]["preset"]["name"] == "tiny"


def test_probe_refuses_a_directory_without_a_pair(tmp_path, capsys):
  assert probe.main(["--pair", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert str(tmp_path) in err and len(err.splitlines()) == 1
