"""`python -m balcap.data.capworld --preview out.png`: look at CapWorld examples.

Writes a contact sheet of the first --num examples of --split (images, references, SFT
captions and their flaws) and prints the path written.
"""

from __future__ import annotations

import argparse
import sys

from balcap.data.capworld.generate import CapWorldSpec
from balcap.data.capworld.preview import write_preview


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m balcap.data.capworld", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preview", required=True, metavar="PATH",
                      help="PNG file to write the contact sheet to")
  parser.add_argument("--split", default="train", help="split name (seeds the examples)")
  parser.add_argument("--num", type=int, default=8, help="number of examples")
  parser.add_argument("--seed", type=int, default=0, help="the world's seed")
  parser.add_argument("--size", type=int, default=224,
                      help="image side in pixels, a multiple of 28")
  parser.add_argument("--columns", type=int, default=4, help="examples per row")
  parser.add_argument("--min-objects", type=int, default=1)
  parser.add_argument("--max-objects", type=int, default=6)
  parser.add_argument("--terse-share", type=float, default=0.0,
                      help="share of SFT captions written too short on purpose "
                           "(configs/tiny.py: 0.4, with --max-objects 1)")
  args = parser.parse_args(argv)
  if args.num < 1:
    parser.error("--num must be >= 1")
  try:
    spec = CapWorldSpec(image_sizes=((args.size, args.size),), min_objects=args.min_objects,
                        max_objects=args.max_objects, seed=args.seed,
                        terse_share=args.terse_share)
  except ValueError as error:
    parser.error(str(error))
  print(write_preview(args.preview, spec, args.split, args.num, args.columns))
  return 0


if __name__ == "__main__":
  sys.exit(main())
