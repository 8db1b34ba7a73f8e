"""Writes a split of scenes as a samples file for the dump tool and benchmark.

  python -m tools.scenes.samples --out DIR --split train|val|test --num N
      [--offset K] [--qtypes describe,moving,still,count]

For each of N scenes of the split (seeds from tools/scenes/world.py:SPLITS,
starting K into the split) it writes the clip as 8 PNG frames
(DIR/clips/SEED/frame_T.png, read by the `video_llava` backend as
`{"video": DIR}`), its event frames (DIR/events/SEED.npy, read by the scenes
drafter plugin as `{"events": FILE}`) and one sample line per question type
into DIR/samples.jsonl (docs/PLUGINS.md schema; `seed` and `qtype` are extra
fields the dump tool ignores, kept for scoring answers with
tools/scenes/text.py; `group` is the scene, so that statistics can resample
scenes rather than samples). Rerunning with the same arguments rewrites the same
files.
"""

from __future__ import annotations

import argparse
import sys

from tools.scenes import splits, text, world


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--out", required=True, help="directory to write")
  p.add_argument("--split", required=True, help=f"one of {list(world.SPLITS)}")
  p.add_argument("--num", type=int, required=True, help="number of scenes")
  p.add_argument("--offset", type=int, default=0, help="first scene index")
  p.add_argument(
    "--qtypes", default=",".join(text.QTYPES), help="comma-separated"
  )
  args = p.parse_args(argv)
  qtypes = [q for q in args.qtypes.split(",") if q]
  bad = [q for q in qtypes if q not in text.QTYPES]
  if bad or not qtypes:
    print(
      f"error: --qtypes {args.qtypes!r}: expected some of {list(text.QTYPES)}",
      file=sys.stderr,
    )
    return 2
  if args.num < 1 or args.offset < 0:
    print("error: --num must be >= 1 and --offset >= 0", file=sys.stderr)
    return 2
  try:
    path = splits.write_samples(
      args.out, args.split, args.num, args.offset, qtypes
    )
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
