"""Probes of a trained scenes pair: what its target gets wrong, and why.

  python -m tools.scenes.probe --pair DIR [--split test] [--scenes 100]
      [--probes evaluate,attention,readout,planted,tower] [--device D]
      [--dtype float16|float32] [--json PATH]

Five probes (`--probes` picks some; all by default), through the backends
(`video_llava:DIR/target`, `tools.scenes.drafter:make_backend:DIR`):
  evaluate  make_pair's held-out evaluation on `--scenes` scenes of
            `--split`: accuracy per question type, per attribute, the
            kinds of wrong cells in `describe` answers (`text.cell_misses`:
            another object's cell is a binding error), whose cell such a
            sentence gives and whether the rest of it is right
            (`text.cell_swaps`), and the wrong cells by sentence form
            (`text.wrong_cells_by_form`: the object named before its cell,
            or the cell before the object at it); in `moving` and `still`
            answers, objects of the kind the question leaves out, by
            sentence form (`text.wrong_kind_by_form`)
  attention where the target looks when it names an object's cell: in each
            layer, the share of the best head's attention on the object's
            first-frame patches (its start cell), its last-frame patches
            and the other objects' (`cell_attention`)
  planted   the target asked `still` as the second turn, after a `describe`
            answer that puts the static objects in cells no object starts
            in: does it answer from the video (the true cells) or copy the
            conversation (the planted ones)?
  readout   how well an object's start cell and its shape can be read
            linearly from its first-frame tokens at each stage: the vision
            tower's layers, the projector's output (the language model's
            input), the language model's layers (a ridge read-out fit on
            the next `--scenes` scenes of the split, `readout`)
  tower     the vision tower's health on the clips' first frames: per
            layer, each head's attention entropy and share on the class
            token, and the patch tokens' common part against their spread
            (tools/scenes/tower.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import torch
import tqdm

from egpt_align.data.format import write_json_atomic
from tools.lib import backends as bk
from tools.lib import generation
from tools.scenes import pair as pair_lib
from tools.scenes import text, token_ids, world
from tools.scenes import tower as tower_lib


def planted_scene(scene: world.Scene) -> world.Scene | None:
  """`scene` with each static object moved to a cell no object starts in
  (at most 3 objects of 9 cells: there is always room); None when no
  object is static."""
  if all(t.moving for t in scene.things):
    return None
  taken = {(t.row, t.col) for t in scene.things}
  free = [divmod(k, 3) for k in range(9) if divmod(k, 3) not in taken]
  things = []
  for thing in scene.things:
    if not thing.moving:
      row, col = free.pop(0)
      thing = dataclasses.replace(thing, row=row, col=col)
    things.append(thing)
  return dataclasses.replace(scene, things=tuple(things))


def planted_ids(prompts: token_ids.Prompts, scene, planted) -> list[int]:
  """Token ids: the `describe` prompt, the answer of `planted`, then the
  `still` question as a later turn (as `train_data.Batches` packs turns)."""
  tok = prompts.tokenizer
  seed = scene.seed
  return (
    prompts(text.question(seed, "describe"))
    + token_ids.answer_ids(tok, text.answer(planted, "describe"))
    + prompts.follow_up(text.question(seed, "still"))
  )


def planted(target, seeds, max_new_tokens: int) -> dict:
  """{"scenes", "true", "planted"}: scenes asked, `still` answers stating
  the true cells, and those stating the planted ones."""
  prompts = pair_lib.target_prompts(target)
  out = {"scenes": 0, "true": 0, "planted": 0}
  for s in tqdm.tqdm(seeds, desc="planted", unit="scene"):
    scene, frames = world.render(s)
    fake = planted_scene(scene)
    if fake is None:
      continue
    ids = planted_ids(prompts, scene, fake)
    inputs = pair_lib.target_inputs(target, prompts, None, frames, ids)
    gen = generation.greedy_generate(
      target, target.collate([inputs]), max_new_tokens
    )
    n = int(gen.lengths[0])
    answer = token_ids.decode_answer(
      target.tokenizer, gen.tokens[0, :n].tolist()
    )
    out["scenes"] += 1
    out["true"] += text.correct(answer, scene, "still")
    out["planted"] += text.correct(answer, fake, "still")
  return out


def cell_tokens(tokenizer, ids) -> list[tuple[str, str, int]]:
  """(colour, cell, k) of each object sentence of the answer `ids`: token
  k starts the cell's name (`text.stated_cells`), so the position before
  it is where the model chose the cell."""
  ends = [len(tokenizer.decode(ids[:i])) for i in range(len(ids) + 1)]
  out = []
  for colour, cell, offset in text.stated_cells(tokenizer.decode(ids)):
    k = next(i for i in range(len(ids)) if ends[i] <= offset < ends[i + 1])
    out.append((colour, cell, k))
  return out


def object_tokens(thing, frame: int, side: int, first: int) -> list[int]:
  """Sequence positions of the visual tokens of the patches `thing`
  covers in `frame`: the clip's tokens start at `first`, each frame's are
  its CLS token then side x side patches row by row."""
  patch = world.SIZE // side
  covered = world.mask(thing, frame).reshape(side, patch, side, patch)
  hits = np.flatnonzero(covered.any(axis=(1, 3)))
  return [first + frame * (side * side + 1) + 1 + int(i) for i in hits]


@torch.inference_mode()
def cell_attention(target, seeds, max_new_tokens: int) -> dict:
  """Where the target looks when it names an object's cell in a `describe`
  answer (its own greedy one), over the scenes of `seeds` with two or more
  objects. Per stated object, at the position that chose the cell, in each
  layer the head that gives the object's patches in the first frame (the
  start cell) the most attention: its share on them, on the object's
  patches in every frame, and on the other objects' first-frame patches.

  Returns {"right"|"wrong": {"objects", "own" [frames][layers],
  "others_first" [layers]}}, means over the objects whose stated cell is
  right or wrong.
  """
  model = target.model
  prompts = pair_lib.target_prompts(target)
  first, _ = prompts.media_span()
  vision = model.config.vision_config
  side = vision.image_size // vision.patch_size
  layers = model.config.text_config.num_hidden_layers
  frames_n = world.NUM_FRAMES
  pick = torch.arange(layers)
  sums = {
    k: {
      "objects": 0,
      "own": np.zeros((frames_n, layers)),
      "others_first": np.zeros(layers),
    }
    for k in ("right", "wrong")
  }
  previous = model.config._attn_implementation
  model.set_attn_implementation("eager")  # the only one that returns them
  try:
    for s in tqdm.tqdm(seeds, desc="cell attention", unit="scene"):
      scene, frames = world.render(s)
      if len(scene.things) < 2:
        continue
      inputs = pair_lib.target_inputs(
        target, prompts, text.question(s, "describe"), frames
      )
      gen = generation.greedy_generate(
        target, target.collate([inputs]), max_new_tokens
      )
      answer = gen.tokens[0, : int(gen.lengths[0])].tolist()
      prompt = inputs["input_ids"][0].tolist()
      ids = torch.tensor([prompt + answer], device=target.device)
      out = model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values_videos=inputs["pixel_values_videos"].to(target.device),
        output_attentions=True,
      )
      att = torch.stack([a[0].float() for a in out.attentions])  # L,H,T,T
      things = {t.colour: t for t in scene.things}
      for colour, cell, k in cell_tokens(target.tokenizer, answer):
        thing = things.get(colour)
        if thing is None or k == 0:
          continue
        rows = att[:, :, len(prompt) + k - 1]  # [L, H, T]
        own = [
          rows[..., object_tokens(thing, f, side, first)].sum(-1)
          for f in range(frames_n)
        ]  # each [L, H]
        best = own[0].argmax(-1)  # per layer
        others = [
          p
          for t in scene.things
          if t is not thing
          for p in object_tokens(t, 0, side, first)
        ]
        got = sums["right" if cell == thing.cell else "wrong"]
        got["objects"] += 1
        got["own"] += torch.stack([o[pick, best] for o in own]).cpu().numpy()
        got["others_first"] += (
          rows[..., others].sum(-1)[pick, best].cpu().numpy()
        )
  finally:
    model.set_attn_implementation(previous)
  return {
    k: {
      "objects": v["objects"],
      "own": (v["own"] / max(v["objects"], 1)).round(4).tolist(),
      "others_first": (v["others_first"] / max(v["objects"], 1))
      .round(4)
      .tolist(),
    }
    for k, v in sums.items()
  }


RIDGE = 10.0  # the read-out's penalty, on standardised features


def ridge_accuracy(x_fit, y_fit, x_eval, y_eval, classes: int) -> float:
  """Accuracy on (x_eval, y_eval) of a ridge read-out of one-hot labels
  fit on (x_fit, y_fit), features standardised on the fit set."""
  mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6

  def design(x):
    return np.hstack([(x - mu) / sd, np.ones((len(x), 1))])

  a = design(x_fit)
  w = np.linalg.solve(
    a.T @ a + RIDGE * np.eye(a.shape[1]), a.T @ np.eye(classes)[y_fit]
  )
  return float(((design(x_eval) @ w).argmax(1) == y_eval).mean())


# What `readout` reads from an object's tokens: a label's classes.
ATTRIBUTES = {"cell": world.CELLS, "shape": world.SHAPES}
PROBES = ("evaluate", "attention", "readout", "planted", "tower")


@torch.inference_mode()
def object_features(target, seeds):
  """Per object of the scenes `seeds`, the mean of its first-frame patch
  tokens at each stage of the target: the vision tower's embeddings and
  each of its layers (`tower`), then the language model's input (the
  projector's output) and each of its layers (`lm`), the clip asked
  `describe`. Returns ({"tower": [stage][objects, dim], "lm": ...},
  {attribute: [objects] class indices} for each of `ATTRIBUTES`)."""
  model = target.model
  prompts = pair_lib.target_prompts(target)
  first, _ = prompts.media_span()
  vision = model.config.vision_config
  side = vision.image_size // vision.patch_size
  feats, labels = {"tower": [], "lm": []}, {k: [] for k in ATTRIBUTES}
  for s in seeds:
    scene, frames = world.render(s)
    inputs = pair_lib.target_inputs(
      target, prompts, text.question(s, "describe"), frames
    )
    pix = inputs["pixel_values_videos"].to(target.device)
    out = model(
      input_ids=inputs["input_ids"].to(target.device),
      pixel_values_videos=pix,
      output_hidden_states=True,
    )
    tower = model.model.video_tower(pix[0, :1], output_hidden_states=True)
    for thing in scene.things:
      seq = object_tokens(thing, 0, side, first)
      own = object_tokens(thing, 0, side, 0)  # in frame 0's own tokens
      feats["tower"].append([h[0, own].mean(0) for h in tower.hidden_states])
      feats["lm"].append([h[0, seq].mean(0) for h in out.hidden_states])
      for k, classes in ATTRIBUTES.items():
        labels[k].append(classes.index(getattr(thing, k)))
  stacked = {
    k: [
      torch.stack(stage).float().cpu().numpy() for stage in zip(*v, strict=True)
    ]
    for k, v in feats.items()
  }
  return stacked, {k: np.array(v) for k, v in labels.items()}


def readout(target, fit_seeds, eval_seeds) -> dict:
  """How well each of `ATTRIBUTES` (an object's start cell, its shape)
  can be read linearly from its first-frame tokens, stage by stage
  (`object_features`): a ridge read-out fit on the objects of `fit_seeds`,
  its accuracy on those of `eval_seeds`. {attribute: {"tower":
  [embeddings, layer 1, ...], "lm": [input, layer 1, ...]}, "objects":
  [fit, eval]}."""
  fit, y_fit = object_features(target, fit_seeds)
  got, y_eval = object_features(target, eval_seeds)
  out = {
    name: {
      k: [
        round(ridge_accuracy(a, y_fit[name], b, y_eval[name], len(classes)), 4)
        for a, b in zip(fit[k], got[k], strict=True)
      ]
      for k in fit
    }
    for name, classes in ATTRIBUTES.items()
  }
  out["objects"] = [len(y_fit["cell"]), len(y_eval["cell"])]
  return out


def readout_lines(got: dict) -> list[str]:
  fit, scored = got["objects"]
  lines = [
    f"read linearly from an object's first-frame tokens (ridge, fit on "
    f"{fit} objects, scored on {scored}):"
  ]
  for name in ATTRIBUTES:
    lines += [
      f"  {name}: vision tower (embeddings, layers 1..) "
      + " ".join(f"{x:.2f}" for x in got[name]["tower"]),
      f"  {name}: language model (input, layers 1..)   "
      + " ".join(f"{x:.2f}" for x in got[name]["lm"]),
    ]
  return lines


def attention_lines(got: dict) -> list[str]:
  lines = ["cell attention (best head per layer, share of its attention):"]
  for kind, v in got.items():
    if not v["objects"]:
      continue
    lines.append(f"  cell {kind} ({v['objects']} objects), layers 1..:")
    rows = [
      ("first frame, own", v["own"][0]),
      ("last frame, own", v["own"][-1]),
      ("first frame, others", v["others_first"]),
    ]
    for name, vals in rows:
      lines.append(f"    {name:20s} " + " ".join(f"{x:.2f}" for x in vals))
  return lines


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--pair", required=True, help="pair directory (make_pair)")
  p.add_argument("--split", default="test", choices=list(world.SPLITS))
  p.add_argument("--scenes", type=int, default=100, help="scenes per probe")
  p.add_argument("--device", default=None, help="default: cuda if present")
  p.add_argument("--dtype", default="float32", choices=["float16", "float32"])
  p.add_argument("--max_new_tokens", type=int, default=96)
  p.add_argument("--json", default=None, help="write the results here")
  p.add_argument(
    "--probes",
    default=",".join(PROBES),
    help=f"which probes to run, comma-separated (default: all of {PROBES})",
  )
  args = p.parse_args(argv)
  path = os.path.join(args.pair, pair_lib.PAIR_FILE)
  if not os.path.isfile(path):
    print(
      f"error: {path}: missing; --pair takes a make_pair directory",
      file=sys.stderr,
    )
    return 2
  if args.scenes < 1:
    print(f"error: --scenes {args.scenes}: expected >= 1", file=sys.stderr)
    return 2
  chosen = [x for x in args.probes.split(",") if x]
  unknown = [x for x in chosen if x not in PROBES]
  if unknown or not chosen:
    print(
      f"error: --probes {args.probes}: expected some of {', '.join(PROBES)}",
      file=sys.stderr,
    )
    return 2
  device = bk.torch_device(args.device)
  try:
    target = bk.load_backend(
      f"video_llava:{args.pair}/target", device=device, dtype=args.dtype
    )
    drafter = bk.load_backend(
      f"tools.scenes.drafter:make_backend:{args.pair}",
      device=device,
      dtype=args.dtype,
    )
  except (FileNotFoundError, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  seeds = world.split_seeds(args.split, args.scenes)
  with open(path) as f:
    info = json.load(f)
  got = {}
  if "evaluate" in chosen:
    got["evaluate"] = pair_lib.evaluate(
      target, drafter, seeds, args.max_new_tokens
    )
    print("\n".join(pair_lib.accuracy_table(got["evaluate"])))
    entropy = got["evaluate"]["target_mean_entropy_nats"]
    print(
      f"{args.split} scenes per type: {len(seeds)}; target mean next-token "
      f"entropy {entropy:.3f} nats"
    )
  if "attention" in chosen:
    got["cell_attention"] = cell_attention(target, seeds, args.max_new_tokens)
    print("\n".join(attention_lines(got["cell_attention"])))
  if "readout" in chosen:
    fit_seeds = world.split_seeds(args.split, args.scenes, offset=args.scenes)
    got["readout"] = readout(target, fit_seeds, seeds)
    print("\n".join(readout_lines(got["readout"])))
  if "planted" in chosen:
    got["planted"] = planted(target, seeds, args.max_new_tokens)
    print(
      f"planted: of {got['planted']['scenes']} scenes, `still` after a "
      "describe answer with the static objects moved states the true cells "
      f"{got['planted']['true']} times, the planted ones "
      f"{got['planted']['planted']} times"
    )
  if "tower" in chosen:
    clips = np.stack([world.render(s)[1] for s in seeds])
    got["tower"] = tower_lib.health(
      target.model.model.video_tower, tower_lib.first_frames(clips)
    )
    print("\n".join(tower_lib.lines(got["tower"])))
  if args.json:
    write_json_atomic(
      args.json,
      {
        "pair": args.pair,
        "fingerprint": info.get("fingerprint"),
        "split": args.split,
        "dtype": args.dtype,
        **got,
      },
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
