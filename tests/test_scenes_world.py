"""Scenes world and text: renderer, events, answers, parser, tokenizer."""

import dataclasses

import numpy as np
import pytest

from tools.scenes import text, token_ids, train_data, train_losses, world

SEEDS = list(range(60)) + world.split_seeds("test", 20)


def test_render_is_deterministic_per_seed():
  for seed in (0, 5, 1_000_003):
    s1, f1 = world.render(seed)
    s2, f2 = world.render(seed)
    assert s1 == s2
    np.testing.assert_array_equal(f1, f2)
    assert f1.shape == (world.NUM_FRAMES, world.SIZE, world.SIZE, 3)
    assert f1.dtype == np.uint8
  assert not np.array_equal(world.render(1)[1], world.render(2)[1])


def test_splits_are_disjoint_seed_ranges():
  assert world.split_of(world.split_seeds("val", 1)[0]) == "val"
  assert world.split_of(world.split_seeds("test", 3, offset=7)[-1]) == "test"
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    world.split_seeds("dev", 1)
  with pytest.raises(ValueError, match="in no split"):
    world.split_of(-1)


def _still(scene):
  things = tuple(
    dataclasses.replace(t, direction=None, speed=None) for t in scene.things
  )
  return dataclasses.replace(scene, things=things)


def test_static_scene_gives_no_events():
  scene = _still(world.make_scene(3))
  ev = world.events(world.draw(scene))
  assert ev.shape == (world.NUM_FRAMES - 1, 2, world.SIZE, world.SIZE)
  assert ev.sum() == 0


def test_events_only_where_moving_objects_pass():
  for seed in range(20):
    scene, frames = world.render(seed)
    ev = world.events(frames).sum(axis=(0, 1))
    changed = (frames != frames[:1]).any(axis=(0, 3))
    # No event where a pixel never changes; motion gives some events.
    assert not ev[~changed].any()
    if any(t.moving for t in scene.things):
      assert ev.sum() > 0


def test_event_sign_follows_brightness():
  frames = np.full((3, world.SIZE, world.SIZE, 3), 60, np.uint8)
  frames[1:, 10, 20] = 200  # brighter from frame 1 on
  frames[2, 30, 40] = 10  # darker in frame 2
  ev = world.events(frames)
  assert ev[0, 0, 10, 20] > 0 and ev[0, 1, 10, 20] == 0
  assert ev[1, :, 10, 20].sum() == 0  # no further change, no event
  assert ev[1, 1, 30, 40] > 0 and ev[1, 0, 30, 40] == 0
  ev[0, 0, 10, 20] = 0
  ev[1, 1, 30, 40] = 0
  assert ev.sum() == 0


def test_every_answer_parses_back_to_its_scene():
  for seed in SEEDS:
    scene = world.make_scene(seed)
    for qtype in text.QTYPES:
      for variant in range(3):
        answer = text.answer(scene, qtype, variant)
        assert text.correct(answer, scene, qtype), (seed, qtype, answer)


def test_cell_answers_name_the_object_that_starts_there():
  """A cell question names its cell; the answer states the object starting
  there (colour, shape, motion, in a cell-first sentence), or no object."""
  empty = 0
  for seed in SEEDS:
    scene = world.make_scene(seed)
    at = {thing.cell: thing for thing in scene.things}
    for cell in world.CELLS:
      assert cell in text.cell_question(seed, cell, seed)
      answer = text.cell_answer(scene, cell, seed)
      stated = [(c, where) for c, where, _ in text.stated_cells(answer)]
      colours = [c for c in world.COLOURS if c in answer]
      if cell not in at:
        empty += 1
        assert stated == [] and colours == [], answer
        continue
      thing = at[cell]
      assert stated == [(thing.colour, cell)], answer
      assert colours == [thing.colour] and thing.shape in answer
      assert text.sentence_form(answer) == "cell_first"
      moves = text._MOVE.findall(answer.lower())
      want = [(thing.direction, thing.speed)] if thing.moving else []
      assert moves == want, answer
  assert 0 < empty < 9 * len(SEEDS)


def test_parser_rejects_answers_of_another_scene():
  wrong = 0
  for seed in range(40):
    scene, other = world.make_scene(seed), world.make_scene(seed + 1)
    for qtype in text.QTYPES:
      if text.facts(scene, qtype) != text.facts(other, qtype):
        wrong += 1
        assert not text.correct(text.answer(other, qtype), scene, qtype)
  assert wrong > 100
  assert text.parse("", "describe") is None
  assert text.parse("There are two objects. Blah.", "describe") is None


def test_partial_scores_ignore_what_events_cannot_show():
  for seed in range(200):
    scene = world.make_scene(seed)
    moving = [t for t in scene.things if t.moving]
    if moving and len(moving) < len(scene.things):
      break
  recoloured = dataclasses.replace(
    scene,
    things=tuple(
      dataclasses.replace(t, colour="white" if t.colour != "white" else "red")
      for t in scene.things
    ),
  )
  answer = text.answer(recoloured, "moving")
  assert not text.correct(answer, scene, "moving")
  assert text.partial_correct(answer, scene, "moving")
  assert text.partial_correct(text.answer(scene, "still"), scene, "still")
  # A wrong direction is a wrong motion fact.
  turned = dataclasses.replace(
    scene,
    things=tuple(
      dataclasses.replace(t, direction="up" if t.direction != "up" else "down")
      if t.moving
      else t
      for t in scene.things
    ),
  )
  assert not text.partial_correct(
    text.answer(turned, "moving"), scene, "moving"
  )
  # The right motion from a wrong start cell is a wrong motion fact.
  moved = dataclasses.replace(
    scene,
    things=tuple(
      dataclasses.replace(t, row=(t.row + 1) % 3) if t.moving else t
      for t in scene.things
    ),
  )
  assert text.answer(moved, "moving") != text.answer(scene, "moving")
  assert not text.partial_correct(text.answer(moved, "moving"), scene, "moving")
  # An answer to `moving` that calls an object still (a describe answer
  # lists the static ones too) is wrong, not an error.
  described = text.answer(scene, "describe")
  assert len(text.parse(described, "moving")[1]) == len(scene.things)
  assert not text.partial_correct(described, scene, "moving")


def test_wording_varies_with_the_variant():
  scene = world.make_scene(11)
  answers = {text.answer(scene, "describe", v) for v in range(10)}
  assert len(answers) > 3


def test_tokenizer_round_trips_every_answer():
  tok = text.train_tokenizer(range(200), 512)
  ids = [tok.convert_tokens_to_ids(name) for name in text.SPECIAL_TOKENS]
  assert ids == list(range(len(text.SPECIAL_TOKENS)))
  lengths = []
  for seed in SEEDS:  # mostly scenes the tokenizer was not trained on
    scene = world.make_scene(seed)
    for qtype in text.QTYPES:
      answer = " " + text.answer(scene, qtype, seed)
      ids = tok(answer, add_special_tokens=False)["input_ids"]
      assert tok.unk_token_id not in ids
      assert tok.decode(ids) == answer
      lengths.append(len(ids))
    for cell in world.CELLS:
      answer = " " + text.cell_answer(scene, cell, seed)
      ids = tok(answer, add_special_tokens=False)["input_ids"]
      assert tok.unk_token_id not in ids
      assert tok.decode(ids) == answer
  assert max(lengths) >= 40
  ids = tok(text.prompt("Describe the scene.", "<video>" * 3))["input_ids"]
  assert ids[0] == tok.bos_token_id
  assert ids.count(tok.convert_tokens_to_ids("<video>")) == 3


def test_training_batches_are_the_same_from_worker_processes():

  tok = text.train_tokenizer(range(100), 512)
  scenes = [world.make_scene(s) for s in range(30)]
  batches = train_data.Batches(tok, scenes, "<video>", 17, 0, 4)
  executor = train_data.make_executor({"target": batches}, 2)
  with executor:
    got = list(train_data.stream(batches, "target", 12, executor))
  want = list(train_data.stream(batches, "target", 12))
  assert len(got) == len(want) == 12
  for g, w in zip(got, want, strict=True):
    for a, b in zip(g, w, strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Steps differ from each other (the stream is not one batch repeated).
  assert not np.array_equal(np.asarray(got[0][1]), np.asarray(got[1][1]))


def test_samples_cli_bad_split_is_one_line(tmp_path, capsys):
  from tools.scenes import samples

  assert samples.main(["--out", str(tmp_path), "--split", "dev", "--num", "1"])
  err = capsys.readouterr().err.strip()
  assert "'dev'" in err and len(err.splitlines()) == 1
  assert samples.main(
    ["--out", str(tmp_path), "--split", "test", "--num", "1", "--qtypes", "x"]
  )
  assert "--qtypes" in capsys.readouterr().err


def test_training_losses_equal_the_models_own_masked_loss():
  """The training losses (media spliced in at the prompts' fixed span, no
  attention mask, logits only after the media) on fixed-width packed
  batches equal each model's own forward (placeholder search, attention
  mask) on the unpadded batch: the padding is unlabelled and on the right,
  so causal attention never lets a real token see it."""
  import torch

  from tools.scenes import models, training

  preset = models.PRESETS["tiny"]
  tok = text.train_tokenizer(range(100), 512)
  scenes = [world.make_scene(s) for s in range(30)]
  torch.manual_seed(0)
  target = models.build_target(preset, tok).eval()
  drafter = models.build_drafter(preset, tok).eval()
  frames = np.stack([world.render(s.seed)[1] for s in scenes])
  events = np.stack([world.events(f) for f in frames])
  frames_t, events_t = torch.from_numpy(frames), torch.from_numpy(events)

  def masked_target(idx, ids, mask, labels):
    return target(
      input_ids=ids,
      attention_mask=mask,
      pixel_values_videos=models.pixels(frames_t[idx]),
      labels=labels,
    ).loss

  def masked_drafter(idx, ids, mask, labels):
    hidden = drafter(
      ids, attention_mask=mask, use_cache=False, event_frames=events_t[idx]
    ).last_hidden_state
    logits = drafter.lm.lm_head(hidden[:, :-1])
    return torch.nn.functional.cross_entropy(
      logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    )

  cpu = torch.device("cpu")
  for name, model, media, masked in (
    ("target", target, frames, masked_target),
    ("drafter", drafter, events, masked_drafter),
  ):
    fixed = train_data.make_batches(name, tok, scenes, preset, 0)
    wants, made = [], [fixed(step) for step in range(3)]
    for f in made:  # the model's own loss, before make_loss sets it up
      n = int(f[2].sum(1).max())  # the longest sequence, unpadded
      assert f[1].shape[1] == fixed.width > n
      assert (f[2][:, n:] == 0).all() and (f[3][:, n:] == -100).all()
      with torch.no_grad():
        wants.append(float(masked(f[0], f[1][:, :n], f[2][:, :n], f[3][:, :n])))
    loss = training.make_loss(name, model, media, fixed, cpu, "none")
    lm = train_losses.language_model(name, model)
    assert lm.config._attn_implementation == train_losses.CAUSAL_ATTENTION
    for f, want in zip(made, wants, strict=True):
      with torch.no_grad():
        got = loss(*train_data.device_batch(f, cpu))
        assert float(got) == pytest.approx(want, rel=1e-5), name
  with pytest.raises(ValueError, match="over the fixed width 7"):
    token_ids.pad_batch(
      [[1, 2, 3, 4, 5, 6, 7, 8]], [[-100] * 3 + [4, 5, 6, 7, 8]], 0, width=7
    )


@pytest.mark.parametrize("name", ["target", "drafter", "target+facts"])
def test_the_training_loss_traces_as_one_graph(name):
  """Once make_loss has set a model up, its loss is one graph for
  torch.compile (no break for dynamo to cut the compiled step at); the
  target's with fact tokens weighted too."""
  import functools

  import torch

  from tools.scenes import models, training

  preset = models.PRESETS["tiny"]
  tok = text.train_tokenizer(range(50), 512)
  scenes = [world.make_scene(s) for s in range(8)]
  frames = np.stack([world.render(s.seed)[1] for s in scenes])
  weights = None
  if name == "target+facts":
    name, weights = "target", train_losses.token_weights(tok, 3.0)
  media = (
    frames if name == "target" else np.stack([world.events(f) for f in frames])
  )
  build = models.build_target if name == "target" else models.build_drafter
  model = build(preset, tok)
  batches = train_data.make_batches(name, tok, scenes, preset, 0)
  training.make_loss(name, model, media, batches, torch.device("cpu"), "model")
  loss = (
    train_losses.target_loss if name == "target" else train_losses.drafter_loss
  )
  if weights is not None:
    loss = functools.partial(loss, weights=weights)
  start = batches.prompts.media_span()[0]
  idx, ids, _, labels = batches(1)
  m = torch.from_numpy(media)[torch.as_tensor(idx)]
  torch._dynamo.reset()
  explained = torch._dynamo.explain(
    lambda i, lab, m: loss(model, i, lab, m, start)
  )(ids, labels, m)
  assert explained.graph_break_count == 0, explained.break_reasons
  assert explained.graph_count == 1


def test_train_restores_the_attention_implementation():
  """Training attends without a mask; the trained model goes back to the
  implementation it came with (which honours padding masks)."""
  import torch

  from tools.scenes import models, training

  preset = models.override(
    models.PRESETS["tiny"], ["target_steps=2", "drafter_steps=2"]
  )
  tok = text.train_tokenizer(range(50), 512)
  scenes = [world.make_scene(s) for s in range(8)]
  frames = np.stack([world.render(s.seed)[1] for s in scenes])
  events = np.stack([world.events(f) for f in frames])
  cpu = torch.device("cpu")
  for name, build, media in (
    ("target", models.build_target, frames),
    ("drafter", models.build_drafter, events),
  ):
    model = build(preset, tok)
    lm = train_losses.language_model(name, model)
    before = lm.config._attn_implementation
    batches = train_data.make_batches(name, tok, scenes, preset, 0)
    training.train(name, model, batches, preset, media, cpu, None, "none")
    assert (
      lm.config._attn_implementation == before != train_losses.CAUSAL_ATTENTION
    )


def test_training_sequences_are_conversations_of_distinct_questions():
  """A packed sequence: the first turn is the inference prompt and its
  answer, each later turn `USER: q ASSISTANT:` and its answer, every
  question type at most once; exactly the answers are labelled; a later
  turn that does not fit the width is left out, the first never is (an
  answer over max_new_tokens is an error)."""

  tok = text.train_tokenizer(range(100), 512)
  scenes = [world.make_scene(s) for s in range(30)]
  turns, room = 3, 40
  batches = train_data.Batches(
    tok, scenes, "<video>", 5, 0, 16, 64, turns, room
  )
  assert batches.width == batches.prompts.longest() + 64 + room
  dropped = 0
  for step in range(4):
    rows = train_data.examples(scenes, 0, step, 16, turns)
    idx, ids, mask, labels = batches(step)
    np.testing.assert_array_equal(idx, [r[0] for r in rows])
    for i, (scene_idx, qas) in enumerate(rows):
      assert len(qas) == turns
      qtypes = [
        next(t for t in text.QTYPES if q in text.QUESTIONS[t]) for q, _ in qas
      ]
      assert len(set(qtypes)) == turns
      for (_, a), qt in zip(qas, qtypes, strict=True):
        assert text.correct(a, scenes[scene_idx], qt)
      want_ids, want_labels = [], []
      for k, (q, a) in enumerate(qas):
        head = batches.prompts.follow_up(q) if k else batches.prompts(q)
        ans = token_ids.answer_ids(tok, a)
        if k and len(want_ids) + len(head) + len(ans) > batches.width:
          dropped += 1
          break
        want_ids += head + ans
        want_labels += [-100] * len(head) + ans
      n = len(want_ids)
      assert ids[i, :n].tolist() == want_ids
      assert labels[i, :n].tolist() == want_labels
      assert (labels[i, n:] == -100).all() and int(mask[i].sum()) == n
      first = batches.prompts(qas[0][0])
      assert ids[i, : len(first)].tolist() == first
      assert (
        tok.decode(batches.prompts.follow_up("Q?")) == "USER: Q? ASSISTANT:"
      )
  assert dropped > 0  # the room of 40 is too small for every third turn
  short = train_data.Batches(tok, scenes, "<video>", 4, 0, 4, 5)
  with pytest.raises(ValueError, match=r"training scene \d+ \(step 0\)"):
    short(0)


def test_cell_turns_follow_the_regular_turns():
  """With cell_turns each conversation keeps its regular turns as they were
  and ends with that many questions about one cell, answered from its scene
  (the cell an object's start about three times in four); Batches packs
  them as labelled turns."""
  from tools.scenes import models

  scenes = [world.make_scene(s) for s in range(30)]
  plain = train_data.examples(scenes, 0, 3, 200, 2)
  more = train_data.examples(scenes, 0, 3, 200, 2, cell_turns=2)
  occupied = 0
  for (i, qas), (j, both) in zip(plain, more, strict=True):
    assert i == j and both[:2] == qas and len(both) == 4
    at = {thing.cell: thing for thing in scenes[i].things}
    for q, a in both[2:]:
      cell = next(c for c in world.CELLS if q.endswith(f" the {c}?"))
      stated = [(c, where) for c, where, _ in text.stated_cells(a)]
      assert stated == ([(at[cell].colour, cell)] if cell in at else [])
      occupied += cell in at
  assert 0.65 < occupied / 400 < 0.85
  tok = text.train_tokenizer(range(100), 512)
  batches = train_data.Batches(tok, scenes, "<video>", 5, 0, 16, None, 2, 0, 1)
  preset = dataclasses.replace(models.PRESETS["tiny"], cell_turns=3)
  made = train_data.make_batches("target", tok, scenes, preset, 0)
  assert made.cell_turns == 3  # the preset's field reaches the batches
  rows = train_data.examples(scenes, 0, 1, 16, 2, 1)
  _, _, _, labels = batches(1)
  for i, (_, qas) in enumerate(rows):
    last = token_ids.answer_ids(tok, qas[-1][1])
    got = [x for x in labels[i].tolist() if x != -100]
    assert got[-len(last) :] == last


def test_training_compiles_only_on_cuda_and_as_told():
  import torch

  from tools.scenes import models, training

  cuda, cpu = torch.device("cuda"), torch.device("cpu")
  # torch.compile wraps lazily: no GPU is needed to see the choice.
  model = torch.nn.Linear(2, 2)
  fn = model.forward
  assert training.compiled(fn, model, cuda, "model") is not fn
  assert training.compiled(fn, model, cuda, "graphs") is not fn
  assert training.compiled(fn, model, cpu, "graphs") is fn
  assert training.compiled(fn, model, cuda, "none") is fn
  assert training.compiled(fn, model, cpu, "model") is fn
  with pytest.raises(ValueError, match="compile mode 'fast'"):
    training.compiled(fn, model, cuda, "fast")
  with pytest.raises(ValueError, match="Linear: no transformer layers"):
    training.compiled(fn, model, cuda, "layers")
  # `layers`: every transformer layer of both towers compiled in place,
  # nothing else.
  tok = text.train_tokenizer(range(50), 512)
  target = models.build_target(models.PRESETS["tiny"], tok)
  assert training.compiled(fn, target, cuda, "layers") is fn
  done = [m for m in target.modules() if m._compiled_call_impl is not None]
  names = [type(m).__name__ for m in done]
  tiny = models.PRESETS["tiny"]
  assert names.count("LlamaDecoderLayer") == tiny.target_layers
  # The video tower's layers (and the unused image tower's, never called).
  assert names.count("CLIPEncoderLayer") == 2 * tiny.vision_layers
  assert len(names) == tiny.target_layers + 2 * tiny.vision_layers
  # `layers-graphs`: the same layers compiled, and the step graphed whole.
  target = models.build_target(tiny, tok)
  assert training.compiled(fn, target, cuda, "layers-graphs") is fn
  done = [m for m in target.modules() if m._compiled_call_impl is not None]
  assert len(done) == tiny.target_layers + 2 * tiny.vision_layers
  assert "layers-graphs" in training.GRAPH_MODES


def test_attribute_hits_score_each_fact_of_each_object():
  scene = next(
    world.make_scene(s)
    for s in range(100)
    if len(world.make_scene(s).things) == 3
    and sum(t.moving for t in world.make_scene(s).things) == 2
  )
  n, moving = 3, 2
  full = {"colour": n, "shape": n, "cell": n, "motion": n, "speed": moving}
  for variant in range(5):
    answer = text.answer(scene, "describe", variant)
    got = text.attribute_hits(answer, scene)
    assert got == {k: (v, v) for k, v in full.items()}, answer
  answer = text.answer(scene, "describe")
  moved = next(t for t in scene.things if t.moving)
  other = next(s for s in world.SHAPES if s != moved.shape)
  sentences = text._sentences(answer)
  i = next(i for i, s in enumerate(sentences) if moved.colour in s)
  wrong_shape = sentences[i].replace(moved.shape, other)
  got = text.attribute_hits(
    " ".join(sentences[:i] + [wrong_shape] + sentences[i + 1 :]), scene
  )
  assert got["shape"] == (n - 1, n)
  assert all(got[k] == (v, v) for k, v in full.items() if k != "shape")
  # The object left out (the count sentence still says three): every fact
  # of it is missed.
  dropped = sentences[:i] + sentences[i + 1 :]
  got = text.attribute_hits(" ".join(dropped), scene)
  assert got == {k: (v - 1, v) for k, v in full.items()}
  assert text.attribute_hits("No idea.", scene) == {
    k: (0, v) for k, v in full.items()
  }


def test_cell_misses_tell_a_swap_from_a_cell_nobody_is_in():
  scene = next(
    world.make_scene(s)
    for s in range(200)
    if len(world.make_scene(s).things) == 3
  )
  none = dict.fromkeys(text.CELL_MISSES, 0)
  answer = text.answer(scene, "describe")
  assert text.cell_misses(answer, scene) == none
  a, b, c = scene.things
  taken = {(t.row, t.col) for t in scene.things}
  row, col = next(divmod(k, 3) for k in range(9) if divmod(k, 3) not in taken)
  # a and b swapped (two binding errors), c sent to a cell nobody is in.
  said = (
    dataclasses.replace(a, row=b.row, col=b.col),
    dataclasses.replace(b, row=a.row, col=a.col),
    dataclasses.replace(c, row=row, col=col),
  )
  wrong = text.answer(dataclasses.replace(scene, things=said), "describe")
  got = text.cell_misses(wrong, scene)
  assert got == {"other_object": 2, "elsewhere": 1, "unstated": 0}, wrong
  dropped = [x for x in text._sentences(answer) if c.colour not in x]
  assert text.cell_misses(" ".join(dropped), scene)["unstated"] == 1
  assert text.cell_misses("No idea.", scene)["unstated"] == 3


def test_cell_swaps_tell_whose_cell_and_whether_the_rest_is_right():
  """A sentence giving an object another's cell counts by where that other
  object is named (an earlier sentence, or a later one) and, when its shape
  and motion are right, as `rest_right`."""
  scene = next(
    world.make_scene(s)
    for s in range(200)
    if len(world.make_scene(s).things) == 3
  )
  a, b, c = scene.things
  rng = np.random.default_rng(0)
  assert text.cell_swaps(
    text.answer(scene, "describe"), scene
  ) == dict.fromkeys(text.CELL_SWAPS, 0)
  shape = next(x for x in world.SHAPES if x != b.shape)
  sentences = [  # a and c given b's cell before b is named, then b a's
    text._sentence(dataclasses.replace(a, row=b.row, col=b.col), rng),
    text._sentence(dataclasses.replace(c, row=b.row, col=b.col), rng),
    text._sentence(
      dataclasses.replace(b, row=a.row, col=a.col, shape=shape), rng
    ),
  ]
  got = text.cell_swaps("I see three objects. " + " ".join(sentences), scene)
  assert got == {"named_before": 1, "named_after": 2, "rest_right": 2}


def _sentence_in(thing, form: str) -> str:
  """`thing`'s sentence as the generator writes it in `form`."""
  k = next(
    k
    for k in range(100)
    if text.SENTENCE_FORMS[int(np.random.default_rng(k).integers(3))] == form
  )
  return text._sentence(thing, np.random.default_rng(k))


def test_sentence_form_is_the_form_the_generator_drew():
  seen = set()
  for s in range(30):
    for thing in world.make_scene(s).things:
      for k in range(20):
        drawn = int(np.random.default_rng(k).integers(3))
        sentence = text._sentence(thing, np.random.default_rng(k))
        assert text.sentence_form(sentence) == text.SENTENCE_FORMS[drawn]
        seen.add(drawn)
  assert seen == {0, 1, 2}


def test_wrong_cells_by_form_counts_each_form_apart():
  scene = next(
    world.make_scene(s)
    for s in range(200)
    if len(world.make_scene(s).things) == 3
  )
  a, b, c = scene.things
  b_at_a = dataclasses.replace(b, row=a.row, col=a.col)  # b given a's cell
  stranger = next(
    x for x in world.COLOURS if x not in {a.colour, b.colour, c.colour}
  )
  other = dataclasses.replace(c, colour=stranger)  # not in the scene
  answer = " ".join(
    [
      "The clip shows three objects.",
      _sentence_in(a, "cell_first"),
      _sentence_in(b_at_a, "cell_first"),
      _sentence_in(c, "there_is"),
      _sentence_in(other, "object_first"),
    ]
  )
  assert text.wrong_cells_by_form(answer, scene) == {
    "object_first": [0, 0],
    "cell_first": [1, 2],
    "there_is": [0, 1],
  }, answer
  right = text.answer(scene, "describe")
  got = text.wrong_cells_by_form(right, scene)
  assert sum(w for w, _ in got.values()) == 0
  assert sum(n for _, n in got.values()) == 3


def test_wrong_kind_by_form_counts_objects_the_question_leaves_out():
  """In a `moving` answer a static object of the scene counts as the wrong
  kind (in a `still` answer a moving one), by its sentence's form; objects
  not in the scene count for nothing; a true answer has none."""
  scene = next(
    world.make_scene(s)
    for s in range(500)
    if sorted(t.moving for t in world.make_scene(s).things)
    == [False, True, True]
  )
  still = next(t for t in scene.things if not t.moving)
  movers = [t for t in scene.things if t.moving]
  stranger = next(
    x for x in world.COLOURS if x not in {t.colour for t in scene.things}
  )
  other = dataclasses.replace(still, colour=stranger)
  moving_answer = " ".join(
    [
      "Three of the three objects move.",
      _sentence_in(still, "cell_first"),
      _sentence_in(movers[0], "there_is"),
      _sentence_in(movers[1], "cell_first"),
      _sentence_in(other, "cell_first"),
    ]
  )
  assert text.wrong_kind_by_form(moving_answer, scene, "moving") == {
    "object_first": [0, 0],
    "cell_first": [1, 2],
    "there_is": [0, 1],
  }, moving_answer
  assert text.wrong_kind_by_form(moving_answer, scene, "still") == {
    "object_first": [0, 0],
    "cell_first": [1, 2],
    "there_is": [1, 1],
  }
  for qtype in text.FILTERED:
    got = text.wrong_kind_by_form(text.answer(scene, qtype), scene, qtype)
    assert sum(w for w, _ in got.values()) == 0
    assert sum(n for _, n in got.values()) == (2 if qtype == "moving" else 1)
  with pytest.raises(ValueError, match="'describe': expected one of"):
    text.wrong_kind_by_form(moving_answer, scene, "describe")
