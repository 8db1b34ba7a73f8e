"""Probes of a trained scenes pair: what its target gets wrong, and why.

  python -m tools.scenes.probe --pair DIR [--split test] [--scenes 100]
      [--device D] [--dtype float16|float32] [--json PATH]

Two probes, through the backends (`video_llava:DIR/target`,
`tools.scenes.drafter:make_backend:DIR`):
  evaluate  make_pair's held-out evaluation on `--scenes` scenes of
            `--split`: accuracy per question type, per attribute, and the
            kinds of wrong cells in `describe` answers (`text.cell_misses`:
            another object's cell is a binding error)
  planted   the target asked `still` as the second turn, after a `describe`
            answer that puts the static objects in cells no object starts
            in: does it answer from the video (the true cells) or copy the
            conversation (the planted ones)?
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch
import tqdm

from egpt_align.data.format import write_json_atomic
from tools.lib import backends as bk
from tools.lib import generation
from tools.scenes import make_pair, models, text, world


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


def planted_ids(prompts: models.Prompts, scene, planted) -> list[int]:
  """Token ids: the `describe` prompt, the answer of `planted`, then the
  `still` question as a later turn (as `training.Batches` packs turns)."""
  tok = prompts.tokenizer
  seed = scene.seed
  return (
    prompts(text.question(seed, "describe"))
    + models.answer_ids(tok, text.answer(planted, "describe"))
    + prompts.follow_up(text.question(seed, "still"))
  )


def planted(target, seeds, max_new_tokens: int) -> dict:
  """{"scenes", "true", "planted"}: scenes asked, `still` answers stating
  the true cells, and those stating the planted ones."""
  prompts = make_pair.target_prompts(target)
  out = {"scenes": 0, "true": 0, "planted": 0}
  for s in tqdm.tqdm(seeds, desc="planted", unit="scene"):
    scene, frames = world.render(s)
    fake = planted_scene(scene)
    if fake is None:
      continue
    inputs = make_pair.target_inputs(target, prompts, "", frames)
    ids = torch.tensor([planted_ids(prompts, scene, fake)])
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    gen = generation.greedy_generate(
      target, target.collate([inputs]), max_new_tokens
    )
    n = int(gen.lengths[0])
    answer = models.decode_answer(target.tokenizer, gen.tokens[0, :n].tolist())
    out["scenes"] += 1
    out["true"] += text.correct(answer, scene, "still")
    out["planted"] += text.correct(answer, fake, "still")
  return out


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
  args = p.parse_args(argv)
  path = os.path.join(args.pair, make_pair.PAIR_FILE)
  if not os.path.isfile(path):
    print(
      f"error: {path}: missing; --pair takes a make_pair directory",
      file=sys.stderr,
    )
    return 2
  if args.scenes < 1:
    print(f"error: --scenes {args.scenes}: expected >= 1", file=sys.stderr)
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
  results = make_pair.evaluate(target, drafter, seeds, args.max_new_tokens)
  print("\n".join(make_pair.accuracy_table(results)))
  print(
    f"{args.split} scenes per type: {len(seeds)}; target mean next-token "
    f"entropy {results['target_mean_entropy_nats']:.3f} nats"
  )
  got = planted(target, seeds, args.max_new_tokens)
  print(
    f"planted: of {got['scenes']} scenes, `still` after a describe answer "
    f"with the static objects moved states the true cells {got['true']} "
    f"times, the planted ones {got['planted']} times"
  )
  if args.json:
    write_json_atomic(
      args.json,
      {
        "pair": args.pair,
        "fingerprint": info.get("fingerprint"),
        "split": args.split,
        "dtype": args.dtype,
        "evaluate": results,
        "planted": got,
      },
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
