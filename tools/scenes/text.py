"""Questions, answers and their parser; the shared tokenizer.

Answers are derived from a scene's ground truth with seeded variation of
wording and order (`answer`); `parse` reads the facts back with the same
grammar, so a model's greedy answer is scored by its facts (`facts`), not by
its exact wording.

Question types:
  describe: every object with colour, shape, start cell and motion;
  moving: the moving objects with direction, speed and start cell;
  still: the static objects with their cells;
  count: how many objects, how many move, and their colours.
"""

from __future__ import annotations

import re

import numpy as np

from tools.scenes import world

QTYPES = ("describe", "moving", "still", "count")
QUESTIONS = {
  "describe": (
    "Describe the scene.",
    "What do you see in this clip?",
    "Describe every object in the video.",
  ),
  "moving": (
    "What is moving in this clip?",
    "Which objects move, and where do they go?",
  ),
  "still": (
    "Which objects stay still?",
    "What does not move in this clip?",
  ),
  "count": (
    "How many objects are there?",
    "Count the objects in the clip.",
  ),
}
NUMBERS = ("none", "one", "two", "three", "four")
STILL_PHRASES = ("stays still", "does not move", "is not moving")
MOVE_PHRASES = ("moves {d} {s}", "is moving {d} {s}", "slides {d} {s}")
# The words that carry an answer's facts, as `parse` reads them back: the
# rest of an answer is wording, which varies by seed.
FACT_WORDS = frozenset(
  (*world.COLOURS, *world.SHAPES, *world.ROWS, *world.COLS)
  + (*world.DIRECTIONS, *world.SPEEDS, *NUMBERS)
)
SPECIAL_TOKENS = (
  "<unk>",
  "<s>",
  "</s>",
  "<pad>",
  "<image>",
  "<video>",
  "<event>",
)
PROMPT_PREFIX = "USER:"
PROMPT_SUFFIX = "ASSISTANT:"


def _rng(seed: int, qtype: str, variant: int) -> np.random.Generator:
  return np.random.default_rng([seed, QTYPES.index(qtype), variant, 11])


def question(seed: int, qtype: str, variant: int = 0) -> str:
  """The question of type `qtype` for scene `seed` (wording seeded)."""
  options = QUESTIONS[qtype]
  return options[int(_rng(seed, qtype, variant).integers(len(options)))]


def _obj(thing: world.Thing, rng, capital: bool = False) -> str:
  art = "the" if rng.random() < 0.5 else "a"
  if capital:
    art = art.capitalize()
  return f"{art} {thing.colour} {thing.shape}"


def _motion(thing: world.Thing, rng) -> str:
  if not thing.moving:
    return STILL_PHRASES[int(rng.integers(len(STILL_PHRASES)))]
  tpl = MOVE_PHRASES[int(rng.integers(len(MOVE_PHRASES)))]
  return tpl.format(d=thing.direction, s=thing.speed)


# The three forms of an object's sentence (`_sentence`), by what comes first:
# the object and then its cell ("A red circle at the top left ..."), the cell
# and then the object at it ("At the top left, a red circle ..."), or
# "There is a red circle at the top left that ...".
SENTENCE_FORMS = ("object_first", "cell_first", "there_is")


def sentence_form(sentence: str) -> str:
  """Which of `SENTENCE_FORMS` an object's sentence is written in (leading
  blanks ignored)."""
  sentence = sentence.lstrip()
  if sentence.startswith("At the "):
    return "cell_first"
  if sentence.startswith("There is "):
    return "there_is"
  return "object_first"


def _sentence(thing: world.Thing, rng) -> str:
  form = int(rng.integers(len(SENTENCE_FORMS)))
  if form == 0:
    return (
      f"{_obj(thing, rng, True)} at the {thing.cell} {_motion(thing, rng)}."
    )
  if form == 1:
    return f"At the {thing.cell}, {_obj(thing, rng)} {_motion(thing, rng)}."
  return (
    f"There is {_obj(thing, rng).split(' ', 1)[1].join(['a ', ''])} at the "
    f"{thing.cell} that {_motion(thing, rng)}."
  )


# Training-only questions about one cell (`cell_question`, `cell_answer`):
# the cell is named by the question, so the model must find the object at a
# place, the lookup a cell-first sentence needs and the one pairs get wrong.
CELL_QUESTIONS = (
  "What is at the {cell}?",
  "Which object is at the {cell}?",
  "What do you see at the {cell}?",
)
CELL_EMPTY = ("Nothing is at the {cell}.", "There is no object at the {cell}.")


def _cell_rng(seed: int, cell: str, variant: int) -> np.random.Generator:
  return np.random.default_rng([seed, world.CELLS.index(cell), variant, 13])


def cell_question(seed: int, cell: str, variant: int = 0) -> str:
  """A question about what starts at `cell` of scene `seed`."""
  i = int(_cell_rng(seed, cell, variant).integers(len(CELL_QUESTIONS)))
  return CELL_QUESTIONS[i].format(cell=cell)


def cell_answer(scene: world.Scene, cell: str, variant: int = 0) -> str:
  """The answer to `cell_question(scene.seed, cell, variant)`: the object
  that starts at `cell` in a cell-first sentence, or that none does."""
  rng = _cell_rng(scene.seed, cell, variant)
  for thing in scene.things:
    if thing.cell == cell:
      return f"At the {cell}, {_obj(thing, rng)} {_motion(thing, rng)}."
  return CELL_EMPTY[int(rng.integers(len(CELL_EMPTY)))].format(cell=cell)


def _count_phrase(n: int, noun: str = "object") -> str:
  return f"{NUMBERS[n]} {noun}{'' if n == 1 else 's'}"


def _colour_list(things) -> str:
  names = [t.colour for t in things]
  if len(names) == 1:
    return names[0]
  return ", ".join(names[:-1]) + " and " + names[-1]


def answer(scene: world.Scene, qtype: str, variant: int = 0) -> str:
  """The answer to `question(scene.seed, qtype, variant)`."""
  rng = _rng(scene.seed, qtype, variant)
  rng.integers(8)  # the question's draw
  things = [scene.things[i] for i in rng.permutation(len(scene.things))]
  n = len(things)
  be = "is" if n == 1 else "are"
  if qtype == "describe":
    intro = (
      f"There {be} {_count_phrase(n)} in this clip.",
      f"I can see {_count_phrase(n)}.",
      f"The clip shows {_count_phrase(n)}.",
    )[int(rng.integers(3))]
    return " ".join([intro] + [_sentence(t, rng) for t in things])
  if qtype in ("moving", "still"):
    keep = [t for t in things if t.moving == (qtype == "moving")]
    if not keep:
      return (
        "Nothing is moving; every object stays where it is."
        if qtype == "moving"
        else "Nothing stays still; every object is moving."
      )
    k = len(keep)
    if n == 1:
      verb = "moves" if qtype == "moving" else "stays still"
      intro = f"The only object {verb}."
    else:
      verb = "moves" if qtype == "moving" else "stays still"
      if k != 1:
        verb = "move" if qtype == "moving" else "stay still"
      intro = f"{NUMBERS[k].capitalize()} of the {_count_phrase(n)} {verb}."
    return " ".join([intro] + [_sentence(t, rng) for t in keep])
  if qtype == "count":
    moving = sum(t.moving for t in things)
    intro = (
      f"There {be} {_count_phrase(n)} in this clip.",
      f"The clip shows {_count_phrase(n)}.",
    )[int(rng.integers(2))]
    still = n - moving
    motion = (
      f"{NUMBERS[moving].capitalize()} {'is' if moving == 1 else 'are'} "
      f"moving and {NUMBERS[still]} {'is' if still == 1 else 'are'} still."
    )
    colours = (
      f"Their colours are {_colour_list(things)}."
      if n > 1
      else f"It is {things[0].colour}."
    )
    return " ".join([intro, motion, colours])
  raise ValueError(f"unknown question type {qtype!r}; expected {QTYPES}")


# --------------------------------------------------------------------------
# Facts and parsing.

_COLOUR_RE = "|".join(world.COLOURS)
_SHAPE_RE = "|".join(world.SHAPES)
_CELLS = sorted(world.CELLS, key=len, reverse=True)  # longest name first
_OBJ = re.compile(rf"\b({_COLOUR_RE}) ({_SHAPE_RE})\b")
_CELL = re.compile(r"\bat the (" + "|".join(_CELLS) + r")\b")
_MOVE = re.compile(r"\b(left|right|up|down) (slowly|quickly)\b")
_STILL = re.compile("|".join(STILL_PHRASES))
_NUM = {w: i for i, w in enumerate(NUMBERS)}


def _thing_fact(thing: world.Thing, qtype: str) -> tuple:
  motion = (thing.direction, thing.speed) if thing.moving else ("still",)
  if qtype == "still":
    return (thing.colour, thing.shape, thing.cell)
  return (thing.colour, thing.shape, thing.cell) + motion


def facts(scene: world.Scene, qtype: str) -> tuple:
  """The ground-truth facts an answer of type `qtype` must state."""
  things = scene.things
  if qtype == "describe":
    return (len(things), frozenset(_thing_fact(t, qtype) for t in things))
  if qtype in ("moving", "still"):
    keep = [t for t in things if t.moving == (qtype == "moving")]
    return (len(keep), frozenset(_thing_fact(t, qtype) for t in keep))
  if qtype == "count":
    return (
      len(things),
      sum(t.moving for t in things),
      frozenset(t.colour for t in things),
    )
  raise ValueError(f"unknown question type {qtype!r}; expected {QTYPES}")


def _sentences(text: str) -> list[str]:
  return [s.strip() for s in re.split(r"(?<=\.)\s+", text.strip()) if s]


def _parse_thing(sentence: str, qtype: str) -> tuple | None:
  sentence = sentence.lower()
  obj, cell = _OBJ.search(sentence), _CELL.search(sentence)
  if obj is None or cell is None:
    return None
  base = (obj.group(1), obj.group(2), cell.group(1))
  if qtype == "still":
    return base
  move = _MOVE.search(sentence)
  if move is not None:
    return base + (move.group(1), move.group(2))
  return base + ("still",) if _STILL.search(sentence) else None


def _numbers(sentence: str) -> list[int]:
  words = re.findall(r"[a-z]+", sentence.lower())
  return [_NUM[w] for w in words if w in _NUM]


def parse(text: str, qtype: str) -> tuple | None:
  """Facts stated by an answer `text` of type `qtype` (None: unparseable)."""
  if qtype not in QTYPES:
    raise ValueError(f"unknown question type {qtype!r}; expected {QTYPES}")
  sents = _sentences(text)
  if not sents:
    return None
  head = _numbers(sents[0])
  if qtype == "count":
    if len(sents) != 3:
      return None
    split = _numbers(sents[1])
    colours = frozenset(re.findall(rf"\b({_COLOUR_RE})\b", sents[2]))
    if len(head) != 1 or len(split) != 2 or sum(split) != head[0]:
      return None
    return (head[0], split[0], colours)
  if sents[0].startswith("Nothing"):
    return (0, frozenset()) if len(sents) == 1 else None
  things = [_parse_thing(s, qtype) for s in sents[1:]]
  if any(t is None for t in things):
    return None
  if qtype == "describe":
    n = head[0] if len(head) == 1 else -1
  elif sents[0].startswith("The only object"):
    n = len(things) if len(things) == 1 else -1
  else:
    n = head[0] if head and head[0] == len(things) else -1
  return (n, frozenset(things))


def correct(text: str, scene: world.Scene, qtype: str) -> bool:
  """Whether answer `text` states exactly the scene's facts."""
  return parse(text, qtype) == facts(scene, qtype)


# Partial scores: facts an event camera can see. `moving/motion`: the start
# cell, direction and speed of every moving object (colour and shape
# ignored); `still/cells`: the start cells of the static objects.
PARTIAL = {"moving": ("motion", (2, 3, 4)), "still": ("cells", (2,))}


def _project(stated: tuple | None, fields) -> tuple | None:
  if stated is None:
    return None
  n, things = stated
  # A field the statement lacks (motion of an object called still) is "".
  return n, sorted(
    tuple(t[i] if i < len(t) else "" for i in fields) for t in things
  )


def partial_correct(text: str, scene: world.Scene, qtype: str) -> bool:
  """Whether `text` gets the PARTIAL facts of `qtype` right."""
  fields = PARTIAL[qtype][1]
  got = _project(parse(text, qtype), fields)
  return got is not None and got == _project(facts(scene, qtype), fields)


def _by_colour(text: str) -> dict[str, tuple]:
  """The objects a `describe` answer states, by colour ({} unparseable)."""
  stated = parse(text, "describe")
  return {t[0]: t for t in stated[1]} if stated else {}


# Per-attribute scores of a `describe` answer: which facts a model gets
# right object by object, where `correct` only says whether all are.
ATTRIBUTES = ("colour", "shape", "cell", "motion", "speed")


def attribute_hits(text: str, scene: world.Scene) -> dict[str, tuple[int, int]]:
  """{attribute: (right, asked)} over the scene's objects for a `describe`
  answer. Objects are matched by colour (unique within a scene): `colour`
  counts the true colours the answer names; the others count, for matched
  objects, the right shape, start cell, motion (still, or the direction)
  and speed (moving objects only); an unmatched object or an unparseable
  answer gets nothing right."""
  said = _by_colour(text)
  hits = dict.fromkeys(ATTRIBUTES, 0)
  asked = dict.fromkeys(ATTRIBUTES, 0)
  for thing in scene.things:
    true = _thing_fact(thing, "describe")
    got = said.get(thing.colour)
    fields = {"colour": 0, "shape": 1, "cell": 2, "motion": 3}
    if thing.moving:
      fields["speed"] = 4
    for name, i in fields.items():
      asked[name] += 1
      hits[name] += got is not None and len(got) > i and got[i] == true[i]
  return {name: (hits[name], asked[name]) for name in ATTRIBUTES}


def _object_sentences(text: str):
  """(sentence match, object match, cell match) of each sentence of an
  answer that names an object and a cell."""
  for sentence in re.finditer(r"[^.]+\.?", text):
    low = sentence.group().lower()
    obj, cell = _OBJ.search(low), _CELL.search(low)
    if obj is not None and cell is not None:
      yield sentence, obj, cell


def stated_cells(text: str) -> list[tuple[str, str, int]]:
  """(colour, cell, offset) of each object sentence of an answer that names
  an object and a cell: the offset is where the cell's name starts in
  `text` (what a model had to produce next, there)."""
  return [
    (obj.group(1), cell.group(1), sentence.start() + cell.start(1))
    for sentence, obj, cell in _object_sentences(text)
  ]


def _by_form(text: str, scene: world.Scene, wrong) -> dict[str, list]:
  """{form: [wrong, stated]} over the sentences of an answer that name an
  object of the scene (by colour) and a cell, by `sentence_form`;
  `wrong(thing, cell)` says whether such a sentence counts as wrong."""
  things = {thing.colour: thing for thing in scene.things}
  out = {form: [0, 0] for form in SENTENCE_FORMS}
  for sentence, obj, cell in _object_sentences(text):
    thing = things.get(obj.group(1))
    if thing is not None:
      got = out[sentence_form(sentence.group())]
      got[0] += wrong(thing, cell.group(1))
      got[1] += 1
  return out


def wrong_cells_by_form(text: str, scene: world.Scene) -> dict[str, list]:
  """{form: [wrong, stated]} over the sentences of an answer that name an
  object of the scene (by colour) and a cell, by `sentence_form`: how often
  the cell is not that object's start cell. Finding an object's cell
  (object first) and the object at a cell (cell first) are two lookups a
  model can learn apart."""
  return _by_form(text, scene, lambda thing, cell: cell != thing.cell)


# Question types whose answers name only some of the objects: `moving` the
# moving ones, `still` the static ones (`wrong_kind_by_form`).
FILTERED = ("moving", "still")


def wrong_kind_by_form(text: str, scene: world.Scene, qtype: str) -> dict:
  """{form: [wrong kind, stated]} over the sentences of a `moving` or
  `still` answer that name an object of the scene (by colour) and a cell,
  by `sentence_form`: how often the object is of the kind the question
  leaves out (a static one in a `moving` answer, a moving one in a `still`
  answer), whatever the sentence says of it."""
  if qtype not in FILTERED:
    raise ValueError(f"question type {qtype!r}: expected one of {FILTERED}")
  wanted = qtype == "moving"
  return _by_form(text, scene, lambda thing, _: thing.moving != wanted)


# Kinds of a wrong or missing cell in a `describe` answer (`cell_misses`).
CELL_MISSES = ("other_object", "elsewhere", "unstated")


def cell_misses(text: str, scene: world.Scene) -> dict[str, int]:
  """{kind: objects} over the scene's objects whose start cell a `describe`
  answer does not state right: `other_object`, the cell of another object
  of the scene (a binding error: what and where seen, paired up wrongly);
  `elsewhere`, a cell no object starts in; `unstated`, the object (matched
  by colour) not stated, or the answer unparseable."""
  said = _by_colour(text)
  cells = {thing.cell for thing in scene.things}
  out = dict.fromkeys(CELL_MISSES, 0)
  for thing in scene.things:
    got = said.get(thing.colour)
    if got is None:
      out["unstated"] += 1
    elif got[2] != thing.cell:
      out["other_object" if got[2] in cells else "elsewhere"] += 1
  return out


# Sentences of an answer that give an object another object's start cell
# (`cell_swaps`): whose cell it is, and whether the rest is right.
CELL_SWAPS = ("named_before", "named_after", "rest_right")


def cell_swaps(text: str, scene: world.Scene) -> dict[str, int]:
  """Over the sentences of an answer that give an object of the scene
  (matched by colour) the start cell of another: `named_before`, the
  other is named in an earlier sentence; `named_after`, in a later one or
  not at all; `rest_right`, those sentences whose shape and motion are the
  named object's own (only the cell is wrong)."""
  by_colour = {thing.colour: thing for thing in scene.things}
  by_cell = {thing.cell: thing for thing in scene.things}
  out = dict.fromkeys(CELL_SWAPS, 0)
  named = set()
  for sentence, obj, cell in _object_sentences(text):
    thing, other = by_colour.get(obj.group(1)), by_cell.get(cell.group(1))
    if thing is not None and other is not None and other is not thing:
      out["named_before" if other.colour in named else "named_after"] += 1
      got = _parse_thing(sentence.group(), "describe")
      true = _thing_fact(thing, "describe")
      if got is not None:
        out["rest_right"] += got[:2] + got[3:] == true[:2] + true[3:]
    named.add(obj.group(1))
  return out


# --------------------------------------------------------------------------
# Prompts and the tokenizer.


def prompt(question_text: str, media_token: str) -> str:
  """The text prompt, with one media placeholder (the real pair's form)."""
  return f"{PROMPT_PREFIX} {media_token}\n{question_text} {PROMPT_SUFFIX}"


def corpus(seeds, variants: int = 2):
  """Training text for the tokenizer: questions, answers, prompts."""
  for seed in seeds:
    scene = world.make_scene(seed)
    for qtype in QTYPES:
      for v in range(variants):
        yield prompt(question(seed, qtype, v), "<video>")
        yield " " + answer(scene, qtype, v)


def train_tokenizer(seeds, vocab_size: int):
  """A byte-level BPE tokenizer trained on `corpus(seeds)`, HF-wrapped.

  Llama's conventions: `<s>` is prepended, `</s>` ends answers, `<pad>`
  pads; `<video>` / `<event>` are the media placeholders.
  """
  from tokenizers import (
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
  )
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(corpus(seeds), trainer=trainer)
  bos = tok.token_to_id("<s>")
  tok.post_processor = processors.TemplateProcessing(
    single="<s> $A", special_tokens=[("<s>", bos)]
  )
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token="<s>",
    eos_token="</s>",
    unk_token="<unk>",
    pad_token="<pad>",
    additional_special_tokens=["<image>", "<video>", "<event>"],
    clean_up_tokenization_spaces=False,
  )
  return fast
