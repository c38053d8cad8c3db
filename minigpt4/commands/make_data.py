"""`python -m minigpt4 make-data <set>`: generate the offline data sets from synthetic scenes.

`make-data train` writes what the tiny training configs read (see minigpt4/data/make.py).
`make-data eval` writes the offline eval set (see minigpt4/eval/evalset.py) to data/eval/.
`make-data lite` writes the lite projection's training data (see minigpt4/lite/data.py).
`make-data lite-teach` writes the teacher-answered open instructions (see minigpt4/lite/teach.py).
`make-data lite-mix` puts several stage-2 sets into one, with its features (see minigpt4/lite/mix.py).
Every file is written to a temporary name and renamed, so an interrupted run leaves no half file.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from minigpt4.commands.common import HelpFormatter
from minigpt4.data.make import write_cc_sbu_align, write_shards
from minigpt4.eval.evalset import write_eval_set
from minigpt4.lite.data import add_parser as add_lite_parser
from minigpt4.lite.mix import add_parser as add_mix_parser
from minigpt4.lite.teach import add_parser as add_teach_parser


def make_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    rng = random.Random(args.seed)
    write_shards(out / "stage1" / "shapes", rng, args.shards, args.per_shard, args.size, "json")
    write_shards(out / "stage1" / "shapes_txt", rng, 2, args.per_shard, args.size, "txt")
    write_cc_sbu_align(out / "cc_sbu_align", rng, args.stage2, args.size)
    print(f"wrote the training sets under {out}")
    return 0


def make_eval(args: argparse.Namespace) -> int:
    try:
        counts = write_eval_set(
            Path(args.out), n_scenes=args.scenes, seed=args.seed, photos=not args.no_photos
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote the eval set under {args.out}: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter, prog="python -m minigpt4 make-data", description=__doc__.split("\n")[0]
    )
    sets = parser.add_subparsers(dest="set", required=True, metavar="SET")
    train = sets.add_parser(
        "train", formatter_class=HelpFormatter, help="tiny stage-1 shards and a stage-2 cc_sbu_align folder"
    )
    train.add_argument("--out", default="data/tiny", help="output folder (default: data/tiny)")
    train.add_argument("--seed", type=int, default=0, help="random seed of the generated set")
    train.add_argument("--shards", type=int, default=4, help="shards of the main stage-1 source")
    train.add_argument("--per-shard", type=int, default=32, help="samples per stage-1 shard")
    train.add_argument("--stage2", type=int, default=48, help="stage-2 image/description pairs")
    train.add_argument("--size", type=int, default=224, help="image side in pixels")
    train.set_defaults(run=make_train)
    evalset = sets.add_parser(
        "eval",
        formatter_class=HelpFormatter,
        help="caption, VQA and POPE files over rendered scenes and real photos",
    )
    evalset.add_argument("--out", default="data/eval", help="output folder (default: data/eval)")
    evalset.add_argument("--seed", type=int, default=0, help="random seed of the generated set")
    evalset.add_argument("--scenes", type=int, default=24, help="rendered scenes (default: 24)")
    evalset.add_argument("--no-photos", action="store_true", help="leave out scikit-image's photos")
    evalset.set_defaults(run=make_eval)
    add_lite_parser(sets)
    add_teach_parser(sets)
    add_mix_parser(sets)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Generate an offline data set; see `make-data --help`."""
    args = build_parser().parse_args(argv)
    return args.run(args)
